"""The `image-gen` command end to end on the untrained tiny model: files written, metadata, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from image_gen import cli
from image_gen.errors import ImageGenError
from image_gen.settings import load_settings
from pipelines.errors import GenerationCanceled, InvalidParamsError, ModelLoadError, ModelNotFoundError
from storage.objects import NotFound, PreconditionFailed, StorageError

REPO_ROOT = Path(__file__).resolve().parents[2]
FAST = ["--steps", "2", "--size", "64x64"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def env(workdir: Path) -> dict[str, str]:
    """The environment of a user whose models folder is `workdir/models` (set through IMAGE_GEN_MODELS_DIR)."""
    clean = {key: value for key, value in os.environ.items() if not key.startswith("IMAGE_GEN_")}
    return {
        **clean,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        "IMAGE_GEN_MODELS_DIR": str(workdir / "models"),
        "IMAGE_GEN_BUNDLED_MODELS": "false",  # a user with only their own models folder (bundled: test_bundled_models)
        "XDG_CACHE_HOME": str(workdir / "cache"),  # the registry's weight-hash cache
    }


def run(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`image-gen ARGS...` in a fresh Python process."""
    command = [sys.executable, "-m", "image_gen.cli", *args]
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


def assert_one_line_error(stderr: str, *expected: str) -> None:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("image-gen: error: "), stderr
    assert "Traceback" not in stderr
    for text in expected:
        assert text in lines[0]


@pytest.fixture(scope="module")
def model_dir(env: dict[str, str], workdir: Path) -> Path:
    """`image-gen setup` into an empty models folder: builds the untrained tiny model."""
    result = run(env, workdir, "setup")
    assert result.returncode == 0, result.stderr
    assert "built the untrained tiny model" in result.stderr
    assert result.stdout.strip() == "models ready: untrained-tiny"
    return workdir / "models" / "untrained-tiny"


@pytest.fixture
def in_process(env: dict[str, str], workdir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Runs `cli.main` in this process with the same environment and working folder as `run`."""
    for key in [key for key in os.environ if key.startswith("IMAGE_GEN_")]:
        monkeypatch.delenv(key)
    for key in ("IMAGE_GEN_MODELS_DIR", "IMAGE_GEN_BUNDLED_MODELS", "XDG_CACHE_HOME"):
        monkeypatch.setenv(key, env[key])
    monkeypatch.chdir(workdir)
    yield


def test_help_lists_every_command_without_importing_torch(env: dict[str, str], workdir: Path) -> None:
    result = run(env, workdir, "--help")
    assert result.returncode == 0
    for command in ("generate", "models", "info", "setup", "serve", "worker", "bench", "train", "keys"):
        assert command in result.stdout
    probe = "import sys; from image_gen import cli; cli.build_parser().format_help(); print('torch' in sys.modules)"
    imported = subprocess.run(
        [sys.executable, "-c", probe], env=env, cwd=workdir, capture_output=True, text=True, check=True
    )
    assert imported.stdout.strip() == "False"


def test_setup_again_keeps_the_model(
    model_dir: Path, in_process: None, capsys: pytest.CaptureFixture
) -> None:
    weights = model_dir / "unet" / "diffusion_pytorch_model.safetensors"
    before = weights.stat().st_mtime_ns
    assert cli.main(["setup"]) == 0
    assert capsys.readouterr().out.strip() == "models ready: untrained-tiny"
    assert weights.stat().st_mtime_ns == before


def test_models_json_lists_the_model(
    model_dir: Path, in_process: None, capsys: pytest.CaptureFixture
) -> None:
    assert cli.main(["models", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    (model,) = listing["models"]
    assert model["name"] == "untrained-tiny"
    assert model["label"] == "untrained"
    assert model["native_size"] == 64
    assert len(model["content_hash"]) == 10
    assert listing["broken"] == []


def test_models_table_shows_broken_folders(
    model_dir: Path, in_process: None, workdir: Path, capsys: pytest.CaptureFixture
) -> None:
    broken = workdir / "models" / "half-copied"
    broken.mkdir()
    try:
        assert cli.main(["models"]) == 0
    finally:
        broken.rmdir()
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == [
        "NAME",
        "ARCH",
        "SIZE",
        "SCHEDULER",
        "STEPS",
        "GUIDANCE",
        "HASH",
        "LABEL",
    ]
    assert "untrained-tiny  sd1" in out
    assert "broken: half-copied: " in out and "model_index.json is missing" in out


def test_generate_writes_a_png_whose_info_round_trips_the_request(
    model_dir: Path, env: dict[str, str], workdir: Path
) -> None:
    args = ["a red fox, in snow", "--seed", "7", "--negative", "blurry", "--scheduler", "euler", *FAST]
    result = run(env, workdir, "generate", *args)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [str(Path("outputs") / "7-a-red-fox-in-snow.png")]

    info = run(env, workdir, "info", "--json", "outputs/7-a-red-fox-in-snow.png")
    assert info.returncode == 0, info.stderr
    payload = json.loads(info.stdout)
    assert payload["source"] == "image-gen"
    record = payload["request"]
    assert record["request"] == {
        "prompt": "a red fox, in snow",
        "negative_prompt": "blurry",
        "model": "untrained-tiny",
        "width": 64,
        "height": 64,
        "steps": 2,
        "guidance_scale": 5.0,
        "scheduler": "euler",
        "seed": 7,
        "num_images": 1,
    }
    assert (record["device"], record["dtype"], record["attention"]) == ("cpu", "float32", "sdpa")
    assert len(record["content_sha256"]) == 64
    assert record["content_hash"] == record["content_sha256"][:10]
    assert record["pipeline_version"]

    parameters = payload["parameters"]
    assert parameters["prompt"] == "a red fox, in snow"
    assert parameters["negative_prompt"] == "blurry"
    assert (parameters["steps"], parameters["sampler"], parameters["cfg_scale"]) == (2, "Euler", 5.0)
    assert (parameters["seed"], parameters["width"], parameters["height"]) == (7, 64, 64)
    assert (parameters["model"], parameters["model_hash"]) == ("untrained-tiny", record["content_hash"])


def test_same_seed_gives_identical_pixels_and_files_are_named_by_seed(
    model_dir: Path, env: dict[str, str], workdir: Path, in_process: None, capsys: pytest.CaptureFixture
) -> None:
    first = run(
        env, workdir, "generate", "a lighthouse", "--seed", "11", "-n", "2", "-o", "one/out.png", *FAST
    )
    assert first.returncode == 0, first.stderr
    assert first.stdout.split() == ["one/out-0.png", "one/out-1.png"]
    # The second run in this process: same pixels whether the model was just loaded or not.
    assert cli.main(["generate", "a lighthouse", "--seed", "11", "-n", "2", "-o", "two", *FAST]) == 0
    assert capsys.readouterr().out.split() == ["two/11-a-lighthouse.png", "two/12-a-lighthouse.png"]
    # Alone instead of second in a batch of two: the same image, up to the last bit of a few pixels (a batch of
    # another size may run other kernels, whose sums round differently).
    assert cli.main(["generate", "a lighthouse", "--seed", "12", "-o", "three", *FAST]) == 0
    assert capsys.readouterr().out.split() == ["three/12-a-lighthouse.png"]

    def pixels(name: str) -> np.ndarray:
        with Image.open(workdir / name) as image:
            return np.asarray(image.convert("RGB"), dtype=np.int16)

    assert np.array_equal(pixels("one/out-0.png"), pixels("two/11-a-lighthouse.png"))
    assert np.array_equal(pixels("one/out-1.png"), pixels("two/12-a-lighthouse.png"))
    assert np.abs(pixels("one/out-1.png") - pixels("three/12-a-lighthouse.png")).max() <= 1
    assert np.abs(pixels("one/out-0.png") - pixels("one/out-1.png")).max() > 16  # another seed, another image


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--size", "65x64"], ["width 65", "multiple of 8 from 32 to 512"]),
        (["--size", "1024x1024"], ["width 1024", "from 32 to 512"]),
        (["--size", "big"], ["--size must be WIDTHxHEIGHT"]),
        (["--steps", "0"], ["--steps 0", "greater than or equal to 1"]),
        (["--steps", "151"], ["--steps 151", "less than or equal to 150"]),
        (["--model", "nope"], ["model 'nope' not found", "available models are untrained-tiny"]),
        (["--scheduler", "nope"], ["unknown scheduler 'nope'", "ddim, euler"]),
        (["--guidance", "-1"], ["--guidance -1.0", "greater than or equal to 0"]),
        (["-n", "0"], ["-n 0", "greater than or equal to 1"]),
        (["--device", "gpu"], ["--device", "choose from 'auto', 'cpu', 'cuda', 'mps'"]),
        (["--models-dir", "no-such-folder"], ["models folder no-such-folder does not exist"]),
    ],
)
def test_bad_generate_input_exits_2_with_one_line_naming_what_is_allowed(
    model_dir: Path, in_process: None, capsys: pytest.CaptureFixture, args: list[str], expected: list[str]
) -> None:
    assert cli.main(["generate", "a fox", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert_one_line_error(captured.err, *expected)


def test_bad_settings_env_value_exits_2_without_traceback(
    model_dir: Path, env: dict[str, str], workdir: Path
) -> None:
    result = run({**env, "IMAGE_GEN_DTYPE": "float8"}, workdir, "generate", "a fox", *FAST)
    assert result.returncode == 2
    assert_one_line_error(result.stderr, "IMAGE_GEN_DTYPE", "'auto', 'float32', 'float16' or 'bfloat16'")


def test_info_reads_an_a1111_png(env: dict[str, str], workdir: Path) -> None:
    text = (
        "a lighthouse at dusk\nNegative prompt: lowres\n"
        "Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 3288149472, "
        "Size: 512x768, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Version: v1.10.1"
    )
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    Image.new("RGB", (8, 8)).save(workdir / "a1111.png", pnginfo=info)

    result = run(env, workdir, "info", "a1111.png")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "source: a1111"
    for line in ("prompt: a lighthouse at dusk", "negative prompt: lowres", "sampler: DPM++ 2M",
                 "schedule type: Karras", "cfg scale: 6.5", "seed: 3288149472", "width: 512", "height: 768",
                 "model hash: 6ce0161689", "Version: v1.10.1"):  # fmt: skip
        assert line in lines


def test_info_on_a_missing_or_non_image_file_exits_2(
    in_process: None, workdir: Path, capsys: pytest.CaptureFixture
) -> None:
    assert cli.main(["info", "missing.png"]) == 2
    assert_one_line_error(capsys.readouterr().err, "no such file: missing.png")
    (workdir / "notes.png").write_text("not a picture")
    assert cli.main(["info", "notes.png"]) == 2
    assert_one_line_error(capsys.readouterr().err, "notes.png is not an image")


def test_a_command_whose_module_is_missing_exits_2(
    in_process: None, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(cli.SERVICE_COMMANDS, "worker", ("image_gen.not_written_yet", "run_worker"))
    assert cli.main(["worker"]) == 2
    assert_one_line_error(
        capsys.readouterr().err, "`image-gen worker` is not available", "image_gen.not_written_yet"
    )


def test_settings_precedence_is_flags_then_env_then_file_then_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in [key for key in os.environ if key.startswith("IMAGE_GEN_")]:
        monkeypatch.delenv(key)
    config = tmp_path / "image-gen.toml"
    config.write_text('port = 9000\nhost = "0.0.0.0"\nmax_batch = 8\n')
    monkeypatch.setenv("IMAGE_GEN_CONFIG", str(config))
    monkeypatch.setenv("IMAGE_GEN_PORT", "8000")
    monkeypatch.setenv("IMAGE_GEN_MAX_BATCH", "6")

    settings = load_settings(max_batch=2, device=None)
    assert (settings.max_batch, settings.port, settings.host, settings.device) == (2, 8000, "0.0.0.0", "auto")
    json_config = tmp_path / "other.json"
    json_config.write_text('{"store": "s3://bucket/prefix"}')
    assert load_settings(json_config).store == "s3://bucket/prefix"


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"attention": "flash"}, "'sdpa', 'xformers', 'sliced' or 'math'"),
        ({"store": "ftp://host/x"}, "a path, file://PATH or s3://BUCKET/PREFIX"),
        ({"port": 0}, "greater than or equal to 1"),
        ({"cpu_offload": "maybe"}, "true/false"),
        ({"modelsdir": "x"}, "unknown setting 'modelsdir' (allowed: models_dir, store"),
    ],
)
def test_invalid_settings_are_one_line(values: dict[str, object], expected: str) -> None:
    with pytest.raises(ImageGenError) as caught:
        load_settings(**values)
    assert "\n" not in str(caught.value)
    assert expected in str(caught.value)


@pytest.mark.parametrize(
    ("error", "code", "param"),
    [
        (
            InvalidParamsError("steps 0 is not allowed: use 1 to 150", param="steps"),
            "invalid_params",
            "steps",
        ),
        (ModelNotFoundError("model 'x' not found"), "model_not_found", "model"),
        (ModelLoadError("unet/ has no weights"), "model_load_failed", "model"),
        (GenerationCanceled("canceled"), "canceled", None),
        (NotFound("jobs/1 not found"), "not_found", None),
        (PreconditionFailed("etag changed"), "conflict", None),
        (StorageError("bucket unreachable"), "storage_error", None),
        (RuntimeError("boom"), "internal_error", None),
    ],
)
def test_lower_layer_errors_map_to_one_app_error(error: Exception, code: str, param: str | None) -> None:
    mapped = ImageGenError.from_exception(error)
    assert (mapped.code, mapped.param, mapped.message) == (code, param, str(error))
