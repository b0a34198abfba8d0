"""The fallback, rollback and speculative rejection policies on hand-made logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

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
    falls_back = policies.fallback(_logits_with_probs(probs), jnp.float32(threshold))
    expected = [0.2 * i + 0.15 < threshold for i in range(5)]
    np.testing.assert_array_equal(np.asarray(falls_back), expected)


def _one_hot_logits(preferred, vocab=6):
    return jnp.asarray(np.eye(vocab)[np.asarray(preferred)] * BIG, jnp.float32)


def test_rollback_picks_first_token_over_threshold():
    # The large model prefers token 1 everywhere; drafts 1, 1, 3, 4: positions 2 and 3 disagree.
    logits = _one_hot_logits([[1, 1, 1, 1]])
    drafts = jnp.asarray([[1, 1, 3, 4]], jnp.int32)
    rolls_back, index = policies.first_rollback(logits, drafts, jnp.asarray([4]), jnp.float32(5.0))
    assert bool(rolls_back[0]) and int(index[0]) == 2


def test_rollback_ignores_drafts_past_the_row_count_and_padding():
    logits = _one_hot_logits([[1, 1, 1, 1], [2, 2, 2, 2]])
    drafts = jnp.asarray([[1, 1, 3, 4], [2, 5, 0, 0]], jnp.int32)
    rolls_back, index = policies.first_rollback(logits, drafts, jnp.asarray([2, 0]), jnp.float32(5.0))
    np.testing.assert_array_equal(np.asarray(rolls_back), [False, False])


def test_rollback_threshold_compares_negative_log_probability():
    # p_large(draft=0) = 0.05 -> -log p = 3.0; the large model's argmax is token 1 (p = 0.95).
    logits = _logits_with_probs([[[0.05, 0.95]]])
    drafts = jnp.asarray([[0]], jnp.int32)
    for threshold, expected in [(2.9, True), (3.1, False), (np.inf, False)]:
        rolls_back, _ = policies.first_rollback(logits, drafts, jnp.asarray([1]), jnp.float32(threshold))
        assert bool(rolls_back[0]) == expected


def test_equal_argmax_is_never_a_rollback():
    # A flat-ish distribution: the draft is the argmax but -log p = log(3) > threshold 0.5.
    logits = _logits_with_probs([[[0.34, 0.33, 0.33]]])
    drafts = jnp.asarray([[0]], jnp.int32)
    rolls_back, _ = policies.first_rollback(logits, drafts, jnp.asarray([1]), jnp.float32(0.5))
    assert not bool(rolls_back[0])
    disagrees, _ = policies.first_disagreement(logits, drafts, jnp.asarray([1]))
    assert not bool(disagrees[0])


def test_exact_rolls_back_any_disagreement():
    logits = _logits_with_probs([[[0.45, 0.55], [0.5, 0.5]]])
    drafts = jnp.asarray([[0, 0]], jnp.int32)  # -log 0.45 = 0.8, far below the threshold of 5
    lenient, _ = policies.first_rollback(logits, drafts, jnp.asarray([2]), jnp.float32(5.0))
    strict, index = policies.first_disagreement(logits, drafts, jnp.asarray([2]))
    assert not bool(lenient[0])
    assert bool(strict[0]) and int(index[0]) == 0


def test_sampled_rollback_judges_the_argmax_too():
    # When sampling, the replacement is a fresh draw, so a likely-but-unsure argmax draft is rolled back too.
    logits = _logits_with_probs([[[0.34, 0.33, 0.33]]])
    drafts = jnp.asarray([[0]], jnp.int32)  # the argmax, -log p = 1.08
    for threshold, expected in [(1.0, True), (1.2, False)]:
        rolls_back, _ = policies.first_rollback(logits, drafts, jnp.asarray([1]), jnp.float32(threshold),
                                                greedy=jnp.bool_(False))
        assert bool(rolls_back[0]) == expected


def _speculative(p_large, p_small, drafts, num_drafts, uniforms):
    return policies.first_rejection_speculative(_logits_with_probs(p_large), _logits_with_probs(p_small),
                                                jnp.asarray(drafts, jnp.int32), jnp.asarray(num_drafts),
                                                jnp.asarray(uniforms, jnp.float32))


def test_speculative_accepts_with_probability_ratio():
    # Draft 0 at each of 3 positions: p_large(0) / p_small(0) = 1 (accept always), 0.5, 0.5.
    p_small = [[[0.5, 0.5]] * 3]
    p_large = [[[0.6, 0.4], [0.25, 0.75], [0.25, 0.75]]]
    for uniforms, expected_index in [([0.99, 0.4, 0.0], None), ([0.99, 0.6, 0.0], 1), ([0.0, 0.1, 0.5], 2)]:
        rejects, index, residual = _speculative(p_large, p_small, [[0, 0, 0]], [3], [uniforms])
        assert bool(rejects[0]) == (expected_index is not None)
        if expected_index is not None:
            assert int(index[0]) == expected_index
            # norm(max(0, p_large - p_small)) = norm([0, 0.25]) = [0, 1]
            np.testing.assert_allclose(np.asarray(jax.nn.softmax(residual[0])), [0.0, 1.0], atol=1e-6)


def test_speculative_ignores_drafts_past_the_row_count():
    rejects, _, _ = _speculative([[[0.01, 0.99]] * 2], [[[0.99, 0.01]] * 2], [[1, 0]], [1], [[0.5, 0.5]])
    assert not bool(rejects[0])  # draft 1 is accepted (ratio 99); draft 0, which would be rejected, is padding


def test_speculative_residual_falls_back_to_p_large_without_mass():
    # Equal distributions: a forced rejection (u = 1 is outside [0, 1) but shows the fallback) has no residual.
    rejects, index, residual = _speculative([[[0.3, 0.7]]], [[[0.3, 0.7]]], [[1]], [1], [[1.0]])
    assert bool(rejects[0]) and int(index[0]) == 0
    np.testing.assert_allclose(np.asarray(jax.nn.softmax(residual[0])), [0.3, 0.7], atol=1e-6)


def test_speculative_rejection_keeps_the_large_distribution():
    """One position, many independent draws: y ~ p_small, accepted with min(1, p_large / p_small), else a
    resample from the residual. The result must follow p_large (the policy alone, without models)."""
    p_small = np.array([0.5, 0.3, 0.1, 0.1])
    p_large = np.array([0.1, 0.2, 0.3, 0.4])
    draws = 40_000
    key_draft, key_accept, key_resample = jax.random.split(jax.random.key(0), 3)
    drafts = jax.random.categorical(key_draft, jnp.log(jnp.asarray(p_small, jnp.float32)), shape=(draws,))
    uniforms = jax.random.uniform(key_accept, (draws, 1))
    rejects, _, residual = policies.first_rejection_speculative(
        jnp.broadcast_to(jnp.log(jnp.asarray(p_large, jnp.float32)), (draws, 1, 4)),
        jnp.broadcast_to(jnp.log(jnp.asarray(p_small, jnp.float32)), (draws, 1, 4)),
        drafts[:, None].astype(jnp.int32), jnp.ones((draws,), jnp.int32), uniforms)
    resampled = jax.random.categorical(key_resample, residual)
    out = np.asarray(jnp.where(rejects, resampled, drafts))
    counts = np.bincount(out, minlength=4)
    assert stats.chisquare(counts, p_large * draws).pvalue > 1e-3
    assert stats.chisquare(np.bincount(np.asarray(drafts), minlength=4), p_large * draws).pvalue < 1e-6


def test_tied_argmax_keeps_only_the_first_index():
    # Tokens 1 and 3 tie for the max: greedy decoding picks 1, so exact mode must reject a draft of 3.
    logits = jnp.asarray([[[0.0, 2.0, 0.0, 2.0], [0.0, 2.0, 0.0, 2.0]]], jnp.float32)
    disagrees, index = policies.first_disagreement(logits, jnp.asarray([[1, 3]], jnp.int32), jnp.asarray([2]))
    assert bool(disagrees[0]) and int(index[0]) == 1


@pytest.mark.parametrize("exact,sampled,rule", [(False, False, policies.bild_rule), (False, True, policies.bild_rule),
                                                (True, False, policies.exact_greedy_rule),
                                                (True, True, policies.speculative_rule)])
def test_rule_id_picks_the_rule(exact, sampled, rule):
    assert policies.RULES[int(policies.rule_id(jnp.bool_(exact), jnp.bool_(sampled)))] is rule
