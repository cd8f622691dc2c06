"""Does the frozen text encoder tell the UNet, at each shape word, what it has to draw there?

For two-object position captions ("a red circle to the left of a blue square") a linear probe reads, from the
encoder's token state at each object's shape noun, that object's colour (8 classes) and its side of the other
object (left / right / above / below). If both read out well, the information the UNet needs to bind colours and
places to objects is in its cross-attention keys and values, and a UNet that misses them is limited by itself,
not by the text encoder. The same probe on the encoder's input embeddings (its layer 0: word plus position
embedding, no context) is the control: there a noun's state cannot know its colour, and knows its side only as
far as where the word sits in the sentence gives it away.

The probe trains on the captions the teacher trained on (each scene's in-template caption and one of its
paraphrases) for one range of scenes, and is tested on other scenes, both in-template and in the evaluation
suite's held-out phrasings. `python -m eval.text_probe` prints the table.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from transformers import BertModel, BertTokenizer

from eval.metrics import mean_with_interval
from pipelines.training.scenes import (
    COLORS,
    HELDOUT_SHAPE_WORDS,
    INVERSE_RELATION,
    PARAPHRASE_SHAPE_WORDS,
    RELATIONS,
    SHAPE_WORDS,
    make_scene,
    scene_paraphrases,
)
from pipelines.training.text import load_text_encoder

TARGETS: dict[str, tuple[str, ...]] = {"colour": tuple(COLORS), "side": RELATIONS}
"""What the probe reads at each object's noun, and its classes: the object's colour, and where it is relative to
the other object (the first object of "a left of b" is "left of", the second "right of")."""

_TEST_SEED_OFFSET = 1_000_000
"""Test scenes are numbered from here, far from the training scenes."""


@dataclass
class NounStates:
    """One row per object of each caption: the token state at its shape noun, and what the probe should read."""

    states: dict[int, np.ndarray]
    """Per encoder layer (0 = input embeddings), (n, hidden) float32."""
    labels: dict[str, np.ndarray]
    """Per target, (n,) class indices into TARGETS[target]."""


def _shape_nouns(tokenizer: BertTokenizer) -> dict[str, list[list[int]]]:
    """Every spelling of each shape (training, paraphrase and held-out words) as word-piece ids, longest first."""
    spellings: dict[str, set[str]] = {}
    for words in (SHAPE_WORDS, PARAPHRASE_SHAPE_WORDS):
        for shape, names in words.items():
            spellings.setdefault(shape, set()).update(names)
    for shape, name in HELDOUT_SHAPE_WORDS.items():
        spellings[shape].add(name)
    return {shape: sorted((tokenizer(name, add_special_tokens=False).input_ids for name in names), key=len,
                          reverse=True)
            for shape, names in spellings.items()}


def noun_index(ids: list[int], spellings: list[list[int]]) -> int:
    """Index of the last word piece of the first spelling found in `ids` (the noun's head: "sign" of "plus
    sign"); ValueError if none is there."""
    for pieces in spellings:
        for start in range(len(ids) - len(pieces) + 1):
            if ids[start:start + len(pieces)] == pieces:
                return start + len(pieces) - 1
    raise ValueError("no spelling of the shape in the caption")


@torch.no_grad()
def noun_states(seeds: range, phrasing: str, tokenizer: BertTokenizer, encoder: BertModel,
                layers: tuple[int, ...], batch_size: int = 128) -> NounStates:
    """Token states at both objects' nouns of the position scenes `seeds`, encoded as the pipelines encode
    prompts (padded to the tokenizer's length, no attention mask). `phrasing`: "in_template", "heldout" (the
    evaluation's held-out words and sentences) or "training" (each scene's in-template caption and one of its
    paraphrases, as the teacher saw them)."""
    if phrasing not in ("in_template", "heldout", "training"):
        raise ValueError(f"phrasing {phrasing!r} is not one of in_template, heldout, training")
    nouns = _shape_nouns(tokenizer)
    scenes = [make_scene(seed, kind="position", heldout=phrasing == "heldout")[1] for seed in seeds]
    if phrasing == "training":
        scenes += [replace(scene, caption=scene_paraphrases(scene.to_json(), 1)[0]) for scene in scenes]
    states: dict[int, list[np.ndarray]] = {layer: [] for layer in layers}
    labels: dict[str, list[int]] = {target: [] for target in TARGETS}
    for start in range(0, len(scenes), batch_size):
        batch = scenes[start:start + batch_size]
        ids = tokenizer([scene.caption for scene in batch], padding="max_length", truncation=True,
                        max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
        hidden = encoder(ids.to(encoder.device), output_hidden_states=True).hidden_states
        for row, scene in enumerate(batch):
            sides = (scene.relation, INVERSE_RELATION[scene.relation])
            for obj, side in zip(scene.objects, sides, strict=True):
                index = noun_index(ids[row].tolist(), nouns[obj.shape])
                for layer in layers:
                    states[layer].append(hidden[layer][row, index].float().cpu().numpy())
                labels["colour"].append(TARGETS["colour"].index(obj.color))
                labels["side"].append(TARGETS["side"].index(side))
    return NounStates({layer: np.stack(rows) for layer, rows in states.items()},
                      {target: np.array(values) for target, values in labels.items()})


def fit_linear_probe(x: np.ndarray, y: np.ndarray, classes: int, steps: int = 300, weight_decay: float = 1e-3,
                     seed: int = 0) -> torch.nn.Linear:
    """Multinomial logistic regression on standardised features (the standardisation is folded into the
    returned layer), full batch, Adam."""
    torch.manual_seed(seed)
    features = torch.from_numpy(x).float()
    mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
    targets = torch.from_numpy(y).long()
    probe = torch.nn.Linear(x.shape[1], classes)
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-2, weight_decay=weight_decay)
    standardised = (features - mean) / std
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(probe(standardised), targets).backward()
        optimizer.step()
    with torch.no_grad():
        probe.weight /= std
        probe.bias -= probe.weight @ mean
    return probe


def probe_accuracy(probe: torch.nn.Linear, x: np.ndarray, y: np.ndarray) -> dict:
    with torch.no_grad():
        predicted = probe(torch.from_numpy(x).float()).argmax(1).numpy()
    return mean_with_interval((predicted == y).astype(float))


def text_probe_report(train_scenes: int = 2000, test_scenes: int = 400, layers: tuple[int, ...] = (0, 6),
                      tokenizer: BertTokenizer | None = None, encoder: BertModel | None = None) -> dict:
    """Probe accuracy per target, encoder layer and test phrasing, with bootstrap 95% intervals."""
    if tokenizer is None or encoder is None:
        tokenizer, encoder = load_text_encoder()
    train = noun_states(range(train_scenes), "training", tokenizer, encoder, layers)
    test_seeds = range(_TEST_SEED_OFFSET, _TEST_SEED_OFFSET + test_scenes)
    tests = {phrasing: noun_states(test_seeds, phrasing, tokenizer, encoder, layers)
             for phrasing in ("in_template", "heldout")}
    report: dict = {"train_objects": len(train.labels["colour"]), "test_objects": test_scenes * 2,
                    "chance": {target: 1 / len(classes) for target, classes in TARGETS.items()}, "accuracy": {}}
    for target, classes in TARGETS.items():
        for layer in layers:
            probe = fit_linear_probe(train.states[layer], train.labels[target], len(classes))
            report["accuracy"][f"{target}/layer{layer}"] = {
                phrasing: probe_accuracy(probe, test.states[layer], test.labels[target])
                for phrasing, test in tests.items()}
    return report


def report_table(report: dict) -> str:
    def cell(result: dict) -> str:
        return f"{100 * result['mean']:.1f} [{100 * result['low']:.1f}, {100 * result['high']:.1f}]"

    lines = ["| probe target | encoder states | chance | in-template captions | held-out phrasings |",
             "|---|---|---|---|---|"]
    for key, results in report["accuracy"].items():
        target, layer = key.split("/layer")
        states = "input embeddings (control)" if layer == "0" else f"layer {layer} (what the UNet reads)"
        lines.append(f"| {target} | {states} | {100 * report['chance'][target]:.1f} | {cell(results['in_template'])} "
                     f"| {cell(results['heldout'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.text_probe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-scenes", type=int, default=2000, help="position scenes to fit the probe on")
    parser.add_argument("--test-scenes", type=int, default=400, help="position scenes to test it on")
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args(argv)
    if args.train_scenes < 10 or args.test_scenes < 1:
        parser.error("--train-scenes must be at least 10 and --test-scenes at least 1")
    report = text_probe_report(args.train_scenes, args.test_scenes)
    print(f"{report['train_objects']} training objects, {report['test_objects']} test objects per phrasing; "
          "probe accuracy in %, bootstrap 95% intervals\n")
    print(report_table(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
