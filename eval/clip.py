"""CLIP scorers behind one interface (`embed_images`, `embed_texts`, `score`): the in-house contrastive model, or
any local transformers `CLIPModel` folder; `load_scorer` picks the backend from the folder."""

from __future__ import annotations

import hashlib
import json
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from eval.metrics import clip_scores

BUNDLED_SCORER = Path(__file__).parent / "models" / "inhouse-clip"
"""The in-house CLIP shipped with the package (`image-gen train clip --out eval/models/inhouse-clip`)."""


class ClipLoadError(ValueError):
    """A scorer folder that is missing or of neither layout; the message says which files each layout needs."""


class ClipScorer(ABC):
    """Image and text embeddings in one space (L2-normalised rows) and CLIPScore between them.

    `name` and `content_hash` identify the scorer in results files, so scores from different scorers are never
    compared. Thread-safe: one embedding at a time per instance.
    """

    name: str
    content_hash: str
    batch_size: int = 64

    def __init__(self) -> None:
        self._lock = threading.Lock()

    @abstractmethod
    def _embed_images(self, images: list[Image.Image]) -> torch.Tensor: ...

    @abstractmethod
    def _embed_texts(self, texts: list[str]) -> torch.Tensor: ...

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(n, d) float32 unit vectors, one per image."""
        return self._batched(self._embed_images, list(images))

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """(n, d) float32 unit vectors, one per text."""
        return self._batched(self._embed_texts, list(texts))

    def score(self, images: Sequence[Image.Image], texts: Sequence[str]) -> np.ndarray:
        """CLIPScore of each (image, text) pair: 100 * max(cos, 0), as torchmetrics defines it."""
        if len(images) != len(texts):
            raise ValueError(f"score() pairs images with texts: got {len(images)} images and {len(texts)} texts")
        return clip_scores(self.embed_images(images), self.embed_texts(texts))

    def identity(self) -> dict[str, str]:
        return {"name": self.name, "content_hash": self.content_hash}

    @torch.inference_mode()
    def _batched(self, embed: Any, items: list) -> np.ndarray:
        with self._lock:
            chunks = [embed(items[start:start + self.batch_size]) for start in range(0, len(items), self.batch_size)]
        if not chunks:
            return np.zeros((0, self.dim), dtype=np.float32)
        embeddings = torch.cat(chunks).float()
        return torch.nn.functional.normalize(embeddings, dim=-1).cpu().numpy()

    @property
    @abstractmethod
    def dim(self) -> int: ...


class InhouseClipScorer(ClipScorer):
    """The in-house contrastive model (`pipelines.training.clip`): conv image tower on 64 px images, frozen MiniLM
    token states pooled and projected."""

    def __init__(self, folder: Path, device: str = "cpu") -> None:
        super().__init__()
        from pipelines.training.clip import ContrastiveClip
        from pipelines.training.text import load_text_encoder

        self.device = torch.device(device)
        self.model = ContrastiveClip.from_pretrained(folder).to(self.device)
        self.tokenizer, self.encoder = load_text_encoder(self.device)
        self.name = folder.name
        self.content_hash = _weights_hash(folder)

    @property
    def dim(self) -> int:
        return self.model.config.embed_dim

    def _embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        from pipelines.training.clip import image_pixels

        return self.model.encode_images(image_pixels(images, self.model.config.image_size).to(self.device))

    def _embed_texts(self, texts: list[str]) -> torch.Tensor:
        from pipelines.training.clip import encode_captions_masked

        states, mask = encode_captions_masked(texts, self.tokenizer, self.encoder, self.model.config.max_tokens)
        return self.model.encode_text(states.to(self.device), mask.to(self.device))


class TransformersClipScorer(ClipScorer):
    """A local transformers `CLIPModel` folder with its processor (e.g. openai/clip-vit-large-patch14 saved to
    disk): standard CLIPScore, the projected image and text features as torchmetrics takes them."""

    def __init__(self, folder: Path, device: str = "cpu") -> None:
        super().__init__()
        from transformers import CLIPModel, CLIPProcessor

        self.device = torch.device(device)
        self.model = CLIPModel.from_pretrained(folder).to(self.device).eval()
        self.processor = CLIPProcessor.from_pretrained(folder)
        self.name = folder.name
        self.content_hash = _weights_hash(folder)

    @property
    def dim(self) -> int:
        return self.model.config.projection_dim

    def _embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        inputs = self.processor(images=[image.convert("RGB") for image in images], return_tensors="pt")
        return _features(self.model.get_image_features(pixel_values=inputs["pixel_values"].to(self.device)))

    def _embed_texts(self, texts: list[str]) -> torch.Tensor:
        inputs = self.processor(text=texts, return_tensors="pt", padding=True, truncation=True)
        return _features(self.model.get_text_features(input_ids=inputs["input_ids"].to(self.device),
                                                      attention_mask=inputs["attention_mask"].to(self.device)))


def _features(output: Any) -> torch.Tensor:
    """transformers 4 returns the projected features; 5 a model output holding them as `pooler_output`."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _weights_hash(folder: Path) -> str:
    """sha256 (first 10 hex digits, as the model registry shows) over the folder's safetensors files."""
    digest = hashlib.sha256()
    for file in sorted(folder.glob("*.safetensors")):
        with file.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()[:10]


def scorer_kind(folder: Path) -> str:
    """"inhouse" or "transformers", from the folder's config.json; ClipLoadError for anything else."""
    config_file = folder / "config.json"
    if not folder.is_dir():
        raise ClipLoadError(f"CLIP folder {folder} does not exist")
    try:
        config = json.loads(config_file.read_text())
    except FileNotFoundError:
        raise ClipLoadError(f"{folder} has no config.json: a CLIP folder is the in-house model (config.json, "
                            "model.safetensors) or a transformers CLIPModel saved with its processor") from None
    except (OSError, ValueError) as error:
        raise ClipLoadError(f"{config_file} is not valid JSON: {error}") from None
    if not list(folder.glob("*.safetensors")):
        raise ClipLoadError(f"{folder} has no .safetensors weights (other formats are not loaded)")
    from pipelines.training.clip import CLASS_NAME

    if config.get("_class_name") == CLASS_NAME:
        return "inhouse"
    if config.get("model_type") == "clip" or "CLIPModel" in config.get("architectures", []):
        return "transformers"
    raise ClipLoadError(f"{config_file} describes neither the in-house CLIP (_class_name {CLASS_NAME!r}) nor a "
                        "transformers CLIPModel (model_type 'clip')")


_CACHE: dict[tuple[str, str], ClipScorer] = {}
_CACHE_LOCK = threading.Lock()


def load_scorer(folder: str | Path | None = None, device: str = "cpu") -> ClipScorer:
    """The scorer in `folder` (the bundled in-house CLIP when None), loaded once per process and device."""
    path = Path(folder) if folder is not None else BUNDLED_SCORER
    if folder is None and not path.is_dir():
        raise ClipLoadError(f"the bundled in-house CLIP is missing from {path}: train it with `image-gen train "
                            f"clip --out {path}` (make clip-model), or pass a CLIP folder")
    key = (str(path.resolve()), device)
    with _CACHE_LOCK:
        if key not in _CACHE:
            backend = InhouseClipScorer if scorer_kind(path) == "inhouse" else TransformersClipScorer
            try:
                _CACHE[key] = backend(path, device)
            except (OSError, RuntimeError, KeyError, ValueError) as error:  # truncated or mismatched weights
                raise ClipLoadError(f"{path}: cannot load the CLIP weights: {' '.join(str(error).split())[:300]}") from error
        return _CACHE[key]
