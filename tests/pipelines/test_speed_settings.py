"""The speed settings (channels_last, fused QKV, bf16 autocast, torch.compile) and the CUDA path: each draws what
stock diffusers draws, within the parity tolerance (bf16: within its documented tolerance)."""

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from pipelines import attention
from pipelines.errors import InvalidParamsError
from pipelines.params import GenerationParams
from pipelines.registry import ModelRegistry
from pipelines.schedulers import make_scheduler
from pipelines.text2image import Text2ImagePipeline

SIZE = 32
STEPS = 3
PIXEL_TOLERANCE = 2  # of 255, as tests/pipelines/test_text2image.py
BF16_PIXEL_TOLERANCE = 8
"""bfloat16 keeps 8 significant bits: over a few steps pixels drift by a few levels (docs/performance.md)."""
PROMPTS, NEGATIVES, SEEDS = ["a red cat", "a blue house"], ["", "blurry"], [7, 11]
CUDA = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA device: the --device cuda path (float16 weights, sdpa) runs where one exists",
)


def pixels(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(image) for image in images]).astype(np.int16)


def max_pixel_difference(a: list[Image.Image], b: list[Image.Image]) -> int:
    return int(np.abs(pixels(a) - pixels(b)).max())


def stock_images(model: Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> list[Image.Image]:
    stock = StableDiffusionPipeline.from_pretrained(
        model, safety_checker=None, local_files_only=True, torch_dtype=dtype
    ).to(device)
    stock.set_progress_bar_config(disable=True)
    stock.scheduler = make_scheduler("ddim", stock.scheduler.config)
    return stock(
        PROMPTS,
        negative_prompt=NEGATIVES,
        num_inference_steps=STEPS,
        guidance_scale=5.0,
        height=SIZE,
        width=SIZE,
        generator=[torch.Generator("cpu").manual_seed(seed) for seed in SEEDS],
    ).images


def ours(pipe: Text2ImagePipeline) -> list[Image.Image]:
    return pipe(PROMPTS, NEGATIVES, SEEDS, SIZE, SIZE, STEPS, 5.0, "ddim")


@pytest.fixture(scope="module")
def reference(tiny_sd_model: Path) -> list[Image.Image]:
    return stock_images(tiny_sd_model)


@pytest.mark.parametrize(
    "options", [{"channels_last": True}, {"fuse_qkv": True}, {"channels_last": True, "fuse_qkv": True}]
)
def test_layout_and_fused_projections_match_stock(
    tiny_sd_model: Path, reference: list[Image.Image], options: dict
) -> None:
    pipe = Text2ImagePipeline.from_pretrained(tiny_sd_model, device="cpu", **options)
    assert all(getattr(pipe.optimizations, name) is True for name in options)
    assert max_pixel_difference(ours(pipe), reference) <= PIXEL_TOLERANCE


def test_channels_last_stores_convolution_weights_nhwc(tiny_sd_model: Path) -> None:
    pipe = Text2ImagePipeline.from_pretrained(tiny_sd_model, device="cpu", channels_last=True)
    weight = pipe.unet.conv_in.weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()


def test_fused_qkv_makes_one_projection_per_self_attention(tiny_sd_model: Path) -> None:
    pipe = Text2ImagePipeline.from_pretrained(tiny_sd_model, device="cpu", fuse_qkv=True)
    modules = [m for m in pipe.unet.modules() if hasattr(m, "to_qkv") or hasattr(m, "to_kv")]
    assert modules and all(m.fused_projections for m in modules)


def test_bf16_autocast_stays_within_its_tolerance_and_is_recorded(
    tiny_sd_model: Path, reference: list[Image.Image]
) -> None:
    pipe = Text2ImagePipeline.from_pretrained(tiny_sd_model, device="cpu", autocast="bfloat16")
    images = ours(pipe)
    assert max_pixel_difference(images, reference) <= BF16_PIXEL_TOLERANCE
    assert pipe.unet.dtype == torch.float32, "weights stay in float32; only the arithmetic is bf16"
    result = pipe.generate(GenerationParams(prompt="a kite", seed=1, steps=1))
    assert result.metadata()["autocast"] == "bfloat16"


def test_fused_qkv_needs_sdpa_and_says_so(tiny_sd_model: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        pipe = Text2ImagePipeline.from_pretrained(tiny_sd_model, device="cpu", attention="sliced", fuse_qkv=True)
    assert pipe.optimizations.fuse_qkv is False and "fuse_qkv" in caplog.text


@pytest.mark.parametrize(("value", "message"), [("float16", "CUDA"), ("int8", "bfloat16")])
def test_autocast_names_what_this_device_allows(tiny_sd_model: Path, value: str, message: str) -> None:
    with pytest.raises(InvalidParamsError, match=message):
        Text2ImagePipeline.from_pretrained(tiny_sd_model, device="cpu", autocast=value)


def test_compile_warms_up_at_load_and_matches_stock(
    tiny_sd_model: Path, reference: list[Image.Image], monkeypatch: pytest.MonkeyPatch
) -> None:
    # aot_eager runs the same graph capture as inductor without its C++ build, which takes minutes on a small CPU;
    # `image-gen bench pipeline --variants compile` measures the real backend.
    monkeypatch.setattr(attention, "COMPILE_BACKEND", "aot_eager")
    warmed: list[int] = []
    monkeypatch.setattr(Text2ImagePipeline, "warm_up", lambda self, **_: warmed.append(1) or None)
    pipe = Text2ImagePipeline.from_pretrained(tiny_sd_model, device="cpu", compile=True)
    assert pipe.optimizations.compile is True and warmed == [1]
    assert max_pixel_difference(ours(pipe), reference) <= PIXEL_TOLERANCE


def test_registry_loads_pipelines_with_its_speed_settings(tiny_models_dir: Path, tmp_path: Path) -> None:
    registry = ModelRegistry(
        [tiny_models_dir], device="cpu", channels_last=True, fuse_qkv=True, autocast="bfloat16",
        hash_cache=tmp_path / "hashes.json",
    )
    pipe = registry.load("tiny-sd")
    assert (pipe.optimizations.channels_last, pipe.optimizations.fuse_qkv, pipe.optimizations.autocast) == (
        True, True, "bfloat16"
    )
    with pytest.raises(InvalidParamsError, match="autocast"):
        ModelRegistry([tiny_models_dir], autocast="fp8")


@CUDA
def test_cuda_float16_matches_stock_on_cuda(tiny_sd_model: Path) -> None:
    pipe = Text2ImagePipeline.from_pretrained(tiny_sd_model, device="cuda", dtype="float16")
    assert pipe.device.type == "cuda" and pipe.unet.dtype == torch.float16
    reference = stock_images(tiny_sd_model, device="cuda", dtype=torch.float16)
    assert max_pixel_difference(ours(pipe), reference) <= PIXEL_TOLERANCE


@CUDA
@pytest.mark.parametrize("options", [
    {"autocast": "float16"},
    pytest.param({"channels_last": True, "fuse_qkv": True}, marks=pytest.mark.xfail(strict=True, reason=(
        "seen on an H100 (torch 2.11, cu130): this tiny model's float16 images with channels_last + fused QKV differ "
        "from float32 by 243/255, while on the CPU at float16 they differ by 1/255 and on SD 1.5's architecture these "
        "settings match stock float16 on CUDA to 1/255 (docs/benchmarks/gpu.md); cause not found yet"))),
])
def test_cuda_speed_settings_stay_close_to_float32(
    tiny_sd_model: Path, reference: list[Image.Image], options: dict
) -> None:
    dtype = "float32" if "autocast" in options else "float16"
    pipe = Text2ImagePipeline.from_pretrained(tiny_sd_model, device="cuda", dtype=dtype, **options)
    assert max_pixel_difference(ours(pipe), reference) <= BF16_PIXEL_TOLERANCE


@CUDA
def test_cuda_denoising_loop_never_waits_for_the_gpu(tiny_sd_model: Path) -> None:
    """From the first step's callback to the last's, nothing syncs host and device (sync debug mode "error" raises
    on any .item(), blocking copy or stream sync): the scheduler reads its CPU tables, the UNet its own timesteps."""
    pipe = Text2ImagePipeline.from_pretrained(tiny_sd_model, device="cuda", dtype="float16")
    ours(pipe)  # warm-up: cuDNN and cuBLAS choose their kernels

    def on_step(event) -> None:
        torch.cuda.set_sync_debug_mode("error" if event.step < event.total else "default")

    try:
        pipe(PROMPTS, NEGATIVES, SEEDS, SIZE, SIZE, STEPS, 5.0, "ddim", callback=on_step)
    finally:
        torch.cuda.set_sync_debug_mode("default")
