"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from image_gen.api.deps import Service

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz")
def readyz(service: Service) -> JSONResponse:
    """Ready when the store answers and at least one model is registered."""
    checks = {}
    try:
        list(service.store.list("jobs/", limit=1))
        checks["store"] = "ok"
    except Exception as error:
        checks["store"] = f"unreachable: {error}"
    checks["models"] = "ok" if service.models() else "no model registered"
    ready = all(value == "ok" for value in checks.values())
    return JSONResponse(
        {"status": "ready" if ready else "not ready", "checks": checks}, status_code=200 if ready else 503
    )
