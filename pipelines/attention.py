"""Attention backends, VAE slicing and tiling, model CPU offload, and the speed settings (channels_last, autocast,
fused QKV projections, torch.compile): applied to a model's modules, reported back so that each image's metadata
records what produced it. docs/performance.md has what each one measured."""

import contextlib
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
AUTOCAST_MODES = ("off", "bfloat16", "float16")
COMPILE_BACKEND = "inductor"
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
    channels_last: bool = False
    autocast: str = "off"
    fuse_qkv: bool = False
    compile: bool = False

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


def set_channels_last(modules: list[torch.nn.Module], enabled: bool) -> bool:
    """Store the convolution weights of `modules` in NHWC order (channels_last), so that convolutions take and give
    NHWC activations; the same numbers in another memory layout."""
    if enabled:
        for module in modules:
            module.to(memory_format=torch.channels_last)
    return enabled


def set_fused_qkv(modules: list[torch.nn.Module], enabled: bool, attention: str) -> bool:
    """One matmul for query, key and value of each self-attention (key and value of each cross-attention) instead
    of three (two); needs the sdpa backend, whose fused processor diffusers provides. Returns whether it is on."""
    if not enabled:
        return False
    if attention != "sdpa":
        logger.warning("fuse_qkv needs attention 'sdpa', not %r: projections stay separate", attention)
        return False
    for module in modules:
        module.fuse_qkv_projections()
    return True


def check_autocast(mode: str, device: torch.device, dtype: torch.dtype) -> str:
    """The autocast mode to run with: "off", or the lower precision that matmuls and convolutions run in while the
    weights, norms and the scheduler stay in `dtype`. float16 autocast is for CUDA only."""
    check_choice(mode, AUTOCAST_MODES, "autocast")
    if mode == "float16" and device.type != "cuda":
        raise InvalidParamsError("autocast 'float16' needs a CUDA device: use bfloat16 or off", param="autocast")
    if mode != "off" and dtype != torch.float32:
        logger.warning("autocast %r with %s weights has nothing to do: off", mode, dtype)
        return "off"
    return mode


def autocast_context(mode: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The context the UNet and the VAE decoder run in for autocast `mode` (a no-op for "off")."""
    if mode == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, mode))


def compile_module(module: torch.nn.Module, device: torch.device) -> bool:
    """Compile `module` in place with torch.compile (COMPILE_BACKEND); on the CPU with inductor's freezing, which
    folds the weights (and, under autocast, their bf16 copies) into the compiled code and prepacks them for oneDNN.
    The first call of a new input shape pays the compilation (minutes on a small CPU); after a second batch size the
    batch dimension becomes dynamic, so later batch sizes reuse the code. Returns whether it is on."""
    options = {"freezing": True} if COMPILE_BACKEND == "inductor" and device.type == "cpu" else None
    try:
        module.compile(backend=COMPILE_BACKEND, options=options)
    except (RuntimeError, AttributeError) as error:
        logger.warning("torch.compile is unavailable (%s): running eager", error)
        return False
    return True
