"""Text2ImagePipeline: same pixels as stock diffusers, seeds that mean one thing, callbacks, cancellation, caching."""

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image

from pipelines.attention import set_vae_tiling
from pipelines.errors import GenerationCanceled, InvalidParamsError
from pipelines.params import GenerationParams
from pipelines.schedulers import make_scheduler
from pipelines.text2image import StepEvent, Text2ImagePipeline, resolve_device

SIZE = 32
STEPS = 3
PIXEL_TOLERANCE = 2  # of 255


def pixels(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(image) for image in images]).astype(np.int16)


def max_pixel_difference(a: list[Image.Image], b: list[Image.Image]) -> int:
    return int(np.abs(pixels(a) - pixels(b)).max())


def generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(seed) for seed in seeds]


def count_unet_rows(pipe: Text2ImagePipeline) -> list[int]:
    """Batch rows of every UNet call made from now on."""
    rows: list[int] = []
    pipe.unet.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    return rows


@pytest.fixture(scope="module")
def sd(tiny_sd_model: Path) -> Text2ImagePipeline:
    return Text2ImagePipeline.from_pretrained(tiny_sd_model, device="cpu")


@pytest.fixture
def fresh_sd(tiny_sd_model: Path) -> Text2ImagePipeline:
    """A pipeline of its own, for tests that hook into its modules."""
    return Text2ImagePipeline.from_pretrained(tiny_sd_model, device="cpu")


def stock_images(stock, prompts, negative_prompts, seeds, scheduler, guidance, config) -> list[Image.Image]:
    stock.set_progress_bar_config(disable=True)
    stock.scheduler = make_scheduler(scheduler, config)
    return stock(
        prompts,
        negative_prompt=negative_prompts,
        num_inference_steps=STEPS,
        guidance_scale=guidance,
        height=SIZE,
        width=SIZE,
        generator=generators(seeds),
    ).images


@pytest.mark.parametrize("scheduler", ["ddim", "euler_a", "dpmpp_2m_karras"])
def test_matches_stock_stable_diffusion_pipeline(
    sd: Text2ImagePipeline, tiny_sd_model: Path, scheduler: str
) -> None:
    prompts, negatives, seeds = ["a red cat", "a blue house"], ["", "blurry"], [7, 11]
    ours = sd(prompts, negatives, seeds, SIZE, SIZE, STEPS, 5.0, scheduler)
    stock = StableDiffusionPipeline.from_pretrained(tiny_sd_model, safety_checker=None, local_files_only=True)
    reference = stock_images(stock, prompts, negatives, seeds, scheduler, 5.0, sd.scheduler_config)
    assert pixels(ours).std() > 1, "random weights should still draw a non-flat image"
    assert max_pixel_difference(ours, reference) <= PIXEL_TOLERANCE


@pytest.mark.parametrize("scheduler", ["euler", "dpmpp_2m"])
def test_matches_stock_sdxl_pipeline(tiny_sdxl_model: Path, scheduler: str) -> None:
    pipe = Text2ImagePipeline.from_pretrained(tiny_sdxl_model, device="cpu")
    prompts, seeds = ["a lighthouse at dusk", "a bowl of fruit"], [3, 4]
    ours = pipe(prompts, ["", ""], seeds, SIZE, SIZE, STEPS, 5.0, scheduler)
    stock = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_model, local_files_only=True)
    # An empty negative prompt is diffusers' "no negative prompt": zero embeddings (force_zeros_for_empty_prompt).
    reference = stock_images(stock, prompts, None, seeds, scheduler, 5.0, pipe.scheduler_config)
    assert max_pixel_difference(ours, reference) <= PIXEL_TOLERANCE

    ours = pipe(prompts, ["grainy", "grainy"], seeds, SIZE, SIZE, STEPS, 5.0, scheduler)
    reference = stock_images(
        stock, prompts, ["grainy", "grainy"], seeds, scheduler, 5.0, pipe.scheduler_config
    )
    assert max_pixel_difference(ours, reference) <= PIXEL_TOLERANCE


def test_matches_stock_with_the_minilm_text_encoder(tiny_minilm_model: Path) -> None:
    pipe = Text2ImagePipeline.from_pretrained(tiny_minilm_model, device="cpu")
    assert pipe.text_encoder.__class__.__name__ == "BertModel"
    ours = pipe(["a small boat"], ["dark"], [5], SIZE, SIZE, STEPS, 4.0, "unipc")
    stock = StableDiffusionPipeline.from_pretrained(
        tiny_minilm_model, safety_checker=None, local_files_only=True
    )
    reference = stock_images(stock, ["a small boat"], ["dark"], [5], "unipc", 4.0, pipe.scheduler_config)
    assert max_pixel_difference(ours, reference) <= PIXEL_TOLERANCE


def test_lcm_model_matches_stock_and_makes_one_unet_pass_per_step(tiny_lcm_model: Path) -> None:
    pipe = Text2ImagePipeline.from_pretrained(tiny_lcm_model, device="cpu")
    rows = count_unet_rows(pipe)
    ours = pipe(["a tree"], [""], [9], SIZE, SIZE, STEPS, 8.0, "lcm")
    assert rows == [1] * STEPS  # the guidance scale goes into the embedding, not into an unconditional pass
    stock = StableDiffusionPipeline.from_pretrained(
        tiny_lcm_model, safety_checker=None, local_files_only=True
    )
    reference = stock_images(stock, ["a tree"], None, [9], "lcm", 8.0, pipe.scheduler_config)
    assert max_pixel_difference(ours, reference) <= PIXEL_TOLERANCE


def test_guidance_above_one_batches_conditional_and_unconditional_rows(fresh_sd: Text2ImagePipeline) -> None:
    rows = count_unet_rows(fresh_sd)
    fresh_sd(["a", "b"], ["", ""], [1, 2], SIZE, SIZE, 2, 3.0, "ddim")
    fresh_sd(["a", "b"], ["", ""], [1, 2], SIZE, SIZE, 2, 1.0, "ddim")
    assert rows == [4, 4, 2, 2]


def test_same_request_twice_gives_identical_images(sd: Text2ImagePipeline) -> None:
    first = sd(["a green field"], [""], [123], SIZE, SIZE, STEPS, 5.0, "euler_a")
    second = sd(["a green field"], [""], [123], SIZE, SIZE, STEPS, 5.0, "euler_a")
    assert max_pixel_difference(first, second) == 0


def test_image_i_of_a_batch_equals_a_single_image_with_seed_plus_i(sd: Text2ImagePipeline) -> None:
    result = sd.generate(
        GenerationParams(prompt="a castle", seed=40, num_images=3, steps=STEPS, scheduler="euler_a")
    )
    assert result.seeds == [40, 41, 42]
    for i, image in enumerate(result.images):
        single = sd.generate(
            GenerationParams(prompt="a castle", seed=40 + i, steps=STEPS, scheduler="euler_a")
        )
        assert max_pixel_difference([image], single.images) <= PIXEL_TOLERANCE
    assert max_pixel_difference(result.images[:1], result.images[1:2]) > PIXEL_TOLERANCE


def test_different_seeds_give_different_images(sd: Text2ImagePipeline) -> None:
    images = sd(["a castle", "a castle"], ["", ""], [1, 2], SIZE, SIZE, STEPS, 5.0, "ddim")
    assert max_pixel_difference(images[:1], images[1:]) > PIXEL_TOLERANCE


def test_callback_sees_every_step_with_a_preview_at_image_size(sd: Text2ImagePipeline) -> None:
    events: list[StepEvent] = []
    sd(["a moon"], [""], [1], 48, SIZE, STEPS, 5.0, "ddim", callback=events.append)
    assert [(event.step, event.total) for event in events] == [(1, STEPS), (2, STEPS), (3, STEPS)]
    preview = events[-1].preview()
    assert preview.size == (48, SIZE)
    assert preview.mode == "RGB"


def test_preview_of_other_latent_channel_counts_uses_three_channels_stretched() -> None:
    latents = torch.randn(2, 6, 5, 7)
    assert StepEvent(step=1, total=1, latents=latents, scale=8).preview(index=1).size == (56, 40)
    values = np.asarray(StepEvent(step=1, total=1, latents=latents, scale=1).preview(index=1))
    assert values.shape == (5, 7, 3)
    assert (values.min(axis=(0, 1)) == 0).all() and (values.max(axis=(0, 1)) == 255).all()


def test_cancel_from_the_callback_stops_within_one_step_and_returns_no_image(
    fresh_sd: Text2ImagePipeline,
) -> None:
    rows = count_unet_rows(fresh_sd)

    def cancel_at_step_two(event: StepEvent) -> None:
        if event.step == 2:
            raise GenerationCanceled("canceled by the user")

    with pytest.raises(GenerationCanceled):
        fresh_sd(["a dog"], [""], [1], SIZE, SIZE, 10, 5.0, "ddim", callback=cancel_at_step_two)
    assert len(rows) == 2


def test_repeated_prompts_skip_the_text_encoder(fresh_sd: Text2ImagePipeline) -> None:
    encoded: list[int] = []
    fresh_sd.text_encoder.register_forward_pre_hook(lambda module, args: encoded.append(args[0].shape[0]))
    fresh_sd(["a fox", "a fox"], ["", ""], [1, 2], SIZE, SIZE, 1, 5.0, "ddim")
    assert encoded == [1, 1]  # "a fox" once, "" once
    fresh_sd(["a fox"], [""], [3], SIZE, SIZE, 1, 5.0, "ddim")
    assert encoded == [1, 1]


def test_prompt_cache_is_bounded(fresh_sd: Text2ImagePipeline) -> None:
    fresh_sd.prompt_cache_size = 3
    fresh_sd.encode_prompts([f"prompt {i}" for i in range(5)])
    assert list(fresh_sd.prompt_cache) == ["prompt 2", "prompt 3", "prompt 4"]


def test_generate_fills_defaults_and_reports_what_ran(sd: Text2ImagePipeline) -> None:
    result = sd.generate(GenerationParams(prompt="a kite", steps=2))
    params = result.params
    assert (params.model, params.width, params.height) == ("tiny-sd", SIZE, SIZE)
    assert (params.scheduler, params.guidance_scale) == (sd.info.default_scheduler, sd.info.default_guidance)
    assert params.seed is not None and result.seeds == [params.seed]
    assert (result.attention, result.device, result.dtype, result.vae_tiled) == (
        "sdpa",
        "cpu",
        "float32",
        False,
    )
    assert set(result.timings) == {"text_encode", "denoise", "decode"}
    metadata = result.metadata()
    assert metadata["params"]["prompt"] == "a kite" and metadata["attention"] == "sdpa"


@pytest.mark.parametrize(
    ("width", "height", "steps", "guidance", "scheduler", "param", "hint"),
    [
        (36, SIZE, 2, 5.0, "ddim", "width", "multiple of 8 from 16 to 64"),
        (SIZE, 72, 2, 5.0, "ddim", "height", "multiple of 8 from 16 to 64"),
        (SIZE, SIZE, 0, 5.0, "ddim", "steps", "1 to 150"),
        (SIZE, SIZE, 151, 5.0, "ddim", "steps", "1 to 150"),
        (SIZE, SIZE, 2, -1.0, "ddim", "guidance_scale", ">= 0"),
        (SIZE, SIZE, 2, 5.0, "dpm_fast", "scheduler", "dpmpp_2m_karras"),
    ],
)
def test_invalid_requests_name_the_allowed_values(
    sd: Text2ImagePipeline,
    width: int,
    height: int,
    steps: int,
    guidance: float,
    scheduler: str,
    param: str,
    hint: str,
) -> None:
    with pytest.raises(InvalidParamsError, match=hint) as error:
        sd(["x"], [""], [1], width, height, steps, guidance, scheduler)
    assert error.value.param == param


def test_batch_lists_must_have_equal_lengths(sd: Text2ImagePipeline) -> None:
    with pytest.raises(InvalidParamsError, match="one seed per prompt"):
        sd(["a", "b"], ["", ""], [1], SIZE, SIZE, 1, 5.0, "ddim")


@pytest.mark.parametrize("attention", ["math", "sliced"])
def test_attention_backends_draw_the_same_image(
    tiny_sd_model: Path, sd: Text2ImagePipeline, attention: str
) -> None:
    pipe = Text2ImagePipeline.from_pretrained(tiny_sd_model, device="cpu", attention=attention)
    assert pipe.optimizations.attention == attention
    request = (["a mountain"], [""], [3], SIZE, SIZE, 2, 5.0, "ddim")
    assert max_pixel_difference(pipe(*request), sd(*request)) <= PIXEL_TOLERANCE


def test_xformers_and_cpu_offload_fall_back_on_cpu_with_a_warning(
    tiny_sd_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        pipe = Text2ImagePipeline.from_pretrained(
            tiny_sd_model, device="cpu", attention="xformers", cpu_offload=True
        )
    assert pipe.optimizations.attention == "sdpa"
    assert pipe.optimizations.cpu_offload is False
    assert "xformers" in caplog.text and "cpu_offload" in caplog.text


def test_vae_tiling_auto_tiles_only_above_1024_pixels(sd: Text2ImagePipeline) -> None:
    assert set_vae_tiling(sd.vae, "auto", 1024, 1024) is False
    assert set_vae_tiling(sd.vae, "auto", 1032, 512) is True
    assert set_vae_tiling(sd.vae, "on", 64, 64) is True
    assert set_vae_tiling(sd.vae, "off", 4096, 4096) is False
    set_vae_tiling(sd.vae, "off", SIZE, SIZE)


def test_bare_unet_loop_times_only_unet_passes(fresh_sd: Text2ImagePipeline) -> None:
    rows = count_unet_rows(fresh_sd)
    seconds = fresh_sd.bare_unet_loop(SIZE, SIZE, steps=4, guidance_scale=5.0, batch_size=2)
    assert seconds > 0
    assert rows == [4] * 4


def test_sdxl_bare_unet_loop_builds_the_added_conditioning(tiny_sdxl_model: Path) -> None:
    pipe = Text2ImagePipeline.from_pretrained(tiny_sdxl_model, device="cpu")
    assert pipe.bare_unet_loop(SIZE, SIZE, steps=2, guidance_scale=1.0) > 0


def test_sdxl_in_float16_decodes_with_a_float32_vae(tiny_sdxl_model: Path) -> None:
    half = Text2ImagePipeline.from_pretrained(tiny_sdxl_model, device="cpu", dtype="float16")
    assert (half.unet.dtype, half.text_encoder_2.dtype, half.vae.dtype) == (
        torch.float16,
        torch.float16,
        torch.float32,
    )
    full = Text2ImagePipeline.from_pretrained(tiny_sdxl_model, device="cpu", dtype="float32")
    request = (["a cat"], [""], [1], SIZE, SIZE, 2, 5.0, "euler")
    assert max_pixel_difference(half(*request), full(*request)) <= 8


@pytest.mark.parametrize(
    ("option", "value"), [("dtype", "float64"), ("attention", "flash"), ("vae_tiling", "yes")]
)
def test_unknown_load_options_name_the_known_ones(tiny_sd_model: Path, option: str, value: str) -> None:
    with pytest.raises(InvalidParamsError, match=r"use one of|use auto") as error:
        Text2ImagePipeline.from_pretrained(tiny_sd_model, device="cpu", **{option: value})
    assert error.value.param == option


@pytest.mark.parametrize(
    ("device", "message"),
    [("tpu9", "is not known: use auto, cpu, cuda"), ("cuda", "is not available on this machine"), ("cuda:7", "not available")],
)
def test_a_device_this_machine_lacks_is_refused_by_name(
    device: str, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InvalidParamsError, match=message) as error:
        resolve_device(device)
    assert error.value.param == "device"
    assert resolve_device("cpu").type == "cpu" and resolve_device("auto").type == "cpu"


def test_a_cuda_index_past_the_machines_devices_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(InvalidParamsError, match="'cuda:2' does not exist: this machine has 2 CUDA device"):
        resolve_device("cuda:2")
    assert resolve_device("cuda:1") == torch.device("cuda:1")
