"""The app layer's one error type, and how the errors of the layers below become it."""

from __future__ import annotations


class ImageGenError(Exception):
    """A one-line, user-facing error; `param` names the offending input, `code` is a stable machine name."""

    def __init__(self, message: str, *, param: str | None = None, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    @classmethod
    def from_exception(cls, exc: Exception) -> ImageGenError:
        """Wraps a `PipelineError` or `StorageError` keeping its one-line message; anything else is internal."""
        if isinstance(exc, ImageGenError):
            return exc
        # Imported here so that importing this module stays cheap (no torch, no boto3).
        from pipelines import errors as pipeline
        from storage import objects

        # Most specific first: (error type, code, param).
        table: list[tuple[type[Exception], str, str | None]] = [
            (pipeline.InvalidParamsError, "invalid_params", getattr(exc, "param", None)),
            (pipeline.ModelNotFoundError, "model_not_found", "model"),
            (pipeline.ModelLoadError, "model_load_failed", "model"),
            (pipeline.GenerationCanceled, "canceled", None),
            (pipeline.PipelineError, "generation_failed", None),
            (objects.NotFound, "not_found", None),
            (objects.PreconditionFailed, "conflict", None),
            (objects.StorageError, "storage_error", None),
        ]
        for error_type, code, param in table:
            if isinstance(exc, error_type):
                return cls(str(exc), param=param, code=code)
        return cls(str(exc) or type(exc).__name__, code="internal_error")
