"""The vocabulary reductions equal their jax.numpy references, ties and -inf included, in the native kernel
and in XLA's operations alike."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bild_jax import native_library, reductions
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


@pytest.mark.skipif(not native_library.available(), reason="no C++ compiler for the native kernels")
def test_native_log_normalizer_equals_xla_jitted_batched_and_differentiated():
    """The native kernel (any leading shape, a row length not a multiple of its 16 lanes) against XLA's
    operations: jitted, under vmap, its gradient; a row holding a NaN, one of all -inf and one with +inf
    give NaN log-sum-exps, as XLA's."""
    logits = jax.random.normal(jax.random.key(2), (2, 3, 4097)) * 8
    logits = logits.at[0, :, -1].set(40.0).at[1, :, -1].set(logits[1].max(-1))  # the max in the last, odd column
    assert "bild_log_normalizer" in jax.jit(log_normalizer).lower(logits).as_text()
    for got, want in zip(jax.jit(log_normalizer)(logits), reductions._log_normalizer(logits)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(jax.vmap(log_normalizer)(logits)[1]),
                               np.asarray(reductions._log_normalizer(logits)[1]), rtol=1e-6)
    grad = jax.grad(lambda x: log_normalizer(x)[1].sum())(logits)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(jax.nn.softmax(logits, axis=-1)), rtol=1e-5, atol=1e-7)
    odd = logits.at[0, 0, 9].set(jnp.nan).at[0, 1].set(-jnp.inf).at[1, 2, 4096].set(jnp.inf)
    peak, lse = jax.jit(log_normalizer)(odd)
    assert np.isnan(np.asarray(lse)).tolist() == [[True, True, False], [False, False, True]]
    assert float(peak[0, 1]) == -np.inf and float(peak[1, 2]) == np.inf
