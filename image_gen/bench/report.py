"""What every benchmark report shares: the machine's description, robust statistics, and the files it writes."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch


def machine() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpu_features": cpu_features(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average": [round(load, 2) for load in os.getloadavg()],
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")


def cpu_features() -> str:
    """The CPU flags that decide which kernels run (bf16 dot products, AMX tiles), as /proc/cpuinfo names them."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return " ".join(flag for flag in SPEED_FLAGS if flag in flags) or "none of " + " ".join(SPEED_FLAGS)
    except OSError:
        pass
    return "unknown"


def summary(samples: list[float]) -> dict:
    """Median and spread (min, max, relative interquartile range) of repeated timings."""
    ordered = sorted(samples)
    quartiles = statistics.quantiles(ordered, n=4) if len(ordered) >= 2 else [ordered[0]] * 3
    median = statistics.median(ordered)
    return {
        "median": median,
        "min": ordered[0],
        "max": ordered[-1],
        "iqr_rel": (quartiles[2] - quartiles[0]) / median if median else 0.0,
        "n": len(ordered),
    }


def machine_markdown(info: dict) -> str:
    return "\n".join(f"- {key}: {value}" for key, value in info.items())


def write_report(out: Path, name: str, markdown: str, data: dict) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / f"{name}.md", out / f"{name}.json"
    md.write_text(markdown.rstrip() + "\n")
    js.write_text(json.dumps(data, indent=2) + "\n")
    return md, js
