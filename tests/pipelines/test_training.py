"""`image-gen train vae|unet|distill|export` end to end on a tiny run (2 to 4 steps, 16 scenes at 64 px): the
exported folders load in stock diffusers and generate, runs resume and stop on a time budget, and bad input is one
line with exit code 2."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image

from pipelines.training.cli import main as train
from pipelines.training.common import RunConfig, TrainingRun
from pipelines.training.distill import DistillConfig
from pipelines.training.export import STUDENT_NAME, TEACHER_NAME
from pipelines.training.scenes import SCENE_VERSION
from pipelines.training.text import MAX_TOKENS

IMAGE_SIZE = 64
TINY = ["--batch-size", "2", "--dataset-size", "16", "--image-size", str(IMAGE_SIZE)]


@dataclass
class Chain:
    run_dir: Path
    out: Path
    stdout: dict[str, str]
    """What each command printed, by name (vae, unet, unet-resumed, distill, export), and the UNet's progress.json
    after its first run (unet-progress)."""


def run_quietly(argv: list[str]) -> tuple[int, str]:
    """Run `image-gen train ...` in this process; its exit code and standard output (progress bars are dropped)."""
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
        code = train(argv)
    return code, stdout.getvalue()


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Chain:
    """vae (2 steps), unet (2 steps, then resumed to 4), distill (2 steps) and export, run once for the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    run_dir, out = tmp_path_factory.mktemp("run"), tmp_path_factory.mktemp("models")
    stdout = {}
    try:
        for name, argv in (
            ("vae", ["vae", "--steps", "2"]),
            ("unet", ["unet", "--steps", "2"]),
            ("unet-resumed", ["unet", "--steps", "4"]),
            ("distill", ["distill", "--steps", "2"]),
        ):
            code, stdout[name] = run_quietly([*argv, "--run-dir", str(run_dir), *TINY])
            assert code == 0, name
            if name == "unet":
                stdout["unet-progress"] = (run_dir / "unet" / "checkpoint" / "progress.json").read_text()
        code, stdout["export"] = run_quietly(["export", "--run-dir", str(run_dir), "--out", str(out)])
        assert code == 0, "export"
    finally:
        torch.set_num_threads(threads)
    return Chain(run_dir, out, stdout)


def one_line_error(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith("image-gen train"), lines[0]
    return lines[0]


# --- the chain ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_each_stage_writes_its_weights_and_config(chain: Chain) -> None:
    run = chain.run_dir
    for folder in ("vae/final", "unet/final/unet-ema", "unet/final/unet-raw", "distill/final/unet"):
        assert (run / folder / "config.json").is_file() and (run / folder / "diffusion_pytorch_model.safetensors").is_file()
    assert json.loads((run / "vae" / "final" / "config.json").read_text())["scaling_factor"] > 0
    config = json.loads((run / "distill" / "config.json").read_text())
    assert (config["steps"], config["batch_size"], config["dataset_size"], config["image_size"]) == (2, 2, 16, 64)
    # Teacher and student trained on the scenes' captions and two paraphrases of each.
    assert json.loads((run / "unet" / "config.json").read_text())["unet"]["paraphrase_rate"] == 0.5
    assert config["distill"]["paraphrase_rate"] == 0.5
    caches = sorted(path.name for path in (run / "data").glob("text-*.npy"))
    assert caches == [f"text-v{SCENE_VERSION}-n16-s0-64px-para2.npy"]
    assert len(np.load(run / "data" / caches[0])) > 16 * 2  # 16 captions, 32 paraphrases and "", some repeated


@pytest.mark.slow
def test_a_rerun_with_more_steps_resumes_from_the_checkpoint(chain: Chain) -> None:
    assert json.loads(chain.stdout["unet-progress"])["step"] == 2
    assert "resumed unet at step 2" in chain.stdout["unet-resumed"]
    checkpoint = chain.run_dir / "unet" / "checkpoint"
    assert json.loads((checkpoint / "progress.json").read_text())["step"] == 4
    # A restart would have logged step 0 a second time, and its optimiser would have taken 2 steps, not 2 + 2.
    logged = [json.loads(line)["step"] for line in (chain.run_dir / "unet" / "log.jsonl").open()]
    assert logged == [0]
    optimizer = torch.load(checkpoint / "optimizer.bin", weights_only=True)
    assert {int(state["step"]) for state in optimizer["state"].values()} == {4}


@pytest.mark.slow
def test_report_plots_each_stage_and_summarises_the_run(chain: Chain, tmp_path: Path) -> None:
    code, printed = run_quietly(["report", "--run-dir", str(chain.run_dir), "--out", str(tmp_path)])
    assert code == 0
    assert sorted(Path(line).name for line in printed.split()) == [
        "loss-distill.png", "loss-unet.png", "loss-vae.png", "training-summary.json"]
    for stage in ("vae", "unet", "distill"):
        with Image.open(tmp_path / f"loss-{stage}.png") as plot:
            assert plot.size == (640, 360)
    summary = json.loads((tmp_path / "training-summary.json").read_text())
    assert {stage: summary[stage]["steps"] for stage in summary} == {"vae": 2, "unet": 4, "distill": 2}
    assert summary["unet"]["config"]["unet"]["block_out_channels"] == [64, 128, 192]
    assert summary["vae"]["final"]["loss"] > 0


@pytest.mark.slow
def test_export_prints_the_teacher_and_student_folders(chain: Chain) -> None:
    assert chain.stdout["export"].split() == [str(chain.out / TEACHER_NAME), str(chain.out / STUDENT_NAME)]


@pytest.mark.slow
@pytest.mark.parametrize("name", [TEACHER_NAME, STUDENT_NAME])
def test_stock_diffusers_loads_an_exported_folder_and_generates(chain: Chain, name: str) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(chain.out / name)
    pipe.set_progress_bar_config(disable=True)
    result = pipe("a red circle to the left of a blue square", num_inference_steps=2, guidance_scale=1.5,
                  generator=torch.Generator().manual_seed(0), output_type="np")
    assert result.images.shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert np.isfinite(result.images).all()
    assert pipe.tokenizer.model_max_length == MAX_TOKENS
    assert type(pipe.text_encoder).__name__ == "BertModel"


@pytest.mark.slow
def test_the_student_samples_with_lcm_and_a_guidance_embedding(chain: Chain) -> None:
    from diffusers import DDIMScheduler, LCMScheduler, UNet2DConditionModel

    student, teacher = chain.out / STUDENT_NAME, chain.out / TEACHER_NAME
    assert LCMScheduler.load_config(student / "scheduler")["_class_name"] == "LCMScheduler"
    assert DDIMScheduler.load_config(teacher / "scheduler")["_class_name"] == "DDIMScheduler"
    student_unet = UNet2DConditionModel.from_pretrained(student / "unet")
    assert student_unet.config.time_cond_proj_dim == DistillConfig().time_cond_proj_dim
    assert student_unet.time_embedding.cond_proj is not None
    assert UNet2DConditionModel.load_config(teacher / "unet")["time_cond_proj_dim"] is None


@pytest.mark.slow
def test_each_folder_has_an_image_gen_manifest_with_presets_and_sizes(chain: Chain) -> None:
    teacher = json.loads((chain.out / TEACHER_NAME / "image-gen.json").read_text())
    student = json.loads((chain.out / STUDENT_NAME / "image-gen.json").read_text())
    for manifest in (teacher, student):
        assert manifest["native_size"] == IMAGE_SIZE
        assert f"{IMAGE_SIZE}x{IMAGE_SIZE}" in manifest["allowed_sizes"]
        assert all(IMAGE_SIZE <= int(side) <= manifest["max_size"] for size in manifest["allowed_sizes"]
                   for side in size.split("x"))
    assert set(teacher["presets"]) == set(student["presets"]) == {"speed", "quality"}
    assert (teacher["distilled"], student["distilled"]) == (False, True)
    assert student["presets"]["speed"]["scheduler"] == "lcm" and student["default_steps"] <= 4
    assert (student["default_scheduler"], teacher["default_scheduler"]) == ("lcm", "euler_a")
    # Speed runs the student and Quality the teacher, whichever of the two is chosen
    assert student["presets"]["quality"]["model"] == TEACHER_NAME and "model" not in student["presets"]["speed"]
    assert teacher["presets"]["speed"]["model"] == STUDENT_NAME and "model" not in teacher["presets"]["quality"]


@pytest.mark.slow
def test_the_registry_defaults_to_the_student(chain: Chain, tmp_path: Path) -> None:
    from pipelines.registry import ModelRegistry

    models = ModelRegistry([chain.out], device="cpu", hash_cache=tmp_path / "hashes.json")
    assert sorted(info.name for info in models.list()) == [TEACHER_NAME, STUDENT_NAME]
    assert models.default().name == STUDENT_NAME


@pytest.mark.slow
def test_unet_config_trains_the_unet_it_names(chain: Chain, tmp_path: Path) -> None:
    shutil.copytree(chain.run_dir / "vae", tmp_path / "run" / "vae")
    smaller = {"block_out_channels": [32, 64], "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
               "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "layers_per_block": 2}
    (tmp_path / "unet.json").write_text(json.dumps(smaller))
    code, _ = run_quietly(["unet", "--steps", "1", "--run-dir", str(tmp_path / "run"), "--unet-config",
                           str(tmp_path / "unet.json"), *TINY])
    assert code == 0
    recorded = json.loads((tmp_path / "run" / "unet" / "config.json").read_text())["unet"]
    assert {key: recorded[key] for key in smaller} == smaller
    built = UNet2DConditionModel.load_config(tmp_path / "run" / "unet" / "final" / "unet-ema")
    assert built["block_out_channels"] == [32, 64] and built["layers_per_block"] == 2


@pytest.mark.slow
def test_resuming_a_checkpoint_with_another_unet_config_is_refused(chain: Chain, tmp_path: Path, capsys) -> None:
    progress = (chain.run_dir / "unet" / "checkpoint" / "progress.json").read_text()
    (tmp_path / "unet.json").write_text(json.dumps({"layers_per_block": 2}))
    assert train(["unet", "--steps", "6", "--run-dir", str(chain.run_dir), "--unet-config",
                  str(tmp_path / "unet.json"), *TINY]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "holds a checkpoint of another UNet (layers_per_block differ)" in line and "new --run-dir" in line
    assert (chain.run_dir / "unet" / "checkpoint" / "progress.json").read_text() == progress


@pytest.mark.slow
def test_a_zero_snr_fine_tune_starts_from_given_weights_and_its_export_samples_from_pure_noise(
        chain: Chain, tmp_path: Path) -> None:
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline

    run, init = tmp_path / "run", chain.run_dir / "unet" / "final" / "unet-ema"
    shutil.copytree(chain.run_dir / "vae", run / "vae")
    (tmp_path / "unet.json").write_text(json.dumps({"zero_terminal_snr": True, "loss_weighting": "min_snr_v"}))
    code, _ = run_quietly(["unet", "--steps", "2", "--run-dir", str(run), "--unet-config", str(tmp_path / "unet.json"),
                           "--init-from", str(init), "--snapshot-every", "1", *TINY])
    assert code == 0
    config = json.loads((run / "unet" / "config.json").read_text())
    assert config["init_from"] == str(init) and config["noise_schedule"]["rescale_betas_zero_snr"] is True
    assert sorted(path.name for path in (run / "unet").glob("step-*")) == ["step-1", "step-2"]
    # Two steps in the learning rate's warm-up (at most 1.2e-6) move no weight far from where it started.
    start = UNet2DConditionModel.from_pretrained(init).state_dict()
    trained = UNet2DConditionModel.from_pretrained(run / "unet" / "final" / "unet-raw").state_dict()
    assert max((trained[name] - start[name]).abs().max().item() for name in start) < 1e-4
    # The student is distilled on the teacher's schedule, and both folders sample on it.
    assert run_quietly(["distill", "--steps", "1", "--run-dir", str(run), *TINY])[0] == 0
    assert run_quietly(["export", "--run-dir", str(run), "--out", str(tmp_path / "models")])[0] == 0
    for name in (TEACHER_NAME, STUDENT_NAME):
        scheduler = json.loads((tmp_path / "models" / name / "scheduler" / "scheduler_config.json").read_text())
        assert (scheduler["rescale_betas_zero_snr"], scheduler["timestep_spacing"]) == (True, "trailing")
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "models" / TEACHER_NAME)
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a red circle", num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    assert np.isfinite(images).all() and images.std() > 0


def test_init_from_a_folder_without_a_unet_is_refused(tmp_path: Path, capsys) -> None:
    (tmp_path / "vae" / "final").mkdir(parents=True)
    (tmp_path / "vae" / "final" / "config.json").write_text("{}")
    assert train(["unet", "--run-dir", str(tmp_path), "--init-from", str(tmp_path / "nowhere")]) == 2
    assert f"--init-from {tmp_path / 'nowhere'}: no config.json there" in one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "unet").exists()


@pytest.mark.slow
def test_a_time_budget_stops_early_with_a_checkpoint(tmp_path: Path) -> None:
    code, _ = run_quietly(["vae", "--steps", "100000", "--time-budget", "0.02", "--run-dir", str(tmp_path), *TINY])
    assert code == 0
    progress = json.loads((tmp_path / "vae" / "checkpoint" / "progress.json").read_text())
    assert progress["step"] < 100000
    assert (tmp_path / "vae" / "checkpoint" / "model.safetensors").is_file()


def test_stop_at_ends_a_leg_with_a_checkpoint_and_the_next_leg_resumes_there(tmp_path: Path) -> None:
    def leg(stop_at: int | None) -> list[int]:
        run = TrainingRun(RunConfig(run_dir=tmp_path, steps=10, batch_size=1, lr=1e-3, stop_at=stop_at), "leg")
        run.resume()
        return list(run.loop())

    assert leg(stop_at=4) == [0, 1, 2, 3]
    assert json.loads((tmp_path / "leg" / "checkpoint" / "progress.json").read_text())["step"] == 4
    assert leg(stop_at=None) == [4, 5, 6, 7, 8, 9]


# --- bad input: one line, exit code 2 ---------------------------------------------------------------------------


@pytest.mark.parametrize(("stage", "missing", "run_first"), [
    ("unet", "vae/final", "vae"),
    ("distill", "unet/final/unet-ema", "unet"),
    ("export", "unet/final/unet-ema", "unet"),
])
def test_a_stage_before_the_one_it_needs_is_refused(tmp_path: Path, capsys, stage: str, missing: str,
                                                    run_first: str) -> None:
    if stage != "unet":  # a VAE exists, so what is missing is the UNet
        (tmp_path / "vae" / "final").mkdir(parents=True)
        (tmp_path / "vae" / "final" / "config.json").write_text("{}")
    assert train([stage, "--run-dir", str(tmp_path)]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert f"{tmp_path / missing} not found" in line and f"image-gen train {run_first}" in line
    assert not (tmp_path / stage).exists()


@pytest.mark.parametrize("stage", ["distill", "export"])
def test_a_missing_teacher_snapshot_is_named(tmp_path: Path, capsys, stage: str) -> None:
    for folder in ("vae/final", "unet/final/unet-ema"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "config.json").write_text("{}")
    assert train([stage, "--run-dir", str(tmp_path), "--teacher", "step-7"]) == 2
    assert f"{tmp_path / 'unet' / 'step-7' / 'unet-ema'} not found" in one_line_error(capsys.readouterr().err)


@pytest.mark.parametrize(("content", "message"), [
    ("{not json", "cannot read it as JSON"),
    ('{"channels": [1]}', "unknown keys ['channels']"),
    ("[1, 2]", "unknown keys not an object"),
    ('{"block_out_channels": [32, 64]}', "need one entry per level"),
    ('{"attention_head_dim": 48}', "attention_head_dim 48 must divide every entry of block_out_channels"),
    ('{"paraphrase_rate": 2}', "paraphrase_rate must be between 0 and 1, got 2"),
    ('{"zero_terminal_snr": true}', 'zero_terminal_snr needs loss_weighting "min_snr_v"'),
])
def test_a_bad_unet_config_is_refused(tmp_path: Path, capsys, content: str, message: str) -> None:
    (tmp_path / "vae" / "final").mkdir(parents=True)
    (tmp_path / "vae" / "final" / "config.json").write_text("{}")
    (tmp_path / "unet.json").write_text(content)
    assert train(["unet", "--run-dir", str(tmp_path), "--unet-config", str(tmp_path / "unet.json")]) == 2
    assert message in one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "unet").exists()


def test_a_data_folder_without_captions_jsonl_is_refused(tmp_path: Path, capsys) -> None:
    (tmp_path / "images").mkdir()
    assert train(["vae", "--run-dir", str(tmp_path / "run"), "--data", str(tmp_path / "images"), *TINY]) == 2
    assert f"{tmp_path / 'images' / 'captions.jsonl'} not found" in one_line_error(capsys.readouterr().err)


def test_a_data_folder_naming_a_missing_image_is_refused(tmp_path: Path, capsys) -> None:
    (tmp_path / "captions.jsonl").write_text('{"file": "gone.png", "caption": "a red square"}\n')
    assert train(["vae", "--run-dir", str(tmp_path / "run"), "--data", str(tmp_path), *TINY]) == 2
    assert f"{tmp_path / 'gone.png'} not found" in one_line_error(capsys.readouterr().err)


@pytest.mark.parametrize("argv", [
    ["unet", "--steps", "0"],
    ["vae", "--steps", "-3"],
    ["vae", "--steps", "many"],
    ["distill", "--batch-size", "0"],
    ["vae", "--time-budget", "0"],
    ["vae", "--stop-at", "0"],
    ["vae", "--stop-at", "11", "--steps", "10"],
    ["vae", "--dataset-size", "0"],
    ["unet", "--snapshot-every", "0"],
    ["distill", "--paraphrase-rate", "1.5"],
    ["distill", "--paraphrase-rate", "half"],
])
def test_numbers_out_of_range_are_refused(tmp_path: Path, capsys, argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        train([*argv, "--run-dir", str(tmp_path)])
    assert exit_.value.code == 2
    assert argv[1] in one_line_error(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_the_image_gen_command_reports_bad_training_input_in_one_line(tmp_path: Path) -> None:
    image_gen = Path(sys.executable).with_name("image-gen")
    assert image_gen.is_file(), "the image-gen console script is installed next to the interpreter"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([str(image_gen), "train", "unet", "--run-dir", str(tmp_path), "--steps", "2"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2
    assert "vae/final not found" in one_line_error(result.stderr)
