"""What the app layer hands its front ends, so that `ui/` imports `image_gen` only (docs/architecture.md).

These are the lower layers' own types, re-exported: a front end builds `GenerationParams`, reads `ModelInfo` and
`Job` records from the service, lists schedulers, reads PNG parameters, and catches the errors named here.
"""

from __future__ import annotations

from pipelines.errors import InvalidParamsError
from pipelines.params import GenerationParams, ModelInfo
from pipelines.schedulers import SCHEDULER_NAMES, SCHEDULERS, scheduler_from_label
from storage.objects import NotFound, StorageError
from storage.pnginfo import PngInfo, read_png_info
from storage.queue import Job

__all__ = [
    "SCHEDULERS",
    "SCHEDULER_NAMES",
    "GenerationParams",
    "InvalidParamsError",
    "Job",
    "ModelInfo",
    "NotFound",
    "PngInfo",
    "StorageError",
    "read_png_info",
    "scheduler_from_label",
]
