"""The evaluation runner and the regression gate on a real degradation: a generator that draws the domain
perfectly against the same generator degraded as an under-stepped sampler leaves its images."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from eval.cli import add_leaderboard_arguments, run_leaderboard
from eval.clip import load_scorer
from eval.runner import EvalConfig, choose_distractors, evaluate
from eval.suites import SuitePrompt, load_suite
from pipelines.training.scenes import make_scene


@pytest.fixture(scope="module")
def prompts() -> list[SuitePrompt]:
    """Every category in both phrasings: 16 prompts of the built-in suite."""
    return load_suite()[::20]


def leaderboard(*argv: object) -> int:
    parser = argparse.ArgumentParser()
    add_leaderboard_arguments(parser)
    return run_leaderboard(parser.parse_args([str(arg) for arg in argv]))


def scene_generator(prompts: list[SuitePrompt], degraded: bool):
    """A generator that draws each prompt's ground-truth scene: a model that has learnt the domain. Degraded, its
    images come out as an under-stepped sampler leaves them: blurred, washed out and noisy."""
    by_text = {p.prompt: p for p in prompts}

    def generate(texts: list[str], seeds: list[int]) -> list[Image.Image]:
        images = []
        for text, seed in zip(texts, seeds, strict=True):
            prompt = by_text[text]
            image = make_scene(prompt.seed, kind=prompt.category)[0]
            blur, contrast, noise = (3.0, 0.5, 30.0) if degraded else (0.0, 1.0, 2.0)
            pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(blur)), dtype=np.float64)
            mean = pixels.mean(axis=(0, 1))
            pixels = mean + contrast * (pixels - mean) + np.random.default_rng(seed).normal(0.0, noise, pixels.shape)
            images.append(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)))
        return images

    return generate


def write_result(folder: Path, name: str, prompts: list[SuitePrompt], degraded: bool) -> Path:
    config = EvalConfig(model="scenes", scheduler="oracle", steps=1 if degraded else 4, guidance_scale=0.0,
                        width=128, height=128)
    result = evaluate(scene_generator(prompts, degraded), prompts, load_scorer(), config,
                      model_info={"content_hash": "oracle"}, suite=None)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(result))
    return path


def test_the_gate_fails_on_a_degraded_configuration_and_passes_on_a_rerun_of_the_baseline(
    prompts: list[SuitePrompt], tmp_path: Path, capsys: pytest.CaptureFixture
):
    baseline = write_result(tmp_path, "baseline", prompts, degraded=False)
    rerun = write_result(tmp_path, "rerun", prompts, degraded=False)
    degraded = write_result(tmp_path, "degraded", prompts, degraded=True)
    base, worse = (json.loads(path.read_text())["summary"] for path in (baseline, degraded))
    assert worse["clip_score"]["mean"] < base["clip_score"]["mean"]  # the degradation is real in the metrics
    assert worse["compositional"]["mean"] < base["compositional"]["mean"]
    assert worse["frechet_distance"]["mean"] > base["frechet_distance"]["mean"]

    gate = ("--results", tmp_path, "--out", tmp_path / "board", "--baseline", baseline, "--tolerance", 0.05)
    capsys.readouterr()
    assert leaderboard(*gate, "--candidate", rerun) == 0
    assert "gate passed" in capsys.readouterr().out
    assert leaderboard(*gate, "--candidate", degraded) == 1
    report = capsys.readouterr().err
    assert report.startswith("image-gen: regression: ")
    assert "clip_score:" in report and "frechet_distance:" in report and "compositional:" in report



def test_distractors_are_prompts_that_show_something_else(prompts: list[SuitePrompt]):
    chosen = choose_distractors(prompts, 10)
    for prompt, others in zip(prompts, chosen, strict=True):
        assert len(others) == 10
        for other in (prompts[j] for j in others):
            assert (other.category, other.seed) != (prompt.category, prompt.seed)  # not its other phrasing
