"""What a generation asks for (GenerationParams) and what a model folder allows (ModelInfo, read from its configs).

`ModelInfo.resolve` fills a request's blanks from the model's defaults and checks it against the model.
"""

import json
import math
import secrets
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipelines.errors import InvalidParamsError, ModelLoadError
from pipelines.schedulers import check_scheduler

MAX_STEPS = 150
MAX_IMAGES = 16
SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed accepts any unsigned 64-bit seed
RANDOM_SEED_BOUND = 2**32  # random seeds stay short enough to read and retype

SUPPORTED_PIPELINES: dict[str, Literal["sd", "sdxl"]] = {
    "StableDiffusionPipeline": "sd",
    "LatentConsistencyModelPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
}
SD_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SDXL_COMPONENTS = (*SD_COMPONENTS, "text_encoder_2", "tokenizer_2")
COMPONENT_LIBRARIES = ("diffusers", "transformers")
WEIGHTED_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
# A preset may name another model ("model"): the student's Quality preset runs its teacher.
PRESET_KEYS = ("model", "scheduler", "steps", "guidance_scale", "width", "height", "negative_prompt")
OVERRIDE_FILE = "image-gen.json"
OVERRIDE_KEYS = (
    "label", "description", "native_size", "allowed_sizes", "min_size", "max_size",
    "default_scheduler", "default_steps", "default_guidance", "presets", "distilled", "priority",
)  # fmt: skip
ASPECT_RATIOS = ((1, 1), (4, 3), (3, 2), (16, 9))  # long side : short side


class GenerationParams(BaseModel):
    """One text-to-image request; None means "the model's default" (seed None: a random one)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    negative_prompt: str = ""
    model: str | None = None
    width: int | None = Field(None, ge=8)
    height: int | None = Field(None, ge=8)
    steps: int | None = Field(None, ge=1, le=MAX_STEPS)
    guidance_scale: float | None = Field(None, ge=0.0, allow_inf_nan=False)
    scheduler: str | None = None
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    num_images: int = Field(1, ge=1, le=MAX_IMAGES)


class ModelInfo(BaseModel):
    """A model folder's identity, sizes and defaults: inferred from its configs, overridden by image-gen.json."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    path: Path
    architecture: Literal["sd1", "sd2", "sdxl"]
    native_size: int
    allowed_sizes: list[str]
    min_size: int
    max_size: int
    default_scheduler: str
    default_steps: int = Field(ge=1, le=MAX_STEPS)
    default_guidance: float = Field(ge=0.0, allow_inf_nan=False)
    presets: dict[str, dict[str, Any]]
    content_hash: str = ""
    content_sha256: str = ""
    label: str = ""
    description: str = ""
    distilled: bool = False
    priority: int = Field(0, description="the registry's default model is the usable one with the highest priority")

    @model_validator(mode="after")
    def _check_consistent(self) -> "ModelInfo":
        for key, value in (
            ("min_size", self.min_size),
            ("native_size", self.native_size),
            ("max_size", self.max_size),
        ):
            if value % 8 or value < 8:
                raise ValueError(f"{key} {value} must be a positive multiple of 8")
        if not self.min_size <= self.native_size <= self.max_size:
            raise ValueError(
                f"need min_size <= native_size <= max_size, got {self.min_size}, {self.native_size}, {self.max_size}"
            )
        try:
            check_scheduler(self.default_scheduler)
            for size in self.allowed_sizes:
                self.check_size(*parse_size(size))
        except InvalidParamsError as error:
            raise ValueError(str(error)) from None
        for preset, values in self.presets.items():
            unknown = set(values) - set(PRESET_KEYS)
            if unknown:
                raise ValueError(
                    f"preset {preset!r} has unknown keys {sorted(unknown)}: use {', '.join(PRESET_KEYS)}"
                )
            if "model" in values and not (isinstance(values["model"], str) and values["model"]):
                raise ValueError(f"preset {preset!r}: model must be a model's name")
        return self

    @classmethod
    def from_folder(cls, path: Path) -> "ModelInfo":
        """Read a diffusers folder's configs (no weights are loaded, no hash is computed: the registry adds it);
        raise ModelLoadError if the folder cannot be used."""
        path = Path(path)
        if not path.is_dir():
            raise ModelLoadError(f"model folder {path} does not exist")
        index = read_json(path / "model_index.json")
        family = check_model_index(path, index)
        for component in SDXL_COMPONENTS if family == "sdxl" else SD_COMPONENTS:
            check_component(path, index, component)
        unet = read_json(path / "unet" / "config.json")
        vae = read_json(path / "vae" / "config.json")
        scheduler = read_json(path / "scheduler" / "scheduler_config.json")
        if family == "sdxl":
            architecture = "sdxl"
        else:
            architecture = "sd2" if unet.get("cross_attention_dim") == 1024 else "sd1"
        sample_size = unet.get("sample_size", 64)
        if isinstance(sample_size, list):
            sample_size = max(sample_size)
        native = int(sample_size) * 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
        fields: dict[str, Any] = {
            "name": path.name,
            "path": path,
            "architecture": architecture,
            **inferred_defaults(architecture, native, unet, scheduler),
        }
        overrides_file = path / OVERRIDE_FILE
        if overrides_file.exists():
            overrides = read_json(overrides_file)
            unknown = set(overrides) - set(OVERRIDE_KEYS)
            if unknown:
                raise ModelLoadError(
                    f"{overrides_file}: unknown keys {sorted(unknown)}: use {', '.join(OVERRIDE_KEYS)}"
                )
            fields.update(overrides)
            if "allowed_sizes" not in overrides and {"native_size", "min_size", "max_size"} & set(overrides):
                fields["allowed_sizes"] = suggested_sizes(
                    fields["native_size"], fields["min_size"], fields["max_size"]
                )
        try:
            return cls(**fields)
        except ValidationError as error:
            raise ModelLoadError(f"{path}: invalid model settings: {one_line(error)}") from error

    def check_size(self, width: int, height: int) -> None:
        """Raise InvalidParamsError unless both sides are multiples of 8 within [min_size, max_size]."""
        for param, value in (("width", width), ("height", height)):
            if value % 8 or not self.min_size <= value <= self.max_size:
                raise InvalidParamsError(
                    f"{param} {value} is not allowed for model {self.name!r}: use a multiple of 8 from"
                    f" {self.min_size} to {self.max_size} (suggested: {', '.join(self.allowed_sizes)})",
                    param=param,
                )

    def check_request(
        self, width: int, height: int, steps: int, guidance_scale: float, scheduler: str
    ) -> None:
        """Raise InvalidParamsError, naming the allowed values, for anything this model does not accept."""
        self.check_size(width, height)
        if not 1 <= steps <= MAX_STEPS:
            raise InvalidParamsError(f"steps {steps} is not allowed: use 1 to {MAX_STEPS}", param="steps")
        if not (math.isfinite(guidance_scale) and guidance_scale >= 0):
            raise InvalidParamsError(
                f"guidance_scale {guidance_scale} is not allowed: use a number >= 0", param="guidance_scale"
            )
        check_scheduler(scheduler)

    def resolve(self, params: GenerationParams) -> GenerationParams:
        """Params with every None filled from this model's defaults (a random seed if none), checked against it."""
        if params.model not in (None, self.name):
            raise InvalidParamsError(
                f"params are for model {params.model!r}, not {self.name!r}", param="model"
            )
        resolved = params.model_copy(
            update={
                "model": self.name,
                "width": params.width or self.native_size,
                "height": params.height or self.native_size,
                "steps": params.steps or self.default_steps,
                "guidance_scale": self.default_guidance
                if params.guidance_scale is None
                else params.guidance_scale,
                "scheduler": params.scheduler or self.default_scheduler,
                "seed": secrets.randbelow(RANDOM_SEED_BOUND) if params.seed is None else params.seed,
            }
        )
        self.check_request(
            resolved.width, resolved.height, resolved.steps, resolved.guidance_scale, resolved.scheduler
        )
        if resolved.seed + resolved.num_images - 1 > SEED_MAX:
            raise InvalidParamsError(
                f"seed {resolved.seed} + {resolved.num_images} images passes {SEED_MAX}: use a smaller seed",
                param="seed",
            )
        return resolved


def inferred_defaults(architecture: str, native: int, unet: dict, scheduler: dict) -> dict[str, Any]:
    """Sizes, scheduler, steps and guidance for a model folder that has no image-gen.json saying otherwise.

    Sizes: native side from the configs, any multiple of 8 from half to twice it. Distilled models: LCM-distilled
    UNets (a guidance embedding, `time_cond_proj_dim`) get lcm, 4 steps, guidance 8 (fed to the embedding, no extra
    pass); an LCMScheduler folder (e.g. fused LCM-LoRA) lcm, 4 steps, guidance 1; a Turbo folder (Euler a with
    trailing spacing) euler_a, 4 steps, guidance 0. Others get DPM++ 2M Karras, 25 steps, guidance 7 (5 for SDXL).
    """
    min_size, max_size = round_to(native // 2, 8), round_to(native * 2, 8)
    scheduler_class = scheduler.get("_class_name")
    if unet.get("time_cond_proj_dim") is not None:
        defaults = ("lcm", 4, 8.0, True)
    elif scheduler_class == "LCMScheduler":
        defaults = ("lcm", 4, 1.0, True)
    elif (
        scheduler_class == "EulerAncestralDiscreteScheduler"
        and scheduler.get("timestep_spacing") == "trailing"
    ):
        defaults = ("euler_a", 4, 0.0, True)
    else:
        defaults = ("dpmpp_2m_karras", 25, 5.0 if architecture == "sdxl" else 7.0, False)
    scheduler_name, steps, guidance, distilled = defaults
    if distilled:
        presets = {"speed": {"steps": max(1, steps // 2)}, "quality": {"steps": steps * 2}}
    else:
        presets = {
            "speed": {"scheduler": "dpmpp_2m_karras", "steps": 12},
            "quality": {"scheduler": scheduler_name, "steps": 40},
        }
    return {
        "native_size": native,
        "min_size": min_size,
        "max_size": max_size,
        "allowed_sizes": suggested_sizes(native, min_size, max_size),
        "default_scheduler": scheduler_name,
        "default_steps": steps,
        "default_guidance": guidance,
        "presets": presets,
        "distilled": distilled,
    }


def suggested_sizes(native: int, min_size: int, max_size: int) -> list[str]:
    """Common aspect ratios at no more than the native area, as "WxH", landscape then portrait (multiples of 64
    from 256 px up, else of 8): for 1024 these are SDXL's training buckets 1152x896, 1216x832, 1344x768."""
    step = 64 if native >= 256 else 8
    sizes: list[str] = []
    for long_ratio, short_ratio in ASPECT_RATIOS:
        short = round_to(native * math.sqrt(short_ratio / long_ratio), step)
        long = max(step, native * native // short // step * step)
        for size in (f"{long}x{short}", f"{short}x{long}"):
            if min_size <= short and long <= max_size and size not in sizes:
                sizes.append(size)
    return sizes


def parse_size(size: str) -> tuple[int, int]:
    """ "768x512" -> (768, 512)."""
    try:
        width, height = (int(side) for side in size.lower().split("x"))
    except ValueError:
        raise ValueError(f"size {size!r} is not of the form WIDTHxHEIGHT, e.g. 512x768") from None
    return width, height


def round_to(value: float, multiple: int) -> int:
    return max(multiple, round(value / multiple) * multiple)


def read_json(file: Path) -> dict:
    """A JSON object from `file`, or ModelLoadError saying what is wrong with it."""
    try:
        value = json.loads(file.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{file} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelLoadError(f"{file} is not valid JSON: {one_line(error)}") from None
    if not isinstance(value, dict):
        raise ModelLoadError(f"{file} is not a JSON object")
    return value


def check_model_index(path: Path, index: dict) -> Literal["sd", "sdxl"]:
    """The family ("sd" or "sdxl") of a supported model_index.json, else ModelLoadError naming the supported ones."""
    class_name = index.get("_class_name")
    family = SUPPORTED_PIPELINES.get(class_name)
    if family is None:
        raise ModelLoadError(
            f"{path}: pipeline class {class_name!r} is not supported: use one of {', '.join(SUPPORTED_PIPELINES)}"
        )
    return family


def check_component(path: Path, index: dict, component: str) -> None:
    """Raise ModelLoadError unless `component` is declared, present, and (for weighted ones) has whole safetensors."""
    entry = index.get(component)
    if not (isinstance(entry, list) and len(entry) == 2 and entry[0] in COMPONENT_LIBRARIES):
        raise ModelLoadError(
            f"{path}: model_index.json declares {component} as {entry!r}: need [library, class] from {', '.join(COMPONENT_LIBRARIES)}"
        )
    folder = path / component
    if not folder.is_dir():
        raise ModelLoadError(f"{path}: component folder {component}/ is missing")
    if component in WEIGHTED_COMPONENTS:
        weights = sorted(folder.glob("*.safetensors"))
        if not weights:
            raise ModelLoadError(
                f"{path}: {component}/ has no .safetensors weights (other formats are not loaded)"
            )
        for file in weights:
            check_safetensors(file)


def check_safetensors(file: Path) -> None:
    """Raise ModelLoadError if a safetensors file's size differs from what its header promises (e.g. truncated)."""
    size = file.stat().st_size
    try:
        with file.open("rb") as handle:
            header_size = int.from_bytes(handle.read(8), "little")
            if size < 8 or header_size > size - 8:
                raise ValueError("header is cut off")
            header = json.loads(handle.read(header_size))
        data_end = max(
            (t["data_offsets"][1] for key, t in header.items() if key != "__metadata__"), default=0
        )
    except (ValueError, KeyError, TypeError, IndexError) as error:
        raise ModelLoadError(f"{file} is not a valid safetensors file: {one_line(error)}") from None
    if 8 + header_size + data_end != size:
        raise ModelLoadError(
            f"{file} is truncated or corrupt: {size} bytes, its header promises {8 + header_size + data_end}"
        )


def one_line(error: BaseException) -> str:
    """An exception's message on one line (pydantic's multi-line errors: the first problem)."""
    if isinstance(error, ValidationError):
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        return f"{where}: {first['msg']}" if where else first["msg"]
    return " ".join(str(error).split())
