"""The one place where exceptions become HTTP responses, all in OpenAI's error shape."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from image_gen.errors import ImageGenError

STATUS_BY_CODE = {
    "not_found": 404,
    "model_not_found": 404,
    "conflict": 409,
    "canceled": 409,
    "storage_error": 503,
    "model_load_failed": 503,
    "generation_failed": 500,
    "internal_error": 500,
    "timeout": 504,
}


# Engine parameter names -> the API's field names.
API_PARAMS = {"width": "size", "height": "size", "num_images": "n"}


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def install(app: FastAPI) -> None:
    @app.exception_handler(ImageGenError)
    async def _app_error(_: Request, error: ImageGenError) -> JSONResponse:
        status = STATUS_BY_CODE.get(error.code, 400)
        kind = "invalid_request_error" if status < 500 else "server_error"
        param = API_PARAMS.get(error.param, error.param) if error.param else None
        return JSONResponse(error_body(error.message, kind, param, error.code), status_code=status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        param = ".".join(str(part) for part in first.get("loc", ())[1:]) or None
        message = f"{param or 'request'}: {first.get('msg', 'invalid value')}"
        return JSONResponse(
            error_body(message, "invalid_request_error", param, "invalid_value"), status_code=400
        )

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, error: HTTPException) -> JSONResponse:
        return JSONResponse(
            error_body(str(error.detail), "invalid_request_error", None, None),
            status_code=error.status_code,
            headers=getattr(error, "headers", None),
        )
