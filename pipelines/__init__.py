"""The generation engine: model registry, Text2Image pipeline, schedulers and attention backends over diffusers.

Names are re-exported lazily, so that `import pipelines.errors` or `pipelines.bootstrap` does not pay for
importing torch and diffusers (several seconds). See docs/architecture.md for the contract.
"""

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipelines.attention import ATTENTION_BACKENDS, VAE_TILING_MODES, Optimizations
    from pipelines.errors import (
        GenerationCanceled,
        InvalidParamsError,
        ModelLoadError,
        ModelNotFoundError,
        PipelineError,
    )
    from pipelines.params import GenerationParams, ModelInfo
    from pipelines.registry import BUNDLED_MODELS_DIR, ModelRegistry
    from pipelines.schedulers import SCHEDULER_NAMES, make_scheduler, scheduler_from_label, scheduler_label
    from pipelines.text2image import GenerationResult, StepEvent, Text2ImagePipeline

_EXPORTS = {
    "pipelines.attention": ("ATTENTION_BACKENDS", "VAE_TILING_MODES", "Optimizations"),
    "pipelines.errors": (
        "GenerationCanceled",
        "InvalidParamsError",
        "ModelLoadError",
        "ModelNotFoundError",
        "PipelineError",
    ),
    "pipelines.params": ("GenerationParams", "ModelInfo"),
    "pipelines.registry": ("BUNDLED_MODELS_DIR", "ModelRegistry"),
    "pipelines.schedulers": ("SCHEDULER_NAMES", "make_scheduler", "scheduler_from_label", "scheduler_label"),
    "pipelines.text2image": ("GenerationResult", "StepEvent", "Text2ImagePipeline"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = [
    "ATTENTION_BACKENDS",
    "BUNDLED_MODELS_DIR",
    "SCHEDULER_NAMES",
    "VAE_TILING_MODES",
    "GenerationCanceled",
    "GenerationParams",
    "GenerationResult",
    "InvalidParamsError",
    "ModelInfo",
    "ModelLoadError",
    "ModelNotFoundError",
    "ModelRegistry",
    "Optimizations",
    "PipelineError",
    "StepEvent",
    "Text2ImagePipeline",
    "make_scheduler",
    "scheduler_from_label",
    "scheduler_label",
]


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'pipelines' has no attribute {name!r}")
    return getattr(importlib.import_module(_MODULE_OF[name]), name)
