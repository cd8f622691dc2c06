"""The leaderboard: results records (and arena ratings, when there are any) as one table, rendered to Markdown,
HTML and JSON, with a Pareto plot of quality against seconds per image."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

from eval.results import RESULTS_FORMAT, headline, higher_is_better

OUTPUT_FILES = ("leaderboard.md", "leaderboard.html", "leaderboard.json", "pareto.png")

COLUMNS = (
    ("clip_score", "CLIPScore", ".2f"),
    ("r_precision", "R-precision", ".1%"),
    ("compositional", "Compositional", ".1%"),
    ("frechet_distance", "Frechet dist.", ".4f"),
    ("diversity", "Diversity", ".4f"),
    ("seconds_per_image", "s/image", ".3f"),
    ("peak_memory_mb", "Peak MB", ".0f"),
)
"""Metric columns in table order: key, heading, format."""


class LeaderboardError(ValueError):
    """Results or ratings that cannot be read; the message names the file."""


def load_results(folder: Path) -> list[dict]:
    """Every results record (`image-gen eval` output) in `folder`, by name; other JSON files are skipped."""
    if not folder.is_dir():
        raise LeaderboardError(f"results folder {folder} does not exist: write results there with "
                               "`image-gen eval --out`")
    results = []
    for file in sorted(folder.glob("*.json")):
        try:
            record = json.loads(file.read_text())
        except (OSError, ValueError) as error:
            raise LeaderboardError(f"{file} is not valid JSON: {error}") from None
        if isinstance(record, dict) and record.get("format") == RESULTS_FORMAT:
            results.append({**record, "file": file.name})
    if not results:
        raise LeaderboardError(f"no results in {folder}: run `image-gen eval --out {folder}` first")
    return results


def load_ratings(file: Path) -> dict[str, dict]:
    """Arena ratings by contender name. Accepted: `{"name": rating, ...}`, or a list of records (or such a list
    under "ratings" or "leaderboard") with a name in "contender", "model" or "name" and a "rating" (optional
    "low"/"lower", "high"/"upper", "rank", "battles")."""
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as error:
        raise LeaderboardError(f"ratings file {file} cannot be read: {error}") from None
    if isinstance(data, dict) and isinstance(data.get("ratings", data.get("leaderboard")), list):
        data = data.get("ratings", data.get("leaderboard"))
    ratings: dict[str, dict] = {}
    if isinstance(data, dict):
        for name, value in data.items():
            if isinstance(value, int | float):
                ratings[name] = {"rating": float(value)}
            elif isinstance(value, dict) and isinstance(value.get("rating"), int | float):
                ratings[name] = _rating(value)
    elif isinstance(data, list):
        for record in data:
            name = next((record.get(k) for k in ("contender", "model", "name") if isinstance(record, dict)
                         and isinstance(record.get(k), str)), None)
            if name is not None and isinstance(record.get("rating"), int | float):
                ratings[name] = _rating(record)
    if not ratings:
        raise LeaderboardError(f"ratings file {file} holds no ratings (see `image-gen leaderboard --help`)")
    return ratings


def _rating(record: dict) -> dict:
    picked = {"rating": float(record["rating"])}
    for key, names in (("low", ("low", "lower")), ("high", ("high", "upper")), ("rank", ("rank",)),
                       ("battles", ("battles", "votes"))):
        value = next((record[n] for n in names if isinstance(record.get(n), int | float)), None)
        if value is not None:
            picked[key] = value
    return picked


def pareto_front(points: list[tuple[float, float]], quality_higher_is_better: bool = True) -> list[bool]:
    """Whether each (seconds, quality) point is on the front: no other point is at least as fast and at least as
    good, and strictly better in one."""
    sign = 1.0 if quality_higher_is_better else -1.0
    front = []
    for i, (seconds, quality) in enumerate(points):
        dominated = any(
            s <= seconds and sign * q >= sign * quality and (s < seconds or sign * q > sign * quality)
            for j, (s, q) in enumerate(points) if j != i
        )
        front.append(not dominated)
    return front


def leaderboard_rows(results: list[dict], ratings: dict[str, dict] | None = None,
                     quality: str = "clip_score") -> list[dict]:
    """One row per result, best `quality` first; a rating joins by configuration name, else by model name."""
    rows = []
    for result in results:
        config, summary = result["config"], result["summary"]
        values = headline(result)
        if quality not in values:
            raise LeaderboardError(f"{result['file']} has no {quality!r}: choose one of {', '.join(values)}")
        metrics = {key: {k: summary[key][k] for k in ("mean", "low", "high") if k in summary[key]}
                   if isinstance(summary.get(key), dict) else {"mean": summary.get(key)} for key, _, _ in COLUMNS}
        rating = None
        if ratings:
            rating = ratings.get(result["name"], ratings.get(config["model"]))
        rows.append({
            "name": result["name"], "model": config["model"], "content_hash": config.get("content_hash", ""),
            "scheduler": config["scheduler"], "steps": config["steps"], "guidance_scale": config["guidance_scale"],
            "size": f"{config['width']}x{config['height']}", "prompts": config["prompts"],
            "images": summary["images"], "metrics": metrics, "quality": values[quality], "arena": rating,
            "file": result["file"],
        })
    front = pareto_front([(r["metrics"]["seconds_per_image"]["mean"], r["quality"]) for r in rows],
                         higher_is_better(quality))
    for row, on_front in zip(rows, front, strict=True):
        row["pareto"] = on_front
    rows.sort(key=lambda r: -r["quality"] if higher_is_better(quality) else r["quality"])
    return rows


def _cell(metric: dict, fmt: str) -> str:
    mean = metric.get("mean")
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    text = format(mean, fmt)
    if "low" in metric and "high" in metric:
        text += f" [{format(metric['low'], fmt)}, {format(metric['high'], fmt)}]"
    return text


def _arena_cell(rating: dict | None) -> str:
    if rating is None:
        return "-"
    text = f"{rating['rating']:.0f}"
    if "low" in rating and "high" in rating:
        text += f" [{rating['low']:.0f}, {rating['high']:.0f}]"
    return text


def _table(rows: list[dict], with_arena: bool) -> tuple[list[str], list[list[str]]]:
    heading = ["#", "configuration", "model (hash)", "scheduler", "steps", "guidance", "size",
               *(title for _, title, _ in COLUMNS)] + (["arena"] if with_arena else []) + ["Pareto"]
    body = []
    for rank, row in enumerate(rows, start=1):
        cells = [str(rank), row["name"], f"{row['model']} ({row['content_hash']})", row["scheduler"],
                 str(row["steps"]), f"{row['guidance_scale']:g}", row["size"],
                 *(_cell(row["metrics"][key], fmt) for key, _, fmt in COLUMNS)]
        cells += [_arena_cell(row["arena"])] if with_arena else []
        body.append([*cells, "yes" if row["pareto"] else ""])
    return heading, body


def render_markdown(rows: list[dict], quality: str) -> str:
    with_arena = any(row["arena"] for row in rows)
    heading, body = _table(rows, with_arena)
    lines = [
        "# Leaderboard",
        "",
        f"Sorted by {quality}; brackets are bootstrap 95% intervals. {rows[0]['prompts']} prompts, "
        f"{rows[0]['images']} images per configuration. Pareto: no other configuration is both faster and better "
        f"in {quality}. Generated by `image-gen leaderboard`; the format is described in docs/evaluation.md.",
        "",
        "![Pareto plot](pareto.png)",
        "",
        "| " + " | ".join(heading) + " |",
        "|" + "|".join("---" for _ in heading) + "|",
        *("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |" for cells in body),
    ]
    return "\n".join(lines) + "\n"


def render_html(rows: list[dict], quality: str) -> str:
    with_arena = any(row["arena"] for row in rows)
    heading, body = _table(rows, with_arena)
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in heading)
    table_rows = "\n".join(
        "<tr" + (' class="pareto"' if row["pareto"] else "") + ">"
        + "".join(f"<td>{html.escape(cell)}</td>" for cell in cells) + "</tr>"
        for row, cells in zip(rows, body, strict=True)
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>image-gen leaderboard</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.9rem; }}
th, td {{ border-bottom: 1px solid #ddd; padding: 0.35rem 0.6rem; text-align: left; white-space: nowrap; }}
tr.pareto td {{ background: #eef6ee; }}
img {{ max-width: 720px; display: block; margin: 1rem 0; }}
</style></head>
<body>
<h1>Leaderboard</h1>
<p>Sorted by {html.escape(quality)}; brackets are bootstrap 95% intervals. Highlighted rows are on the Pareto front
of {html.escape(quality)} against seconds per image.</p>
<img src="pareto.png" alt="Pareto plot of {html.escape(quality)} against seconds per image">
<table><thead><tr>{head}</tr></thead><tbody>
{table_rows}
</tbody></table>
</body></html>
"""


def plot_pareto(rows: list[dict], quality: str, path: Path) -> None:
    """Quality against seconds per image (log scale), with intervals, labels and the front drawn as steps."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5), dpi=120)
    for row in rows:
        seconds = row["metrics"]["seconds_per_image"]["mean"]
        metric = row["metrics"].get(quality, {"mean": row["quality"]})
        low, high = metric.get("low", row["quality"]), metric.get("high", row["quality"])
        axes.errorbar(seconds, row["quality"], yerr=[[row["quality"] - low], [high - row["quality"]]],
                      fmt="o", color="tab:green" if row["pareto"] else "tab:gray", capsize=3)
        axes.annotate(row["name"], (seconds, row["quality"]), textcoords="offset points", xytext=(5, 5), fontsize=7)
    front = sorted((r["metrics"]["seconds_per_image"]["mean"], r["quality"]) for r in rows if r["pareto"])
    if len(front) > 1:
        axes.step(*zip(*front, strict=True), where="post", color="tab:green", alpha=0.6, label="Pareto front")
        axes.legend()
    axes.set_xscale("log")
    axes.margins(x=0.25, y=0.1)  # room for the labels of the outermost points
    axes.set_xlabel("seconds per image (log scale)")
    axes.set_ylabel(quality + ("" if higher_is_better(quality) else " (lower is better)"))
    axes.set_title("Quality against speed")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def write_leaderboard(results_dir: Path, out_dir: Path, ratings_file: Path | None = None,
                      quality: str = "clip_score") -> list[Path]:
    """Render every result in `results_dir` (and the ratings) into `out_dir`; returns the files written."""
    ratings = load_ratings(ratings_file) if ratings_file is not None else None
    rows = leaderboard_rows(load_results(results_dir), ratings, quality)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / name for name in OUTPUT_FILES]
    paths[0].write_text(render_markdown(rows, quality))
    paths[1].write_text(render_html(rows, quality))
    paths[2].write_text(json.dumps({"quality": quality, "rows": rows}, indent=2) + "\n")
    plot_pareto(rows, quality, paths[3])
    return paths
