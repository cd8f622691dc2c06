"""From a dropped PNG's metadata (ours or another studio's) to values for the studio's controls, with a note for
every value that cannot be used here (a model not installed, a sampler we do not have, a size out of range)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

from image_gen.types import InvalidParamsError, ModelInfo, PngInfo, scheduler_from_label

# ComfyUI's sampler names (KSampler's sampler_name) that are one of our schedulers.
COMFYUI_SAMPLERS = {
    "euler": "euler",
    "euler_ancestral": "euler_a",
    "heun": "heun",
    "dpmpp_2m": "dpmpp_2m",
    "ddim": "ddim",
    "uni_pc": "unipc",
    "uni_pc_bh2": "unipc",
    "lcm": "lcm",
}


@dataclass
class ImportedParams:
    """Control values read from a PNG (keys of GenerationParams, only those found and usable) and notes on the rest."""

    values: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def scheduler_of(sampler: str, schedule_type: str | None = None) -> str | None:
    """Our scheduler for a studio's sampler (and schedule type, as A1111 1.9+ and ComfyUI split them); None if none."""
    karras = (schedule_type or "").strip().lower() == "karras"
    name = COMFYUI_SAMPLERS.get(sampler.strip().lower())
    if name is None:
        try:
            name = scheduler_from_label(sampler)
        except InvalidParamsError:
            return None
    if karras and name == "dpmpp_2m":
        return "dpmpp_2m_karras"
    return name


def find_model(name: str | None, model_hash: str | None, models: list[ModelInfo]) -> ModelInfo | None:
    """The installed model a PNG names: by content hash, else by name (case-insensitive, file extension ignored)."""
    wanted_hash = (model_hash or "").strip().lower()
    if wanted_hash:
        for info in models:
            if info.content_hash and info.content_hash.lower().startswith(wanted_hash[:10]):
                return info
    if name:
        stem = PurePath(name.replace("\\", "/")).stem.lower() if "." in name else name.lower()
        for info in models:
            if info.name.lower() in (name.lower(), stem):
                return info
    return None


def import_parameters(info: PngInfo, models: list[ModelInfo], current_model: ModelInfo) -> ImportedParams:
    """What `info` sets on the studio's controls; the model is the one it names if installed, else the current."""
    imported = ImportedParams()
    if info.source == "image-gen" and info.request and isinstance(info.request.get("request"), dict):
        found = dict(info.request["request"])
        found["model_hash"] = info.request.get("content_sha256", "")[:10]
        sampler = found.get("scheduler")
    else:
        p = info.parameters
        found = {
            "prompt": p.get("prompt"),
            "negative_prompt": p.get("negative_prompt"),
            "steps": p.get("steps"),
            "guidance_scale": p.get("cfg_scale"),
            "seed": p.get("seed"),
            "width": p.get("width"),
            "height": p.get("height"),
            "model": p.get("model"),
            "model_hash": p.get("model_hash"),
        }
        sampler = p.get("sampler")
        if sampler:
            sampler = scheduler_of(str(sampler), p.get("schedule_type")) or f"?{sampler}"
    values = imported.values
    for key in ("prompt", "negative_prompt"):
        if isinstance(found.get(key), str):
            values[key] = found[key]

    model = find_model(found.get("model"), found.get("model_hash"), models)
    if model is None:
        model = current_model
        if found.get("model"):
            imported.notes.append(
                f"Model {found['model']!r} is not installed here: kept {current_model.name}."
            )
    values["model"] = model.name

    if isinstance(sampler, str) and sampler.startswith("?"):
        imported.notes.append(f"Sampler {sampler[1:]!r} is not available here: kept the current scheduler.")
    elif sampler:
        values["scheduler"] = sampler
    if isinstance(found.get("steps"), int) and 1 <= found["steps"] <= 150:
        values["steps"] = found["steps"]
    if isinstance(found.get("guidance_scale"), (int, float)) and found["guidance_scale"] >= 0:
        values["guidance_scale"] = float(found["guidance_scale"])
    if isinstance(found.get("seed"), int) and found["seed"] >= 0:
        values["seed"] = found["seed"]

    width, height = found.get("width"), found.get("height")
    if isinstance(width, int) and isinstance(height, int):
        try:
            model.check_size(width, height)
        except InvalidParamsError:
            imported.notes.append(
                f"Size {width}x{height} is not allowed for {model.name} "
                f"({model.min_size} to {model.max_size} px, multiples of 8): kept the model's size."
            )
        else:
            values["width"], values["height"] = width, height
    return imported
