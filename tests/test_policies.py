"""The fallback and rollback policies on hand-made logits."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from bild_jax import policies

BIG = 30.0  # a logit gap large enough that softmax is one-hot in float32


def _logits_with_probs(probs) -> jnp.ndarray:
    return jnp.log(jnp.asarray(probs, jnp.float32))


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.5, 0.6, 0.9, 1.0])
def test_fallback_fires_exactly_below_threshold(threshold):
    # Row i has max probability 0.2 * i + 0.15 (0.15 .. 0.95) on token i, the rest spread over 9 tokens.
    probs = []
    for i in range(5):
        top = 0.2 * i + 0.15
        row = np.full(10, (1 - top) / 9)
        row[i] = top
        probs.append(row)
    falls_back, draft = policies.fallback(_logits_with_probs(probs), jnp.float32(threshold))
    expected = [0.2 * i + 0.15 < threshold for i in range(5)]
    np.testing.assert_array_equal(np.asarray(falls_back), expected)
    np.testing.assert_array_equal(np.asarray(draft), np.arange(5))


def _one_hot_logits(preferred, vocab=6):
    return jnp.asarray(np.eye(vocab)[np.asarray(preferred)] * BIG, jnp.float32)


def test_rollback_picks_first_token_over_threshold():
    # The large model prefers token 1 everywhere; drafts 1, 1, 3, 4: positions 2 and 3 disagree.
    logits = _one_hot_logits([[1, 1, 1, 1]])
    drafts = jnp.asarray([[1, 1, 3, 4]], jnp.int32)
    rolls_back, index, replacement = policies.first_rollback(
        logits, drafts, jnp.asarray([4]), jnp.float32(5.0), jnp.bool_(False))
    assert bool(rolls_back[0]) and int(index[0]) == 2 and int(replacement[0]) == 1


def test_rollback_ignores_drafts_past_the_row_count_and_padding():
    logits = _one_hot_logits([[1, 1, 1, 1], [2, 2, 2, 2]])
    drafts = jnp.asarray([[1, 1, 3, 4], [2, 5, 0, 0]], jnp.int32)
    rolls_back, index, _ = policies.first_rollback(
        logits, drafts, jnp.asarray([2, 0]), jnp.float32(5.0), jnp.bool_(False))
    np.testing.assert_array_equal(np.asarray(rolls_back), [False, False])


def test_rollback_threshold_compares_negative_log_probability():
    # p_large(draft=0) = 0.05 -> -log p = 3.0; the large model's argmax is token 1 (p = 0.95).
    logits = _logits_with_probs([[[0.05, 0.95]]])
    drafts = jnp.asarray([[0]], jnp.int32)
    for threshold, expected in [(2.9, True), (3.1, False), (np.inf, False)]:
        rolls_back, _, replacement = policies.first_rollback(
            logits, drafts, jnp.asarray([1]), jnp.float32(threshold), jnp.bool_(False))
        assert bool(rolls_back[0]) == expected
        assert int(replacement[0]) == 1


def test_equal_argmax_is_never_a_rollback():
    # A flat-ish distribution: the draft is the argmax but -log p = log(3) > threshold 0.5.
    logits = _logits_with_probs([[[0.34, 0.33, 0.33]]])
    drafts = jnp.asarray([[0]], jnp.int32)
    for exact in (False, True):
        rolls_back, _, _ = policies.first_rollback(logits, drafts, jnp.asarray([1]), jnp.float32(0.5),
                                                   jnp.bool_(exact))
        assert not bool(rolls_back[0])


def test_exact_rolls_back_any_disagreement():
    logits = _logits_with_probs([[[0.45, 0.55], [0.5, 0.5]]])
    drafts = jnp.asarray([[0, 0]], jnp.int32)  # -log 0.45 = 0.8, far below the threshold of 5
    lenient, _, _ = policies.first_rollback(logits, drafts, jnp.asarray([2]), jnp.float32(5.0), jnp.bool_(False))
    strict, index, replacement = policies.first_rollback(logits, drafts, jnp.asarray([2]), jnp.float32(5.0),
                                                         jnp.bool_(True))
    assert not bool(lenient[0])
    assert bool(strict[0]) and int(index[0]) == 0 and int(replacement[0]) == 1
