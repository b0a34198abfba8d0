"""What `bild-jax demo` and `sweep` measure: ROUGE-L, interleaved timing of systems, the table rows."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from bild_jax.evaluation import rouge_l, run_systems, summarize


def test_rouge_l_on_code_tokens():
    assert rouge_l("a.b(c)", "a.b(c)") == 1.0
    assert rouge_l("x = 1", "def f():") == 0.0
    assert rouge_l("", "x") == 0.0
    # candidate tokens [return, x, +, 1], reference [return, x]: LCS 2, F1 = 2 * 2 / (4 + 2).
    assert rouge_l("return x + 1", "return x") == pytest.approx(2 / 3)


@dataclasses.dataclass
class _Stats:
    fallbacks: np.ndarray


@dataclasses.dataclass
class _GreedyOutput:
    tokens: np.ndarray
    lengths: np.ndarray


@dataclasses.dataclass
class _BildOutput(_GreedyOutput):
    from_large: np.ndarray
    stats: _Stats


def test_systems_take_turns_prompt_by_prompt_after_compiling():
    calls = []

    def greedy(prompt):
        calls.append(("greedy", prompt[0][0]))
        return _GreedyOutput(tokens=np.array([[7, 8, 9]]), lengths=np.array([2]))

    def bild(prompt):
        calls.append(("bild", prompt[0][0]))
        return _BildOutput(tokens=np.array([[7, 8, 9]]), lengths=np.array([3]),
                           from_large=np.array([[True, False, False]]), stats=_Stats(np.array([prompt[0][0]])))

    seen = []
    greedy_run, bild_run = run_systems([("greedy", greedy), ("bild", bild)], [[1, 5], [2, 5]], on_call=seen.append)
    assert calls == [("greedy", 1), ("bild", 1), ("greedy", 1), ("bild", 1), ("greedy", 2), ("bild", 2)]
    assert seen == ["greedy", "bild"] * 3
    assert greedy_run.outputs == [[7, 8], [7, 8]] and greedy_run.from_large is None and greedy_run.stats == {}
    assert bild_run.outputs == [[7, 8, 9], [7, 8, 9]] and bild_run.from_large == [[True, False, False]] * 2
    assert bild_run.stats == {"fallbacks": 1 + 2}  # summed over the timed prompts, not the compiling call
    assert greedy_run.seconds > 0 and greedy_run.compile_seconds > 0


def test_table_row_compares_with_the_baseline():
    def fixed(outputs):
        return lambda prompt: _GreedyOutput(tokens=np.array([outputs[prompt[0][0]]]), lengths=np.array([2]))

    base, other = run_systems([("large", fixed({0: [1, 2], 1: [3, 4]})), ("small", fixed({0: [1, 2], 1: [5, 6]}))],
                              [[0], [1]])
    decode = lambda ids: " ".join(f"w{i}" for i in ids)  # noqa: E731
    row = summarize(other, base, ["w1 w2", "w3 w4"], decode)
    assert row["system"] == "small" and row["exact_match"] == 0.5
    assert row["rouge_l"] == pytest.approx(50.0)
    assert row["speedup"] == pytest.approx(base.seconds / other.seconds)
    assert summarize(base, base, ["w1 w2", "w3 w4"], decode)["speedup"] == 1.0
