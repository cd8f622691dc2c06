"""ModelRegistry: finds model folders, describes them, hashes their weights, loads lazily, explains broken ones."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

from pipelines.errors import ModelLoadError, ModelNotFoundError
from pipelines.params import OVERRIDE_FILE, ModelInfo
from pipelines.registry import ModelRegistry, WeightHashes


def registry(tmp_path: Path, *model_dirs: Path, **options) -> ModelRegistry:
    return ModelRegistry(list(model_dirs), device="cpu", hash_cache=tmp_path / "hashes.json", **options)


def copy_model(source: Path, destination: Path) -> Path:
    shutil.copytree(source, destination)
    return destination


def edit_json(file: Path, **changes) -> None:
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


def test_lists_every_layout_with_its_architecture(tmp_path: Path, tiny_models_dir: Path) -> None:
    models = {info.name: info for info in registry(tmp_path, tiny_models_dir).list()}
    assert sorted(models) == ["tiny-lcm", "tiny-minilm", "tiny-sd", "tiny-sdxl"]
    assert (
        {name: info.architecture for name, info in models.items()}
        == {
            "tiny-lcm": "sd1",
            "tiny-minilm": "sd1",  # a 48-dim text encoder: neither SD 1.x's 768 nor SD 2.x's 1024, reported as the layout
            "tiny-sd": "sd1",
            "tiny-sdxl": "sdxl",
        }
    )


def test_infers_sizes_and_defaults_from_the_configs(tmp_path: Path, tiny_models_dir: Path) -> None:
    models = {info.name: info for info in registry(tmp_path, tiny_models_dir).list()}
    sd = models["tiny-sd"]
    assert (sd.native_size, sd.min_size, sd.max_size) == (32, 16, 64)  # UNet 16 latents x VAE factor 2
    assert sd.allowed_sizes[0] == "32x32"
    assert (sd.default_scheduler, sd.default_steps, sd.default_guidance, sd.distilled) == (
        "dpmpp_2m_karras",
        25,
        7.0,
        False,
    )
    assert models["tiny-sdxl"].default_guidance == 5.0
    lcm = models["tiny-lcm"]
    assert (lcm.default_scheduler, lcm.default_steps, lcm.default_guidance, lcm.distilled) == (
        "lcm",
        4,
        8.0,
        True,
    )
    assert set(lcm.presets) == {"speed", "quality"}


def test_sd2_is_told_from_sd1_by_the_cross_attention_width(tmp_path: Path, tiny_sd_model: Path) -> None:
    model = copy_model(tiny_sd_model, tmp_path / "models" / "tiny-sd2")
    edit_json(model / "unet" / "config.json", cross_attention_dim=1024)
    assert ModelInfo.from_folder(model).architecture == "sd2"


def test_image_gen_json_overrides_the_inferred_defaults(tmp_path: Path, tiny_sd_model: Path) -> None:
    model = copy_model(tiny_sd_model, tmp_path / "models" / "house-style")
    card = {
        "label": "untrained",
        "description": "random weights",
        "native_size": 48,
        "min_size": 32,
        "max_size": 128,
        "allowed_sizes": ["48x48", "64x32"],
        "default_scheduler": "ddim",
        "default_steps": 6,
        "default_guidance": 3.5,
        "presets": {"speed": {"steps": 2}, "quality": {"steps": 12, "scheduler": "euler"}},
        "distilled": True,
    }
    (model / "image-gen.json").write_text(json.dumps(card))
    info = registry(tmp_path, model.parent).get("house-style")
    assert info.model_dump(include=set(card)) == card


def test_image_gen_json_mistakes_are_load_errors(tmp_path: Path, tiny_sd_model: Path) -> None:
    model = copy_model(tiny_sd_model, tmp_path / "models" / "typo")
    (model / "image-gen.json").write_text(json.dumps({"default_sampler": "ddim"}))
    with pytest.raises(ModelLoadError, match=r"unknown keys.*default_scheduler"):
        ModelInfo.from_folder(model)
    (model / "image-gen.json").write_text(json.dumps({"default_scheduler": "dpm_fast"}))
    with pytest.raises(ModelLoadError, match="unknown scheduler 'dpm_fast'"):
        ModelInfo.from_folder(model)


def test_content_hash_is_the_sha256_of_the_weights_and_is_remembered(
    tmp_path: Path, tiny_sd_model: Path
) -> None:
    model = copy_model(tiny_sd_model, tmp_path / "models" / "tiny-sd")
    weights = sorted(model.glob("*/*.safetensors"), key=lambda file: file.relative_to(model).as_posix())
    expected = hashlib.sha256(b"".join(file.read_bytes() for file in weights)).hexdigest()
    info = registry(tmp_path, model.parent).get("tiny-sd")
    assert (info.content_sha256, info.content_hash) == (expected, expected[:10])

    cache = json.loads((tmp_path / "hashes.json").read_text())
    assert cache[str(model.resolve())]["sha256"] == expected
    cache[str(model.resolve())]["sha256"] = "f" * 64  # a remembered hash is used while sizes and mtimes agree
    (tmp_path / "hashes.json").write_text(json.dumps(cache))
    assert WeightHashes(tmp_path / "hashes.json").sha256(model) == "f" * 64

    with (model / "vae" / "diffusion_pytorch_model.safetensors").open("r+b") as handle:
        handle.seek(-1, 2)
        last = handle.read(1)
        handle.seek(-1, 2)
        handle.write(bytes([last[0] ^ 1]))
    assert WeightHashes(tmp_path / "hashes.json").sha256(model) not in ("f" * 64, expected)


def test_broken_folders_are_skipped_and_explained(
    tmp_path: Path, tiny_sd_model: Path, tiny_sdxl_model: Path
) -> None:
    models = tmp_path / "models"
    copy_model(tiny_sd_model, models / "good")
    (models / "no-index").mkdir()
    edit_json(
        copy_model(tiny_sd_model, models / "refiner") / "model_index.json",
        _class_name="StableDiffusionXLImg2ImgPipeline",
    )
    (copy_model(tiny_sd_model, models / "corrupt-json") / "unet" / "config.json").write_text("{not json")
    shutil.rmtree(copy_model(tiny_sdxl_model, models / "missing-encoder") / "text_encoder_2")
    weights = copy_model(tiny_sd_model, models / "truncated") / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])

    found = registry(tmp_path, models, tmp_path / "nowhere")
    assert [info.name for info in found.list()] == ["good"]
    errors = found.errors
    assert "model_index.json is missing" in errors["no-index"]
    assert (
        "'StableDiffusionXLImg2ImgPipeline' is not supported: use one of StableDiffusionPipeline"
        in errors["refiner"]
    )
    assert "is not valid JSON" in errors["corrupt-json"]
    assert "text_encoder_2/ is missing" in errors["missing-encoder"]
    assert "is truncated or corrupt" in errors["truncated"]
    assert "does not exist" in errors[str(tmp_path / "nowhere")]
    assert all("\n" not in message for message in errors.values())


def test_unknown_model_error_names_the_available_ones(tmp_path: Path, tiny_models_dir: Path) -> None:
    with pytest.raises(
        ModelNotFoundError, match="'sdxl-turbo' not found: available models are tiny-lcm, tiny-minilm"
    ):
        registry(tmp_path, tiny_models_dir).get("sdxl-turbo")


def test_asking_for_a_broken_model_says_why(tmp_path: Path, tiny_sd_model: Path) -> None:
    model = copy_model(tiny_sd_model, tmp_path / "models" / "half")
    shutil.rmtree(model / "vae")
    with pytest.raises(ModelLoadError, match="vae/ is missing"):
        registry(tmp_path, model.parent).load("half")


def test_missing_models_folder_is_reported_and_default_explains(tmp_path: Path) -> None:
    empty = registry(tmp_path, tmp_path / "absent")
    assert empty.list() == []
    with pytest.raises(ModelNotFoundError, match=r"no usable model in .*absent does not exist"):
        empty.default()
    with pytest.raises(ModelLoadError, match="does not exist"):
        ModelInfo.from_folder(tmp_path / "absent")


def test_default_is_the_first_model_of_the_first_folder(
    tmp_path: Path, tiny_sd_model: Path, tiny_models_dir: Path
) -> None:
    user = tmp_path / "user"
    copy_model(tiny_sd_model, user / "zz-mine")
    assert registry(tmp_path, user, tiny_models_dir).default().name == "zz-mine"
    assert registry(tmp_path, tiny_models_dir, user).default().name == "tiny-lcm"


def test_default_is_the_model_with_the_highest_priority(tmp_path: Path, tiny_sd_model: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    copy_model(tiny_sd_model, first / "a-teacher")
    student = copy_model(tiny_sd_model, second / "b-student")
    models = registry(tmp_path, first, second)
    assert models.default().name == "a-teacher"  # equal priorities: folder order
    (student / OVERRIDE_FILE).write_text(json.dumps({"priority": 1}))
    assert (models.get("b-student").priority, models.get("a-teacher").priority) == (1, 0)
    assert models.default().name == "b-student"


def test_a_preset_may_name_a_model_but_nothing_else_unknown(tmp_path: Path, tiny_sd_model: Path) -> None:
    model = copy_model(tiny_sd_model, tmp_path / "m")
    (model / OVERRIDE_FILE).write_text(json.dumps({"presets": {"quality": {"model": "other", "steps": 30}}}))
    assert ModelInfo.from_folder(model).presets["quality"] == {"model": "other", "steps": 30}
    (model / OVERRIDE_FILE).write_text(json.dumps({"presets": {"quality": {"model": 3}}}))
    with pytest.raises(ModelLoadError, match="preset 'quality': model must be a model's name"):
        ModelInfo.from_folder(model)


def test_a_folder_that_is_itself_a_model_can_be_listed(tmp_path: Path, tiny_sd_model: Path) -> None:
    assert [info.name for info in registry(tmp_path, tiny_sd_model).list()] == ["tiny-sd"]


def test_load_is_lazy_cached_and_bounded(tmp_path: Path, tiny_models_dir: Path) -> None:
    models = registry(tmp_path, tiny_models_dir, max_loaded=1)
    assert models.loaded() == ()
    sd = models.load("tiny-sd")
    assert models.load("tiny-sd") is sd
    assert sd.info.content_hash == models.get("tiny-sd").content_hash != ""
    models.load("tiny-lcm")
    assert models.loaded() == ("tiny-lcm",)
    assert models.load("tiny-sd") is not sd


def test_fp16_variant_weights_are_found_and_loaded(tmp_path: Path, tiny_sd_model: Path) -> None:
    stock = StableDiffusionPipeline.from_pretrained(tiny_sd_model, safety_checker=None, local_files_only=True)
    stock.to(torch.float16).save_pretrained(tmp_path / "models" / "half-sd", variant="fp16")
    assert list((tmp_path / "models" / "half-sd" / "unet").glob("*.fp16.safetensors"))
    pipe = registry(tmp_path, tmp_path / "models", dtype="float32").load("half-sd")
    assert pipe.unet.dtype == torch.float32
    assert pipe(["a cup"], [""], [1], 32, 32, 1, 5.0, "ddim")[0].size == (32, 32)
