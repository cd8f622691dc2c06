"""The process-wide objects every entry point builds from the settings: model registry, store and queue."""

from __future__ import annotations

import sys
from pathlib import Path

from image_gen.errors import ImageGenError
from image_gen.settings import Settings
from pipelines.registry import BUNDLED_MODELS_DIR, ModelRegistry, complete_bundled_models
from storage.objects import ObjectStore, open_store
from storage.queue import JobQueue


def check_device(device: str) -> None:
    from pipelines.errors import InvalidParamsError
    from pipelines.text2image import resolve_device

    try:
        resolve_device(device)
    except InvalidParamsError as error:
        raise ImageGenError(str(error), param="device") from None


def model_folders(settings: Settings) -> list[Path]:
    """The folders the registry searches: the shipped models (completed with their text encoder first) unless
    `bundled_models` is off, then `models_dir`."""
    if settings.bundled_models and BUNDLED_MODELS_DIR.is_dir():
        complete_bundled_models()
        return [BUNDLED_MODELS_DIR, settings.models_dir]
    return [settings.models_dir]


def build_registry(settings: Settings, *, bootstrap: bool) -> ModelRegistry:
    """The registry over the bundled models and `models_dir`; with `bootstrap`, builds the untrained tiny model
    into `models_dir` first when no model exists anywhere."""
    if "models_dir" in settings.model_fields_set and not settings.models_dir.is_dir():
        raise ImageGenError(
            f"models folder {settings.models_dir} does not exist: set --models-dir or IMAGE_GEN_MODELS_DIR "
            "to a folder of diffusers model folders",
            param="models_dir",
        )
    model_dirs = model_folders(settings)

    def build() -> ModelRegistry:
        return ModelRegistry(
            model_dirs,
            max_loaded=settings.max_loaded_models,
            device=settings.device,
            dtype=settings.dtype,
            attention=settings.attention,
            vae_tiling=settings.vae_tiling,
            cpu_offload=settings.cpu_offload,
            channels_last=settings.channels_last,
            autocast=settings.autocast,
            fuse_qkv=settings.fuse_qkv,
            compile=settings.compile,
        )

    check_device(settings.device)
    registry = build()
    if bootstrap and not registry.list():
        from pipelines.bootstrap import UNTRAINED_MODEL_NAME, build_untrained_model

        path = build_untrained_model(settings.models_dir / UNTRAINED_MODEL_NAME)
        print(f"image-gen: no model found: built the untrained tiny model in {path}", file=sys.stderr)
        registry = build()
    return registry


def open_queue(settings: Settings) -> tuple[ObjectStore, JobQueue]:
    try:
        store = open_store(settings.store)
    except ValueError as error:
        raise ImageGenError(str(error), param="store") from error
    return store, JobQueue(store, lease_s=settings.lease_s)
