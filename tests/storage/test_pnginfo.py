"""PNG metadata: our `parameters` text matches A1111's format, and every studio's chunks parse to one shape."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin

from storage.pnginfo import format_parameters, parse_parameters, read_png_info, write_png


def png_with_chunks(chunks: dict[str, str]) -> bytes:
    """A 8x8 PNG carrying `chunks` as text chunks, the way each studio saves them with PIL."""
    info = PngImagePlugin.PngInfo()
    for key, value in chunks.items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "teal").save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


A1111_TEXT = (
    "masterpiece, a lighthouse at dusk, (oil painting:1.2), <lora:add_detail:0.6>\n"
    "Negative prompt: lowres, bad anatomy, watermark\n"
    "Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 3288149472, "
    "Size: 512x768, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.45, "
    'Clip skip: 2, Hires upscale: 2, Hires upscaler: Latent, Lora hashes: "add_detail: 7c6bad76eb54", '
    "Version: v1.10.1"
)
FORGE_TEXT = (
    "a cozy cabin in the snow\n"
    "Steps: 20, Sampler: Euler, Schedule type: Simple, CFG scale: 1, Distilled CFG Scale: 3.5, "
    "Seed: 1234, Size: 896x1152, Model hash: bea01d51bd, Model: flux1-dev-bnb-nf4-v2, "
    "Diffusion in Low Bits: bnb-nf4 (fp16 LoRA), Module 1: ae, Version: f2.0.1v1.10.1-previous-313-g8a042934"
)
FOOOCUS_JSON = {
    "adm_guidance": "(1.5, 0.8, 0.3)",
    "base_model": "juggernautXL_v8Rundiffusion",
    "base_model_hash": "aeb7e9e689",
    "full_negative_prompt": ["unrealistic, saturated"],
    "full_prompt": ["a red fox in the forest, highly detailed"],
    "guidance_scale": 4,
    "loras": [["sd_xl_offset_example-lora_1.0.safetensors", 0.1, "4852686128"]],
    "metadata_scheme": "fooocus",
    "negative_prompt": "",
    "performance": "Speed",
    "prompt": "a red fox in the forest",
    "resolution": "(1152, 896)",
    "sampler": "dpmpp_2m_sde_gpu",
    "scheduler": "karras",
    "seed": "1937448230",
    "sharpness": 2,
    "steps": 30,
    "styles": "['Fooocus V2', 'Fooocus Enhance', 'Fooocus Sharp']",
    "vae": "Default (model)",
    "version": "Fooocus v2.5.5",
}
COMFYUI_PROMPT = {
    "3": {
        "class_type": "KSampler",
        "inputs": {
            "seed": 156680208700286,
            "steps": 20,
            "cfg": 8,
            "sampler_name": "euler",
            "scheduler": "normal",
            "denoise": 1,
            "model": ["10", 0],
            "positive": ["6", 0],
            "negative": ["7", 0],
            "latent_image": ["5", 0],
        },
    },
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}},
    "10": {
        "class_type": "LoraLoader",
        "inputs": {
            "lora_name": "detail.safetensors",
            "strength_model": 1,
            "model": ["4", 0],
            "clip": ["4", 1],
        },
    },
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 640, "batch_size": 1}},
    "6": {
        "class_type": "CLIPTextEncode",
        "inputs": {
            "text": "beautiful scenery nature glass bottle landscape, purple galaxy bottle,",
            "clip": ["10", 1],
        },
    },
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "text, watermark", "clip": ["10", 1]}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
}
COMFYUI_WORKFLOW = {
    "last_node_id": 9,
    "last_link_id": 9,
    "nodes": [
        {
            "id": 3,
            "type": "KSampler",
            "inputs": [
                {"name": "model", "type": "MODEL", "link": 1},
                {"name": "positive", "type": "CONDITIONING", "link": 4},
                {"name": "negative", "type": "CONDITIONING", "link": 6},
                {"name": "latent_image", "type": "LATENT", "link": 2},
            ],
            "widgets_values": [156680208700286, "randomize", 20, 8, "euler", "normal", 1],
        },
        {"id": 6, "type": "CLIPTextEncode", "widgets_values": ["a glass bottle"]},
        {"id": 7, "type": "CLIPTextEncode", "widgets_values": ["text, watermark"]},
    ],
    "links": [[4, 6, 0, 3, 1, "CONDITIONING"], [6, 7, 0, 3, 2, "CONDITIONING"]],
    "version": 0.4,
}
INVOKEAI_METADATA = {
    "generation_mode": "txt2img",
    "positive_prompt": "a photo of an astronaut riding a horse",
    "negative_prompt": "blurry",
    "width": 768,
    "height": 512,
    "seed": 4001,
    "rand_device": "cpu",
    "cfg_scale": 7.5,
    "cfg_rescale_multiplier": 0,
    "steps": 30,
    "scheduler": "dpmpp_2m_k",
    "model": {
        "key": "4f9c",
        "hash": "blake3:9b3b7a",
        "name": "stable-diffusion-v1-5",
        "base": "sd-1",
        "type": "main",
    },
    "app_version": "4.2.4",
}


def test_format_parameters_writes_a1111_infotext() -> None:
    text = format_parameters(
        "a lighthouse at dusk",
        "blurry",
        steps=20,
        sampler="DPM++ 2M",
        schedule_type="Karras",
        cfg_scale=7.0,
        seed=42,
        width=512,
        height=768,
        model_hash="0123456789",
        model="untrained-tiny",
        extra={"Version": "image-gen 0.1.0"},
    )
    assert text == (
        "a lighthouse at dusk\n"
        "Negative prompt: blurry\n"
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 42, Size: 512x768, "
        "Model hash: 0123456789, Model: untrained-tiny, Version: image-gen 0.1.0"
    )


def test_format_parameters_omits_empty_negative_prompt_and_unset_fields() -> None:
    text = format_parameters("a fox", steps=4, sampler="Euler", cfg_scale=7.5, seed=1, width=64, height=64)
    assert text == "a fox\nSteps: 4, Sampler: Euler, CFG scale: 7.5, Seed: 1, Size: 64x64"
    precise = format_parameters(
        "a fox", steps=4, sampler="Euler", cfg_scale=1.2345678, seed=1, width=8, height=8
    )
    assert parse_parameters(precise)["cfg_scale"] == 1.2345678


def test_values_with_commas_colons_or_newlines_are_json_quoted_and_round_trip() -> None:
    text = format_parameters(
        "a fox",
        steps=4,
        sampler="Euler",
        cfg_scale=7,
        seed=1,
        width=64,
        height=64,
        model='my model, v2: "final"',
        extra={"Note": "line one\nline two", "Plain": "no quoting"},
    )
    assert 'Model: "my model, v2: \\"final\\""' in text
    assert "Plain: no quoting" in text
    parsed = parse_parameters(text)
    assert parsed["model"] == 'my model, v2: "final"'
    assert parsed["extra"] == {"Note": "line one\nline two", "Plain": "no quoting"}


def test_multiline_prompts_round_trip() -> None:
    text = format_parameters(
        "line one,\nline two",
        "bad, ugly\nworse",
        steps=2,
        sampler="DDIM",
        cfg_scale=5,
        seed=9,
        width=64,
        height=128,
    )
    parsed = parse_parameters(text)
    assert parsed["prompt"] == "line one,\nline two"
    assert parsed["negative_prompt"] == "bad, ugly\nworse"
    assert (parsed["steps"], parsed["cfg_scale"], parsed["seed"]) == (2, 5.0, 9)
    assert (parsed["width"], parsed["height"]) == (64, 128)


def test_parse_a1111_infotext_with_hires_and_lora_fields() -> None:
    parsed = parse_parameters(A1111_TEXT)
    assert parsed["prompt"] == "masterpiece, a lighthouse at dusk, (oil painting:1.2), <lora:add_detail:0.6>"
    assert parsed["negative_prompt"] == "lowres, bad anatomy, watermark"
    assert parsed["steps"] == 28
    assert parsed["sampler"] == "DPM++ 2M"
    assert parsed["schedule_type"] == "Karras"
    assert parsed["cfg_scale"] == 6.5
    assert parsed["seed"] == 3288149472
    assert (parsed["width"], parsed["height"]) == (512, 768)
    assert parsed["model_hash"] == "6ce0161689"
    assert parsed["model"] == "v1-5-pruned-emaonly"
    assert parsed["extra"]["Lora hashes"] == "add_detail: 7c6bad76eb54"
    assert parsed["extra"]["Hires upscaler"] == "Latent"
    assert parsed["extra"]["Version"] == "v1.10.1"


def test_a_last_line_with_fewer_than_three_fields_belongs_to_the_prompt() -> None:
    parsed = parse_parameters("a portrait\nstyle: watercolor, mood: calm")
    assert parsed["prompt"] == "a portrait\nstyle: watercolor, mood: calm"
    assert parsed["negative_prompt"] == ""
    assert "steps" not in parsed


def test_a_field_that_does_not_parse_as_a_number_stays_in_extra() -> None:
    parsed = parse_parameters("x\nSteps: many, Sampler: Euler, Seed: 5")
    assert "steps" not in parsed
    assert parsed["extra"]["Steps"] == "many"
    assert parsed["seed"] == 5


def test_write_png_then_read_png_info_round_trips_text_and_request(tmp_path: Path) -> None:
    request = {"prompt": "ein Fuchs im Schnee — 雪の狐", "seed": 7, "steps": 2, "model": "untrained-tiny"}
    text = format_parameters(
        request["prompt"], steps=2, sampler="DDIM", cfg_scale=5, seed=7, width=8, height=8
    )
    path = tmp_path / "fox.png"
    write_png(Image.new("RGB", (8, 8), "white"), path, text, request)

    info = read_png_info(path)
    assert info.source == "image-gen"
    assert info.raw_text == text
    assert info.request == request
    assert info.parameters["prompt"] == request["prompt"]
    assert info.parameters["seed"] == 7
    assert read_png_info(path.read_bytes()) == info


def test_write_png_uses_text_chunks_other_studios_read(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    write_png(Image.new("RGB", (8, 8)), buffer, "a fox\nSteps: 1, Sampler: Euler, Seed: 1", {"seed": 1})
    with Image.open(io.BytesIO(buffer.getvalue())) as image:
        assert image.text["parameters"] == "a fox\nSteps: 1, Sampler: Euler, Seed: 1"
        assert json.loads(image.text["image-gen"]) == {"seed": 1}


def test_read_a1111_png() -> None:
    info = read_png_info(png_with_chunks({"parameters": A1111_TEXT}))
    assert info.source == "a1111"
    assert info.request is None
    assert info.raw_text == A1111_TEXT
    assert info.parameters["seed"] == 3288149472


def test_read_forge_png() -> None:
    info = read_png_info(png_with_chunks({"parameters": FORGE_TEXT}))
    assert info.source == "forge"
    assert info.parameters["prompt"] == "a cozy cabin in the snow"
    assert info.parameters["cfg_scale"] == 1.0
    assert info.parameters["extra"]["Distilled CFG Scale"] == "3.5"
    assert info.parameters["extra"]["Diffusion in Low Bits"] == "bnb-nf4 (fp16 LoRA)"


def test_read_fooocus_png_with_json_parameters() -> None:
    info = read_png_info(
        png_with_chunks({"parameters": json.dumps(FOOOCUS_JSON), "fooocus_scheme": "fooocus"})
    )
    assert info.source == "fooocus"
    parameters = info.parameters
    assert parameters["prompt"] == "a red fox in the forest"
    assert parameters["negative_prompt"] == ""
    assert (parameters["steps"], parameters["cfg_scale"], parameters["seed"]) == (30, 4.0, 1937448230)
    assert (parameters["width"], parameters["height"]) == (1152, 896)
    assert (parameters["sampler"], parameters["schedule_type"]) == ("dpmpp_2m_sde_gpu", "karras")
    assert (parameters["model"], parameters["model_hash"]) == ("juggernautXL_v8Rundiffusion", "aeb7e9e689")
    assert parameters["extra"]["performance"] == "Speed"


def test_read_fooocus_png_with_a1111_scheme() -> None:
    text = (
        "a red fox\nNegative prompt: blurry\nSteps: 30, Sampler: DPM++ 2M SDE Karras, Seed: 12, "
        "Size: 1152x896, CFG scale: 4, Version: Fooocus v2.5.5"
    )
    info = read_png_info(png_with_chunks({"parameters": text, "fooocus_scheme": "a1111"}))
    assert info.source == "fooocus"
    assert info.parameters["negative_prompt"] == "blurry"
    assert info.parameters["width"] == 1152


def test_read_comfyui_png_from_the_prompt_graph() -> None:
    chunks = {"prompt": json.dumps(COMFYUI_PROMPT), "workflow": json.dumps(COMFYUI_WORKFLOW)}
    info = read_png_info(png_with_chunks(chunks))
    assert info.source == "comfyui"
    assert info.raw_text == chunks["prompt"]
    parameters = info.parameters
    assert parameters["prompt"] == "beautiful scenery nature glass bottle landscape, purple galaxy bottle,"
    assert parameters["negative_prompt"] == "text, watermark"
    assert (parameters["seed"], parameters["steps"], parameters["cfg_scale"]) == (156680208700286, 20, 8.0)
    assert (parameters["sampler"], parameters["schedule_type"]) == ("euler", "normal")
    assert (parameters["width"], parameters["height"]) == (512, 640)
    assert parameters["model"] == "v1-5-pruned-emaonly.safetensors"


def test_read_comfyui_values_through_primitive_nodes_and_an_advanced_sampler() -> None:
    prompt = {
        "1": {
            "class_type": "KSamplerAdvanced",
            "inputs": {
                "noise_seed": ["5", 0],
                "steps": 12,
                "cfg": 3.5,
                "sampler_name": "dpmpp_2m",
                "scheduler": "karras",
                "positive": ["2", 0],
                "negative": ["4", 0],
            },
        },
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": ["3", 0]}},
        "3": {"class_type": "PrimitiveString", "inputs": {"value": "a tiny robot"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": ""}},
        "5": {"class_type": "PrimitiveInt", "inputs": {"value": 77}},
    }
    parameters = read_png_info(png_with_chunks({"prompt": json.dumps(prompt)})).parameters
    assert parameters["prompt"] == "a tiny robot"
    assert parameters["negative_prompt"] == ""
    assert (parameters["seed"], parameters["steps"], parameters["cfg_scale"]) == (77, 12, 3.5)


def test_read_comfyui_png_with_only_the_workflow() -> None:
    info = read_png_info(png_with_chunks({"workflow": json.dumps(COMFYUI_WORKFLOW)}))
    assert info.source == "comfyui"
    parameters = info.parameters
    assert parameters["prompt"] == "a glass bottle"
    assert parameters["negative_prompt"] == "text, watermark"
    assert (parameters["seed"], parameters["steps"], parameters["cfg_scale"]) == (156680208700286, 20, 8.0)
    assert parameters["sampler"] == "euler"


def test_read_invokeai_png() -> None:
    info = read_png_info(png_with_chunks({"invokeai_metadata": json.dumps(INVOKEAI_METADATA)}))
    assert info.source == "invokeai"
    parameters = info.parameters
    assert parameters["prompt"] == "a photo of an astronaut riding a horse"
    assert parameters["negative_prompt"] == "blurry"
    assert (parameters["width"], parameters["height"], parameters["seed"]) == (768, 512, 4001)
    assert (parameters["steps"], parameters["cfg_scale"], parameters["sampler"]) == (30, 7.5, "dpmpp_2m_k")
    assert (parameters["model"], parameters["model_hash"]) == ("stable-diffusion-v1-5", "blake3:9b3b7a")
    assert parameters["extra"]["app_version"] == "4.2.4"


def test_png_without_metadata_reads_as_none() -> None:
    info = read_png_info(png_with_chunks({"Software": "GIMP"}))
    assert (info.source, info.raw_text, info.request, info.parameters) == ("none", None, None, {"extra": {}})


def test_read_png_info_rejects_data_that_is_not_an_image(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is not an image"):
        read_png_info(b"not a png")
    with pytest.raises(FileNotFoundError):
        read_png_info(tmp_path / "missing.png")
