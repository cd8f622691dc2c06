"""The teacher's noise schedule and loss weighting: Stable Diffusion's schedule leaves part of the image in its last
step, the zero-terminal-SNR one does not and is sampled from that step; "min_snr" gives noisy steps (and the
pure-noise one) almost no weight, "min_snr_v" at least an x0 weight of one. Both are recorded per run, so a
teacher's export and distillation use the schedule it was trained on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerAncestralDiscreteScheduler, UNet2DConditionModel

from pipelines.errors import PipelineError
from pipelines.training.unet import (
    NOISE_SCHEDULE,
    UnetConfig,
    build_unet,
    load_initial_weights,
    min_snr_weights,
    noise_schedule,
    run_noise_schedule,
)

SMALL = UnetConfig(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D",) * 2,
                   up_block_types=("CrossAttnUpBlock2D",) * 2)


def test_sds_schedule_keeps_part_of_the_image_in_its_last_step() -> None:
    scheduler = DDPMScheduler(**noise_schedule(zero_terminal_snr=False))
    assert noise_schedule(False) == NOISE_SCHEDULE
    assert scheduler.alphas_cumprod[-1].sqrt().item() == pytest.approx(0.068, abs=0.001)


def test_the_zero_snr_schedule_ends_in_pure_noise_and_samples_from_there() -> None:
    schedule = noise_schedule(zero_terminal_snr=True)
    training = DDPMScheduler(**schedule)
    assert training.alphas_cumprod[-1].item() == pytest.approx(0.0, abs=1e-7)
    assert training.alphas_cumprod[0].item() == pytest.approx(DDPMScheduler(**NOISE_SCHEDULE).alphas_cumprod[0].item(), rel=1e-6)
    sampler = DDIMScheduler(**schedule)
    sampler.set_timesteps(25)
    assert int(sampler.timesteps[0]) == 999  # "leading" spacing would start at 961 and skip the pure-noise step
    euler_a = EulerAncestralDiscreteScheduler.from_config(sampler.config)
    euler_a.set_timesteps(25)
    assert int(euler_a.timesteps[0]) == 999 and torch.isfinite(euler_a.sigmas).all()


def test_min_snr_gives_the_noisiest_steps_almost_no_weight_and_min_snr_v_at_least_one() -> None:
    for zero_snr in (False, True):
        scheduler = DDPMScheduler(**noise_schedule(zero_snr))
        timesteps = torch.arange(1000)
        snr = scheduler.alphas_cumprod / (1 - scheduler.alphas_cumprod)
        plain = min_snr_weights(scheduler, timesteps, 5.0, "min_snr")
        floored = min_snr_weights(scheduler, timesteps, 5.0, "min_snr_v")
        # As weights of the x0 error (the v error is it times SNR + 1): min(SNR, 5) and min(SNR + 1, 5).
        assert torch.allclose(plain * (snr + 1), snr.clamp(max=5.0), atol=1e-5)
        assert torch.allclose(floored * (snr + 1), (snr + 1).clamp(max=5.0), atol=1e-5)
        assert plain[-1] < 0.01 and floored[-1].item() == pytest.approx(1.0, abs=0.01)
        assert torch.equal(plain[:50], floored[:50])  # where SNR > gamma both are gamma / (SNR + 1)
    zero = DDPMScheduler(**noise_schedule(True))
    assert min_snr_weights(zero, torch.tensor([999]), 5.0, "min_snr").item() == 0.0


@pytest.mark.parametrize(("fields", "message"), [
    ({"loss_weighting": "snr"}, "loss_weighting 'snr' is not one of min_snr, min_snr_v"),
    ({"zero_terminal_snr": True}, 'zero_terminal_snr needs loss_weighting "min_snr_v"'),
])
def test_a_schedule_without_weight_on_its_last_step_is_refused(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        UnetConfig(**fields)


def test_a_run_records_its_schedule_and_runs_from_before_used_sds(tmp_path: Path) -> None:
    assert run_noise_schedule(tmp_path) == NOISE_SCHEDULE
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"unet": {}}))
    assert run_noise_schedule(tmp_path) == NOISE_SCHEDULE
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"noise_schedule": noise_schedule(True)}))
    assert run_noise_schedule(tmp_path)["rescale_betas_zero_snr"] is True


def test_initial_weights_are_loaded_and_another_layout_is_refused(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = build_unet(SMALL, latent_channels=4, sample_size=8, cross_attention_dim=32)
    source.save_pretrained(tmp_path / "source")
    torch.manual_seed(1)
    fresh = build_unet(SMALL, latent_channels=4, sample_size=8, cross_attention_dim=32)
    assert not torch.equal(fresh.conv_in.weight, source.conv_in.weight)
    load_initial_weights(fresh, tmp_path / "source")
    loaded, saved = fresh.state_dict(), source.state_dict()
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[name], saved[name]) for name in saved)

    wider = build_unet(UnetConfig(block_out_channels=(32, 96), down_block_types=SMALL.down_block_types,
                                  up_block_types=SMALL.up_block_types), 4, 8, cross_attention_dim=32)
    with pytest.raises(PipelineError, match=r"a UNet of channels \[32, 64\], this run's is \[32, 96\]"):
        load_initial_weights(wider, tmp_path / "source")
    deeper = build_unet(UnetConfig(block_out_channels=(32, 64), layers_per_block=2,
                                   down_block_types=SMALL.down_block_types, up_block_types=SMALL.up_block_types),
                        4, 8, cross_attention_dim=32)
    with pytest.raises(PipelineError, match="its layout differs from this run's UNet"):
        load_initial_weights(deeper, tmp_path / "source")
    assert isinstance(UNet2DConditionModel.load_config(tmp_path / "source"), dict)
