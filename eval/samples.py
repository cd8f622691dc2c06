"""Sample sheets of an evaluation run, for a model card: the first images of each category of the suite as one PNG
strip per category, and `samples.md` naming each image's prompt and whether the detector passed it."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from eval.suites import SuitePrompt

GAP = 4


def sample_strip(images: list[Image.Image]) -> Image.Image:
    """The images side by side on white, `GAP` pixels apart."""
    width = sum(image.width for image in images) + GAP * (len(images) - 1)
    strip = Image.new("RGB", (width, max(image.height for image in images)), "white")
    x = 0
    for image in images:
        strip.paste(image.convert("RGB"), (x, 0))
        x += image.width + GAP
    return strip


def write_samples(images: list[list[Image.Image]], prompts: list[SuitePrompt], rows: list[dict], out: Path,
                  per_category: int = 6, title: str = "") -> list[Path]:
    """One `<category>.png` per category (the first image of its first `per_category` prompts, in suite order) and
    `samples.md` with a table per category; returns the files written."""
    if per_category < 1:
        raise ValueError(f"per_category must be at least 1, got {per_category}")
    by_category: dict[str, list[int]] = {}
    for index, prompt in enumerate(prompts):
        by_category.setdefault(prompt.category, []).append(index)
    out.mkdir(parents=True, exist_ok=True)
    written, lines = [], [f"# Samples{': ' + title if title else ''}", ""]
    for category, indices in by_category.items():
        chosen = indices[:per_category]
        path = out / f"{category}.png"
        sample_strip([images[i][0] for i in chosen]).save(path)
        written.append(path)
        lines += [f"## {category}", "", f"![{category}]({path.name})", "", "| # | prompt | detector |", "|---|---|---|"]
        for n, i in enumerate(chosen, 1):
            passed = rows[i]["passed"][0]
            verdict = "n/a" if passed is None else "pass" if passed else "fail"
            lines.append(f"| {n} | {prompts[i].prompt} | {verdict} |")
        lines.append("")
    (out / "samples.md").write_text("\n".join(lines))
    return [*written, out / "samples.md"]
