"""Shared pieces of the experiment scripts: machine description, result files, Markdown. Timing lives in
`bild_jax.evaluation`."""

from __future__ import annotations

import json
import math
import os
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

import jax

RESULTS_DIR = Path(__file__).parent / "results"


def machine_info() -> dict[str, Any]:
    """What the timings were taken on: CPU model, cores, load, accelerators and library versions."""
    import torch

    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        # Other processes on the machine slow every system down; the load shows whether they did.
        "load_average_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax_backend": jax.default_backend(),
        "jax_devices": [f"{d.platform}:{d.device_kind}" for d in jax.devices()],
        "torch_threads": torch.get_num_threads(),
        "torch_cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "versions": {p: version(p) for p in ("bild-jax", "jax", "jaxlib", "flax", "torch", "transformers",
                                            "datasets", "sacrebleu", "rouge-score", "scikit-learn")},
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_results(data: dict, markdown: str, out_dir: Path, name: str) -> tuple[Path, Path]:
    """Writes `<out_dir>/<name>.json` and `<out_dir>/<name>.md`; returns both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    json_path.write_text(json.dumps(_plain(data), indent=1, allow_nan=False) + "\n")
    md_path.write_text(markdown)
    return json_path, md_path


def _plain(value):
    """Strict JSON: numpy scalars as numbers, paths as strings, non-finite floats (an inf rollback threshold)
    as the strings "inf"/"-inf"/"nan"."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Path):
        return str(value)
    return value


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table; the first column left-aligned, the others right-aligned."""
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join([":---"] + ["---:"] * (len(headers) - 1)) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def report_header(title: str, data: dict) -> list[str]:
    """The opening Markdown lines of a results report: title, the command that made it, the machine, and a
    warning when the machine was busy. `data` holds "command" and "machine" (`machine_info()`)."""
    return [f"# {title}\n", f"`{data['command']}`\n", machine_line(data["machine"]), busy_warning(data["machine"])]


def machine_line(machine: dict) -> str:
    """One Markdown line naming the machine and the versions that matter for timings."""
    v = machine["versions"]
    load = machine["load_average_1_5_15"]
    load_text = f", load average {load[0]:.1f}" if load else ""
    return (f"Machine: {machine['cpu']}, {machine['cores']} cores{load_text}, JAX backend {machine['jax_backend']}, "
            f"torch threads {machine['torch_threads']}; jax {v['jax']}, flax {v['flax']}, torch {v['torch']}, "
            f"transformers {v['transformers']}.\n")


def busy_warning(machine: dict) -> str:
    """A warning line when other processes kept the CPU busy as the run started (empty otherwise): their load
    slows both sides, and PyTorch's spinning OpenMP threads far more than XLA's."""
    load = machine["load_average_1_5_15"]
    if load is None or load[0] < 1.0:
        return ""
    return (f"**Warning: the machine was busy (load average {load[0]:.1f} on {machine['cores']} cores when the run "
            "started); timings are not representative.**\n")
