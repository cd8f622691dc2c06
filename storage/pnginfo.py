"""PNG generation metadata: the `parameters` text other Stable Diffusion studios write, and our JSON chunk.

Reads what A1111, Forge, Fooocus, ComfyUI and InvokeAI embed, normalised to one dict shape.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO

from PIL import Image, PngImagePlugin, UnidentifiedImageError

PARAMETERS_KEY = "parameters"
REQUEST_KEY = "image-gen"

# A1111's infotext grammar (modules/infotext_utils.py): `Key: value` pairs separated by commas,
# a value JSON-quoted when it holds a comma, colon or newline.
_PARAM_RE = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE_RE = re.compile(r"^(\d+)x(\d+)$")
_FOOOCUS_RESOLUTION_RE = re.compile(r"^\(?\s*(\d+)\s*[,x*×]\s*(\d+)\s*\)?$")

# A1111 field name -> our key, for the fields every studio has.
_A1111_FIELDS = {
    "Steps": "steps",
    "Sampler": "sampler",
    "Schedule type": "schedule_type",
    "CFG scale": "cfg_scale",
    "Seed": "seed",
    "Model hash": "model_hash",
    "Model": "model",
}
_FOOOCUS_FIELDS = {
    "prompt": "prompt",
    "negative_prompt": "negative_prompt",
    "steps": "steps",
    "sampler": "sampler",
    "scheduler": "schedule_type",
    "guidance_scale": "cfg_scale",
    "seed": "seed",
    "base_model": "model",
    "base_model_hash": "model_hash",
}
_INVOKEAI_FIELDS = {
    "positive_prompt": "prompt",
    "negative_prompt": "negative_prompt",
    "steps": "steps",
    "scheduler": "sampler",
    "cfg_scale": "cfg_scale",
    "seed": "seed",
    "width": "width",
    "height": "height",
}
# The normalised keys of `PngInfo.parameters`, in display order (each only when known; `extra` always).
PARAMETER_KEYS = (
    "prompt",
    "negative_prompt",
    "steps",
    "sampler",
    "schedule_type",
    "cfg_scale",
    "seed",
    "width",
    "height",
    "model",
    "model_hash",
)
_INT_KEYS = {"steps", "seed", "width", "height"}
_FLOAT_KEYS = {"cfg_scale"}


@dataclass(frozen=True)
class PngInfo:
    """What a PNG says about how it was made.

    `parameters` has the `PARAMETER_KEYS` that are known and `extra` (every other field, under the studio's
    own name). `source` is one of "image-gen", "a1111", "forge", "fooocus", "comfyui", "invokeai" or "none".
    """

    parameters: dict[str, Any]
    raw_text: str | None
    request: dict[str, Any] | None
    source: str


def quote(value: object) -> str:
    """A value as A1111 writes it: JSON-quoted when it holds a comma, colon or newline."""
    text = str(value)
    if "," not in text and ":" not in text and "\n" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def unquote(text: str) -> str:
    """The inverse of `quote`; leaves text that is not a JSON string as it is."""
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    return value if isinstance(value, str) else text


def _number(value: float) -> str:
    """7.0 -> "7", 7.5 -> "7.5", as A1111 shows CFG scale; never rounded."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def format_parameters(
    prompt: str,
    negative_prompt: str = "",
    *,
    steps: int,
    sampler: str,
    cfg_scale: float,
    seed: int,
    width: int,
    height: int,
    schedule_type: str | None = None,
    model_hash: str | None = None,
    model: str | None = None,
    extra: Mapping[str, object] | None = None,
) -> str:
    """The `parameters` text in A1111's format: prompt, `Negative prompt:` line, then one line of fields.

    Fields that are None are left out; `extra` fields follow `Model` in their given order.
    """
    fields: dict[str, object | None] = {
        "Steps": steps,
        "Sampler": sampler,
        "Schedule type": schedule_type,
        "CFG scale": _number(cfg_scale),
        "Seed": seed,
        "Size": f"{width}x{height}",
        "Model hash": model_hash,
        "Model": model,
        **(extra or {}),
    }
    line = ", ".join(f"{key}: {quote(value)}" for key, value in fields.items() if value is not None)
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{line}".strip()


def _typed(key: str, value: Any) -> Any:
    """Converts a numeric field to int/float; returns None when it does not parse."""
    try:
        if key in _INT_KEYS:
            return int(float(value)) if isinstance(value, str) and "." in value else int(value)
        if key in _FLOAT_KEYS:
            return float(value)
    except (TypeError, ValueError):
        return None
    return value


def _normalise(fields: Mapping[str, Any], names: Mapping[str, str]) -> dict[str, Any]:
    """Maps a studio's fields to our keys; what has no key of ours, or does not parse, goes to `extra`."""
    result: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for name, value in fields.items():
        key = names.get(name)
        typed = _typed(key, value) if key else None
        if key is None or typed is None:
            extra[name] = value
        else:
            result[key] = typed
    result["extra"] = extra
    return result


def _parse_a1111(text: str) -> dict[str, Any]:
    *lines, last_line = text.strip().split("\n")
    # As A1111 does: a last line with fewer than three fields is still part of the prompt.
    if len(_PARAM_RE.findall(last_line)) < 3:
        lines.append(last_line)
        last_line = ""

    prompt: list[str] = []
    negative: list[str] = []
    for raw_line in lines:
        line = raw_line.strip()
        if line.startswith("Negative prompt:"):
            negative.append(line[len("Negative prompt:") :].strip())
        elif negative:
            negative.append(line)
        else:
            prompt.append(line)

    fields: dict[str, str] = {}
    size: tuple[int, int] | None = None
    for key, value in _PARAM_RE.findall(last_line):
        value = unquote(value)
        match = _SIZE_RE.match(value)
        if key == "Size" and match:
            size = int(match.group(1)), int(match.group(2))
        else:
            fields[key] = value

    result = {"prompt": "\n".join(prompt), "negative_prompt": "\n".join(negative)}
    result.update(_normalise(fields, _A1111_FIELDS))
    if size:
        result["width"], result["height"] = size
    return result


def _parse_fooocus(data: Mapping[str, Any]) -> dict[str, Any]:
    fields = dict(data)
    resolution = str(fields.pop("resolution", ""))
    result = _normalise(fields, _FOOOCUS_FIELDS)
    match = _FOOOCUS_RESOLUTION_RE.match(resolution)
    if match:
        result["width"], result["height"] = int(match.group(1)), int(match.group(2))
    elif resolution:
        result["extra"]["resolution"] = resolution
    return result


def parse_parameters(text: str) -> dict[str, Any]:
    """Parses a `parameters` chunk: A1111/Forge/Fooocus infotext, or the JSON Fooocus writes there."""
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            data = json.loads(stripped)
        except json.JSONDecodeError:
            data = None
        if isinstance(data, dict):
            return _parse_fooocus(data)
    return _parse_a1111(stripped)


def parse_invokeai(data: Mapping[str, Any]) -> dict[str, Any]:
    """Parses InvokeAI's `invokeai_metadata` JSON (3.x and later)."""
    fields = dict(data)
    model = fields.pop("model", None)
    result = _normalise(fields, _INVOKEAI_FIELDS)
    if isinstance(model, Mapping):
        name = model.get("name") or model.get("model_name")
        if name:
            result["model"] = name
        if model.get("hash"):
            result["model_hash"] = model["hash"]
    elif isinstance(model, str):
        result["model"] = model
    return result


_COMFY_SAMPLERS = {"KSampler", "KSamplerAdvanced"}
_COMFY_TEXT_INPUTS = ("text", "text_g", "text_l", "prompt", "string", "value")
_COMFY_VALUE_INPUTS = ("value", "seed", "int", "float", "string")  # of primitive nodes
_COMFY_CONDITIONING_INPUTS = ("conditioning", "conditioning_1", "conditioning_to")


def _comfy_follow(nodes: Mapping[str, Any], ref: Any, keys: tuple[str, ...], via: tuple[str, ...]) -> Any:
    """Follows a ComfyUI link ([node_id, slot]) to the first node that has a scalar under one of `keys`,
    passing through nodes by their `via` inputs (a LoRA loader's `model`, a conditioning combiner...)."""
    for _ in range(32):  # bounded: a malformed graph may have cycles
        if not (isinstance(ref, list) and ref and str(ref[0]) in nodes):
            return None
        inputs = nodes[str(ref[0])].get("inputs", {})
        for key in keys:
            if isinstance(inputs.get(key), (str, int, float)):
                return inputs[key]
        linked = [inputs[key] for key in keys + via if isinstance(inputs.get(key), list)]
        if not linked:
            return None
        ref = linked[0]
    return None


def parse_comfyui_prompt(prompt: Mapping[str, Any]) -> dict[str, Any]:
    """Parses ComfyUI's `prompt` chunk (the API-format graph): seed, steps, CFG, sampler and scheduler
    of the first KSampler, the texts of the CLIPTextEncode nodes on its positive and negative inputs,
    the size of its empty latent and the checkpoint name."""
    nodes = {str(node_id): node for node_id, node in prompt.items() if isinstance(node, Mapping)}
    samplers = sorted(
        (node_id for node_id, node in nodes.items() if node.get("class_type") in _COMFY_SAMPLERS),
        key=lambda node_id: (len(node_id), node_id),
    )
    if not samplers:
        return {"extra": {}}
    inputs = nodes[samplers[0]].get("inputs", {})
    result: dict[str, Any] = {}
    for key, name in (
        ("prompt", "positive"),
        ("negative_prompt", "negative"),
    ):
        text = _comfy_follow(nodes, inputs.get(name), _COMFY_TEXT_INPUTS, _COMFY_CONDITIONING_INPUTS)
        if isinstance(text, str):
            result[key] = text
    for key, name in (
        ("seed", "seed"),
        ("seed", "noise_seed"),
        ("steps", "steps"),
        ("cfg_scale", "cfg"),
        ("sampler", "sampler_name"),
        ("schedule_type", "scheduler"),
    ):
        value = inputs.get(name)
        if isinstance(value, list):  # a link, e.g. the seed comes from a primitive node
            value = _comfy_follow(nodes, value, (name, *_COMFY_VALUE_INPUTS), ())
        value = _typed(key, value) if isinstance(value, (str, int, float)) else None
        if value is not None:
            result[key] = value
    for key in ("width", "height"):
        value = _typed(key, _comfy_follow(nodes, inputs.get("latent_image"), (key,), ("samples",)))
        if value is not None:
            result[key] = value
    model = _comfy_follow(nodes, inputs.get("model"), ("ckpt_name", "unet_name"), ("model",))
    if isinstance(model, str):
        result["model"] = model
    result["extra"] = {"sampler_node": samplers[0]}
    return result


def parse_comfyui_workflow(workflow: Mapping[str, Any]) -> dict[str, Any]:
    """Parses ComfyUI's `workflow` chunk (the editor graph), for PNGs that lack the `prompt` chunk."""
    nodes = {node.get("id"): node for node in workflow.get("nodes", []) if isinstance(node, Mapping)}
    # A link is [link_id, from_node, from_slot, to_node, to_slot, type].
    link_source = {link[0]: link[1] for link in workflow.get("links", []) if isinstance(link, list)}
    result: dict[str, Any] = {"extra": {}}
    sampler = next((node for node in nodes.values() if node.get("type") in _COMFY_SAMPLERS), None)
    if sampler is None:
        return result
    values = list(sampler.get("widgets_values", []))
    if sampler["type"] == "KSamplerAdvanced":
        values = values[1:]  # drops add_noise: the rest lines up with KSampler's widgets
    for key, value in zip(
        ("seed", None, "steps", "cfg_scale", "sampler", "schedule_type"), values, strict=False
    ):
        typed = _typed(key, value) if key else None
        if typed is not None:
            result[key] = typed
    for slot in sampler.get("inputs", []):
        key = {"positive": "prompt", "negative": "negative_prompt"}.get(slot.get("name"))
        source = nodes.get(link_source.get(slot.get("link")))
        if key and source and source.get("type") == "CLIPTextEncode" and source.get("widgets_values"):
            result[key] = str(source["widgets_values"][0])
    return result


def _load_json(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def _studio_of(text: str, parameters: Mapping[str, Any], chunks: Mapping[str, str]) -> str:
    if "fooocus_scheme" in chunks or text.lstrip().startswith("{"):
        return "fooocus"
    version = str(parameters["extra"].get("Version", ""))
    if version.startswith("Fooocus"):
        return "fooocus"
    # Forge versions look like f0.0.17v1.8.0rc-latest-276-g29be1da7 or f2.0.1v1.10.1-previous-...
    if re.match(r"^f\d", version) or "forge" in version.lower():
        return "forge"
    return "a1111"


def read_png_info(path_or_bytes: str | os.PathLike[str] | bytes | BinaryIO) -> PngInfo:
    """Reads the generation metadata of an image file: ours, or any studio's listed in `PngInfo`.

    Raises FileNotFoundError for a missing path and ValueError for data that is not an image.
    """
    source = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
    try:
        with Image.open(source) as image:
            chunks = getattr(image, "text", image.info)  # PNG: every text chunk, also those after IDAT
            chunks = {key: value for key, value in chunks.items() if isinstance(value, str)}
    except UnidentifiedImageError as exc:
        what = os.fspath(path_or_bytes) if isinstance(path_or_bytes, (str, os.PathLike)) else "the data"
        raise ValueError(f"{what} is not an image (expected a PNG)") from exc

    request = _load_json(chunks.get(REQUEST_KEY))
    text = chunks.get(PARAMETERS_KEY)
    if text is not None:
        parameters = parse_parameters(text)
        studio = "image-gen" if request is not None else _studio_of(text, parameters, chunks)
        return PngInfo(parameters, text, request, studio)
    if request is not None:
        return PngInfo({"extra": {}}, None, request, "image-gen")

    invokeai = _load_json(chunks.get("invokeai_metadata"))
    if invokeai is not None:
        return PngInfo(parse_invokeai(invokeai), chunks["invokeai_metadata"], None, "invokeai")
    comfy_prompt = _load_json(chunks.get("prompt"))
    if comfy_prompt is not None:
        return PngInfo(parse_comfyui_prompt(comfy_prompt), chunks["prompt"], None, "comfyui")
    comfy_workflow = _load_json(chunks.get("workflow"))
    if comfy_workflow is not None:
        return PngInfo(parse_comfyui_workflow(comfy_workflow), chunks["workflow"], None, "comfyui")
    return PngInfo({"extra": {}}, None, None, "none")


def write_png(
    image: Image.Image,
    path_or_buffer: str | os.PathLike[str] | BinaryIO,
    parameters_text: str,
    request_json: Mapping[str, Any],
) -> None:
    """Saves `image` as PNG with the `parameters` chunk (tEXt, iTXt when not Latin-1) and our JSON chunk."""
    info = PngImagePlugin.PngInfo()
    info.add_text(PARAMETERS_KEY, parameters_text)
    info.add_text(REQUEST_KEY, json.dumps(request_json, ensure_ascii=False, sort_keys=True))
    image.save(path_or_buffer, format="PNG", pnginfo=info)
