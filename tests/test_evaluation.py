"""The timing and scoring machinery of `bild-jax demo`, `sweep` and the experiment scripts: ROUGE-L, systems
taking turns after compiling calls timed apart, batches and batch shapes, repeats and medians, output adapters,
the table rows."""

from __future__ import annotations

import dataclasses
import types

import numpy as np
import pytest

from bild_jax import evaluation
from bild_jax.evaluation import (FirstCall, Rows, System, exact_match, padded_shape, paired_change_interval, per_token,
                                 read_output, rouge_l, run_systems, summarize)


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
    assert len(greedy_run.pass_seconds) == 1 and greedy_run.seconds == greedy_run.pass_seconds[0] > 0
    assert list(greedy_run.first_calls) == [None]  # one compiling call, on the first prompt
    assert greedy_run.first_call_seconds == greedy_run.first_calls[None].seconds > 0


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
    # Per prompt: 0 and -100 points; each resample's change is the mean over 2 prompts drawn from those.
    assert row["rouge_l_change"] == pytest.approx(-50.0)
    assert row["rouge_l_change_low"] == -100.0 and row["rouge_l_change_high"] == 0.0
    same = summarize(base, base, ["w1 w2", "w3 w4"], decode)
    assert same["speedup"] == 1.0 and same["rouge_l_change"] == same["rouge_l_change_low"] == 0.0


def test_paired_change_interval_resamples_the_same_prompts_from_both():
    prompts = np.linspace(0.0, 90.0, 64)  # scores that differ a lot from prompt to prompt
    # A system 2 points below on every prompt: the pairing takes the prompts' spread out, so the change is exact.
    assert paired_change_interval(prompts - 2.0, prompts) == pytest.approx((-2.0, -2.0))
    changes = np.where(np.arange(64) % 2 == 0, -4.0, 0.0)  # -4 on half of the prompts: a mean change of -2
    low, high = paired_change_interval(prompts + changes, prompts)
    assert -4.0 < low < -2.0 < high < 0.0
    assert paired_change_interval(prompts + changes, prompts, seed=1) != (low, high)  # a resampling, seeded
    assert paired_change_interval(prompts + changes, prompts) == (low, high)


@dataclasses.dataclass
class _FullStats:
    fallbacks: np.ndarray
    rollbacks: np.ndarray
    large_calls: np.ndarray


class _Clock:
    """A fake `time.perf_counter`: only the systems' calls move it, by the seconds they are given."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = _Clock()
    monkeypatch.setattr(evaluation, "time", types.SimpleNamespace(perf_counter=fake))
    return fake


def _timed_system(name: str, clock: _Clock, durations: list[float], calls: list):
    """A greedy system whose calls take `durations` seconds in turn, logging (name, first id of each prompt) to
    `calls`; every row of a batch of n prompts generates the one token 10 + n."""
    durations = iter(durations)

    def generate(batch):
        calls.append((name, [p[0] for p in batch]))
        clock.now += next(durations)
        return _GreedyOutput(tokens=np.full((len(batch), 2), 10 + len(batch)), lengths=np.ones(len(batch), int))

    return generate


def test_first_calls_are_timed_apart_and_repeats_give_medians(clock):
    calls = []
    # Each system: a compiling first call, then 2 repeats x 2 batches of 2 prompts (the last batch has one).
    a = _timed_system("a", clock, [10.0, 1.0, 2.0, 5.0, 1.0], calls)
    b = _timed_system("b", clock, [20.0, 3.0, 1.0, 1.0, 1.0], calls)
    run_a, run_b = run_systems([("a", a), System("b", b)], [[1], [2], [3]], batch_size=2, repeats=2)
    # Compiling calls first, on the first batch; then turns batch by batch, in every repeat.
    assert calls == [("a", [1, 2]), ("b", [1, 2]), ("a", [1, 2]), ("b", [1, 2]), ("a", [3]), ("b", [3]),
                     ("a", [1, 2]), ("b", [1, 2]), ("a", [3]), ("b", [3])]
    assert run_a.pass_seconds == [3.0, 6.0] and run_a.seconds == 4.5  # the median over passes
    assert run_b.pass_seconds == [4.0, 2.0] and run_b.seconds == 3.0
    assert run_a.first_calls == {None: FirstCall(10.0, 1.0)} and run_a.first_call_seconds == 10.0
    assert run_a.compile_seconds == 9.0 and run_b.compile_seconds == 17.0  # first call less the steady call
    # Outputs come from the first pass only: one per prompt, not one per prompt and repeat.
    assert run_a.outputs == [[12], [12], [11]] and run_a.num_tokens == 3
    assert run_a.tokens_per_s == 3 / 4.5


def test_a_new_batch_shape_gets_its_own_first_call(clock):
    calls = []
    a = _timed_system("a", clock, [4.0, 1.0, 1.0, 3.0, 2.0, 1.0], calls)
    b = _timed_system("b", clock, [1.0] * 6, calls)
    prompts = [[1] * 3, [2] * 5, [3] * 20, [4] * 2]  # buckets 8, 8, 32, 8
    run_a, _ = run_systems([("a", a), ("b", b)], prompts, batch_shape=padded_shape)
    assert calls == [("a", [1]), ("b", [1]), ("a", [1]), ("b", [1]), ("a", [2]), ("b", [2]),
                     ("a", [3]), ("b", [3]), ("a", [3]), ("b", [3]), ("a", [4]), ("b", [4])]
    assert run_a.first_calls == {(1, 8): FirstCall(4.0, 1.0), (1, 32): FirstCall(3.0, 2.0)}
    assert run_a.pass_seconds == [1.0 + 1.0 + 2.0 + 1.0]  # steady calls only
    assert run_a.first_call_seconds == 7.0 and run_a.compile_seconds == 3.0 + 1.0
    assert padded_shape([[1] * 17, [2]]) == (2, 32)


def test_read_adapters_record_every_row():
    out = _BildOutput(tokens=np.array([[1, 2, 3], [4, 5, 6]]), lengths=np.array([1, 3]),
                      from_large=np.array([[True, False, False], [False, True, False]]),
                      stats=_Stats(np.array([2, 3])))
    assert read_output(out) == Rows([[1], [4, 5, 6]], [[True], [False, True, False]], {"fallbacks": 5})
    assert read_output(_GreedyOutput(np.array([[7, 8]]), np.array([1]))) == Rows([[7]])

    # An adapter for another library's output, e.g. a token matrix cut at EOS 0, as experiments/bench.py does
    # for HF transformers.
    def matrix_rows(tokens: np.ndarray) -> Rows:
        return Rows([row[:list(row).index(0) + 1].tolist() if 0 in row else row.tolist() for row in tokens])

    other = System("other", lambda batch: np.array([[p[0], 0, 9] for p in batch]), matrix_rows)
    bild = System("bild", lambda batch: out)
    other_run, bild_run = run_systems([other, bild], [[5], [6]], batch_size=2)
    assert other_run.outputs == [[5, 0], [6, 0]] and other_run.stats == {} and other_run.from_large is None
    assert bild_run.outputs == [[1], [4, 5, 6]] and bild_run.stats == {"fallbacks": 5}
    assert exact_match(other_run, bild_run) == 0.0 and exact_match(bild_run, bild_run) == 1.0
    assert per_token(bild_run) == {"fallbacks": 5 / 4} and per_token(other_run) == {}


def test_bild_rows_carry_per_token_rates_in_a_fixed_column_order():
    def bild(prompt):
        return _BildOutput(tokens=np.array([[1, 2, 3, 4]]), lengths=np.array([4]),
                           from_large=np.zeros((1, 4), bool),
                           stats=_FullStats(np.array([2]), np.array([1]), np.array([3])))

    greedy = lambda prompt: _GreedyOutput(tokens=np.array([[1, 2, 3, 4]]), lengths=np.array([4]))  # noqa: E731
    base, run = run_systems([("large", greedy), ("BiLD", bild)], [[0], [1]])
    decode = lambda ids: " ".join(map(str, ids))  # noqa: E731
    row = summarize(run, base, ["1 2 3 4", "1 2"], decode)
    # The columns of `bild-jax sweep`'s CSV, in order.
    assert list(row) == ["system", "tokens_per_s", "speedup", "exact_match", "rouge_l", "rouge_l_change",
                         "rouge_l_change_low", "rouge_l_change_high", "compile_s", "fallback_rate", "rollback_rate",
                         "large_calls_per_token"]
    assert row["fallback_rate"] == 4 / 8 and row["rollback_rate"] == 2 / 8 and row["large_calls_per_token"] == 6 / 8
    assert row["exact_match"] == 1.0 and row["tokens_per_s"] == pytest.approx(8 / run.seconds)
    assert row["compile_s"] == run.first_call_seconds  # the first call, compilation included
    assert row["rouge_l"] == pytest.approx(100 * (1.0 + 2 * 2 / 6) / 2)
    assert list(summarize(base, base, ["1 2 3 4", "1 2"], decode)) == list(row)[:9]
