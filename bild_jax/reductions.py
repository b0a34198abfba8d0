"""Reductions over the vocabulary that decode loops run every step, written for XLA:CPU's fast kernels.

`jnp.argmax` lowers to a variadic (value, index) reduce that XLA:CPU runs about 5x slower than a plain max
(a 4096-token row: ~19 us against ~3 us here); two single-output reductions give the same answer. The
normalizer spares `log_softmax`/`softmax`, which write a full [..., V] array where one number per row is read.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def argmax(logits: jax.Array) -> jax.Array:
    """logits [..., V] float -> [...] int32: the first index of the maximum, as `jnp.argmax`.

    The index is found as the minimum over a float iota where the row reaches its max (exact for V < 2**24).
    A row holding NaN yields the last index instead of the NaN's.
    """
    vocab = logits.shape[-1]
    peak = jnp.max(logits, axis=-1, keepdims=True)
    index = lax.broadcasted_iota(jnp.float32, logits.shape, logits.ndim - 1)
    first = jnp.min(jnp.where(logits == peak, index, jnp.float32(vocab - 1)), axis=-1)
    return first.astype(jnp.int32)


def log_normalizer(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """logits [..., V] float32 -> (max [...], log-sum-exp [...]) float32, so that log p(t) = logits[t] - lse
    and the most likely token's probability is exp(max - lse)."""
    peak = jnp.max(logits, axis=-1)
    lse = peak + jnp.log(jnp.sum(jnp.exp(logits - peak[..., None]), axis=-1))
    return peak, lse
