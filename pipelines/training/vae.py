"""Train the in-house `AutoencoderKL` (8x downsampling) that gives the UNet its latent space."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from pipelines.training.common import RunConfig, TrainingRun, cosine_lr
from pipelines.training.data import load_dataset


@dataclass
class VaeConfig:
    block_out_channels: tuple[int, ...] = (32, 64, 64, 128)
    latent_channels: int = 16
    """8 channels blurred small shapes past the detector's reach (its accuracy on reconstructions: 78-88%)."""
    norm_num_groups: int = 16
    crop: int = 64
    """Train on random crops: the autoencoder is convolutional, so 64 px crops teach it 128 px images."""
    kl_weight: float = 1e-6


def build_vae(config: VaeConfig, sample_size: int) -> AutoencoderKL:
    blocks = len(config.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=config.block_out_channels,
        layers_per_block=1,
        latent_channels=config.latent_channels,
        norm_num_groups=config.norm_num_groups,
        sample_size=sample_size,
    )


def random_crops(pixels: torch.Tensor, crop: int, generator: torch.Generator) -> torch.Tensor:
    if crop >= pixels.shape[-1]:
        return pixels
    n, _, h, w = pixels.shape
    ys = torch.randint(0, (h - crop) // 8 + 1, (n,), generator=generator) * 8
    xs = torch.randint(0, (w - crop) // 8 + 1, (n,), generator=generator) * 8
    return torch.stack([p[:, y:y + crop, x:x + crop] for p, y, x in zip(pixels, ys.tolist(), xs.tolist(), strict=True)])


def train_vae(run_config: RunConfig, config: VaeConfig) -> AutoencoderKL:
    run = TrainingRun(run_config, "vae")
    run.write_config({"vae": config.__dict__})
    data = load_dataset(run_config.data, run_config.dataset_size, run_config.seed, run_config.image_size,
                        run_config.run_dir / "data")
    vae = build_vae(config, run_config.image_size)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=run_config.lr, weight_decay=0.0)
    vae, optimizer = run.accelerator.prepare(vae, optimizer)
    run.resume()
    rng = np.random.default_rng(run_config.seed + run.step)
    crops = torch.Generator().manual_seed(run_config.seed + run.step)
    for step in run.loop():
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, run_config.steps, 200, run_config.lr)
        pixels, _ = data.batch(rng.integers(0, len(data), run_config.batch_size))
        pixels = random_crops(pixels, config.crop, crops).to(run.device)
        posterior = vae.encode(pixels).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        l1 = F.l1_loss(reconstruction, pixels)
        kl = posterior.kl().mean()
        loss = l1 + 0.5 * F.mse_loss(reconstruction, pixels) + config.kl_weight * kl
        run.accelerator.backward(loss)
        run.accelerator.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % run_config.log_every == 0:
            run.log({"loss": loss.item(), "l1": l1.item(), "kl": kl.item(), "lr": optimizer.param_groups[0]["lr"]})
    vae = run.accelerator.unwrap_model(vae)
    vae.register_to_config(scaling_factor=latent_scaling_factor(vae, data))
    if run.accelerator.is_main_process:
        vae.save_pretrained(run.dir / "final")
    return vae


@torch.no_grad()
def latent_scaling_factor(vae: AutoencoderKL, data, n: int = 256) -> float:
    """1 / std of the latents, so the UNet sees unit-variance inputs (as SD's 0.18215 does)."""
    vae.eval()
    pixels, _ = data.batch(np.arange(min(n, len(data))))
    latents = torch.cat([vae.encode(chunk.to(vae.device)).latent_dist.mean for chunk in pixels.split(32)])
    return round(float(1.0 / latents.std()), 5)
