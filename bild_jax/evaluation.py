"""Timing and scoring generation systems on a prompt set: what `bild-jax demo` and `sweep` report."""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Callable, Sequence

import jax
import numpy as np

_WORD = re.compile(r"\w+|[^\w\s]")


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 in [0, 1] over word and punctuation tokens (code-friendly: `a.b(c)` is 6 tokens)."""
    a, b = _WORD.findall(candidate), _WORD.findall(reference)
    if not a or not b:
        return 0.0
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0]
        for j, other in enumerate(b):
            current.append(previous[j] + 1 if token == other else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    return 0.0 if lcs == 0 else 2 * lcs / (len(a) + len(b))


@dataclasses.dataclass
class SystemRun:
    """One system's outputs over a prompt set, generated one prompt at a time (batch 1)."""

    name: str
    outputs: list[list[int]]
    seconds: float                  # steady state: compilation excluded
    compile_seconds: float          # the first call, compilation included
    from_large: list[list[bool]] | None = None
    stats: dict[str, int] = dataclasses.field(default_factory=dict)  # BiLD counters summed over prompts

    @property
    def num_tokens(self) -> int:
        return sum(len(o) for o in self.outputs)


def run_systems(systems: Sequence[tuple[str, Callable]], prompts: Sequence[Sequence[int]],
                on_call: Callable[[str], None] | None = None) -> list[SystemRun]:
    """Runs each (name, generate) system, `generate([prompt])` returning a greedy or BiLD output, on every
    prompt at batch 1. Each system's first call (compilation) is timed apart; then the systems take turns
    prompt by prompt, so that a machine getting slower or faster mid-run shifts every system alike instead
    of skewing the speedups. `on_call(name)` follows every call."""
    runs = []
    for name, generate in systems:
        start = time.perf_counter()
        jax.block_until_ready(generate([list(prompts[0])]))
        runs.append(SystemRun(name=name, outputs=[], seconds=0.0, compile_seconds=time.perf_counter() - start))
        if on_call:
            on_call(name)
    for prompt in prompts:
        for run, (_, generate) in zip(runs, systems):
            start = time.perf_counter()
            out = jax.block_until_ready(generate([list(prompt)]))
            run.seconds += time.perf_counter() - start
            _record(run, out)
            if on_call:
                on_call(run.name)
    return runs


def _record(run: SystemRun, out) -> None:
    """Appends row 0 of a greedy or BiLD output to `run`."""
    n = int(out.lengths[0])
    run.outputs.append([int(t) for t in out.tokens[0, :n]])
    if hasattr(out, "stats"):
        run.from_large = (run.from_large or []) + [[bool(x) for x in np.asarray(out.from_large[0, :n])]]
        for key, value in dataclasses.asdict(out.stats).items():
            run.stats[key] = run.stats.get(key, 0) + int(value[0])


def summarize(run: SystemRun, baseline: SystemRun, references: Sequence[str], decode: Callable) -> dict:
    """One table row: speed vs the baseline (the large model alone), agreement with it, ROUGE-L vs references."""
    texts = [decode(o) for o in run.outputs]
    row = {
        "system": run.name,
        "tokens_per_s": run.num_tokens / run.seconds,
        "speedup": baseline.seconds / run.seconds,
        "exact_match": float(np.mean([o == b for o, b in zip(run.outputs, baseline.outputs)])),
        "rouge_l": 100 * float(np.mean([rouge_l(t, r) for t, r in zip(texts, references)])),
        "compile_s": run.compile_seconds,
    }
    if run.stats:
        tokens = max(run.num_tokens, 1)
        row.update(fallback_rate=run.stats["fallbacks"] / tokens, rollback_rate=run.stats["rollbacks"] / tokens,
                   large_calls_per_token=run.stats["large_calls"] / tokens)
    return row
