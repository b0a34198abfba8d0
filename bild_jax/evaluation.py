"""Timing and scoring generation systems on a prompt set: what `bild-jax demo` and `sweep` report, and the
timing loop of the experiments (`experiments/bench.py`, `experiments/reproduce.py`).

A `System` is a name, a `generate(batch)` function and a `read(output)` adapter that turns what `generate`
returns into `Rows` (bild-jax outputs by default; the experiments pass adapters for HF PyTorch outputs).
`run_systems` times the systems taking turns batch by batch after compiling calls timed apart, and returns one
`SystemRun` per system; `summarize`, `exact_match` and `per_token` turn runs into report figures.
"""

from __future__ import annotations

import dataclasses
import re
import statistics
import time
from typing import Any, Callable, Hashable, Sequence

import jax
import numpy as np

from bild_jax.prompts import bucket_length

_WORD = re.compile(r"\w+|[^\w\s]")
BOOTSTRAP_RESAMPLES = 1000


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


@dataclasses.dataclass(frozen=True)
class Rows:
    """What one call generated, row by row, as plain Python values."""

    tokens: list[list[int]]                        # per row: the generated ids, up to its length
    from_large: list[list[bool]] | None = None     # per row and token: the large model wrote it (BiLD only)
    stats: dict[str, int] = dataclasses.field(default_factory=dict)  # BiLD counters summed over the rows


def read_output(out) -> Rows:
    """`Rows` of a bild-jax `GenerateOutput` or `BiLDOutput` (tokens [B, N], lengths [B], and for BiLD
    from_large [B, N] and per-row counters `stats` [B] each)."""
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    rows = [tokens[row, :n].tolist() for row, n in enumerate(lengths)]
    if not hasattr(out, "stats"):
        return Rows(rows)
    from_large = np.asarray(out.from_large)
    return Rows(rows, [from_large[row, :n].tolist() for row, n in enumerate(lengths)],
                {key: int(np.asarray(value).sum()) for key, value in dataclasses.asdict(out.stats).items()})


@dataclasses.dataclass(frozen=True)
class System:
    """One way of generating: `generate(batch)` takes a list of prompts (lists of token ids) and returns an
    output that `read` turns into `Rows` (default: a bild-jax output)."""

    name: str
    generate: Callable[[list[list[int]]], Any]
    read: Callable[[Any], Rows] = read_output


@dataclasses.dataclass(frozen=True)
class FirstCall:
    """A system's first call on one batch shape, and its steady call on the same batch right after."""

    seconds: float          # compilation included
    steady_seconds: float

    @property
    def compile_seconds(self) -> float:
        """What the first call cost beyond a steady call: compilation and first-run setup."""
        return max(self.seconds - self.steady_seconds, 0.0)


@dataclasses.dataclass
class SystemRun:
    """One system's outputs over a prompt set and its timings."""

    name: str
    outputs: list[list[int]] = dataclasses.field(default_factory=list)   # per prompt, from the first pass
    batch_seconds: list[list[float]] = dataclasses.field(default_factory=list)  # per pass, per batch: steady state
    first_calls: dict[Hashable, FirstCall] = dataclasses.field(default_factory=dict)  # by batch shape
    from_large: list[list[bool]] | None = None                           # per prompt and token (BiLD only)
    stats: dict[str, int] = dataclasses.field(default_factory=dict)      # BiLD counters summed over prompts

    @property
    def num_tokens(self) -> int:
        """Tokens generated over the prompt set (one pass)."""
        return sum(len(o) for o in self.outputs)

    @property
    def pass_seconds(self) -> list[float]:
        """Per pass over the prompts: the steady-state seconds of its batches."""
        return [sum(batches) for batches in self.batch_seconds]

    @property
    def seconds(self) -> float:
        """One pass over the prompt set, compilation excluded: the median over passes."""
        return float(statistics.median(self.pass_seconds))

    @property
    def tokens_per_s(self) -> float:
        """Tokens generated per second of steady-state time."""
        return self.num_tokens / self.seconds

    @property
    def first_call_seconds(self) -> float:
        """The first calls, one per batch shape, compilation included."""
        return sum(call.seconds for call in self.first_calls.values())

    @property
    def compile_seconds(self) -> float:
        """The first calls less a steady call each: what compilation added."""
        return sum(call.compile_seconds for call in self.first_calls.values())

    def add(self, rows: Rows) -> None:
        """Appends the rows of one call."""
        self.outputs += rows.tokens
        if rows.from_large is not None:
            self.from_large = (self.from_large or []) + rows.from_large
        for key, value in rows.stats.items():
            self.stats[key] = self.stats.get(key, 0) + value


def timed(fn: Callable, *args) -> tuple[Any, float]:
    """(result, seconds) of `fn(*args)`, waiting for every JAX array of the result (dispatch is asynchronous);
    other results (a torch tensor) are returned as they are."""
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - start


def padded_shape(batch: Sequence[Sequence[int]]) -> tuple[int, int]:
    """(rows, prompt bucket): what fixes the compiled program of a bild-jax call on `batch`, given the system."""
    return len(batch), bucket_length(max(len(p) for p in batch))


def run_systems(systems: Sequence[System | tuple[str, Callable]], prompts: Sequence[Sequence[int]],
                on_call: Callable[[str], None] | None = None, *, batch_size: int = 1, repeats: int = 1,
                batch_shape: Callable[[list[list[int]]], Hashable] | None = None) -> list[SystemRun]:
    """Runs every system on `prompts` (lists of token ids), cut into batches of `batch_size` (the last one may be
    smaller), `repeats` times; returns one `SystemRun` per system, in order.

    `systems`: `System`s, or (name, generate) pairs for bild-jax outputs. Each system makes a first call on the
    first batch, timed apart (compilation); then the systems take turns batch by batch, so that a machine
    getting slower or faster mid-run shifts every system alike instead of skewing the speedups. With
    `batch_shape` (e.g. `padded_shape`), every batch whose shape a system has not seen gets such a first call
    too; without, only the first batch does. `SystemRun.batch_seconds` holds each pass's batch times (its
    `seconds` is the median of the pass totals) and `outputs`, `from_large`, `stats` come from the first
    pass. `on_call(name)` follows every call, first calls included.
    """
    systems = [s if isinstance(s, System) else System(*s) for s in systems]
    runs = [SystemRun(s.name) for s in systems]
    batches = [[list(p) for p in prompts[i:i + batch_size]] for i in range(0, len(prompts), batch_size)]
    for repeat in range(repeats):
        for run in runs:
            run.batch_seconds.append([])
        for batch in batches:
            shape = batch_shape(batch) if batch_shape else None
            first_seconds = {}  # system index -> its first call on this shape
            for index, (system, run) in enumerate(zip(systems, runs)):
                if shape not in run.first_calls:
                    _, first_seconds[index] = timed(system.generate, batch)
                    if on_call:
                        on_call(run.name)
            for index, (system, run) in enumerate(zip(systems, runs)):
                out, seconds = timed(system.generate, batch)
                run.batch_seconds[-1].append(seconds)
                if index in first_seconds:
                    run.first_calls[shape] = FirstCall(first_seconds[index], seconds)
                if repeat == 0:
                    run.add(system.read(out))
                if on_call:
                    on_call(run.name)
    return runs


def exact_match(run: SystemRun, other: SystemRun) -> float:
    """The fraction of prompts on which the two runs generated the same tokens."""
    return float(np.mean([a == b for a, b in zip(run.outputs, other.outputs)]))


def per_token(run: SystemRun) -> dict[str, float]:
    """Every BiLD counter of `run.stats` per generated token (empty for greedy runs)."""
    tokens = max(run.num_tokens, 1)
    return {key: value / tokens for key, value in run.stats.items()}


def rouge_l_scores(run: SystemRun, references: Sequence[str], decode: Callable) -> np.ndarray:
    """[prompts] float64: ROUGE-L (x 100) of each output, `decode(ids)`, against its reference text."""
    return np.array([100 * rouge_l(decode(o), r) for o, r in zip(run.outputs, references)])


def paired_change_interval(scores: np.ndarray, base_scores: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES,
                           seed: int = 0) -> tuple[float, float]:
    """The 5th and 95th percentiles of mean(scores) - mean(base_scores) over bootstrap resamples of the prompts,
    each resample taking the same prompts from both ([prompts] float arrays): how much of a change the prompt set
    can resolve. Pairing matters: most of the per-prompt spread is the prompts', shared by both systems."""
    differences = np.asarray(scores, np.float64) - np.asarray(base_scores, np.float64)         # [prompts]
    rows = np.random.default_rng(seed).integers(0, len(differences), (resamples, len(differences)))
    low, high = np.percentile(differences[rows].mean(axis=1), [5, 95])
    return float(low), float(high)


def summarize(run: SystemRun, baseline: SystemRun, references: Sequence[str], decode: Callable) -> dict:
    """One table row: speed vs the baseline (the large model alone), agreement with it, ROUGE-L (x 100, averaged)
    of `decode(ids)` against the reference texts, its change from the baseline's with that change's
    `paired_change_interval` ("rouge_l_change_low" / "_high"), and the first call's seconds as "compile_s"."""
    scores, base_scores = rouge_l_scores(run, references, decode), rouge_l_scores(baseline, references, decode)
    change_low, change_high = paired_change_interval(scores, base_scores)
    row = {
        "system": run.name,
        "tokens_per_s": run.tokens_per_s,
        "speedup": baseline.seconds / run.seconds,
        "exact_match": exact_match(run, baseline),
        "rouge_l": float(scores.mean()),
        "rouge_l_change": float(scores.mean() - base_scores.mean()),
        "rouge_l_change_low": change_low,
        "rouge_l_change_high": change_high,
        "compile_s": run.first_call_seconds,
    }
    if run.stats:
        rates = per_token(run)
        row.update(fallback_rate=rates["fallbacks"], rollback_rate=rates["rollbacks"],
                   large_calls_per_token=rates["large_calls"])
    return row
