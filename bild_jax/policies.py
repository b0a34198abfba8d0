"""BiLD's accept/reject decisions as pure functions of logits: fallback (small model unsure), rollback (large
model disagrees with a draft token) and, for exact sampling, speculative rejection."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def fallback(small_logits: jax.Array, fallback_threshold: jax.Array) -> jax.Array:
    """small_logits [B, V] float32 (processed when sampling) -> falls_back [B] bool.

    The small model falls back to the large one when its confidence, max softmax probability, is below
    the threshold; otherwise it drafts a token (`sampling.sample`: its argmax when greedy).
    """
    return jnp.max(jax.nn.softmax(small_logits, axis=-1), axis=-1) < fallback_threshold


def first_rollback(large_logits: jax.Array, drafts: jax.Array, num_drafts: jax.Array, rollback_threshold: jax.Array,
                   exact: jax.Array, greedy: jax.Array = True) -> tuple[jax.Array, jax.Array]:
    """Finds the first draft token that the large model rolls back (BiLD's rule).

    large_logits [B, D, V] float32 (processed when sampling): row b's logits at index i are the large
    model's prediction for drafts[b, i] [B, D] int32; only the first num_drafts[b] [B] int32 drafts are
    real. Token i is rejected when -log p_large(token) > rollback_threshold, or always with `exact` [] bool;
    but in greedy decoding (`greedy` [] bool) never when it is the large model's argmax, which would replace
    it by itself. Returns (rolls_back [B] bool, index [B] int32 of the first rejected draft). Exact
    *sampling* uses `first_rejection_speculative` instead.
    """
    log_probs = jax.nn.log_softmax(large_logits, axis=-1)
    distance = -jnp.take_along_axis(log_probs, drafts[..., None], axis=-1)[..., 0]
    preferred = jnp.argmax(large_logits, axis=-1).astype(jnp.int32)
    rejected = ((distance > rollback_threshold) | exact) & ((drafts != preferred) | ~jnp.asarray(greedy))
    return _first(rejected, num_drafts)


def first_rejection_speculative(large_logits: jax.Array, small_logits: jax.Array, drafts: jax.Array,
                                num_drafts: jax.Array, uniforms: jax.Array
                                ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Speculative rejection sampling (Leviathan et al., 2023; Chen et al., 2023): the first rejected draft
    and the distribution to resample it from.

    large_logits, small_logits [B, D, V] float32: the processed distributions p_large and p_small at each
    draft; drafts [B, D] int32, drafts[b, i] drawn from p_small[b, i]; only the first num_drafts[b] [B]
    int32 are real; uniforms [B, D] float32 in [0, 1). Draft y is accepted with probability
    min(1, p_large(y) / p_small(y)), i.e. when u * p_small(y) < p_large(y). Returns (rejects [B] bool,
    index [B] int32 of the first rejected draft, residual [B, V] float32 logits of
    norm(max(0, p_large - p_small)) there). Resampling the rejected draft from the residual, dropping the
    later ones, and drawing the token after fully accepted drafts from p_large makes every output token
    distributed as under p_large alone.
    """
    p_large, p_small = jax.nn.softmax(large_logits, axis=-1), jax.nn.softmax(small_logits, axis=-1)

    def at_drafts(probs):
        return jnp.take_along_axis(probs, drafts[..., None], axis=-1)[..., 0]

    rejects, index = _first(uniforms * at_drafts(p_small) >= at_drafts(p_large), num_drafts)

    def at_index(x):
        return jnp.take_along_axis(x, index[:, None, None], axis=1)[:, 0]

    gap = at_index(p_large) - at_index(p_small)
    # Rounding can leave the residual without positive mass where p_large ~ p_small (where a rejection has
    # probability ~0); p_large itself is the right distribution there.
    residual = jnp.where((gap > 0).any(axis=-1, keepdims=True), jnp.log(jnp.maximum(gap, 0.0)), at_index(large_logits))
    return rejects, index, residual


def _first(rejected: jax.Array, num_drafts: jax.Array) -> tuple[jax.Array, jax.Array]:
    """rejected [B, D] bool -> (any real draft rejected [B] bool, index [B] int32 of the first one)."""
    rejected = rejected & (jnp.arange(rejected.shape[1])[None, :] < num_drafts[:, None])
    return rejected.any(axis=-1), jnp.argmax(rejected, axis=-1).astype(jnp.int32)
