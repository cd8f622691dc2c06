"""The one place where exceptions and refused requests become HTTP responses, all in OpenAI's error shape:
`{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

import logging
import math
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from image_gen.errors import ImageGenError
from image_gen.limits import RateLimited
from storage.objects import StorageError

log = logging.getLogger("image_gen.api")

STATUS_BY_CODE = {
    "not_found": 404,
    "model_not_found": 404,
    "invalid_api_key": 401,
    "missing_api_key": 401,
    "rate_limit_exceeded": 429,
    "concurrency_limit_exceeded": 429,
    "request_too_large": 413,
    "conflict": 409,
    "canceled": 409,
    "storage_error": 503,
    "model_load_failed": 503,
    "generation_failed": 500,
    "internal_error": 500,
    "timeout": 504,
    # the arena (docs/arena.md)
    "missing_voter": 400,
    "invalid_voter": 403,
    "invalid_battle_token": 403,
    "battle_expired": 410,
    "already_voted": 409,
    "battle_not_ready": 409,
    "battle_failed": 409,
    "vote_too_early": 429,
    "vote_limit_exceeded": 429,
    "arena_unavailable": 503,
}
TYPE_BY_STATUS = {401: "authentication_error", 429: "rate_limit_error"}

# Engine parameter names -> the API's field names.
API_PARAMS = {"width": "size", "height": "size", "num_images": "n"}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# Declared on every API route: FastAPI then documents no 422 (we answer 400), and clients and fuzzers know the shape.
ERROR_RESPONSES: dict[int | str, dict] = {
    "4XX": {"model": ErrorResponse, "description": "OpenAI-shaped error"}
}


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    kind = TYPE_BY_STATUS.get(status, "invalid_request_error" if status < 500 else "server_error")
    return JSONResponse(error_body(message, kind, param, code), status_code=status, headers=headers)


def _validation_message(error: dict) -> tuple[str | None, str]:
    location = [str(part) for part in error.get("loc", ())]
    param = ".".join(location[1:]) or None
    if error.get("type") == "extra_forbidden":
        return param, f"unknown field {param!r}: see the request schema at /docs"
    if error.get("type") == "json_invalid":
        return None, "the body is not valid JSON"
    message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    return param, f"{param or 'request'}: {message}"


def install(app: FastAPI) -> None:
    @app.exception_handler(ImageGenError)
    async def _app_error(request: Request, error: ImageGenError) -> JSONResponse:
        status = STATUS_BY_CODE.get(error.code, 400)
        param = API_PARAMS.get(error.param, error.param) if error.param else None
        headers = None
        if isinstance(error, RateLimited):
            headers = {"Retry-After": str(max(1, math.ceil(error.retry_after)))}
            request.app.state.metrics.rejected.inc(reason=error.code)
        elif status == 401:
            headers = {"WWW-Authenticate": 'Bearer realm="image-gen"'}
        if status >= 500:
            log.warning("%s %s: %s", request.method, request.url.path, error.message)
        return error_response(status, error.message, param, error.code, headers)

    @app.exception_handler(StorageError)
    async def _storage_error(request: Request, error: StorageError) -> JSONResponse:
        log.warning("%s %s: store error: %s", request.method, request.url.path, error)
        return error_response(503, f"the store is unavailable: {error}", None, "storage_error")

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
        param, message = _validation_message(error.errors()[0])
        return error_response(400, message, param, "invalid_value")

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, error: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        return error_response(
            error.status_code, str(error.detail), None, code, getattr(error, "headers", None)
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=error)
        return error_response(500, "internal error: the server log has the details", None, "internal_error")


API_PREFIXES = ("/v1/", "/sdapi/")


class _Unmatched:
    """The ASGI endpoint of what no API route takes: 405 with `Allow` for a documented path, else 404. (An ASGI
    endpoint rather than a function, so that Starlette routes every method to it, QUERY and TRACE included.)"""

    def __init__(self, paths: dict[str, set[str]]) -> None:
        self.literal = {path: methods for path, methods in paths.items() if "{" not in path}
        self.templates = [
            (re.compile("^" + re.sub(r"\\{[^}]+\\}", "[^/]+", re.escape(path)) + "$"), methods)
            for path, methods in paths.items()
            if "{" in path
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path, method = scope["path"], scope["method"]
        allowed = self.literal.get(path) or {
            m for pattern, methods in self.templates if pattern.match(path) for m in methods
        }
        if not allowed:
            response = error_response(404, f"no route {path}", None, "not_found")
        else:
            methods = ", ".join(sorted(allowed))
            response = error_response(
                405,
                f"{method} is not allowed here: use {methods}",
                None,
                "method_not_allowed",
                {"Allow": methods},
            )
        await response(scope, receive, send)


def install_fallback(app: FastAPI) -> None:
    """After every route is added: a documented path asked with another method gets 405 with an `Allow` naming
    every method of the path (Starlette names only its first route's), an unknown path under /v1/ or /sdapi/ gets
    404; neither falls through to the studio mounted at `/`."""
    paths = {path: {method.upper() for method in item} for path, item in app.openapi()["paths"].items()}
    endpoint = _Unmatched(paths)
    for path in [*endpoint.literal, *(prefix + "{rest:path}" for prefix in API_PREFIXES)]:
        app.router.routes.append(Route(path, endpoint, include_in_schema=False))


class BodySizeLimit:
    """ASGI middleware: refuse API request bodies over `max_bytes` with 413 before the app reads them, whether
    the client declares the length or streams chunks. The studio's paths are left alone."""

    def __init__(self, app: ASGIApp, max_bytes: int, prefixes: tuple[str, ...] = API_PREFIXES) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.prefixes = prefixes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.prefixes):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._refuse(scope, receive, send)
            return
        chunks: list[bytes] = []
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(
            413,
            f"request body is larger than {self.max_bytes} bytes",
            None,
            "request_too_large",
            {"Connection": "close"},
        )
        await response(scope, receive, send)
