"""Train the text-conditioned UNet in the in-house VAE's latent space (the teacher).

v-prediction with min-SNR-5 loss weighting, 10% caption dropout for classifier-free guidance, and EMA weights
with a warm-up so early weights do not linger in the shipped model. Optionally the noise schedule is rescaled to
zero terminal SNR (Lin et al., WACV 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed"), so that the
last training step sees pure noise, as sampling does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.training_utils import EMAModel

from pipelines.errors import PipelineError
from pipelines.training.common import RunConfig, TrainingRun, cosine_lr
from pipelines.training.data import PARAPHRASE_RATE, CaptionedImages, load_dataset
from pipelines.training.scenes import SCENE_VERSION
from pipelines.training.text import CaptionStates, load_text_encoder

NOISE_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "prediction_type": "v_prediction",
    "clip_sample": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}
"""Stable Diffusion's noise schedule. Its last step keeps sqrt(alpha_bar) = 0.068 of the image (on a 16x16 latent a
whole object shows through that noise), so training never shows the model the pure noise that sampling starts from."""

LOSS_WEIGHTINGS = ("min_snr", "min_snr_v")


def noise_schedule(zero_terminal_snr: bool) -> dict:
    """The training and sampling noise schedule: Stable Diffusion's, or rescaled so its last step is pure noise
    (then sampled with trailing timesteps, which start at that step)."""
    if not zero_terminal_snr:
        return dict(NOISE_SCHEDULE)
    return {**NOISE_SCHEDULE, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}


def run_noise_schedule(run_dir: Path) -> dict:
    """The noise schedule a run's teacher was trained with (runs from before the choice existed used SD's)."""
    saved = Path(run_dir) / "unet" / "config.json"
    if saved.exists():
        return json.loads(saved.read_text()).get("noise_schedule", dict(NOISE_SCHEDULE))
    return dict(NOISE_SCHEDULE)


@dataclass
class UnetConfig:
    block_out_channels: tuple[int, ...] = (64, 128, 192)
    # Cross- and self-attention at every level, the full 16x16 latent grid included, where an object of the
    # procedural scenes is 3 to 5 latent pixels wide and its colour and place are bound to the caption's words.
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3
    up_block_types: tuple[str, ...] = ("CrossAttnUpBlock2D",) * 3
    layers_per_block: int = 1
    transformer_layers_per_block: int | tuple[int, ...] = 1
    """Transformer blocks (self-attention, cross-attention to the caption, feed-forward) in each attention layer,
    one number for every level or one per level: more of them give the UNet more rounds of reading the caption."""
    attention_head_dim: int = 32
    """Channels per attention head: 2, 4 and 6 heads at 64, 128 and 192 channels."""
    attention_heads: tuple[int, ...] | None = None
    """Heads per level; None derives them from attention_head_dim. Set it only to rebuild an older layout:
    diffusers' `attention_head_dim` argument counts heads, not channels, so the first teacher shipped as
    inhouse-shapes was trained with 32 heads of 2, 4 and 6 channels (pipelines/training/recipes/inhouse-shapes-v1.json)."""
    caption_dropout: float = 0.1
    paraphrase_rate: float = PARAPHRASE_RATE
    """Share of (non-dropped) training captions replaced by one of the scene's paraphrases, when the data has them."""
    min_snr_gamma: float = 5.0
    loss_weighting: str = "min_snr"
    """How the v-prediction loss of each timestep is weighted, in terms of the weight w the image (x0) error gets:
    "min_snr", w = min(SNR, gamma) (Hang et al. 2023): noisy steps, where the layout is decided, get almost none
    (0.005 at SD's last step, 0 at a zero-SNR one); "min_snr_v", w = min(SNR + 1, gamma), as diffusers' training
    scripts weight v-prediction: at least 1 at every step."""
    zero_terminal_snr: bool = False
    """Rescale the noise schedule so its last step is pure noise (see `noise_schedule`); needs v-prediction and a
    loss weighting that trains that step ("min_snr_v")."""
    ema_max_decay: float = 0.9995

    def __post_init__(self) -> None:
        if self.attention_heads is None:
            if any(channels % self.attention_head_dim for channels in self.block_out_channels):
                raise ValueError(f"attention_head_dim {self.attention_head_dim} must divide every entry of "
                                 f"block_out_channels {list(self.block_out_channels)}")
            self.attention_heads = tuple(channels // self.attention_head_dim for channels in self.block_out_channels)
        elif len(self.attention_heads) != len(self.block_out_channels):
            raise ValueError("attention_heads needs one entry per level of block_out_channels")
        depths = self.transformer_layers_per_block
        per_level = depths if isinstance(depths, tuple) else (depths,) * len(self.block_out_channels)
        if len(per_level) != len(self.block_out_channels):
            raise ValueError("transformer_layers_per_block needs one number, or one per level of block_out_channels")
        if any(not isinstance(depth, int) or depth < 1 for depth in per_level):
            raise ValueError(f"transformer_layers_per_block must be whole numbers of at least 1, got {depths}")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"loss_weighting {self.loss_weighting!r} is not one of {', '.join(LOSS_WEIGHTINGS)}")
        if self.zero_terminal_snr and self.loss_weighting == "min_snr":
            raise ValueError('zero_terminal_snr needs loss_weighting "min_snr_v": "min_snr" gives the pure-noise '
                             "step no weight at all")
        for name in ("caption_dropout", "paraphrase_rate"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be between 0 and 1, got {getattr(self, name)}")


def load_unet_config(file: Path) -> UnetConfig:
    """A UnetConfig from a JSON object of its fields (the others keep their defaults), e.g. a larger UNet for a
    GPU: {"block_out_channels": [128, 256, 384], "layers_per_block": 2}."""
    try:
        fields = json.loads(Path(file).read_text())
    except (OSError, ValueError) as error:
        raise PipelineError(f"--unet-config {file}: cannot read it as JSON: {error}") from None
    known = {field.name for field in dataclasses.fields(UnetConfig)}
    if not isinstance(fields, dict) or set(fields) - known:
        unknown = sorted(set(fields) - known) if isinstance(fields, dict) else "not an object"
        raise PipelineError(f"--unet-config {file}: unknown keys {unknown}: use {', '.join(sorted(known))}")
    fields = {key: tuple(value) if isinstance(value, list) else value for key, value in fields.items()}
    try:
        config = UnetConfig(**fields)
        if not len(config.block_out_channels) == len(config.down_block_types) == len(config.up_block_types):
            raise ValueError("block_out_channels, down_block_types and up_block_types need one entry per level")
    except (TypeError, ValueError) as error:
        raise PipelineError(f"--unet-config {file}: {error}") from None
    return config


def check_resumable(run: TrainingRun, config: UnetConfig) -> None:
    """Refuse to resume a checkpoint of another architecture (its weights would not load)."""
    saved = run.dir / "config.json"
    if not (run.checkpoint_dir / "progress.json").exists() or not saved.exists():
        return
    before = json.loads(saved.read_text()).get("unet", {})
    if "attention_heads" not in before and "attention_head_dim" in before:
        # Written before heads were derived from the head size: diffusers took attention_head_dim as the head count.
        before["attention_heads"] = [before["attention_head_dim"]] * len(before.get("block_out_channels", ()))
    if before:
        before.setdefault("paraphrase_rate", 0.0)  # written before paraphrases: the scenes' own captions only
        before.setdefault("loss_weighting", "min_snr")  # written before the choice: the only weighting then
        before.setdefault("zero_terminal_snr", False)
        before.setdefault("transformer_layers_per_block", 1)
    now = json.loads(json.dumps(config.__dict__))
    changed = sorted(key for key in set(before) | set(now) if before.get(key) != now.get(key))
    if changed:
        raise PipelineError(f"{run.dir} holds a checkpoint of another UNet ({', '.join(changed)} differ): resume it "
                            "with the --unet-config it started with, or train in a new --run-dir")


def build_unet(config: UnetConfig, latent_channels: int, sample_size: int, cross_attention_dim: int = 384,
               time_cond_proj_dim: int | None = None) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        down_block_types=config.down_block_types,
        up_block_types=config.up_block_types,
        block_out_channels=config.block_out_channels,
        layers_per_block=config.layers_per_block,
        transformer_layers_per_block=config.transformer_layers_per_block,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=config.attention_heads,  # diffusers' legacy name: it is the number of heads
        norm_num_groups=32,
        time_cond_proj_dim=time_cond_proj_dim,
    )


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, data: CaptionedImages, cache: Path, batch_size: int = 64) -> torch.Tensor:
    """Scaled latent means of the whole dataset, computed once and cached next to the run."""
    if cache.exists():
        return torch.from_numpy(np.load(cache))
    vae.eval()
    chunks = []
    for start in range(0, len(data), batch_size):
        pixels, _ = data.batch(np.arange(start, min(start + batch_size, len(data))))
        chunks.append(vae.encode(pixels.to(vae.device)).latent_dist.mean.cpu() * vae.config.scaling_factor)
    latents = torch.cat(chunks)
    np.save(cache, latents.numpy())
    return latents


def min_snr_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float,
                    weighting: str = "min_snr") -> torch.Tensor:
    """Weights for a v-prediction loss: min(SNR, gamma) / (SNR + 1) ("min_snr"), or min(SNR + 1, gamma) / (SNR + 1)
    ("min_snr_v"). The v error is the x0 error times SNR + 1, so these weight the x0 error by min(SNR, gamma) and
    min(SNR + 1, gamma)."""
    alphas_cumprod = scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
    snr = alphas_cumprod / (1 - alphas_cumprod)
    floor = 1.0 if weighting == "min_snr_v" else 0.0
    return torch.clamp(snr + floor, max=gamma) / (snr + 1)


def load_initial_weights(unet: UNet2DConditionModel, folder: Path) -> None:
    """Start from another run's or a model folder's UNet weights (fine-tuning); the layouts must match."""
    try:
        source = UNet2DConditionModel.from_pretrained(folder)
    except (OSError, ValueError) as error:
        raise PipelineError(f"--init-from {folder}: not a diffusers UNet folder: {error}") from None
    if list(source.config.block_out_channels) != list(unet.config.block_out_channels):
        raise PipelineError(f"--init-from {folder}: a UNet of channels {list(source.config.block_out_channels)}, "
                            f"this run's is {list(unet.config.block_out_channels)}: use the same --unet-config")
    wanted = {name: tuple(value.shape) for name, value in unet.state_dict().items()}
    given = {name: tuple(value.shape) for name, value in source.state_dict().items()}
    if wanted != given:
        differ = sorted(name for name in set(wanted) | set(given) if wanted.get(name) != given.get(name))
        raise PipelineError(f"--init-from {folder}: its layout differs from this run's UNet ({len(differ)} weights "
                            f"differ, e.g. {differ[0]}): use the --unet-config it was trained with")
    unet.load_state_dict(source.state_dict())


def prepare_training_data(run: TrainingRun, paraphrases: bool = False
                          ) -> tuple[torch.Tensor, CaptionedImages, CaptionStates]:
    """The dataset's cached latents, its captions (and paraphrases) and their cached token states."""
    config = run.config
    vae = AutoencoderKL.from_pretrained(config.run_dir / "vae" / "final").to(run.device)
    data = load_dataset(config.data, config.dataset_size, config.seed, config.image_size, config.run_dir / "data")
    tag = f"n{len(data)}-s{config.seed}-{config.image_size}px"
    if config.data == "procedural":
        tag = f"v{SCENE_VERSION}-{tag}"
    weights = config.run_dir / "vae" / "final" / "diffusion_pytorch_model.safetensors"
    vae_id = hashlib.sha256(weights.read_bytes()).hexdigest()[:12]  # new VAE weights, new latents
    latents = encode_latents(vae, data, config.run_dir / "data" / f"latents-{tag}-vae{vae_id}.npy")
    tokenizer, encoder = load_text_encoder(run.device)
    captions = data.captions
    if paraphrases and data.paraphrases:
        captions = captions + [text for texts in data.paraphrases for text in texts]
        tag = f"{tag}-para{len(data.paraphrases[0])}"
    else:
        data = dataclasses.replace(data, paraphrases=[])  # the captions alone, as their states are
    states = CaptionStates(captions, tokenizer, encoder, config.run_dir / "data" / f"text-{tag}.npy")
    return latents, data, states


def training_captions(data: CaptionedImages, index: np.ndarray, rng: np.random.Generator, dropout: float,
                      paraphrase_rate: float) -> list[str]:
    """The batch's captions: "" at the `dropout` rate, else the image's own caption or, at `paraphrase_rate`, one of
    its paraphrases. A rate of 0 draws no random number, so such a run repeats one made before the rate existed."""
    captions = []
    for i in index:
        if dropout and rng.random() < dropout:
            captions.append("")
        elif data.paraphrases and paraphrase_rate and rng.random() < paraphrase_rate:
            captions.append(data.paraphrases[i][rng.integers(len(data.paraphrases[i]))])
        else:
            captions.append(data.captions[i])
    return captions


def train_unet(run_config: RunConfig, config: UnetConfig, init_from: Path | None = None) -> None:
    """Train (or resume) the teacher; `init_from`, a diffusers UNet folder, gives a fresh run its first weights."""
    run = TrainingRun(run_config, "unet")
    check_resumable(run, config)
    schedule = noise_schedule(config.zero_terminal_snr)
    saved = run.dir / "config.json"
    if init_from is None and saved.exists():  # a resumed fine-tune keeps the record of where it started
        init_from = json.loads(saved.read_text()).get("init_from")
        init_from = Path(init_from) if init_from else None
    extra = {"init_from": str(init_from)} if init_from else {}
    run.write_config({"unet": config.__dict__, "noise_schedule": schedule, **extra})
    latents, data, states = prepare_training_data(run, paraphrases=config.paraphrase_rate > 0)
    scheduler = DDPMScheduler(**schedule)
    unet = build_unet(config, latents.shape[1], latents.shape[-1])
    if init_from is not None and not (run.checkpoint_dir / "progress.json").exists():  # else the checkpoint's
        load_initial_weights(unet, init_from)
    ema = EMAModel(unet.parameters(), decay=config.ema_max_decay, use_ema_warmup=True, inv_gamma=1.0, power=0.75,
                   model_cls=UNet2DConditionModel, model_config=unet.config, foreach=True)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=run_config.lr, weight_decay=0.01)
    unet, optimizer = run.accelerator.prepare(unet, optimizer)
    run.accelerator.register_for_checkpointing(ema)
    run.resume()
    ema.to(run.device)
    rng = np.random.default_rng(run_config.seed + run.step)
    generator = torch.Generator().manual_seed(run_config.seed + run.step)
    for step in run.loop():
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, run_config.steps, 500, run_config.lr)
        index = rng.integers(0, len(data), run_config.batch_size)
        captions = training_captions(data, index, rng, config.caption_dropout, config.paraphrase_rate)
        x0 = latents[index].to(run.device)
        noise = torch.randn(x0.shape, generator=generator).to(run.device)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(index),), generator=generator)
        timesteps = timesteps.to(run.device)
        noisy = scheduler.add_noise(x0, noise, timesteps)
        target = scheduler.get_velocity(x0, noise, timesteps)
        prediction = unet(noisy, timesteps, states(captions).to(run.device)).sample
        per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        weights = min_snr_weights(scheduler, timesteps, config.min_snr_gamma, config.loss_weighting)
        loss = (per_sample * weights).mean()
        run.accelerator.backward(loss)
        run.accelerator.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(unet.parameters())
        if step % run_config.log_every == 0:
            run.log({"loss": loss.item(), "mse": per_sample.mean().item(), "lr": optimizer.param_groups[0]["lr"],
                     "ema_decay": ema.cur_decay_value})
        if (step + 1) % run_config.snapshot_every == 0 and run.accelerator.is_main_process:
            save_unet(run, unet, ema, f"step-{step + 1}")
    if run.accelerator.is_main_process:
        save_unet(run, unet, ema, "final")


def save_unet(run: TrainingRun, unet, ema: EMAModel, tag: str) -> None:
    """Raw and EMA weights side by side, so the better of the two can be shipped."""
    raw = run.accelerator.unwrap_model(unet)
    raw.save_pretrained(run.dir / tag / "unet-raw")
    ema_unet = UNet2DConditionModel.from_config(raw.config)
    ema.copy_to(ema_unet.parameters())
    ema_unet.save_pretrained(run.dir / tag / "unet-ema")
