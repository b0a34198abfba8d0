"""`bild-jax sweep`: a fallback x rollback (x max_draft) grid on a pair, quality vs speedup, and the recommended
point."""

from __future__ import annotations

import csv
import itertools
from pathlib import Path
from typing import Sequence

from rich.console import Console
from rich.progress import Progress

from bild_jax.atomic import atomic_path
from bild_jax.bild import BiLDConfig, bild_generate
from bild_jax.errors import InputError
from bild_jax.evaluation import padded_shape, run_systems, summarize
from bild_jax.generate import greedy_generate

MAX_ROUGE_LOSS = 1.0  # the recommended point is the fastest within this many ROUGE-L points of large-only


def pareto_front(rows: list[dict]) -> list[dict]:
    """Rows that no other row beats on both speedup and ROUGE-L."""
    return [r for r in rows if not any(o["speedup"] >= r["speedup"] and o["rouge_l"] >= r["rouge_l"]
                                       and (o["speedup"], o["rouge_l"]) != (r["speedup"], r["rouge_l"]) for o in rows)]


def grid_configs(fallbacks, rollbacks, max_new_tokens: int, max_draft: int | Sequence[int]) -> list[BiLDConfig]:
    """The checked BiLD config of every (fallback, rollback, max_draft) point, fallback-major; InputError for
    an empty grid or a bad setting, before any model runs."""
    max_drafts = [max_draft] if isinstance(max_draft, int) else list(max_draft)
    if not fallbacks or not rollbacks or not max_drafts:
        raise InputError(f"the grid is empty: fallbacks {list(fallbacks)}, rollbacks {list(rollbacks)}, "
                         f"max_drafts {max_drafts}")
    return [BiLDConfig(fallback_threshold=f, rollback_threshold=r, max_draft=d, max_new_tokens=max_new_tokens)
            for f, r, d in itertools.product(fallbacks, rollbacks, max_drafts)]


def run_sweep(small, large, prompts: list[list[int]], references: list[str] | None, decode, fallbacks, rollbacks,
              max_new_tokens: int, max_draft: int | Sequence[int], out_dir: Path, console: Console | None = None,
              max_rouge_loss: float = MAX_ROUGE_LOSS) -> dict:
    """Runs large-only greedy and BiLD at every (fallback, rollback, max_draft) point, at batch 1.

    Without `references` ROUGE-L is measured against the large model's own output. The recommended point is
    the fastest within `max_rouge_loss` ROUGE-L points of large-only. Writes `out_dir/sweep.csv` and
    `out_dir/sweep.png`; returns {"rows", "baseline", "recommended", "csv", "png", "runs" (the large model's
    `SystemRun`, then one per row), "references" (the texts ROUGE-L was measured against)}.
    """
    console = console or Console()
    configs = grid_configs(fallbacks, rollbacks, max_new_tokens, max_draft)
    if not prompts:
        raise InputError("the sweep needs at least one prompt")
    systems = [("large", lambda p: greedy_generate(large, p, max_new_tokens))]
    systems += [("BiLD", lambda p, c=config: bild_generate(small, large, p, c)) for config in configs]
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"{len(systems)} systems on {len(prompts)} prompts",
                                 total=len(systems) * (len(prompts) + 1))
        # Prompts of several power-of-two buckets compile once per bucket: those first calls are timed apart.
        runs = run_systems(systems, prompts, on_call=lambda _: progress.advance(task), batch_shape=padded_shape)
    baseline, *bild_runs = runs
    references = references or [decode(o) for o in baseline.outputs]
    base_row = summarize(baseline, baseline, references, decode)
    rows = [{"fallback": c.fallback_threshold, "rollback": c.rollback_threshold, "max_draft": c.max_draft,
             **summarize(run, baseline, references, decode)} for c, run in zip(configs, bild_runs)]
    eligible = [r for r in rows if r["rouge_l"] >= base_row["rouge_l"] - max_rouge_loss]
    recommended = max(eligible, key=lambda r: r["speedup"]) if eligible else None
    csv_path, png_path = out_dir / "sweep.csv", out_dir / "sweep.png"
    # Both files are written in full before either replaces its previous version: an interrupted sweep
    # leaves the previous pair.
    with atomic_path(csv_path) as csv_partial, atomic_path(png_path) as png_partial:
        with csv_partial.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        _plot(rows, base_row, recommended, png_partial, max_rouge_loss)
    return {"rows": rows, "baseline": base_row, "recommended": recommended, "csv": csv_path, "png": png_path,
            "runs": runs, "references": references}


def _plot(rows: list[dict], baseline: dict, recommended: dict | None, path: Path, max_rouge_loss: float) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers or in CI
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4.5))
    axes.scatter([r["speedup"] for r in rows], [r["rouge_l"] for r in rows], c="tab:blue", label="BiLD grid")
    front = sorted(pareto_front(rows), key=lambda r: r["speedup"])
    axes.plot([r["speedup"] for r in front], [r["rouge_l"] for r in front], "o-", c="tab:orange",
              label="Pareto front")
    axes.axhline(baseline["rouge_l"], c="gray", ls="--", label="large only")
    axes.axhline(baseline["rouge_l"] - max_rouge_loss, c="gray", ls=":", label=f"-{max_rouge_loss:g} ROUGE-L")
    if recommended:
        axes.scatter([recommended["speedup"]], [recommended["rouge_l"]], s=200, facecolors="none",
                     edgecolors="red", label=f"recommended ({_point(recommended)})")
    for row in rows:
        axes.annotate(_point(row), (row["speedup"], row["rouge_l"]), fontsize=6)
    axes.set_xlabel("speedup over large-only (wall clock)")
    axes.set_ylabel("ROUGE-L")
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _point(row: dict) -> str:
    return f"{row['fallback']:g}/{row['rollback']:g}/{row['max_draft']}"
