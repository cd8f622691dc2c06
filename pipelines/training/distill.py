"""Latent consistency distillation: a student with a guidance-scale embedding that samples in 4 steps.

Follows Luo et al., "Latent Consistency Models" (2023) and diffusers' `train_lcm_distill_sd_wds.py`: the teacher
takes one classifier-free-guided DDIM step from t_{n+k} to t_n, a slowly moving target copy of the student maps
t_n to the clean latent, and the student learns to map t_{n+k} to the same point.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from pipelines.training.common import RunConfig, TrainingRun, cosine_lr
from pipelines.training.data import PARAPHRASE_RATE
from pipelines.training.unet import prepare_training_data, run_noise_schedule, training_captions


@dataclass
class DistillConfig:
    teacher: str = "final"
    """Which teacher snapshot under `<run-dir>/unet/` (its EMA weights)."""
    ddim_timesteps: int = 50
    guidance_min: float = 1.5
    guidance_max: float = 6.0
    """Range of the guidance scale w + 1 the student learns to reproduce."""
    time_cond_proj_dim: int = 256
    target_ema: float = 0.95
    huber_c: float = 0.001
    timestep_scaling: float = 10.0
    paraphrase_rate: float = PARAPHRASE_RATE
    """Share of the prompts given to teacher and student that are one of the scene's paraphrases (as the teacher
    was trained), so the student learns the teacher on the same vocabulary. 0 uses the scenes' captions only."""


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of the guidance weight, as diffusers' LCM pipelines compute it (of w = scale - 1)."""
    w = w * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(np.log(10000.0) / (half - 1)))
    angles = w.float()[:, None] * freqs[None, :].to(w.device)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def boundary_scalings(timesteps: torch.Tensor, scaling: float, sigma_data: float = 0.5):
    scaled = scaling * timesteps.float()
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return c_skip[:, None, None, None], c_out[:, None, None, None]


def split_v_prediction(v: torch.Tensor, sample: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor):
    """(x0, eps) from a v-prediction at noise level (alpha, sigma)."""
    return alpha * sample - sigma * v, alpha * v + sigma * sample


def build_student(teacher: UNet2DConditionModel, dim: int) -> UNet2DConditionModel:
    """The teacher's weights plus a zero-initialised guidance projection: at step 0 it is the teacher."""
    student = UNet2DConditionModel.from_config({**teacher.config, "time_cond_proj_dim": dim})
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    if unexpected or any(not name.startswith("time_embedding.cond_proj") for name in missing):
        raise RuntimeError(f"teacher and student differ beyond the guidance projection: {missing} {unexpected}")
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student


def distill(run_config: RunConfig, config: DistillConfig) -> None:
    run = TrainingRun(run_config, "distill")
    run.write_config({"distill": config.__dict__})
    latents, data, states = prepare_training_data(run, paraphrases=config.paraphrase_rate > 0)
    teacher = UNet2DConditionModel.from_pretrained(run_config.run_dir / "unet" / config.teacher / "unet-ema")
    teacher = teacher.to(run.device).eval().requires_grad_(False)
    student = build_student(teacher, config.time_cond_proj_dim)
    target = copy.deepcopy(student).requires_grad_(False)
    optimizer = torch.optim.AdamW(student.parameters(), lr=run_config.lr, weight_decay=0.0)
    student, optimizer = run.accelerator.prepare(student, optimizer)
    target = target.to(run.device)
    run.accelerator.register_for_checkpointing(target)
    run.resume()

    scheduler = DDPMScheduler(**run_noise_schedule(run_config.run_dir))  # the teacher's
    alphas_cumprod = scheduler.alphas_cumprod.to(run.device)
    alpha_of, sigma_of = alphas_cumprod.sqrt(), (1 - alphas_cumprod).sqrt()
    skip = scheduler.config.num_train_timesteps // config.ddim_timesteps
    solver_timesteps = torch.arange(1, config.ddim_timesteps + 1, device=run.device) * skip - 1
    uncond = states([""]).to(run.device)
    rng = np.random.default_rng(run_config.seed + run.step)
    generator = torch.Generator().manual_seed(run_config.seed + run.step)

    def view(values: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return values[t][:, None, None, None]

    for step in run.loop():
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, run_config.steps, 100, run_config.lr)
        index = rng.integers(0, len(data), run_config.batch_size)
        x0 = latents[index].to(run.device)
        cond = states(training_captions(data, index, rng, 0.0, config.paraphrase_rate)).to(run.device)
        bsz = len(index)
        n = torch.randint(0, config.ddim_timesteps, (bsz,), generator=generator).to(run.device)
        t_start = solver_timesteps[n]
        t_prev = (t_start - skip).clamp(min=0)
        noise = torch.randn(x0.shape, generator=generator).to(run.device)
        x_start = scheduler.add_noise(x0, noise, t_start)
        w = (config.guidance_min - 1) + torch.rand(bsz, generator=generator).to(run.device) * (
            config.guidance_max - config.guidance_min)
        w_embedding = guidance_embedding(w, config.time_cond_proj_dim)

        c_skip_start, c_out_start = boundary_scalings(t_start, config.timestep_scaling)
        v = student(x_start, t_start, cond, timestep_cond=w_embedding).sample
        x0_student, _ = split_v_prediction(v, x_start, view(alpha_of, t_start), view(sigma_of, t_start))
        prediction = c_skip_start * x_start + c_out_start * x0_student

        with torch.no_grad():
            v_teacher = teacher(torch.cat([x_start, x_start]), torch.cat([t_start, t_start]),
                                torch.cat([cond, uncond.expand_as(cond)])).sample
            alpha, sigma = view(alpha_of, t_start), view(sigma_of, t_start)
            x0_cond, eps_cond = split_v_prediction(v_teacher[:bsz], x_start, alpha, sigma)
            x0_uncond, eps_uncond = split_v_prediction(v_teacher[bsz:], x_start, alpha, sigma)
            w_ = w[:, None, None, None]
            x0_guided = x0_cond + w_ * (x0_cond - x0_uncond)
            eps_guided = eps_cond + w_ * (eps_cond - eps_uncond)
            # One DDIM step of the guided teacher from t_start to t_prev.
            x_prev = view(alpha_of, t_prev) * x0_guided + view(sigma_of, t_prev) * eps_guided
            v_target = target(x_prev, t_prev, cond, timestep_cond=w_embedding).sample
            x0_target, _ = split_v_prediction(v_target, x_prev, view(alpha_of, t_prev), view(sigma_of, t_prev))
            c_skip, c_out = boundary_scalings(t_prev, config.timestep_scaling)
            goal = c_skip * x_prev + c_out * x0_target

        loss = (torch.sqrt((prediction.float() - goal.float()) ** 2 + config.huber_c**2) - config.huber_c).mean()
        run.accelerator.backward(loss)
        run.accelerator.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for p_target, p_student in zip(target.parameters(), run.accelerator.unwrap_model(student).parameters(),
                                           strict=True):
                p_target.lerp_(p_student, 1 - config.target_ema)
        if step % run_config.log_every == 0:
            run.log({"loss": loss.item(), "lr": optimizer.param_groups[0]["lr"]})
    if run.accelerator.is_main_process:
        run.accelerator.unwrap_model(student).save_pretrained(run.dir / "final" / "unet")
        target.save_pretrained(run.dir / "final" / "unet-target")
