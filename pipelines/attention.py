"""Attention backends, VAE slicing and tiling, and model CPU offload: applied to a model's modules, reported back
so that each image's metadata records what produced it."""

import dataclasses
import importlib.util
import logging
from typing import Any

import torch
from accelerate import cpu_offload_with_hook
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from pipelines.errors import InvalidParamsError

logger = logging.getLogger(__name__)

ATTENTION_BACKENDS = ("sdpa", "xformers", "sliced", "math")
VAE_TILING_MODES = ("auto", "on", "off")
VAE_TILING_AUTO_SIDE = 1024
"""With vae_tiling="auto" the VAE decodes in tiles when a side exceeds this many pixels: beyond SDXL's native
size the decoder's activations reach several GB, while below it tiling only adds seams and time."""


@dataclasses.dataclass(frozen=True)
class Optimizations:
    """What a pipeline runs with, as applied (e.g. attention "sdpa" when "xformers" was asked for but missing)."""

    attention: str = "sdpa"
    vae_slicing: bool = True
    vae_tiling: str = "auto"
    cpu_offload: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_choice(value: str, allowed: tuple[str, ...], param: str) -> None:
    if value not in allowed:
        raise InvalidParamsError(
            f"{param} {value!r} is not known: use one of {', '.join(allowed)}", param=param
        )


def set_attention(unet: UNet2DConditionModel, backend: str, device: torch.device) -> str:
    """Switch the UNet's attention to `backend` and return the backend actually in use.

    sdpa: torch's scaled_dot_product_attention (flash / memory-efficient kernels where available), the default.
    xformers: xFormers' memory-efficient kernels, CUDA only; falls back to sdpa with a warning when unavailable.
    sliced: attention computed in two slices per head group (less memory, a little slower).
    math: the plain matmul-softmax-matmul implementation, a baseline for benchmarks.
    The VAE keeps diffusers' default (sdpa); its one attention layer is not where time goes.
    """
    check_choice(backend, ATTENTION_BACKENDS, "attention")
    if backend == "xformers":
        if device.type != "cuda" or importlib.util.find_spec("xformers") is None:
            logger.warning("attention 'xformers' needs the xformers package and a CUDA device: using 'sdpa'")
            backend = "sdpa"
        else:
            try:
                unet.enable_xformers_memory_efficient_attention()
                return "xformers"
            except (ImportError, ValueError, RuntimeError, NotImplementedError) as error:
                logger.warning("attention 'xformers' failed to start (%s): using 'sdpa'", error)
                backend = "sdpa"
    if backend == "sliced":
        unet.set_attention_slice("auto")
    else:
        unet.set_attn_processor(AttnProcessor2_0() if backend == "sdpa" else AttnProcessor())
    return backend


def set_vae_slicing(vae: AutoencoderKL, enabled: bool) -> bool:
    """Decode a batch one image at a time (same pixels, less peak memory) when enabled."""
    if enabled:
        vae.enable_slicing()
    else:
        vae.disable_slicing()
    return enabled


def set_vae_tiling(vae: AutoencoderKL, mode: str, width: int, height: int) -> bool:
    """Switch tiled decoding on or off for an image of this size (see VAE_TILING_AUTO_SIDE); return whether it is on."""
    check_choice(mode, VAE_TILING_MODES, "vae_tiling")
    tiled = mode == "on" or (mode == "auto" and max(width, height) > VAE_TILING_AUTO_SIDE)
    if tiled:
        vae.enable_tiling()
    else:
        vae.disable_tiling()
    return tiled


def enable_cpu_offload(modules: list[torch.nn.Module], device: torch.device) -> list[Any]:
    """Keep `modules` in CPU memory and move each to `device` only while it runs (accelerate hooks, chained in call
    order so that starting one offloads the previous); CUDA only. Returns the hooks, empty when not applied."""
    if device.type != "cuda":
        logger.warning("cpu_offload needs a CUDA device: models stay on %s", device)
        return []
    hooks: list[Any] = []
    previous = None
    for module in modules:
        _, previous = cpu_offload_with_hook(module, device, prev_module_hook=previous)
        hooks.append(previous)
    return hooks
