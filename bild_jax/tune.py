"""`bild-jax tune`: the sweep, its recommended point under a quality guard with the spread of that choice over
the prompts, and the pair profile that records it."""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from rich.console import Console

from bild_jax.errors import InputError
from bild_jax.evaluation import SystemRun, rouge_l_scores
from bild_jax.profile import PairProfile
from bild_jax.sweep import MAX_ROUGE_LOSS, run_sweep

RESAMPLES = 200  # bootstrap resamples of the prompts for the spread
NEAR_BEST = 0.95  # a pick is near the best of a resample when it is eligible and this fast relative to the best
UNSTABLE = 0.5   # below this share of resamples where the pick is near the best, the prompt set is too small


def choice_spread(runs: Sequence[SystemRun], references: Sequence[str], decode, max_rouge_loss: float,
                  picked: int, resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """How the recommendation moves with the prompt set: bootstrap resamples of the prompts (batch 1 runs:
    one timed batch per prompt), each picking the fastest point within `max_rouge_loss` ROUGE-L points of the
    large model (`runs[0]`; `runs[1:]` the grid). `picked` is the grid index chosen on all prompts.

    Returns {"stability": share of resamples that pick `picked` itself, "near_best": share in which `picked`
    is eligible and at least NEAR_BEST of the fastest eligible point's speedup (neighbouring grid points are
    often within noise of each other, so this is the share that says whether the choice holds), "speedup":
    [5th, 95th percentile] of its speedup, "rouge_l_loss": [5th, 95th percentile] of its ROUGE-L points below
    the large model}.
    """
    seconds = np.array([np.median(np.array(run.batch_seconds), axis=0) for run in runs])       # [S, prompts]
    if seconds.shape[1] != len(references):
        raise InputError("choice_spread needs batch-1 runs: one timed batch per prompt")
    scores = np.array([rouge_l_scores(run, references, decode) for run in runs])                 # [S, prompts]
    rng = np.random.default_rng(seed)
    same, near, speedups, losses = 0, 0, [], []
    for _ in range(resamples):
        rows = rng.integers(0, len(references), len(references))
        speedup = seconds[0, rows].sum() / seconds[1:, rows].sum(axis=1)                       # [S - 1]
        loss = scores[0, rows].mean() - scores[1:, rows].mean(axis=1)
        eligible = np.flatnonzero(loss <= max_rouge_loss)
        if len(eligible):
            same += eligible[np.argmax(speedup[eligible])] == picked
            near += picked in eligible and speedup[picked] >= NEAR_BEST * speedup[eligible].max()
        speedups.append(speedup[picked])
        losses.append(loss[picked])
    return {"stability": same / resamples, "near_best": near / resamples,
            "speedup": np.percentile(speedups, [5, 95]).tolist(),
            "rouge_l_loss": np.percentile(losses, [5, 95]).tolist()}


def tune(small, large, prompts: list[list[int]], references: list[str] | None, decode, *, fallbacks, rollbacks,
         max_drafts: Sequence[int], max_new_tokens: int, sweep_dir: Path, max_rouge_loss: float = MAX_ROUGE_LOSS,
         large_name: str = "", prompts_name: str = "", console: Console | None = None) -> dict:
    """Sweeps the pair (`bild_jax.sweep.run_sweep`) and turns the recommended point into a `PairProfile`.

    Quality is ROUGE-L against `references` (the prompts' real continuations) when given, else against the
    large model's own output. Returns the sweep's result with "profile" (None when no point is within
    `max_rouge_loss`) and "spread" (`choice_spread`) added; `recommend` gives the profile under another loss.
    """
    result = run_sweep(small, large, prompts, references, decode, fallbacks, rollbacks, max_new_tokens, max_drafts,
                       sweep_dir, console=console, max_rouge_loss=max_rouge_loss)
    result["with_references"] = references is not None
    profile, spread = recommend(result, decode, max_rouge_loss, large_name=large_name, prompts_name=prompts_name,
                                max_new_tokens=max_new_tokens, small_dtype=jnp.dtype(small.dtype).name)
    result.update(profile=profile, spread=spread)
    return result


def recommend(result: dict, decode, max_rouge_loss: float, *, large_name: str = "", prompts_name: str = "",
              max_new_tokens: int, small_dtype: str) -> tuple[PairProfile | None, dict | None]:
    """(profile, spread) of a `tune` result's fastest grid point within `max_rouge_loss` ROUGE-L points of
    large-only; (None, None) when no point is. One sweep gives profiles for several allowed losses."""
    base = result["baseline"]
    eligible = [row for row in result["rows"] if row["rouge_l"] >= base["rouge_l"] - max_rouge_loss]
    if not eligible:
        return None, None
    best = max(eligible, key=lambda row: row["speedup"])
    spread = choice_spread(result["runs"], result["references"], decode, max_rouge_loss, result["rows"].index(best))
    quality = {"metric": "ROUGE-L", "reference": "continuations" if result["with_references"] else "large model output",
               "bild": best["rouge_l"], "large": base["rouge_l"], "max_loss": max_rouge_loss,
               "exact_match": best["exact_match"], "stability": spread["stability"], "near_best": spread["near_best"],
               "speedup_p5_p95": spread["speedup"], "loss_p5_p95": spread["rouge_l_loss"], "resamples": RESAMPLES}
    device = jax.devices()[0]
    measured_on = {"large": large_name, "small_dtype": small_dtype, "prompts": prompts_name,
                   "num_prompts": len(result["references"]), "max_new_tokens": max_new_tokens, "batch_size": 1,
                   "decoding": "greedy",
                   "device": f"{device.device_kind} ({os.cpu_count()} CPU cores)",
                   "date": datetime.date.today().isoformat(), "bild_jax": _version()}
    return PairProfile(fallback_threshold=float(best["fallback"]), rollback_threshold=float(best["rollback"]),
                       max_draft=int(best["max_draft"]), speedup=best["speedup"], quality=quality,
                       measured_on=measured_on), spread


def _version() -> str:
    from bild_jax import __version__

    return __version__
