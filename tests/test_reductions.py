"""The vocabulary reductions equal their jax.numpy references, ties and -inf included."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from bild_jax.reductions import argmax, log_normalizer


def test_argmax_equals_jnp_argmax_with_ties_and_masked_tokens():
    logits = jax.random.normal(jax.random.key(0), (3, 5, 257))
    logits = logits.at[0, 0, 7].set(9.0).at[0, 0, 200].set(9.0)   # a tie: the first index wins
    logits = logits.at[1].set(jnp.where(logits[1] > 0, logits[1], -jnp.inf))
    np.testing.assert_array_equal(np.asarray(argmax(logits)), np.asarray(jnp.argmax(logits, axis=-1)))
    assert int(argmax(logits)[0, 0]) == 7


def test_log_normalizer_is_max_and_logsumexp():
    logits = jax.random.normal(jax.random.key(1), (4, 1000)) * 20
    logits = logits.at[2, :500].set(-jnp.inf)
    peak, lse = log_normalizer(logits)
    np.testing.assert_array_equal(np.asarray(peak), np.asarray(logits.max(-1)))
    np.testing.assert_allclose(np.asarray(lse), np.asarray(jax.nn.logsumexp(logits, axis=-1)), rtol=1e-6)
