"""The Gradio studio for designers, mounted at `/`: prompt in, live progress, images with their parameters out.

Work goes through the job queue (the same `GenerationService` as the REST API), so the studio and programs
share workers and fair share.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from typing import Any

import gradio as gr
from PIL import Image

from image_gen.errors import ImageGenError
from image_gen.service import GenerationService
from pipelines.params import GenerationParams, ModelInfo
from pipelines.schedulers import SCHEDULER_NAMES

OWNER = "local"
RANDOM_SEED = -1


def _model_choices(models: list[ModelInfo]) -> list[tuple[str, str]]:
    return [(f"{m.name} ({m.label})" if m.label else m.name, m.name) for m in models]


def _native(info: ModelInfo) -> str:
    return f"{info.native_size}x{info.native_size}"


def _decode_preview(data_url: str | None) -> Image.Image | None:
    if not data_url:
        return None
    return Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1])))


def _parameters_text(job_params: dict[str, Any], seeds: list[int]) -> str:
    p = job_params
    return (f"**{p['prompt']}**  \nnegative: {p['negative_prompt'] or '-'}  \n"
            f"model `{p['model']}` · {p['width']}x{p['height']} · {p['scheduler']} · {p['steps']} steps · "
            f"guidance {p['guidance_scale']:g} · seeds {', '.join(map(str, seeds))}")


def build_studio(service: GenerationService) -> gr.Blocks:
    models = service.models()
    default = service.model()

    def model_defaults(name: str) -> tuple[Any, ...]:
        info = service.model(name)
        return (gr.update(choices=info.allowed_sizes, value=_native(info)), gr.update(value=info.default_steps),
                gr.update(value=info.default_guidance), gr.update(value=info.default_scheduler),
                f"*{info.description}*" if info.description else "")

    def generate(prompt: str, negative: str, model: str, size: str, steps: float, guidance: float,
                 scheduler: str, seed: float, count: float) -> Iterator[tuple[Any, ...]]:
        if not prompt.strip():
            raise gr.Error("Type a prompt first.")
        width, height = (int(v) for v in size.split("x"))
        params = GenerationParams(prompt=prompt, negative_prompt=negative, model=model, width=width, height=height,
                                  steps=int(steps), guidance_scale=float(guidance), scheduler=scheduler,
                                  seed=None if seed is None or int(seed) == RANDOM_SEED else int(seed),
                                  num_images=int(count))
        try:
            submitted = service.submit(OWNER, params)
        except ImageGenError as error:
            raise gr.Error(error.message) from error
        for job in service.follow(OWNER, submitted.id):
            if job.status == "queued":
                position = service.position(job)
                yield job.id, f"Queued (position {position})" if position is not None else "Queued", None, gr.skip(), gr.skip()
            elif job.status == "running" and job.progress:
                step, total = job.progress["step"], job.progress["total"]
                yield job.id, f"Step {step} of {total}", _decode_preview(job.progress.get("preview")), gr.skip(), gr.skip()
        if job.status != "succeeded":
            message = "Canceled." if job.status == "canceled" else f"Failed: {job.error}"
            yield None, message, None, gr.skip(), gr.skip()
            return
        records = job.result["images"]
        gallery = [(Image.open(io.BytesIO(service.image(OWNER, r["id"]).data)), f"seed {r['seed']}") for r in records]
        yield (None, f"Done in {job.result.get('seconds', 0):.1f} s", None, gallery,
               _parameters_text(job.payload["params"], [r["seed"] for r in records]))

    def cancel(job_id: str | None) -> str:
        if job_id:
            service.cancel(OWNER, job_id)
            return "Canceling..."
        return "Nothing to cancel."

    with gr.Blocks(title="image-gen studio") as studio:
        job_state = gr.State(None)
        gr.Markdown("## image-gen studio")
        with gr.Row():
            with gr.Column(scale=2):
                prompt = gr.Textbox(label="Prompt", lines=2, placeholder="a red circle to the left of a blue square",
                                    elem_id="prompt")
                negative = gr.Textbox(label="Negative prompt", lines=1)
                with gr.Row():
                    generate_button = gr.Button("Generate", variant="primary", elem_id="generate")
                    cancel_button = gr.Button("Cancel", elem_id="cancel")
                status = gr.Markdown("Ready.", elem_id="status")
                preview = gr.Image(label="Preview", interactive=False, height=160, elem_id="preview")
            with gr.Column(scale=1):
                model = gr.Dropdown(_model_choices(models), value=default.name, label="Model", elem_id="model")
                model_note = gr.Markdown(f"*{default.description}*" if default.description else "")
                size = gr.Dropdown(default.allowed_sizes, value=_native(default), label="Size")
                steps = gr.Slider(1, 150, value=default.default_steps, step=1, label="Steps")
                guidance = gr.Slider(0, 20, value=default.default_guidance, step=0.5, label="Guidance")
                scheduler = gr.Dropdown(list(SCHEDULER_NAMES), value=default.default_scheduler, label="Scheduler")
                seed = gr.Number(value=RANDOM_SEED, precision=0, label="Seed (-1: random)")
                count = gr.Slider(1, 8, value=1, step=1, label="Images")
        gallery = gr.Gallery(label="Results", columns=4, height="auto", elem_id="gallery")
        parameters = gr.Markdown(elem_id="parameters")

        model.change(model_defaults, model, [size, steps, guidance, scheduler, model_note])
        inputs = [prompt, negative, model, size, steps, guidance, scheduler, seed, count]
        outputs = [job_state, status, preview, gallery, parameters]
        generate_button.click(generate, inputs, outputs, api_name="generate")
        prompt.submit(generate, inputs, outputs, api_name=False)
        cancel_button.click(cancel, job_state, status, api_name="cancel")
    return studio
