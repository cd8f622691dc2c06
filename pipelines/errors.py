"""The one error type of the pipelines layer and its subclasses; messages are one line and name what is allowed."""


class PipelineError(Exception):
    """Anything that goes wrong in pipelines/: finding, loading or running a model."""


class ModelNotFoundError(PipelineError):
    """No model of that name in the registry."""


class ModelLoadError(PipelineError):
    """A model folder is missing, corrupt, incomplete or of an unsupported layout."""


class InvalidParamsError(PipelineError):
    """Generation parameters the model does not accept; `param` names the offending field when there is one."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class GenerationCanceled(PipelineError):
    """Raised by a step callback to stop a generation; the pipeline then returns no image."""
