"""Batched scheduling of the large model's passes: rows wait for a shared pass, drafts are limited, a call may
run the large model alone; none of it changes a row's output or exact mode's guarantee."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import bild_jax
from bild_jax import bild, sampling
from bild_jax.bild import BiLDConfig, bild_generate
from bild_jax.schedule import BatchSchedule, ScheduleTable, default_schedules, resolve

N = 16          # as in test_bild, so that the suite shares compiled programs
MAX_DRAFT = 8
SCHEDULES = [BatchSchedule(), BatchSchedule(draft_limit=1), BatchSchedule(draft_limit=2, wait_fraction=0.5, max_wait=1),
             BatchSchedule(wait_fraction=0.0)]
MODES = {"greedy": dict(), "exact": dict(exact=True), "sampled": dict(temperature=1.5),
         "exact sampled": dict(temperature=1.5, exact=True)}


def _prompts(vocab: int, lengths=(3, 9, 1, 6), seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, size=n).tolist() for n in lengths]


def _config(**changes) -> BiLDConfig:
    settings = dict(max_new_tokens=N, max_draft=MAX_DRAFT, fallback_threshold=0.4, rollback_threshold=1.0,
                    eos_token_id=[])
    return BiLDConfig(**{**settings, **changes})


@pytest.mark.parametrize("mode", list(MODES))
def test_batched_run_equals_each_row_alone_under_every_schedule(bild_pair, mode):
    small, large = bild_pair("llama")
    prompts = _prompts(large.vocab_size)
    key = jax.random.key(11)
    row_keys = sampling.row_keys(key, len(prompts))
    compiled = None
    for schedule in SCHEDULES:
        config = _config(schedule=schedule, **MODES[mode])
        batched = bild_generate(small, large, prompts, config, rng=key)
        assert batched.schedule == schedule
        assert int(np.asarray(batched.stats.small_tokens).sum()) > 0
        for row, prompt in enumerate(prompts):
            alone = bild_generate(small, large, [prompt], config, rng=row_keys[row:row + 1])
            np.testing.assert_array_equal(np.asarray(alone.tokens[0]), np.asarray(batched.tokens[row]))
            # Row-independent counters (the others count passes shared with, or split by, other rows).
            for name in ("small_tokens", "large_tokens", "rollbacks"):
                assert int(getattr(alone.stats, name)[0]) == int(getattr(batched.stats, name)[row]), name
        # Schedules are traced: one program per batch size for all of them.
        compiled = compiled or bild._bild_decode_jit._cache_size()
        assert bild._bild_decode_jit._cache_size() == compiled


def test_exact_mode_equals_large_greedy_at_batch_16(bild_pair):
    small, large = bild_pair("llama")
    prompts = _prompts(large.vocab_size, lengths=[1 + (3 * i) % 9 for i in range(16)], seed=3)
    expected = bild_jax.greedy_generate(large, prompts, max_new_tokens=N, eos_token_id=[])
    for schedule in (BatchSchedule(), BatchSchedule(draft_limit=2, wait_fraction=0.25, max_wait=2)):
        out = bild_generate(small, large, prompts, _config(exact=True, schedule=schedule))
        np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(expected.tokens))
        assert int(np.asarray(out.stats.small_tokens).sum()) > 0


@pytest.mark.parametrize("draft_limit", [1, 3])
def test_draft_limit_bounds_consecutive_small_tokens(bild_pair, draft_limit):
    """Never falling back or rolling back, the large model writes every (draft_limit + 1)-th token."""
    small, large = bild_pair("llama")
    out = bild_generate(small, large, _prompts(large.vocab_size),
                        _config(fallback_threshold=0.0, rollback_threshold=np.inf,
                                schedule=BatchSchedule(draft_limit=draft_limit)))
    np.testing.assert_array_equal(np.asarray(out.stats.large_tokens), -(-N // (draft_limit + 1)))


def test_waiting_rows_share_large_passes(bild_pair):
    """Rows that wait for each other need fewer passes than a pass whenever any row needs one."""
    small, large = bild_pair("llama")
    prompts = _prompts(large.vocab_size)
    eager = bild_generate(small, large, prompts, _config(schedule=BatchSchedule(wait_fraction=0.0)))
    waiting = bild_generate(small, large, prompts, _config(schedule=BatchSchedule(wait_fraction=1.0)))
    np.testing.assert_array_equal(np.asarray(waiting.tokens), np.asarray(eager.tokens))
    # A row takes part in the passes it asks for, and in other rows' passes that its drafts fit.
    assert int(np.asarray(waiting.stats.verify_passes).sum()) < int(np.asarray(eager.stats.verify_passes).sum())


@pytest.mark.parametrize("mode", ["greedy", "exact sampled"])
def test_large_only_schedule_decodes_with_the_large_model_alone(bild_pair, mode):
    small, large = bild_pair("llama")
    prompts = _prompts(large.vocab_size)
    key = jax.random.key(4)
    config = _config(schedule=BatchSchedule(large_only=True), **MODES[mode])
    out = bild_generate(small, large, prompts, config, rng=key if config.temperature else None)
    if config.temperature:
        expected = bild_jax.sample_generate(large, prompts, N, key, temperature=config.temperature, eos_token_id=[])
    else:
        expected = bild_jax.greedy_generate(large, prompts, N, eos_token_id=[])
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(expected.tokens))
    assert out.schedule.large_only and "large model alone" in out.schedule.describe()
    np.testing.assert_array_equal(np.asarray(out.stats.large_tokens), np.asarray(out.lengths))
    np.testing.assert_array_equal(np.asarray(out.stats.small_tokens), 0)
    assert np.asarray(out.from_large).sum() == np.asarray(out.lengths).sum()


def test_without_a_schedule_a_call_runs_the_builtin_table_entry_for_its_rows(bild_pair):
    """schedule None: the built-in table's entry for the call's number of rows (on a CPU, BiLD's loop for one
    row and the large model alone for four)."""
    small, large = bild_pair("llama")
    prompts = _prompts(large.vocab_size)
    for rows in (prompts[:1], prompts):
        assert bild_generate(small, large, rows, _config()).schedule == default_schedules().for_batch(len(rows))


def test_schedule_tables_pick_by_batch_size_and_round_trip(tmp_path):
    table = ScheduleTable(entries=((2, BatchSchedule(draft_limit=4)), (8, BatchSchedule(large_only=True))),
                          measured_on="test")
    assert [table.for_batch(b) for b in (1, 2, 7, 8, 64)] == [table.entries[0][1]] * 3 + [table.entries[1][1]] * 2
    table.save(tmp_path / "schedule.json")
    assert ScheduleTable.load(tmp_path / "schedule.json") == table
    assert resolve(table, 9).large_only and resolve(BatchSchedule(draft_limit=2), 9).draft_limit == 2
    assert resolve(None, 1) == default_schedules().for_batch(1) == BatchSchedule()
    # On this CPU shorter drafts win at 2 and 3 rows, and no schedule beat greedy decoding from batch 4 on (see
    # schedule.CPU_SCHEDULES).
    cpu = default_schedules("cpu")
    assert [cpu.for_batch(b).draft_limit for b in (1, 2, 3)] == [None, 5, 3]
    assert [cpu.for_batch(b).large_only for b in (1, 2, 3, 4, 16, 64)] == [False] * 3 + [True] * 3
    assert not default_schedules("gpu").for_batch(16).large_only
    policy = bild.BiLDPolicy.from_config(_config(schedule=table), bild_jax.prompts.eos_array(None, []), 2)
    assert int(policy.draft_limit) == 4 and int(policy.max_wait) == MAX_DRAFT + 1


@pytest.mark.parametrize("make,message", [
    (lambda: BatchSchedule(draft_limit=0), "draft_limit must be None or an int >= 1"),
    (lambda: BatchSchedule(max_wait=-1), "max_wait must be None or an int >= 0"),
    (lambda: BatchSchedule(wait_fraction=1.5), "wait_fraction must be in"),
    (lambda: BatchSchedule(wait_fraction=float("nan")), "wait_fraction must be in"),
    (lambda: ScheduleTable(entries=((4, BatchSchedule()), (2, BatchSchedule()))), "increasing batch sizes"),
    (lambda: ScheduleTable(entries=()), "increasing batch sizes"),
    (lambda: BiLDConfig(schedule="fast"), "schedule must be a BatchSchedule"),
])
def test_bad_schedules_are_refused(make, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        make()


def test_bad_schedule_files_are_refused(tmp_path):
    with pytest.raises(ValueError, match="no schedule table at"):
        ScheduleTable.load(tmp_path / "missing.json")
    for text in ("{", '{"entries": [{"draft_limit": 2}]}', '[1, 2]', '{"entries": [{"batch_size": 1, "speed": 3}]}'):
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(ValueError, match="is not a schedule table"):
            ScheduleTable.load(tmp_path / "bad.json")


def test_every_builtin_table_is_valid():
    for platform in ("cpu", "gpu", "tpu"):
        table = default_schedules(platform)
        assert table.for_batch(1) == BatchSchedule() and table.measured_on
