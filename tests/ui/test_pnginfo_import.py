"""The PNG info tab's mapping from any studio's PNG metadata to the studio's controls, with notes for what is
not usable here."""

from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image, PngImagePlugin

from pipelines.params import ModelInfo
from storage.pnginfo import format_parameters, read_png_info, write_png
from ui.pnginfo import import_parameters, scheduler_of


def _model(name: str, content_hash: str = "", native: int = 512) -> ModelInfo:
    return ModelInfo(
        name=name,
        path=Path(name),
        architecture="sd1",
        native_size=native,
        allowed_sizes=[f"{native}x{native}"],
        min_size=native // 2,
        max_size=native * 2,
        default_scheduler="dpmpp_2m_karras",
        default_steps=25,
        default_guidance=7.0,
        presets={},
        content_hash=content_hash,
    )


SD15 = _model("v1-5-pruned-emaonly", "6ce0161689")
HOUSE = _model("house-model", "0123456789")
MODELS = [HOUSE, SD15]


def _png(chunks: dict[str, str]) -> bytes:
    info = PngImagePlugin.PngInfo()
    for key, value in chunks.items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "teal").save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def test_a1111_parameters_fill_every_control_and_find_the_model_by_its_hash() -> None:
    text = (
        "a lighthouse at dusk\nNegative prompt: lowres, watermark\nSteps: 28, Sampler: DPM++ 2M, "
        "Schedule type: Karras, CFG scale: 6.5, Seed: 3288149472, Size: 512x768, Model hash: 6ce0161689, "
        "Model: renamed-on-their-disk, Version: v1.10.1"
    )

    imported = import_parameters(read_png_info(_png({"parameters": text})), MODELS, HOUSE)

    assert imported.values == {
        "prompt": "a lighthouse at dusk",
        "negative_prompt": "lowres, watermark",
        "model": "v1-5-pruned-emaonly",
        "scheduler": "dpmpp_2m_karras",
        "steps": 28,
        "guidance_scale": 6.5,
        "seed": 3288149472,
        "width": 512,
        "height": 768,
    }
    assert imported.notes == []


def test_our_own_png_round_trips_exactly() -> None:
    request = {
        "prompt": "a red circle",
        "negative_prompt": "",
        "model": "house-model",
        "width": 640,
        "height": 384,
        "steps": 4,
        "guidance_scale": 1.5,
        "scheduler": "lcm",
        "seed": 12,
        "num_images": 1,
    }
    text = format_parameters(
        "a red circle",
        steps=4,
        sampler="LCM",
        cfg_scale=1.5,
        seed=12,
        width=640,
        height=384,
        model="house-model",
        model_hash="0123456789",
    )
    buffer = io.BytesIO()
    write_png(Image.new("RGB", (8, 8)), buffer, text, {"request": request, "content_sha256": "0123456789ab"})

    imported = import_parameters(read_png_info(buffer.getvalue()), MODELS, SD15)

    assert imported.values == {key: value for key, value in request.items() if key != "num_images"}
    assert imported.notes == []


def test_comfyui_graph_maps_its_sampler_and_keeps_the_current_model_when_theirs_is_missing() -> None:
    graph = {
        "3": {
            "class_type": "KSampler",
            "inputs": {
                "seed": 42,
                "steps": 20,
                "cfg": 8,
                "sampler_name": "euler_ancestral",
                "scheduler": "normal",
                "model": ["4", 0],
                "positive": ["6", 0],
                "negative": ["7", 0],
                "latent_image": ["5", 0],
            },
        },
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "dreamshaper_8.safetensors"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a castle on a hill", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
    }

    imported = import_parameters(read_png_info(_png({"prompt": json.dumps(graph)})), MODELS, HOUSE)

    assert imported.values["model"] == "house-model"
    assert imported.values["scheduler"] == "euler_a"
    assert (imported.values["prompt"], imported.values["negative_prompt"]) == ("a castle on a hill", "blurry")
    assert (imported.values["seed"], imported.values["steps"], imported.values["guidance_scale"]) == (
        42,
        20,
        8.0,
    )
    assert imported.notes == ["Model 'dreamshaper_8.safetensors' is not installed here: kept house-model."]


def test_what_cannot_be_used_here_is_kept_and_said() -> None:
    text = "a fox\nSteps: 30, Sampler: DPM++ 2M SDE Heun, CFG scale: 4, Seed: 7, Size: 2048x2048"

    imported = import_parameters(read_png_info(_png({"parameters": text})), MODELS, HOUSE)

    assert "scheduler" not in imported.values and "width" not in imported.values
    assert imported.values["model"] == "house-model"
    assert imported.notes == [
        "Sampler 'DPM++ 2M SDE Heun' is not available here: kept the current scheduler.",
        "Size 2048x2048 is not allowed for house-model (256 to 1024 px, multiples of 8): kept the model's size.",
    ]


def test_scheduler_names_of_other_studios() -> None:
    assert scheduler_of("Euler a") == "euler_a"
    assert scheduler_of("DPM++ 2M Karras") == "dpmpp_2m_karras"
    assert scheduler_of("dpmpp_2m", "karras") == "dpmpp_2m_karras"
    assert scheduler_of("uni_pc") == "unipc"
    assert scheduler_of("dpmpp_2m_sde_gpu") is None
