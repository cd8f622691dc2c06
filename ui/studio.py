"""The Gradio studio for designers, mounted at `/`: prompt in, live progress, images with their parameters out;
history, side-by-side comparison and PNG info beside it.

Work goes through the job queue (the same `GenerationService` as the REST API), so the studio and programs share
workers and fair share. Every handler acts for the owner of its request (`ui.login`), never for an owner or id the
page could choose: images and jobs are read through the service, which checks that they belong to that owner.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import suppress
from dataclasses import dataclass
from functools import wraps
from html import escape
from pathlib import Path
from typing import Any, TypeVar

import gradio as gr
from fastapi import FastAPI
from pydantic import ValidationError

from image_gen.api.submission import Submission
from image_gen.auth import KeyStore
from image_gen.errors import ImageGenError
from image_gen.history import History, HistoryImage, images_of
from image_gen.service import GenerationService
from image_gen.types import (
    SCHEDULER_NAMES,
    SCHEDULERS,
    GenerationParams,
    InvalidParamsError,
    Job,
    ModelInfo,
    NotFound,
    PngInfo,
    StorageError,
    read_png_info,
)
from ui import views
from ui.login import StudioLogin
from ui.pnginfo import import_parameters
from ui.styles import CSS, JS, THEME

PRESETS = ("Speed", "Quality", "Custom")
SEED_MODES = ("Random", "Fixed")
MAX_BATCH = 8
MAX_SEED = 2**53 - 1  # what a browser's numbers hold exactly
VARIATIONS = 4  # images a "Variations" click makes, at the seeds after the selected image's
POLL_S = 0.25
HISTORY_PAGE = 24
CAPTION_CHARS = 48

F = TypeVar("F", bound=Callable[..., Any])


def readable(fn: F) -> F:
    """Errors of the layers below become a message on the page (never a traceback)."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ImageGenError as error:
            raise gr.Error(error.message) from error
        except StorageError as error:
            raise gr.Error(f"The image store is not available: {error}", title="Storage error") from error

    return wrapper  # type: ignore[return-value]


class ImageFiles:
    """An owner's stored images as local files, which Gradio copies into its cache to serve them; the PNG bytes are
    kept as stored, so a downloaded image carries its parameters. Files unused for `max_age_s` are deleted (they are
    read from the store again when next shown)."""

    def __init__(
        self, service: GenerationService, root: Path | None = None, max_age_s: float = 86400.0
    ) -> None:
        self.service = service
        self.root = root or Path(tempfile.mkdtemp(prefix="image-gen-studio-"))
        self.max_age_s = max_age_s
        self._pruned_at = time.time()

    def path(self, owner: str, image_id: str, *, thumbnail: bool = False) -> str:
        path = self.root / owner / (f"{image_id}.thumb.webp" if thumbnail else f"{image_id}.png")
        try:
            os.utime(path)  # in use: not pruned
        except FileNotFoundError:
            try:
                data = self.service.image(owner, image_id, thumbnail=thumbnail).data
            except NotFound:
                if not thumbnail:
                    raise
                return self.path(owner, image_id)  # an image stored before thumbnails were: show it whole
            path.parent.mkdir(parents=True, exist_ok=True)
            staging = path.with_name(f"{uuid.uuid4().hex}.part")
            staging.write_bytes(data)
            os.replace(staging, path)
            self._prune()
        return str(path)

    def _prune(self) -> None:
        now = time.time()
        if now - self._pruned_at < self.max_age_s / 24:
            return
        self._pruned_at = now
        for file in self.root.glob("*/*"):
            with suppress(FileNotFoundError):
                if now - file.stat().st_mtime > self.max_age_s:
                    file.unlink()


def parse_size(size: str | None) -> tuple[int, int]:
    text = (size or "").lower().replace("×", "x").replace(" ", "")
    width, sep, height = text.partition("x")
    if not (sep and width.isdigit() and height.isdigit()):
        raise gr.Error(f"Size {size!r} is not WIDTHxHEIGHT in pixels, e.g. 512x768.", title="Invalid size")
    return int(width), int(height)


def form_params(
    prompt: str,
    negative: str,
    model: str,
    size: str,
    steps: float,
    guidance: float,
    scheduler: str,
    seed_mode: str,
    seed: float | None,
    count: float,
) -> GenerationParams:
    """The request the controls describe; raises gr.Error naming what is wrong."""
    if not (prompt or "").strip():
        raise gr.Error("Type a prompt first.", title="Nothing to generate")
    width, height = parse_size(size)
    fixed = seed_mode == "Fixed"
    if fixed and (seed is None or seed < 0 or seed != int(seed)):
        raise gr.Error("Seed must be a whole number from 0, or choose Random.", title="Invalid seed")
    try:
        return GenerationParams(
            prompt=prompt.strip(),
            negative_prompt=(negative or "").strip(),
            model=model or None,
            width=width,
            height=height,
            steps=int(steps),
            guidance_scale=float(guidance),
            scheduler=scheduler or None,
            seed=int(seed) if fixed and seed is not None else None,
            num_images=int(count),
        )
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        raise gr.Error(f"{field}: {first['msg']}", title="Invalid parameters") from error


def best_of_candidates(best_of: float, count: int) -> int | None:
    """The request's `best_of` from the "Best of" control: None when off (1); else the candidates, at least the
    batch count, of which the CLIP scorer's best `count` are shown."""
    candidates = int(best_of)
    if candidates <= 1:
        return None
    if candidates < count:
        raise gr.Error(
            f"Best of {candidates} is fewer candidates than the batch count ({count}): choose at least {count}, "
            "or 1 for off.",
            title="Invalid best of",
        )
    return candidates


def _size(width: int, height: int) -> str:
    return f"{width}x{height}"


def size_choices(info: ModelInfo, current: str | None = None) -> list[str]:
    return info.allowed_sizes + ([current] if current and current not in info.allowed_sizes else [])


def preset_values(service: GenerationService, name: str | None, preset: str) -> tuple[ModelInfo, dict[str, Any]]:
    """The model a preset runs (a preset may switch models: the student's Quality runs its teacher) and the values
    of the controls: steps, guidance, scheduler, size, and the negative prompt where the preset sets one."""
    info, values = service.preset(name, preset.lower())
    shown = {key: values[key] for key in ("steps", "guidance_scale", "scheduler")}
    shown["size"] = _size(values["width"], values["height"])
    if "negative_prompt" in values:
        shown["negative_prompt"] = values["negative_prompt"]
    return info, shown


def own_preset(service: GenerationService, info: ModelInfo) -> str:
    """The preset to show for a model the designer picked: the first that runs this model itself, else Custom."""
    return next((p for p in PRESETS[:2] if service.preset(info.name, p.lower())[0].name == info.name), "Custom")


def preset_info(service: GenerationService, info: ModelInfo) -> str:
    parts = []
    for preset in PRESETS[:2]:
        target, values = preset_values(service, info.name, preset)
        runs = f"{target.name}, " if target.name != info.name else ""
        parts.append(f"{preset}: {runs}{values['steps']} steps, {views.sampler_text(values['scheduler'])}")
    return " · ".join(parts) + " · Custom: your own"


def model_note(info: ModelInfo) -> str:
    facts = [info.architecture.upper(), f"native {info.native_size} px"]
    if info.distilled:
        facts.append("few-step (distilled)")
    if info.label:
        facts.append(info.label)
    text = " · ".join(facts)
    return f"{text}. {info.description}" if info.description else text


def size_info(info: ModelInfo) -> str:
    return f"Or type WxH: multiples of 8 from {info.min_size} to {info.max_size}"


def caption(image: HistoryImage) -> str:
    prompt = image.params.prompt
    short = prompt if len(prompt) <= CAPTION_CHARS else prompt[: CAPTION_CHARS - 1] + "…"
    return f"{short} · seed {image.seed}"


def progress_status(job: Job, position: int | None) -> str:
    if job.cancel_requested:
        return views.status_html("running", "Canceling…")
    if job.status == "queued":
        if job.error:
            return views.status_html("queued", f"Retrying after an error: {job.error}")
        if not position:
            return views.status_html("queued", "Queued: next up")
        return views.status_html("queued", f"Queued: {position} job{'s' if position != 1 else ''} ahead")
    progress = job.progress or {}
    if progress.get("total"):
        step, total = int(progress["step"]), int(progress["total"])
        return views.status_html(
            "running", f"Step {step} of {total}", fraction=step / total, preview=progress.get("preview")
        )
    return views.status_html("running", "Generating…")


def model_choices(models: list[ModelInfo]) -> list[tuple[str, str]]:
    """Dropdown entries: the name, with the model's label (such as "untrained") when it has one."""
    return [(f"{m.name} ({m.label})" if m.label else m.name, m.name) for m in models]


def header_html(user: str | None, *, loaded: bool = True) -> str:
    who = (
        f'Signed in as <b>{escape(user)}</b><a href="logout">Sign out</a>'
        if user
        else "Single-user mode (this computer)"
    )
    return (
        f'<div id="ig-header" data-loaded="{str(loaded).lower()}">'
        '<div><h1 style="display:inline">image-gen studio</h1>'
        '<span class="ig-tagline">text to image on your own server</span></div>'
        f'<div class="ig-user">{who}</div></div>'
    )


@dataclass
class Inspector:
    """What is shown for the selected image of a gallery: its parameters and what can be done with it."""

    parameters: gr.HTML
    download: gr.DownloadButton
    reuse: gr.Button
    reuse_seed: gr.Button
    variations: gr.Button
    compare: gr.Button

    @classmethod
    def build(cls, prefix: str) -> Inspector:
        with gr.Row(elem_classes="ig-inspector"):
            with gr.Column(scale=3, min_width=260):
                parameters = gr.HTML(views.parameters_html(None), elem_id=f"{prefix}-parameters")
            with gr.Column(scale=2, min_width=200, elem_classes="ig-actions"):
                download = gr.DownloadButton(
                    "Download PNG", interactive=False, size="sm", elem_id=f"{prefix}-download"
                )
                reuse = gr.Button("Reuse parameters", interactive=False, size="sm", elem_id=f"{prefix}-reuse")
                reuse_seed = gr.Button(
                    "Reuse seed", interactive=False, size="sm", elem_id=f"{prefix}-reuse-seed"
                )
                variations = gr.Button(
                    f"Variations ({VARIATIONS} nearby seeds)",
                    interactive=False,
                    size="sm",
                    elem_id=f"{prefix}-variations",
                )
                compare = gr.Button(
                    "Add to compare", interactive=False, size="sm", elem_id=f"{prefix}-compare"
                )
        return cls(parameters, download, reuse, reuse_seed, variations, compare)

    @property
    def outputs(self) -> list[Any]:
        return [self.parameters, self.download, self.reuse, self.reuse_seed, self.variations, self.compare]


def build_studio(service: GenerationService, submission: Submission, login: StudioLogin) -> gr.Blocks:
    """The studio's page and handlers, for `mount_studio`. Jobs are submitted through `submission`, as the
    REST API's are: the same generation rate and concurrent-job quota per key."""
    history = History(service)
    files = ImageFiles(service)
    default, start = preset_values(service, None, "Speed")

    def inspect(owner: str, image: HistoryImage | None) -> list[Any]:
        enabled = image is not None
        download = files.path(owner, image.id) if image is not None else None
        return [
            views.parameters_html(image),
            gr.update(value=download, interactive=enabled),
            *(gr.update(interactive=enabled) for _ in range(4)),
        ]

    def controls(params: GenerationParams, *, seed: int | None, count: int = 1) -> list[Any]:
        """Updates for every generation control (see `control_outputs`) showing `params`."""
        info = service.model(params.model)
        assert params.width and params.height
        size = _size(params.width, params.height)
        return [
            params.prompt,
            params.negative_prompt,
            gr.update(value=info.name, info=model_note(info)),
            gr.update(value="Custom", info=preset_info(service, info)),
            gr.update(choices=size_choices(info, size), value=size, info=size_info(info)),
            params.steps,
            params.guidance_scale,
            params.scheduler,
            "Fixed" if seed is not None else gr.skip(),
            seed if seed is not None else gr.skip(),
            count,
        ]

    # --- generate ---------------------------------------------------------------------------------------------

    async def watch(owner: str, job_id: str) -> AsyncIterator[tuple[Job, int | None]]:
        """The job, with its queue position while queued, each time either changes; the last one is finished."""
        last = None
        while True:
            job = await asyncio.to_thread(service.job, owner, job_id)
            position = await asyncio.to_thread(service.position, job) if job.status == "queued" else None
            if (job.version, position) != last:
                last = (job.version, position)
                yield job, position
            if job.finished:
                return
            await asyncio.sleep(POLL_S)

    async def generate(
        prompt: str,
        negative: str,
        model: str,
        size: str,
        steps: float,
        guidance: float,
        scheduler: str,
        seed_mode: str,
        seed: float | None,
        count: float,
        best_of: float,
        request: gr.Request,
    ) -> AsyncIterator[tuple[Any, ...]]:
        """Submit, then follow the job: (job id, status, gallery, results, seed) at each change. With "Best of" N,
        the job makes N candidates and the results are the best of them by CLIPScore, best first."""
        skip = gr.skip()
        try:
            user = login.user(request)
            params = form_params(
                prompt, negative, model, size, steps, guidance, scheduler, seed_mode, seed, count
            )
            candidates = best_of_candidates(best_of, params.num_images)
            job = await asyncio.to_thread(submission.submit, user, params, best_of=candidates)
            used_seed = job.payload["params"]["seed"]
            yield job.id, progress_status(job, None), skip, skip, used_seed
            async for latest, position in watch(user.owner, job.id):
                job = latest
                if not job.finished:
                    yield skip, progress_status(job, position), skip, skip, skip
            if job.status == "succeeded":
                images = images_of(job)
                if candidates is not None:
                    ranked = await asyncio.to_thread(service.images_of, user.owner, job)
                    by_id = {image.id: image for image in images}
                    images = [by_id[record["id"]] for record in ranked]
                paths = await asyncio.to_thread(
                    lambda: [files.path(user.owner, image.id) for image in images]
                )
                took = job.updated_at - job.created_at
                text = f"Done: {len(images)} image{'s' if len(images) != 1 else ''} in {took:.1f} s"
                gallery = [(path, caption(image)) for path, image in zip(paths, images, strict=True)]
                yield None, views.status_html("done", text), gallery, images, used_seed
                return
        except gr.Error as error:
            yield None, views.status_html("failed", error.message), skip, skip, skip
            raise
        except ImageGenError as error:
            yield None, views.status_html("failed", error.message), skip, skip, skip
            raise gr.Error(error.message, title="Cannot generate") from error
        except StorageError as error:
            message = f"The image store is not available: {error}"
            yield None, views.status_html("failed", message), skip, skip, skip
            raise gr.Error(message, title="Storage error") from error
        if job.status == "canceled":
            yield None, views.status_html("canceled", "Canceled."), skip, skip, used_seed
            return
        message = f"Generation failed: {job.error}"
        yield None, views.status_html("failed", message), skip, skip, used_seed
        raise gr.Error(message, title="Generation failed")

    def lock() -> tuple[Any, ...]:
        return gr.update(interactive=False, value="Generating…"), gr.update(interactive=True)

    def finish(results: list[HistoryImage], request: gr.Request) -> list[Any]:
        """After a generation, whatever happened: buttons back, and the first result selected."""
        image = results[0] if results else None
        owner = login.owner(request) if image is not None else ""
        return [
            gr.update(interactive=True, value="Generate"),
            gr.update(interactive=False),
            gr.update(selected_index=0) if results else gr.skip(),
            image,
            *inspect(owner, image),
        ]

    @readable
    def cancel(job_id: str | None, request: gr.Request) -> Any:
        if not job_id:
            return gr.skip()
        service.cancel(login.owner(request), job_id)
        return views.status_html("running", "Canceling…")

    # --- controls ---------------------------------------------------------------------------------------------

    @readable
    def change_model(
        name: str, preset: str, size: str, steps: float, guidance: float, scheduler: str
    ) -> list[Any]:
        info = service.model(name)
        if preset != "Custom":
            # a preset that would switch back to another model gives way to the one that runs the picked model
            preset = own_preset(service, info)
        if preset != "Custom":
            _, values = preset_values(service, info.name, preset)
            size, steps, guidance, scheduler = (
                values["size"],
                values["steps"],
                values["guidance_scale"],
                values["scheduler"],
            )
        else:
            try:
                info.check_size(*parse_size(size))
            except (gr.Error, InvalidParamsError):  # a size the new model does not take: its native size
                size = _size(info.native_size, info.native_size)
        return [
            gr.update(info=model_note(info)),
            gr.update(value=preset, info=preset_info(service, info)),
            gr.update(choices=size_choices(info, size), value=size, info=size_info(info)),
            steps,
            guidance,
            scheduler,
        ]

    @readable
    def apply_preset(name: str, preset: str) -> list[Any]:
        if preset == "Custom":
            return [gr.skip()] * 7
        info, values = preset_values(service, name, preset)
        return [
            gr.update(value=info.name, info=model_note(info)),
            gr.update(info=preset_info(service, info)),
            gr.update(choices=size_choices(info, values["size"]), value=values["size"], info=size_info(info)),
            values["steps"],
            values["guidance_scale"],
            values["scheduler"],
            values.get("negative_prompt", gr.skip()),
        ]

    # --- results and history ----------------------------------------------------------------------------------

    @readable
    def select(images: list[HistoryImage], event: gr.SelectData, request: gr.Request) -> list[Any]:
        image = images[event.index] if images and 0 <= event.index < len(images) else None
        return [image, *inspect(login.owner(request), image)]

    @readable
    def reuse(image: HistoryImage | None) -> list[Any]:
        if image is None:
            return [gr.skip()] * (len(control_outputs) + 1)
        return [*controls(image.params, seed=image.seed), gr.Tabs(selected="generate")]

    def reuse_seed(image: HistoryImage | None) -> list[Any]:
        if image is None:
            return [gr.skip()] * 3
        return ["Fixed", image.seed, gr.Tabs(selected="generate")]

    @readable
    def variations(image: HistoryImage | None) -> list[Any]:
        if image is None:
            raise gr.Error("Select an image first.")
        return [
            *controls(image.params, seed=min(image.seed + 1, MAX_SEED), count=VARIATIONS),
            gr.Tabs(selected="generate"),
        ]

    def new_nav(query: str) -> dict[str, Any]:
        return {"query": query.strip(), "cursors": [None], "index": 0, "next": None}

    @readable
    def show_history(nav: dict[str, Any], request: gr.Request) -> list[Any]:
        owner = login.owner(request)
        page = history.page(owner, nav["query"], limit=HISTORY_PAGE, cursor=nav["cursors"][nav["index"]])
        nav = {**nav, "next": page.next_cursor}
        items = [(files.path(owner, image.id, thumbnail=True), caption(image)) for image in page.images]
        if page.images:
            label = (
                f"Page {nav['index'] + 1} · {len(page.images)} image{'s' if len(page.images) != 1 else ''}"
            )
        elif nav["query"]:
            label = f"No images match “{nav['query']}”."
        else:
            label = "No images yet: generate something first."
        return [
            gr.update(value=items, selected_index=None),
            page.images,
            nav,
            f'<p class="ig-page">{escape(label)}</p>',
            gr.update(interactive=nav["index"] > 0),
            gr.update(interactive=page.next_cursor is not None),
            None,
            *inspect(owner, None),
        ]

    def search(query: str, request: gr.Request) -> list[Any]:
        return show_history(new_nav(query or ""), request)

    def newer(nav: dict[str, Any], request: gr.Request) -> list[Any]:
        return show_history({**nav, "index": max(0, nav["index"] - 1)}, request)

    def older(nav: dict[str, Any], request: gr.Request) -> list[Any]:
        if nav["next"] is None:
            return show_history(nav, request)
        index = nav["index"] + 1
        return show_history(
            {**nav, "cursors": [*nav["cursors"][:index], nav["next"]], "index": index}, request
        )

    @readable
    def on_load(nav: dict[str, Any], current: str | None, request: gr.Request) -> list[Any]:
        """A new page: the user's header and history, and the models folder as it is now (models added or
        removed since the server started show up without a restart)."""
        models = service.models()
        names = [m.name for m in models]
        chosen = current if current in names else (service.model().name if names else None)
        return [
            header_html(login.user_name(request)),
            gr.update(choices=model_choices(models), value=chosen),
            *show_history(nav, request),
        ]

    # --- compare ----------------------------------------------------------------------------------------------

    def compare_view(pair: list[HistoryImage], owner: str) -> list[Any]:
        a, b = [*pair, None, None][:2]
        images = [
            gr.update(
                value=files.path(owner, image.id) if image else None,
                label=f"{name} · seed {image.seed}" if image else name,
            )
            for name, image in (("A", a), ("B", b))
        ]
        return [
            pair,
            *images,
            views.compare_html(a, b),
            gr.update(interactive=len(pair) == 2),
            gr.update(interactive=bool(pair)),
        ]

    @readable
    def add_to_compare(
        image: HistoryImage | None, pair: list[HistoryImage], request: gr.Request
    ) -> list[Any]:
        if image is None:
            raise gr.Error("Select an image first.")
        pair = [*pair[-1:], image] if len(pair) == 2 else [*pair, image]
        if len(pair) == 1:
            gr.Info("Added as A: now pick the image to compare it with.")
            tabs = gr.skip()
        else:
            tabs = gr.Tabs(selected="compare")
        return [*compare_view(pair, login.owner(request)), tabs]

    @readable
    def swap(pair: list[HistoryImage], request: gr.Request) -> list[Any]:
        return compare_view(pair[::-1], login.owner(request))

    @readable
    def clear_compare(request: gr.Request) -> list[Any]:
        return compare_view([], login.owner(request))

    # --- PNG info ---------------------------------------------------------------------------------------------

    def read_png(path: str | None) -> list[Any]:
        if not path:
            return [
                None,
                '<p class="ig-empty">Drop a PNG to read how it was made.</p>',
                "",
                gr.update(interactive=False),
            ]
        try:
            info = read_png_info(path)
        except (ValueError, OSError) as error:
            return [
                None,
                f'<p class="ig-empty">Cannot read this file: {escape(str(error))}</p>',
                "",
                gr.update(interactive=False),
            ]
        usable = info.source != "none" and bool(info.parameters.get("prompt") or info.request)
        return [
            info,
            views.png_info_html(info.parameters, info.source),
            info.raw_text or "",
            gr.update(interactive=usable),
        ]

    @readable
    def send_to_generate(info: PngInfo | None, model: str) -> list[Any]:
        if info is None:
            raise gr.Error("Drop a PNG first.")
        imported = import_parameters(info, service.models(), service.model(model))
        values = imported.values
        info_model = service.model(values["model"])
        size = _size(values["width"], values["height"]) if "width" in values else None
        updates = [
            values.get("prompt", gr.skip()),
            values.get("negative_prompt", gr.skip()),
            gr.update(value=info_model.name, info=model_note(info_model)),
            gr.update(value="Custom", info=preset_info(service, info_model)),
            gr.update(
                choices=size_choices(info_model, size),
                info=size_info(info_model),
                value=size or _size(info_model.native_size, info_model.native_size),
            ),
            values.get("steps", gr.skip()),
            values.get("guidance_scale", gr.skip()),
            values.get("scheduler", gr.skip()),
            "Fixed" if "seed" in values else gr.skip(),
            values.get("seed", gr.skip()),
            gr.skip(),
        ]
        message = "Parameters loaded into Generate."
        if imported.notes:
            message += " " + " ".join(imported.notes)
        gr.Info(message)
        return [*updates, gr.Tabs(selected="generate")]

    # --- layout -----------------------------------------------------------------------------------------------

    with gr.Blocks(title="image-gen studio", fill_width=True, delete_cache=(3600, 86400)) as studio:
        job_state = gr.State(None)
        results_state = gr.State([])
        selected_result = gr.State(None)
        history_items = gr.State([])
        history_nav = gr.State(new_nav(""))
        selected_history = gr.State(None)
        compare_pair = gr.State([])
        png_state = gr.State(None)

        header = gr.HTML(header_html(None, loaded=False), elem_id="ig-header-block")
        with gr.Tabs(selected="generate", overflow_behavior="wrap", elem_id="ig-tabs") as tabs:
            with gr.Tab("Generate", id="generate", elem_id="tab-generate"), gr.Row(equal_height=False):
                with gr.Column(scale=3, min_width=320):
                    prompt = gr.Textbox(
                        label="Prompt",
                        info="Ctrl+Enter generates",
                        lines=3,
                        max_lines=8,
                        elem_id="prompt",
                        autofocus=True,
                        placeholder="a red circle to the left of a blue square",
                    )
                    negative = gr.Textbox(
                        label="Negative prompt",
                        lines=1,
                        max_lines=4,
                        elem_id="negative",
                        placeholder="what to keep out of the image",
                    )
                    with gr.Row():
                        generate_button = gr.Button(
                            "Generate", variant="primary", elem_id="generate", scale=3
                        )
                        cancel_button = gr.Button(
                            "Cancel",
                            variant="stop",
                            elem_id="cancel",
                            interactive=False,
                            scale=1,
                            min_width=90,
                        )
                    status = gr.HTML(views.status_html("idle", "Ready."), elem_id="status")
                    gallery = gr.Gallery(
                        label="Results",
                        columns=4,
                        height="auto",
                        object_fit="contain",
                        elem_id="results",
                        buttons=["download", "fullscreen"],
                        interactive=False,
                    )
                    results_inspector = Inspector.build("results")
                with gr.Column(scale=2, min_width=300, elem_id="settings"):
                    model = gr.Dropdown(
                        model_choices(service.models()),
                        value=default.name,
                        label="Model",
                        info=model_note(default),
                        elem_id="model",
                    )
                    preset = gr.Radio(
                        list(PRESETS),
                        value="Speed",
                        label="Preset",
                        info=preset_info(service, default),
                        elem_id="preset",
                    )
                    size = gr.Dropdown(
                        size_choices(default, start["size"]),
                        value=start["size"],
                        label="Size (width x height)",
                        allow_custom_value=True,
                        info=size_info(default),
                        elem_id="size",
                    )
                    steps = gr.Slider(1, 150, value=start["steps"], step=1, label="Steps", elem_id="steps")
                    guidance = gr.Slider(
                        0,
                        20,
                        value=start["guidance_scale"],
                        step=0.5,
                        label="Guidance (CFG)",
                        elem_id="guidance",
                    )
                    scheduler = gr.Dropdown(
                        [(SCHEDULERS[name].label, name) for name in SCHEDULER_NAMES],
                        value=start["scheduler"],
                        label="Scheduler",
                        elem_id="scheduler",
                    )
                    with gr.Row(equal_height=True):
                        seed_mode = gr.Radio(
                            list(SEED_MODES), value="Random", label="Seed", min_width=150, elem_id="seed-mode"
                        )
                        seed = gr.Number(
                            value=None,
                            precision=0,
                            minimum=0,
                            maximum=MAX_SEED,
                            label="Seed value",
                            placeholder="random",
                            min_width=150,
                            elem_id="seed",
                        )
                    count = gr.Slider(
                        1, MAX_BATCH, value=1, step=1, label="Batch count (images)", elem_id="count"
                    )
                    best_of = gr.Slider(
                        1,
                        MAX_BATCH,
                        value=1,
                        step=1,
                        label="Best of (candidates)",
                        info="Generate this many and keep the batch count best by CLIPScore; 1: off",
                        elem_id="best-of",
                    )
            with gr.Tab("History", id="history", elem_id="tab-history") as history_tab:
                with gr.Row(equal_height=True):
                    query = gr.Textbox(
                        placeholder="Search your prompts",
                        show_label=False,
                        scale=4,
                        min_width=180,
                        elem_id="history-query",
                        container=False,
                    )
                    search_button = gr.Button("Search", scale=1, min_width=90, elem_id="history-search")
                history_gallery = gr.Gallery(
                    label="Your images",
                    show_label=False,
                    columns=6,
                    height="auto",
                    object_fit="cover",
                    elem_id="history",
                    allow_preview=False,
                    interactive=False,
                    buttons=[],
                    elem_classes="ig-history",
                )
                with gr.Row(elem_classes="ig-pager", equal_height=True):
                    previous_button = gr.Button(
                        "← Newer", size="sm", interactive=False, min_width=80, elem_id="history-newer"
                    )
                    page_label = gr.HTML('<p class="ig-page"></p>', elem_id="history-page")
                    next_button = gr.Button(
                        "Older →", size="sm", interactive=False, min_width=80, elem_id="history-older"
                    )
                history_inspector = Inspector.build("history")
            with gr.Tab("Compare", id="compare", elem_id="tab-compare"):
                with gr.Row(equal_height=True):
                    compare_a = gr.Image(
                        label="A",
                        interactive=False,
                        min_width=140,
                        elem_id="compare-a",
                        height=420,
                        buttons=["download", "fullscreen"],
                    )
                    compare_b = gr.Image(
                        label="B",
                        interactive=False,
                        min_width=140,
                        elem_id="compare-b",
                        height=420,
                        buttons=["download", "fullscreen"],
                    )
                compare_table = gr.HTML(views.compare_html(None, None), elem_id="compare-table")
                with gr.Row():
                    swap_button = gr.Button(
                        "Swap A and B", size="sm", interactive=False, elem_id="compare-swap"
                    )
                    clear_button = gr.Button("Clear", size="sm", interactive=False, elem_id="compare-clear")
            with gr.Tab("PNG info", id="pnginfo", elem_id="tab-pnginfo"), gr.Row(equal_height=False):
                with gr.Column(scale=1, min_width=280):
                    png_image = gr.Image(
                        label="Drop a PNG",
                        type="filepath",
                        image_mode=None,
                        sources=["upload", "clipboard"],
                        elem_id="png-drop",
                        height=360,
                    )
                with gr.Column(scale=1, min_width=280):
                    png_parameters = gr.HTML(
                        '<p class="ig-empty">Drop a PNG to read how it was made: ours, or '
                        "one from A1111, Forge, Fooocus, ComfyUI or InvokeAI.</p>",
                        elem_id="png-parameters",
                    )
                    png_raw = gr.Textbox(
                        label="Raw text",
                        lines=4,
                        max_lines=12,
                        interactive=False,
                        buttons=["copy"],
                        elem_id="png-raw",
                    )
                    send_button = gr.Button(
                        "Send to Generate", variant="primary", interactive=False, elem_id="png-send"
                    )

        # --- wiring -------------------------------------------------------------------------------------------
        private: dict[str, Any] = {"api_visibility": "private", "show_progress": "hidden"}
        control_outputs = [
            prompt,
            negative,
            model,
            preset,
            size,
            steps,
            guidance,
            scheduler,
            seed_mode,
            seed,
            count,
        ]
        inputs = [prompt, negative, model, size, steps, guidance, scheduler, seed_mode, seed, count, best_of]
        generate_outputs = [job_state, status, gallery, results_state, seed]
        finish_outputs = [
            generate_button,
            cancel_button,
            gallery,
            selected_result,
            *results_inspector.outputs,
        ]

        def run_generation(locked: Any, **api: Any) -> None:
            """After `locked` (the event that locked the buttons): generate, then unlock and select the first result.
            Gradio 6's page runs a `.then` only after a success, so the unlock also follows a failure."""
            generated = locked.then(
                generate, inputs, generate_outputs, concurrency_limit=None, show_progress="hidden", **api
            )
            generated.then(finish, results_state, finish_outputs, **private)
            generated.failure(finish, results_state, finish_outputs, **private)

        run_generation(
            generate_button.click(lock, None, [generate_button, cancel_button], queue=False, **private),
            api_name="generate",
            api_description="Generate images through the job queue; returns status, images and seed.",
        )
        cancel_button.click(cancel, job_state, status, concurrency_limit=None, **private)

        model.input(
            change_model,
            [model, preset, size, steps, guidance, scheduler],
            [model, preset, size, steps, guidance, scheduler],
            **private,
        )
        preset.input(
            apply_preset, [model, preset], [model, preset, size, steps, guidance, scheduler, negative], **private
        )
        for control in (size, steps, guidance, scheduler):
            control.input(lambda: "Custom", None, preset, queue=False, **private)
        seed.input(lambda: "Fixed", None, seed_mode, queue=False, **private)

        gallery.select(select, results_state, [selected_result, *results_inspector.outputs], **private)
        history_gallery.select(
            select, history_items, [selected_history, *history_inspector.outputs], **private
        )
        compare_outputs = [compare_pair, compare_a, compare_b, compare_table, swap_button, clear_button]
        for inspector, chosen in (
            (results_inspector, selected_result),
            (history_inspector, selected_history),
        ):
            inspector.reuse.click(reuse, chosen, [*control_outputs, tabs], **private)
            inspector.reuse_seed.click(reuse_seed, chosen, [seed_mode, seed, tabs], **private)
            run_generation(
                inspector.variations.click(variations, chosen, [*control_outputs, tabs], **private).success(
                    lock, None, [generate_button, cancel_button], queue=False, **private
                ),
                api_visibility="private",
            )
            inspector.compare.click(
                add_to_compare, [chosen, compare_pair], [*compare_outputs, tabs], **private
            )
        swap_button.click(swap, compare_pair, compare_outputs, **private)
        clear_button.click(clear_compare, None, compare_outputs, **private)

        history_outputs = [
            history_gallery,
            history_items,
            history_nav,
            page_label,
            previous_button,
            next_button,
            selected_history,
            *history_inspector.outputs,
        ]
        search_button.click(search, query, history_outputs, **private)
        query.submit(search, query, history_outputs, **private)
        previous_button.click(newer, history_nav, history_outputs, **private)
        next_button.click(older, history_nav, history_outputs, **private)
        history_tab.select(show_history, history_nav, history_outputs, **private)
        studio.load(on_load, [history_nav, model], [header, model, *history_outputs], **private)

        png_image.change(read_png, png_image, [png_state, png_parameters, png_raw, send_button], **private)
        send_button.click(send_to_generate, [png_state, model], [*control_outputs, tabs], **private)
    studio.queue(default_concurrency_limit=8)
    return studio


def mount_studio(
    app: FastAPI, service: GenerationService, submission: Submission, keys: KeyStore, path: str = "/"
) -> FastAPI:
    """Mount the studio on the API's app: a login page when API keys are configured, else the local user."""
    login = StudioLogin(keys)
    return gr.mount_gradio_app(
        app,
        build_studio(service, submission, login),
        path=path,
        auth=login.check if login.enabled else None,
        auth_message="Sign in with an API key: its name as the user name, its secret as the password.",
        theme=THEME,
        css=CSS,
        js=JS,
        footer_links=["api"],
        show_error=False,
        ssr_mode=False,
    )
