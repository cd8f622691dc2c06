"""Text2ImagePipeline: the denoising loop over diffusers components (tokenizers, text encoders, UNet, VAE,
scheduler), written out top to bottom; Stable Diffusion 1.x/2.x and SDXL layouts.

With the same folder, prompt, seed, scheduler and steps it draws the same pixels as diffusers'
StableDiffusionPipeline / StableDiffusionXLPipeline given CPU generators; seeds mean the same on every device.
"""

import importlib
import inspect
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from PIL import Image

from pipelines.attention import (
    ATTENTION_BACKENDS,
    VAE_TILING_MODES,
    Optimizations,
    autocast_context,
    check_autocast,
    check_choice,
    compile_module,
    enable_cpu_offload,
    set_attention,
    set_channels_last,
    set_fused_qkv,
    set_vae_slicing,
    set_vae_tiling,
)
from pipelines.errors import InvalidParamsError, ModelLoadError
from pipelines.params import SEED_MAX, GenerationParams, ModelInfo, one_line, read_json
from pipelines.schedulers import make_scheduler

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PROMPT_CACHE_SIZE = 64

# Approximate latent -> RGB maps of the SD 1.x/2.x and SDXL VAEs (rows: latent channels), as ComfyUI's previews use.
SD_LATENT_RGB = (
    (0.3512, 0.2297, 0.3227),
    (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721),
    (-0.2120, -0.2616, -0.7177),
)
SDXL_LATENT_RGB = (
    (0.3651, 0.4232, 0.4341),
    (-0.2533, -0.0042, 0.1068),
    (0.1076, 0.1111, -0.0362),
    (-0.3165, -0.2492, -0.2188),
)
SDXL_LATENT_RGB_BIAS = (0.1084, -0.0175, -0.0011)


@dataclass
class StepEvent:
    """Progress after denoising step `step` of `total` (1-based; one UNet pass each); `latents` is the batch so far."""

    step: int
    total: int
    latents: torch.Tensor
    rgb_factors: tuple[tuple[float, float, float], ...] | None = None
    rgb_bias: tuple[float, float, float] = (0.0, 0.0, 0.0)
    scale: int = 8

    def preview(self, index: int = 0) -> Image.Image:
        """A cheap look at image `index` (a linear latent -> RGB map, no VAE), at the final image size."""
        latent = self.latents[index].detach().float().cpu()
        if self.rgb_factors is not None and len(self.rgb_factors) == latent.shape[0]:
            rgb = torch.einsum("chw,cr->hwr", latent, torch.tensor(self.rgb_factors))
            rgb = (rgb + torch.tensor(self.rgb_bias) + 1) / 2
        else:  # unknown latent space: its first three channels, each stretched to [0, 1]
            rgb = latent[[i % latent.shape[0] for i in range(3)]].permute(1, 2, 0)
            low, high = rgb.amin(dim=(0, 1)), rgb.amax(dim=(0, 1))
            rgb = (rgb - low) / (high - low).clamp(min=1e-6)
        pixels = (rgb.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        height, width = pixels.shape[:2]
        return Image.fromarray(pixels).resize(
            (width * self.scale, height * self.scale), Image.Resampling.BILINEAR
        )


StepCallback = Callable[[StepEvent], None]


@dataclass
class GenerationResult:
    """Images of one request with everything that determined them: resolved params, seeds, model hash, settings."""

    images: list[Image.Image]
    params: GenerationParams
    seeds: list[int]
    content_hash: str
    device: str
    dtype: str
    optimizations: Optimizations
    vae_tiled: bool
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def attention(self) -> str:
        return self.optimizations.attention

    def metadata(self) -> dict[str, Any]:
        """Everything but the pixels, JSON-serialisable."""
        return {
            "params": self.params.model_dump(mode="json"),
            "seeds": self.seeds,
            "content_hash": self.content_hash,
            "device": self.device,
            "dtype": self.dtype,
            **self.optimizations.to_dict(),
            "vae_tiled": self.vae_tiled,
            "timings": self.timings,
        }


class Text2ImagePipeline:
    """Text to image with one model's components. Not thread-safe: one generation at a time per instance."""

    def __init__(
        self,
        info: ModelInfo,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        tokenizer: Any,
        text_encoder: torch.nn.Module,
        scheduler_config: dict[str, Any],
        tokenizer_2: Any = None,
        text_encoder_2: torch.nn.Module | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        optimizations: Optimizations | None = None,
        force_zeros_for_empty_prompt: bool = False,
        offload_hooks: list[Any] | None = None,
    ) -> None:
        self.info = info
        self.unet = unet
        self.vae = vae
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.tokenizer_2 = tokenizer_2
        self.text_encoder_2 = text_encoder_2
        self.scheduler_config = scheduler_config
        self.device = torch.device(device)
        self.dtype = dtype
        self.optimizations = optimizations or Optimizations()
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        self.offload_hooks = offload_hooks or []
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.prompt_cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor | None]] = OrderedDict()
        self.prompt_cache_size = PROMPT_CACHE_SIZE

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    @classmethod
    def from_pretrained(
        cls,
        path: Path | str,
        device: str = "auto",
        dtype: str = "auto",
        attention: str = "sdpa",
        vae_slicing: bool = True,
        vae_tiling: str = "auto",
        cpu_offload: bool = False,
        info: ModelInfo | None = None,
        channels_last: bool = False,
        autocast: str = "off",
        fuse_qkv: bool = False,
        compile: bool = False,
    ) -> "Text2ImagePipeline":
        """Load a diffusers folder from disk only (nothing is downloaded).

        device: "auto" (cuda, else mps, else cpu) or a torch device; dtype: "auto" (float16 on cuda/mps, float32 on
        cpu), "float32", "float16" or "bfloat16". `info` is the registry's entry for the folder (read here if None,
        without a content hash). channels_last, autocast ("off", "bfloat16", "float16"), fuse_qkv and compile are
        the speed settings of pipelines.attention (docs/performance.md); compile pays its warm-up here, once.
        """
        path = Path(path)
        check_choice(attention, ATTENTION_BACKENDS, "attention")
        check_choice(vae_tiling, VAE_TILING_MODES, "vae_tiling")
        info = info or ModelInfo.from_folder(path)
        torch_device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, torch_device)
        index = read_json(path / "model_index.json")
        names = ["unet", "vae", "tokenizer", "text_encoder"]
        if info.architecture == "sdxl":
            names += ["tokenizer_2", "text_encoder_2"]
        dtypes = dict.fromkeys(names, torch_dtype)
        vae_config = read_json(path / "vae" / "config.json")
        if (
            info.architecture == "sdxl"
            and torch_dtype == torch.float16
            and vae_config.get("force_upcast", True)
        ):
            dtypes["vae"] = (
                torch.float32
            )  # the SDXL VAE overflows in float16; diffusers decodes in float32 too
        autocast = check_autocast(autocast, torch_device, torch_dtype)
        parts = {name: load_component(path, index, name, dtypes[name]) for name in names}
        applied_attention = set_attention(parts["unet"], attention, torch_device)
        optimizations = Optimizations(
            attention=applied_attention,
            vae_slicing=set_vae_slicing(parts["vae"], vae_slicing),
            vae_tiling=vae_tiling,
            channels_last=set_channels_last([parts["unet"], parts["vae"]], channels_last),
            autocast=autocast,
            fuse_qkv=set_fused_qkv([parts["unet"]], fuse_qkv, applied_attention),
        )
        models = [parts[name] for name in ("text_encoder", "text_encoder_2", "unet", "vae") if name in parts]
        hooks = enable_cpu_offload(models, torch_device) if cpu_offload else []
        if hooks:
            optimizations = replace(optimizations, cpu_offload=True)
        else:
            for model in models:
                model.to(torch_device)
        if compile:
            optimizations = replace(optimizations, compile=compile_module(parts["unet"], torch_device))
        pipeline = cls(
            info=info,
            scheduler_config=read_json(path / "scheduler" / "scheduler_config.json"),
            device=torch_device,
            dtype=torch_dtype,
            optimizations=optimizations,
            force_zeros_for_empty_prompt=info.architecture == "sdxl"
            and index.get("force_zeros_for_empty_prompt", True),
            offload_hooks=hooks,
            **parts,
        )
        if optimizations.compile:
            pipeline.warm_up()
        return pipeline

    def warm_up(self) -> None:
        """Generations of one and of two images at the native size (2 steps, guidance on), so that a compiled UNet
        is compiled now, at load time, rather than in the first requests: the second batch size makes the batch
        dimension dynamic, so that every later batch size at this size reuses the compiled code."""
        size = self.info.native_size
        started = time.perf_counter()
        for batch_size in (1, 2):
            self._generate([""] * batch_size, [""] * batch_size, list(range(batch_size)), size, size, 2, 2.0,
                           self.info.default_scheduler, None)
        logger.info("%s warmed up in %.1f s", self.info.name, time.perf_counter() - started)

    def generate(self, params: GenerationParams, callback: StepCallback | None = None) -> GenerationResult:
        """One request: params resolved against the model, `num_images` images with seeds S, S+1, ..."""
        resolved = self.info.resolve(params)
        seeds = [resolved.seed + i for i in range(resolved.num_images)]
        images, vae_tiled, timings = self._generate(
            [resolved.prompt] * len(seeds),
            [resolved.negative_prompt] * len(seeds),
            seeds,
            resolved.width,
            resolved.height,
            resolved.steps,
            resolved.guidance_scale,
            resolved.scheduler,
            callback,
        )
        return GenerationResult(
            images=images,
            params=resolved,
            seeds=seeds,
            content_hash=self.info.content_hash,
            device=str(self.device),
            dtype=dtype_name(self.dtype),
            optimizations=self.optimizations,
            vae_tiled=vae_tiled,
            timings=timings,
        )

    def __call__(
        self,
        prompts: list[str],
        negative_prompts: list[str],
        seeds: list[int],
        width: int,
        height: int,
        steps: int,
        guidance_scale: float,
        scheduler: str,
        callback: StepCallback | None = None,
    ) -> list[Image.Image]:
        """One image per (prompt, negative prompt, seed), all in one batch; image i depends only on its own row."""
        images, _, _ = self._generate(
            prompts, negative_prompts, seeds, width, height, steps, guidance_scale, scheduler, callback
        )
        return images

    @torch.inference_mode()
    def _generate(
        self,
        prompts: list[str],
        negative_prompts: list[str],
        seeds: list[int],
        width: int,
        height: int,
        steps: int,
        guidance_scale: float,
        scheduler_name: str,
        callback: StepCallback | None,
    ) -> tuple[list[Image.Image], bool, dict[str, float]]:
        self.info.check_request(width, height, steps, guidance_scale, scheduler_name)
        check_batch(prompts, negative_prompts, seeds)
        batch_size = len(prompts)
        # LCM-distilled UNets take the guidance scale as an embedding instead of a second (unconditional) pass.
        has_guidance_embedding = self.unet.config.time_cond_proj_dim is not None
        do_cfg = guidance_scale > 1 and not has_guidance_embedding
        timings: dict[str, float] = {}
        try:
            # 1. Text: token states (and SDXL's pooled embedding), unconditional rows first when guiding.
            started = self._clock()
            prompt_embeds, pooled_embeds = self.encode_prompts(prompts)
            if do_cfg:
                negative_embeds, negative_pooled = self.encode_prompts(negative_prompts, negative=True)
                prompt_embeds = torch.cat([negative_embeds, prompt_embeds])
                if pooled_embeds is not None and negative_pooled is not None:
                    pooled_embeds = torch.cat([negative_pooled, pooled_embeds])
            timings["text_encode"] = self._clock() - started

            # 2. Scheduler and initial noise: one CPU generator per image, so seed S means the same everywhere.
            started = self._clock()
            # The scheduler keeps its tables and timesteps on the CPU and the UNet reads a copy made once on the
            # device: indexing CPU tables with device tensors (as stock does) would make every step wait for the GPU.
            scheduler = make_scheduler(scheduler_name, self.scheduler_config)
            scheduler.set_timesteps(steps, device="cpu")
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(0)
            timesteps = scheduler.timesteps
            unet_timesteps = timesteps.to(self.device)
            generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
            latents = self.initial_noise(generators, width, height, prompt_embeds.dtype)
            latents = latents * scheduler.init_noise_sigma
            step_kwargs = {"generator": generators} if accepts(scheduler.step, "generator") else {}

            # 3. Extra conditioning: SDXL's pooled text embedding and size ids; LCM's guidance embedding.
            added_cond_kwargs = None
            if self.is_sdxl:
                time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=prompt_embeds.dtype)
                added_cond_kwargs = {
                    "text_embeds": pooled_embeds,
                    "time_ids": time_ids.to(self.device).repeat(prompt_embeds.shape[0], 1),
                }
            timestep_cond = None
            if has_guidance_embedding:
                w = torch.tensor(guidance_scale - 1).repeat(batch_size)
                timestep_cond = guidance_embedding(w, self.unet.config.time_cond_proj_dim)
                timestep_cond = timestep_cond.to(device=self.device, dtype=latents.dtype)

            # 4. Denoising loop. Under autocast the UNet computes in lower precision; its output is cast back, so
            # guidance and the scheduler work in the pipeline's dtype.
            for i, t in enumerate(timesteps):
                latent_input = torch.cat([latents] * 2) if do_cfg else latents
                latent_input = scheduler.scale_model_input(latent_input, t)
                with autocast_context(self.optimizations.autocast, self.device):
                    noise_pred = self.unet(
                        latent_input,
                        unet_timesteps[i],
                        encoder_hidden_states=prompt_embeds,
                        timestep_cond=timestep_cond,
                        added_cond_kwargs=added_cond_kwargs,
                        return_dict=False,
                    )[0]
                noise_pred = noise_pred.to(latents.dtype)
                if do_cfg:
                    noise_uncond, noise_text = noise_pred.chunk(2)
                    noise_pred = noise_uncond + guidance_scale * (noise_text - noise_uncond)
                latents = scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
                if callback is not None:
                    callback(self._step_event(i + 1, len(timesteps), latents))
            timings["denoise"] = self._clock() - started

            # 5. Decode with the VAE.
            started = self._clock()
            vae_tiled = set_vae_tiling(self.vae, self.optimizations.vae_tiling, width, height)
            with autocast_context(self.optimizations.autocast, self.device):
                images = self.decode(latents)
            timings["decode"] = self._clock() - started
        finally:
            for hook in self.offload_hooks:
                hook.offload()
        return images, vae_tiled, timings

    @torch.inference_mode()
    def encode_prompts(
        self, texts: list[str], negative: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token states (batch, tokens, dim) and, for SDXL, pooled embeddings (batch, dim); cached per text.

        SDXL folders with `force_zeros_for_empty_prompt` (the default) use zeros for an empty negative prompt,
        as diffusers does when no negative prompt is given.
        """
        missing = [text for text in dict.fromkeys(texts) if text not in self.prompt_cache]
        found = {text: self.prompt_cache[text] for text in texts if text in self.prompt_cache}
        if missing:
            states, pooled = self._encode(missing)
            for i, text in enumerate(missing):
                found[text] = (states[i : i + 1], None if pooled is None else pooled[i : i + 1])
        for text, entry in found.items():
            self.prompt_cache[text] = entry
            self.prompt_cache.move_to_end(text)
        while len(self.prompt_cache) > self.prompt_cache_size:
            self.prompt_cache.popitem(last=False)
        states = torch.cat([found[text][0] for text in texts])
        pooled = None if self.text_encoder_2 is None else torch.cat([found[text][1] for text in texts])
        if negative and self.force_zeros_for_empty_prompt:
            empty = torch.tensor([text == "" for text in texts], device=states.device)
            states = states.masked_fill(empty[:, None, None], 0.0)
            pooled = None if pooled is None else pooled.masked_fill(empty[:, None], 0.0)
        return states, pooled

    def _encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the text encoder(s) as diffusers' pipelines do: pad to the tokenizer's max length, mask only when the
        encoder's config asks for it; SDXL concatenates both encoders' penultimate states."""
        if not self.is_sdxl:
            ids, mask = self._tokenize(self.tokenizer, texts)
            use_mask = getattr(self.text_encoder.config, "use_attention_mask", False)
            states = self.text_encoder(ids, attention_mask=mask if use_mask else None)[0]
            return states.to(self.dtype), None
        pooled = None
        states = []
        for tokenizer, encoder in (
            (self.tokenizer, self.text_encoder),
            (self.tokenizer_2, self.text_encoder_2),
        ):
            ids, _ = self._tokenize(tokenizer, texts)
            output = encoder(ids, output_hidden_states=True)
            if pooled is None and output[0].ndim == 2:
                pooled = output[0]
            states.append(output.hidden_states[-2])
        return torch.cat(states, dim=-1).to(self.dtype), pooled.to(self.dtype)

    def _tokenize(self, tokenizer: Any, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        max_length = tokenizer.model_max_length
        tokens = tokenizer(
            texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
        )
        for text, ids in zip(texts, tokenizer(texts).input_ids, strict=True):
            if len(ids) > max_length:
                logger.warning("prompt cut to the model's %d tokens: %r", max_length, text)
        return tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)

    def initial_noise(
        self, generators: list[torch.Generator], width: int, height: int, dtype: torch.dtype
    ) -> torch.Tensor:
        """Unit Gaussian latents drawn on the CPU, one generator per image, exactly as diffusers' randn_tensor does."""
        shape = (
            1,
            self.unet.config.in_channels,
            height // self.vae_scale_factor,
            width // self.vae_scale_factor,
        )
        noise = [torch.randn(shape, generator=generator, dtype=dtype) for generator in generators]
        return torch.cat(noise).to(self.device)

    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        """Latents to PIL images with the VAE (undoing its scaling), rounded to 8 bits as diffusers does."""
        config = self.vae.config
        if (
            getattr(config, "latents_mean", None) is not None
            and getattr(config, "latents_std", None) is not None
        ):
            mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(config.latents_std).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std / config.scaling_factor + mean
        else:
            latents = latents / config.scaling_factor
        image = self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0].to(self.vae.dtype)
        image = (image / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
        return [Image.fromarray(pixels) for pixels in (image * 255).round().astype(np.uint8)]

    def bare_unet_loop(
        self, width: int, height: int, steps: int, guidance_scale: float, batch_size: int = 1
    ) -> float:
        """Seconds for `steps` bare UNet forward passes shaped like that generation (no text encoder, scheduler,
        callback or VAE): a benchmark's floor for measuring this pipeline's overhead in the denoise timing."""
        do_cfg = guidance_scale > 1 and self.unet.config.time_cond_proj_dim is None
        rows = batch_size * (2 if do_cfg else 1)
        config = self.unet.config
        shape = (rows, config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        latents = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(0)).to(
            self.device, self.dtype
        )
        tokens = self.tokenizer.model_max_length
        kwargs: dict[str, Any] = {
            "encoder_hidden_states": torch.zeros(
                rows, tokens, config.cross_attention_dim, device=self.device, dtype=self.dtype
            )
        }
        if self.is_sdxl:
            pooled_dim = self.text_encoder_2.config.projection_dim
            kwargs["added_cond_kwargs"] = {
                "text_embeds": torch.zeros(rows, pooled_dim, device=self.device, dtype=self.dtype),
                "time_ids": torch.tensor(
                    [[height, width, 0, 0, height, width]] * rows, device=self.device, dtype=self.dtype
                ),
            }
        if config.time_cond_proj_dim is not None:
            w = torch.full((rows,), guidance_scale - 1)
            kwargs["timestep_cond"] = guidance_embedding(w, config.time_cond_proj_dim).to(
                self.device, self.dtype
            )
        timesteps = torch.linspace(999, 0, steps, device=self.device).long()
        with torch.inference_mode():
            started = self._clock()
            for t in timesteps:
                with autocast_context(self.optimizations.autocast, self.device):
                    self.unet(latents, t, return_dict=False, **kwargs)
            elapsed = self._clock() - started
        for hook in self.offload_hooks:
            hook.offload()
        return elapsed

    def _step_event(self, step: int, total: int, latents: torch.Tensor) -> StepEvent:
        if latents.shape[1] != 4:
            return StepEvent(step, total, latents, scale=self.vae_scale_factor)
        if self.is_sdxl:
            return StepEvent(
                step, total, latents, SDXL_LATENT_RGB, SDXL_LATENT_RGB_BIAS, self.vae_scale_factor
            )
        return StepEvent(step, total, latents, SD_LATENT_RGB, scale=self.vae_scale_factor)

    def _clock(self) -> float:
        """Seconds, after the device has finished the work queued so far (so timings are not just launch times)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of guidance scales (batch,) -> (batch, dim), as diffusers' get_guidance_scale_embedding."""
    w = w * 1000.0
    half = dim // 2
    frequencies = torch.exp(
        torch.arange(half, dtype=torch.float32) * -(torch.log(torch.tensor(10000.0)) / (half - 1))
    )
    angles = w.to(torch.float32)[:, None] * frequencies[None, :]
    embedding = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if dim % 2 == 1:
        embedding = torch.nn.functional.pad(embedding, (0, 1))
    return embedding


def load_component(path: Path, index: dict, name: str, dtype: torch.dtype) -> Any:
    """One component with the class model_index.json names, from its subfolder only; safetensors weights only,
    the fp16 variant when float16 is wanted (or when it is the only one)."""
    library, class_name = index[name]
    component_class = getattr(importlib.import_module(library), class_name, None)
    if component_class is None:
        raise ModelLoadError(f"{path}: {name} class {library}.{class_name} is not in the installed {library}")
    folder = path / name
    try:
        if name.startswith("tokenizer"):
            return component_class.from_pretrained(folder, local_files_only=True)
        dtype_argument = "torch_dtype" if library == "diffusers" else "dtype"
        model = component_class.from_pretrained(
            folder,
            local_files_only=True,
            use_safetensors=True,
            variant=weights_variant(folder, dtype),
            **{dtype_argument: dtype},
        )
    except Exception as error:  # loaders raise many types; each means the folder cannot be used
        raise ModelLoadError(
            f"{path}: cannot load {name} ({library}.{class_name}): {one_line(error)}"
        ) from error
    return model.eval()


def weights_variant(folder: Path, dtype: torch.dtype) -> str | None:
    files = [file.name for file in folder.glob("*.safetensors")]
    half = [name for name in files if ".fp16." in name or ".fp16-" in name]
    if half and (dtype == torch.float16 or len(half) == len(files)):
        return "fp16"
    return None


def resolve_device(device: str) -> torch.device:
    """"auto" picks CUDA, then MPS, then the CPU; a named device must exist on this machine."""
    if device != "auto":
        try:
            resolved = torch.device(device)
        except RuntimeError:
            raise InvalidParamsError(f"device {device!r} is not known: use auto, cpu, cuda or cuda:N",
                                     param="device") from None
        available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
        if not available.get(resolved.type, True):
            usable = ", ".join(["auto", *(name for name, ok in available.items() if ok)])
            raise InvalidParamsError(f"device {device!r} is not available on this machine: use {usable}",
                                     param="device")
        if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise InvalidParamsError(f"device {device!r} does not exist: this machine has "
                                     f"{torch.cuda.device_count()} CUDA device(s)", param="device")
        return resolved
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.float16 if device.type in ("cuda", "mps") else torch.float32
    if dtype not in DTYPES:
        raise InvalidParamsError(
            f"dtype {dtype!r} is not known: use auto, {', '.join(DTYPES)}", param="dtype"
        )
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def accepts(function: Callable, argument: str) -> bool:
    return argument in inspect.signature(function).parameters


def check_batch(prompts: list[str], negative_prompts: list[str], seeds: list[int]) -> None:
    if not prompts or not len(prompts) == len(negative_prompts) == len(seeds):
        raise InvalidParamsError(
            f"need one negative prompt and one seed per prompt, got {len(prompts)} prompts,"
            f" {len(negative_prompts)} negative prompts and {len(seeds)} seeds",
            param="prompts",
        )
    for seed in seeds:
        if not 0 <= seed <= SEED_MAX:
            raise InvalidParamsError(f"seed {seed} is not allowed: use 0 to {SEED_MAX}", param="seed")
