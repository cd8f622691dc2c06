"""Random-weight stand-ins for benchmarks: the in-house architecture and the Stable Diffusion 1.5 architecture,
built once into a cache folder (speed and memory do not depend on the weights; images from them are noise).

`inhouse-arch-random`: the bundled `inhouse-shapes` with random UNet and VAE weights (their configs are copied from
the bundled folder, and a cached stand-in is rebuilt when those change), written by `pipelines/training/export.py`
as the real one (v-prediction, the MiniLM encoder with 32 tokens). `inhouse-arch-random-lcm`: the same for the
LCM student `inhouse-shapes-lcm` (its guidance embedding, no unconditional pass).
`sd15-arch-random`: SD 1.5's UNet, VAE and CLIP ViT-L/14 text encoder configs with random weights; its tokenizer is
a character-level CLIP tokenizer (no BPE vocabulary can be downloaded), padded to SD's 77 tokens as the real one is.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

INHOUSE_ARCH = "inhouse-arch-random"
INHOUSE_ARCH_LCM = "inhouse-arch-random-lcm"
SD15_ARCH = "sd15-arch-random"
SEED = 0

# Stable Diffusion 1.5's component configs (runwayml/stable-diffusion-v1-5), as published with its weights.
SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "attention_head_dim": 8,
    "cross_attention_dim": 768,
    "norm_num_groups": 32,
    "norm_eps": 1e-05,
    "act_fn": "silu",
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "mid_block_scale_factor": 1,
}
SD15_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
SD15_TEXT = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 1,
}
SD15_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "clip_sample": False,
    "set_alpha_to_one": False,
}
SD15_MANIFEST = {
    "label": "SD 1.5 architecture, random weights",
    "description": "benchmark stand-in: Stable Diffusion 1.5's architecture with random weights (draws noise)",
    "native_size": 512,
    "min_size": 128,
    "max_size": 1024,
    "default_scheduler": "ddim",
    "default_steps": 25,
    "default_guidance": 7.5,
    "presets": {},
    "distilled": False,
}


def bench_models_dir() -> Path:
    """Where the stand-ins are cached: $IMAGE_GEN_BENCH_MODELS, else ~/.cache/image-gen/bench-models."""
    if os.environ.get("IMAGE_GEN_BENCH_MODELS"):
        return Path(os.environ["IMAGE_GEN_BENCH_MODELS"])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "image-gen" / "bench-models"


def _bundled_configs(distilled: bool) -> tuple[dict, dict]:
    """The UNet and VAE configs of the bundled model the stand-in copies (teacher, or its LCM student)."""
    from pipelines.params import read_json
    from pipelines.registry import BUNDLED_MODELS_DIR
    from pipelines.training.export import STUDENT_NAME, TEACHER_NAME

    folder = BUNDLED_MODELS_DIR / (STUDENT_NAME if distilled else TEACHER_NAME)
    return read_json(folder / "unet" / "config.json"), read_json(folder / "vae" / "config.json")


def _architecture(config: dict) -> dict:
    return {key: value for key, value in config.items() if not key.startswith("_")}


def _build_inhouse(folder: Path, distilled: bool) -> None:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from pipelines.training.export import write_model_folder
    from pipelines.training.text import MAX_TOKENS

    torch.manual_seed(SEED)
    unet_config, vae_config = map(_architecture, _bundled_configs(distilled))
    vae = AutoencoderKL.from_config(vae_config)
    unet = UNet2DConditionModel.from_config(unet_config)
    kind = "LCM student" if distilled else "teacher"
    write_model_folder(
        folder,
        unet,
        vae,
        distilled=distilled,
        description=f"benchmark stand-in: the in-house {kind} architecture with random weights "
        f"({MAX_TOKENS}-token MiniLM text encoder); draws noise",
    )
    card = json.loads((folder / "image-gen.json").read_text())
    card["label"] = f"in-house {kind} architecture, random weights"
    (folder / "image-gen.json").write_text(json.dumps(card, indent=2) + "\n")


def _char_clip_tokenizer(max_length: int):
    """A CLIP BPE tokenizer over single characters (no merges), so nothing is downloaded."""
    from transformers import CLIPTokenizer

    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789.,!?'-")
    vocab = {"!": 0, "<|endoftext|>": 1}
    for char in chars:
        vocab.setdefault(char, len(vocab))
    vocab.update({f"{char}</w>": len(vocab) + i for i, char in enumerate(chars)})
    vocab["<|startoftext|>"] = SD15_TEXT["bos_token_id"]
    vocab["<|endoftext|>"] = SD15_TEXT["eos_token_id"]
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length, pad_token="!")


def _build_sd15(folder: Path) -> None:
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(SEED)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**SD15_VAE),
        text_encoder=CLIPTextModel(CLIPTextConfig(**SD15_TEXT)),
        tokenizer=_char_clip_tokenizer(SD15_TEXT["max_position_embeddings"]),
        unet=UNet2DConditionModel(**SD15_UNET),
        scheduler=DDIMScheduler(**SD15_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to(torch.float16)  # half the disk; loaded in float32 as any fp16 checkpoint
    pipe.save_pretrained(folder, safe_serialization=True)
    (folder / "image-gen.json").write_text(json.dumps(SD15_MANIFEST, indent=2) + "\n")


BUILDERS: dict[str, Callable[[Path], None]] = {
    INHOUSE_ARCH: lambda folder: _build_inhouse(folder, distilled=False),
    INHOUSE_ARCH_LCM: lambda folder: _build_inhouse(folder, distilled=True),
    SD15_ARCH: _build_sd15,
}


def _stale(name: str, folder: Path) -> bool:
    """Whether a cached in-house stand-in was built for another bundled architecture than the one shipped now."""
    if name not in (INHOUSE_ARCH, INHOUSE_ARCH_LCM):
        return False
    from pipelines.params import read_json

    unet_config, vae_config = _bundled_configs(distilled=name == INHOUSE_ARCH_LCM)
    return any(
        read_json(folder / component / "config.json").get(key) != value
        for component, config in (("unet", unet_config), ("vae", vae_config))
        for key, value in _architecture(config).items()
    )


def ensure_bench_model(name: str, root: Path | None = None) -> Path:
    """The folder of stand-in `name`, built on first use (into a staging folder, then renamed into place)."""
    root = root or bench_models_dir()
    folder = root / name
    if (folder / "model_index.json").is_file() and not _stale(name, folder):
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        BUILDERS[name](staging)
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder
