"""BiLD's two policies as pure functions of logits: fallback (small model unsure) and rollback (large model
disagrees with a draft token)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def fallback(small_logits: jax.Array, fallback_threshold: jax.Array) -> tuple[jax.Array, jax.Array]:
    """small_logits [B, V] float32 -> (falls_back [B] bool, draft [B] int32).

    The small model falls back to the large one when its confidence, max softmax probability, is below
    the threshold; otherwise its argmax becomes a draft token.
    """
    confidence = jnp.max(jax.nn.softmax(small_logits, axis=-1), axis=-1)
    return confidence < fallback_threshold, jnp.argmax(small_logits, axis=-1).astype(jnp.int32)


def first_rollback(large_logits: jax.Array, drafts: jax.Array, num_drafts: jax.Array,
                   rollback_threshold: jax.Array, exact: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Finds the first draft token that the large model rejects.

    large_logits [B, D, V] float32: row b's logits at index i are the large model's prediction for
    drafts[b, i] [B, D] int32; only the first num_drafts[b] [B] int32 drafts are real. Token i is rejected
    when it differs from the large model's argmax and either -log p_large(token) > rollback_threshold or
    `exact` [] bool is set. Returns (rolls_back [B] bool, index [B] int32 of the first rejected draft,
    replacement [B] int32 = the large model's argmax there).
    """
    log_probs = jax.nn.log_softmax(large_logits, axis=-1)
    distance = -jnp.take_along_axis(log_probs, drafts[..., None], axis=-1)[..., 0]
    preferred = jnp.argmax(large_logits, axis=-1).astype(jnp.int32)
    real = jnp.arange(drafts.shape[1])[None, :] < num_drafts[:, None]
    rejected = real & (drafts != preferred) & ((distance > rollback_threshold) | exact)
    index = jnp.argmax(rejected, axis=-1).astype(jnp.int32)
    replacement = jnp.take_along_axis(preferred, index[:, None], axis=-1)[:, 0]
    return rejected.any(axis=-1), index, replacement
