"""How well a CLIP scorer reads the procedural domain, on ground-truth renders of the built-in suite's scenes (never
in the in-house CLIP's training set): the true caption's rank among random distractors, matching against
mismatched pairs, and hard distractors that change one thing (swapped colours, flipped relation, another count,
colour or shape). `python -m eval.clip_accuracy --model-card docs/model-card.md` writes the in-house CLIP's model card section."""

from __future__ import annotations

import argparse
import json
import random
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from eval.clip import BUNDLED_SCORER, ClipScorer, load_scorer
from eval.metrics import mean_with_interval, retrieval_hits
from eval.suites import SuitePrompt, load_suite
from pipelines.training.clip import CLASS_NAME, scene_key
from pipelines.training.scenes import COLORS, SHAPES, Scene, SceneObject, caption_for, make_scene

DISTRACTORS = 10
MODEL_CARD_SECTION = "## In-house CLIP"
_OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def _renders(prompts: list[SuitePrompt]) -> list[tuple[Image.Image, Scene]]:
    """Each prompt's ground-truth render and scene (a scene shared by two phrasings is rendered once)."""
    cache: dict[tuple[str, int], tuple[Image.Image, Scene]] = {}
    for prompt in prompts:
        if (prompt.category, prompt.seed) not in cache:
            cache[prompt.category, prompt.seed] = make_scene(prompt.seed, kind=prompt.category)
    return [cache[prompt.category, prompt.seed] for prompt in prompts]


def random_distractor_accuracy(scorer: ClipScorer, prompts: list[SuitePrompt] | None = None,
                               k: int = DISTRACTORS, seed: int = 0) -> dict:
    """Per prompt of the suite (its scene rendered): is the prompt ranked first among itself and `k` prompts of
    other scenes in the same phrasing (R@1), and does it beat the first of them (pair accuracy)? Means with
    bootstrap 95% intervals, overall and per phrasing."""
    prompts = prompts if prompts is not None else load_suite()
    image_embeddings = scorer.embed_images([image for image, _ in _renders(prompts)])
    text_embeddings = scorer.embed_texts([p.prompt for p in prompts])
    keys = np.array([scene_key(p.expectation) for p in prompts])
    phrasing = np.array(["heldout" if "heldout" in p.tags else "in_template" for p in prompts])
    rng = np.random.default_rng(seed)
    hits, pairs = [], []
    for i in range(len(prompts)):
        others = np.flatnonzero((keys != keys[i]) & (phrasing == phrasing[i]))
        chosen = rng.choice(others, k, replace=False)
        true_score = image_embeddings[i] @ text_embeddings[i]
        distractor_scores = image_embeddings[i] @ text_embeddings[chosen].T
        hits.append(bool(retrieval_hits(np.array([true_score]), distractor_scores[None])[0]))
        pairs.append(bool(true_score > distractor_scores[0]))
    hits, pairs = np.array(hits, dtype=float), np.array(pairs, dtype=float)
    report = {"r_at_1": mean_with_interval(hits), "pair_accuracy": mean_with_interval(pairs), "distractors": k}
    for group in ("in_template", "heldout"):
        chosen = phrasing == group
        report[group] = {"r_at_1": mean_with_interval(hits[chosen]), "pair_accuracy": mean_with_interval(pairs[chosen])}
    return report


def _altered(scene: Scene, kind: str) -> tuple[list[SceneObject], str | None] | None:
    """The scene's objects and relation with one thing changed, or None if `kind` does not apply to it."""
    objects, relation = scene.objects, scene.relation
    colors = list(COLORS)
    if kind == "swapped colours" and scene.kind in ("two_objects", "position"):
        a, b = objects
        return [replace(a, color=b.color), replace(b, color=a.color)], relation
    if kind == "flipped relation" and scene.kind == "position":
        return objects, _OPPOSITE[relation]
    if kind == "other count" and scene.kind == "counting":
        return (objects[:2] if len(objects) == 3 else [*objects, objects[0]]), relation
    if kind == "other colour" and scene.kind == "single":
        color = colors[(colors.index(objects[0].color) + 1) % len(colors)]
        return [replace(objects[0], color=color)], relation
    if kind == "other shape" and scene.kind == "single":
        shape = SHAPES[(SHAPES.index(objects[0].shape) + 1) % len(SHAPES)]
        return [replace(objects[0], shape=shape)], relation
    return None


HARD_DISTRACTORS = ("swapped colours", "flipped relation", "other count", "other colour", "other shape")


def hard_distractor_accuracy(scorer: ClipScorer, prompts: list[SuitePrompt] | None = None) -> dict:
    """Per kind of hard distractor: the share of renders whose true caption scores above the caption of the
    same scene with that one change, worded by the same template (both phrasings)."""
    prompts = prompts if prompts is not None else load_suite()
    renders = _renders(prompts)
    report = {}
    for kind in HARD_DISTRACTORS:
        images, true_captions, false_captions = [], [], []
        for prompt, (image, scene) in zip(prompts, renders, strict=True):
            altered = _altered(scene, kind)
            if altered is None:
                continue
            heldout = "heldout" in prompt.tags
            seed = f"{prompt.seed}-{kind}"
            true = caption_for(scene.kind, scene.objects, scene.relation, scene.background, random.Random(seed), heldout)
            false = caption_for(scene.kind, *altered, scene.background, random.Random(seed), heldout)
            images.append(image)
            true_captions.append(true)
            false_captions.append(false)
        image_embeddings = scorer.embed_images(images)
        true_scores = np.einsum("nd,nd->n", image_embeddings, scorer.embed_texts(true_captions))
        false_scores = np.einsum("nd,nd->n", image_embeddings, scorer.embed_texts(false_captions))
        report[kind] = {**mean_with_interval((true_scores > false_scores).astype(float)),
                        "example": f"{true_captions[0]!r} vs {false_captions[0]!r}"}
    return report


def clip_report(scorer: ClipScorer) -> dict:
    return {"scorer": scorer.identity(), "random": random_distractor_accuracy(scorer),
            "hard": hard_distractor_accuracy(scorer)}


def _percent(score: dict) -> str:
    return f"{score['mean']:.1%} [{score['low']:.1%}, {score['high']:.1%}]"


def model_card_section(report: dict, config: dict, training: dict | None) -> str:
    """The "In-house CLIP" section of docs/model-card.md, from a report, the model's config.json and its
    training.json."""
    random_ = report["random"]
    channels = "-".join(str(c) for c in config["channels"])
    lines = [
        MODEL_CARD_SECTION,
        "",
        f"The evaluation suite's scorer (`eval/models/inhouse-clip`, `eval/clip.py`): a conv image tower on "
        f"{config['image_size']} px images (stride-2 stem, {channels} channels, a 4x4 grid flattened so that "
        f"position survives) and the frozen MiniLM's token states, narrowed to {config['text_width']} dimensions, "
        f"mixed by {config['text_layers']} trainable transformer layer(s) and pooled by {config['text_queries']} "
        f"learned attention queries; both towers project to {config['embed_dim']} dimensions. Symmetric InfoNCE "
        "with a learned temperature; captions that describe the same scene count as positives. Trained by "
        "`image-gen train clip` on procedural scenes from seed 50,000,000 on: the built-in suite's scenes are "
        "never in training.",
        "",
    ]
    if training:
        lines += [
            f"Training: {training['steps']} steps of batch {training['batch_size']} on {training['dataset_size']:,} "
            f"scenes ({training['heldout_share']:.0%} of them captioned in the suite's held-out phrasings, since "
            "the scorer must read every prompt it judges"
            + ("; each two-object scene also has its caption with the colours swapped, or the relation flipped, "
               "as a hard negative" if training.get("hard_negatives") else "")
            + f"; {training['distinct_captions']:,} distinct captions in all), "
            f"{training['train_seconds'] / 60:.1f} minutes on one CPU thread including rendering and caption "
            f"encoding. On {training['validation']['n']} fresh validation scenes: R@1 "
            f"{training['validation']['r_at_1']:.1%}, pair accuracy {training['validation']['pair_accuracy']:.1%}.",
            "",
        ]
    lines += [
        f"Ground-truth renders of the built-in suite's {random_['r_at_1']['n']} prompts (scorer "
        f"{report['scorer']['name']}, weights {report['scorer']['content_hash']}); brackets are bootstrap 95% "
        "intervals. Regenerate with `python -m eval.clip_accuracy --model-card docs/model-card.md`.",
        "",
        "| measure | all prompts | in-template phrasing | held-out phrasing |",
        "|---|---|---|---|",
        f"| R@1 of the prompt among {random_['distractors']} random distractors (target >= 90%) | "
        f"{_percent(random_['r_at_1'])} | {_percent(random_['in_template']['r_at_1'])} | "
        f"{_percent(random_['heldout']['r_at_1'])} |",
        f"| matching above mismatched caption (target >= 95%) | {_percent(random_['pair_accuracy'])} | "
        f"{_percent(random_['in_template']['pair_accuracy'])} | {_percent(random_['heldout']['pair_accuracy'])} |",
        "",
        "Hard distractors (reported, no target): the true caption against the same scene's caption with one "
        "thing changed, worded by the same template.",
        "",
        "| hard distractor | renders | true caption scores higher | example |",
        "|---|---|---|---|",
        *(f"| {kind} | {score['n']} | {_percent(score)} | {score['example']} |"
          for kind, score in report["hard"].items()),
        "",
    ]
    return "\n".join(lines)


def write_model_card_section(path: Path, section: str) -> None:
    """Replace the section if the card has it, else append it; nothing else in the card changes."""
    text = path.read_text() if path.exists() else ""
    pattern = re.compile(rf"^{re.escape(MODEL_CARD_SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text.rstrip("\n") + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.clip_accuracy", description=__doc__)
    parser.add_argument("--scorer", type=Path, help="CLIP folder (default: the bundled in-house CLIP)")
    parser.add_argument("--model-card", type=Path, help="write the In-house CLIP section into this file")
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args(argv)
    folder = args.scorer or BUNDLED_SCORER
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").exists() else {}
    if config.get("_class_name") != CLASS_NAME:
        parser.error(f"{folder} is not an in-house CLIP folder")
    report = clip_report(load_scorer(folder))
    training_file = folder / "training.json"
    training = json.loads(training_file.read_text()) if training_file.exists() else None
    section = model_card_section(report, config, training)
    print(section)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.model_card:
        write_model_card_section(args.model_card, section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
