"""Liveness, readiness and metrics: the routes that need no API key."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from image_gen.api.deps import Service
from image_gen.metrics import CONTENT_TYPE

router = APIRouter(tags=["health"])


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ready", "not ready"]
    checks: dict[str, str]


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """The process answers."""
    return Health()


@router.get(
    "/readyz", response_model=Readiness, responses={503: {"model": Readiness, "description": "not ready"}}
)
def readyz(service: Service) -> JSONResponse:
    """Ready when the store answers and a model is registered whose folder loads (configs read, no weights)."""
    checks = {}
    try:
        list(service.store.list("jobs/", limit=1))
        checks["store"] = "ok"
    except Exception as error:
        checks["store"] = f"unreachable: {error}"
    try:
        service.model()
        checks["model"] = "ok"
    except Exception as error:
        checks["model"] = str(error)
    ready = all(value == "ok" for value in checks.values())
    body = Readiness(status="ready" if ready else "not ready", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format 0.0.4"}},
)
def metrics(request: Request) -> Response:
    """Prometheus metrics of this process (requests, latency, jobs, generation time, queue depth)."""
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)
