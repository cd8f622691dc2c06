"""The HTML the studio shows: the job status line with its progress bar and step preview, an image's parameters,
a side-by-side comparison table and the PNG info readout. Pure functions of their inputs, escaped throughout."""

from __future__ import annotations

from collections.abc import Mapping
from html import escape
from typing import Any

from image_gen.history import HistoryImage
from image_gen.types import SCHEDULERS

PREVIEW_PREFIX = "data:image/jpeg;base64,"
SOURCES = {
    "image-gen": "image-gen",
    "a1111": "Stable Diffusion web UI (AUTOMATIC1111)",
    "forge": "Stable Diffusion web UI Forge",
    "fooocus": "Fooocus",
    "comfyui": "ComfyUI",
    "invokeai": "InvokeAI",
}
PNG_FIELDS = {
    "prompt": "Prompt",
    "negative_prompt": "Negative prompt",
    "steps": "Steps",
    "sampler": "Sampler",
    "schedule_type": "Schedule type",
    "cfg_scale": "CFG scale",
    "seed": "Seed",
    "width": "Width",
    "height": "Height",
    "model": "Model",
    "model_hash": "Model hash",
}


def status_html(state: str, text: str, *, fraction: float | None = None, preview: str | None = None) -> str:
    """The status line. `state` is idle, queued, running, done, canceled or failed; a bar shows while queued or
    running (indeterminate without `fraction`), with the step preview (a JPEG data URL) beside it."""
    bar = ""
    if state in ("queued", "running"):
        if fraction is None:
            bar = '<div class="ig-bar ig-bar-wait"><div></div></div>'
        else:
            percent = max(0.0, min(1.0, fraction)) * 100
            bar = (
                f'<div class="ig-bar" role="progressbar" aria-valuemin="0" aria-valuemax="100" '
                f'aria-valuenow="{percent:.0f}"><div style="width:{percent:.1f}%"></div></div>'
            )
    image = ""
    if preview and preview.startswith(PREVIEW_PREFIX):
        image = f'<img class="ig-step-preview" src="{escape(preview)}" alt="preview of the current step">'
    return (
        f'<div class="ig-status ig-{state}" data-state="{state}" role="status" aria-live="polite">{image}'
        f'<div class="ig-status-body"><span class="ig-status-text">{escape(text)}</span>{bar}</div></div>'
    )


def sampler_text(scheduler: str | None) -> str:
    spec = SCHEDULERS.get(scheduler or "")
    return spec.label if spec else str(scheduler)


def _rows(rows: list[tuple[str, str]]) -> str:
    return "".join(f"<tr><th>{escape(name)}</th><td>{escape(value)}</td></tr>" for name, value in rows)


def image_rows(image: HistoryImage) -> list[tuple[str, str]]:
    p = image.params
    return [
        ("Prompt", p.prompt),
        ("Negative prompt", p.negative_prompt or "-"),
        ("Model", f"{p.model} [{image.model_hash}]" if image.model_hash else str(p.model)),
        ("Size", f"{p.width}x{p.height}"),
        ("Sampler", sampler_text(p.scheduler)),
        ("Steps", str(p.steps)),
        ("Guidance", f"{p.guidance_scale:g}"),
        ("Seed", str(p.seed)),
    ]


def parameters_html(image: HistoryImage | None, empty: str = "Select an image to see its parameters.") -> str:
    if image is None:
        return f'<p class="ig-empty">{escape(empty)}</p>'
    return f'<table class="ig-params" data-image-id="{escape(image.id)}">{_rows(image_rows(image))}</table>'


def compare_html(a: HistoryImage | None, b: HistoryImage | None) -> str:
    """Both images' parameters in two columns; the rows that differ are marked."""
    if a is None or b is None:
        return (
            '<p class="ig-empty">Pick two images: select one under Results or History, press '
            "<b>Add to compare</b>, then do the same for the other.</p>"
        )
    rows = []
    for (name, left), (_, right) in zip(image_rows(a), image_rows(b), strict=True):
        marker = ' class="ig-diff"' if left != right else ""
        rows.append(
            f"<tr{marker}><th>{escape(name)}</th><td>{escape(left)}</td><td>{escape(right)}</td></tr>"
        )
    return (
        '<table class="ig-params ig-compare"><thead><tr><th></th><th>A</th><th>B</th></tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def png_info_html(parameters: Mapping[str, Any], source: str) -> str:
    """What a dropped PNG says about how it was made, field by field."""
    if source == "none":
        return '<p class="ig-empty">This image carries no generation parameters.</p>'
    rows = [
        (label, str(parameters[key]))
        for key, label in PNG_FIELDS.items()
        if parameters.get(key) not in (None, "")
    ]
    rows += [(str(key), str(value)) for key, value in parameters.get("extra", {}).items()]
    return (
        f'<p class="ig-source">Written by <b>{escape(SOURCES.get(source, source))}</b></p>'
        f'<table class="ig-params">{_rows(rows)}</table>'
    )
