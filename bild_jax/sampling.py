"""Sampling: temperature / top-k / top-p processing of logits as traced settings, and per-row, per-position
random streams.

Every random draw of a decode is made with its own key, `fold_in(fold_in(row_key, position), stream)`: the
row's key, the output position the draw is for, and what the draw is for (`TOKEN`, `DRAFT`, `ACCEPT`). A
row's randomness therefore depends neither on its batch neighbours nor on how many loop iterations it took,
and a draw that is computed again (BiLD judges a draft whenever the large model runs) gives the same value.
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax

from bild_jax.errors import InputError
from bild_jax.reductions import argmax

# Streams: what a draw is for. Distinct streams keep the draws at one position independent, which exact
# speculative sampling needs (the draft, its acceptance test and the resample must not be correlated).
TOKEN = 0   # a model's own next token: sample_generate's tokens; every token BiLD's large model writes
DRAFT = 1   # the small model's draft
ACCEPT = 2  # the uniform of the speculative acceptance test
MAX_INT32 = 2 ** 31 - 1  # top_k is a traced int32


def check_sampling(temperature, top_k, top_p) -> None:
    """Clear errors for sampling settings out of range."""
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) \
            or not math.isfinite(temperature) or temperature < 0:
        raise InputError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or not 0 <= top_k <= MAX_INT32:
        raise InputError(f"top_k must be an int >= 0 (0 = no top-k) and at most {MAX_INT32}, got {top_k!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, numbers.Real) or not 0 < top_p <= 1:
        raise InputError(f"top_p must be in (0, 1] (1 = no top-p), got {top_p!r}")


def check_rng(rng, temperature: float) -> None:
    """A clear error when sampling (temperature > 0) is asked for without a PRNG key."""
    if temperature > 0 and rng is None:
        raise InputError("sampling (temperature > 0) needs a PRNG key: pass rng=jax.random.key(seed)")


@struct.dataclass
class SamplingParams:
    """Sampling settings as traced scalars: new values reuse the compiled program (top_k included: its
    cut-off is read by rank from a sorted copy, so it needs no static shape)."""

    temperature: jax.Array  # [] float32; 0 is greedy decoding (argmax), where top_k and top_p are ignored
    top_k: jax.Array        # [] int32; keep the top_k most likely tokens, 0 = all
    top_p: jax.Array        # [] float32 in (0, 1]; keep the fewest most likely tokens holding this mass, 1 = all

    @classmethod
    def create(cls, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0) -> "SamplingParams":
        """Checked settings; the defaults are greedy decoding."""
        check_sampling(temperature, top_k, top_p)
        return cls(temperature=np.float32(temperature), top_k=np.int32(top_k), top_p=np.float32(top_p))

    @property
    def sampled(self) -> jax.Array:
        """[] bool: temperature > 0, tokens are drawn at random."""
        return self.temperature > 0


def process_logits(logits: jax.Array, params: SamplingParams) -> jax.Array:
    """logits [..., V] float32 -> the processed distribution's logits [..., V] float32 (unnormalized).

    Sampling: divided by the temperature, then tokens outside the top-k, then outside the top-p nucleus of
    what is left, set to -inf (ties at a cut-off are kept). Greedy (temperature 0): the logits unchanged,
    bit for bit, so that greedy decoding and BiLD's greedy policies (confidence, rollback distance) measure
    the plain softmax, as in the paper.
    """
    scaled = logits / jnp.where(params.sampled, params.temperature, 1.0)
    filtering = params.sampled & ((params.top_k > 0) | (params.top_p < 1))
    # lax.cond: the sort is only paid for when a filter is on.
    return lax.cond(filtering, _top_k_top_p, lambda x, *_: x, scaled, params.top_k, params.top_p)


def _top_k_top_p(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """logits [..., V] float32 with -inf outside the top_k [] int32 tokens, then outside the top_p []
    float32 nucleus of the renormalized rest."""
    vocab = logits.shape[-1]
    ordered = jnp.flip(jnp.sort(logits, axis=-1), axis=-1)  # descending
    rank = jnp.arange(vocab)
    in_top_k = (top_k <= 0) | (rank < top_k)
    probs = jax.nn.softmax(jnp.where(in_top_k, ordered, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # exactly 0 for the most likely token, which is always kept
    # top_p == 1 keeps everything even where the float32 cumulative sum reaches 1 before the last token.
    in_top_p = (top_p >= 1) | (mass_before < top_p)
    kept = jnp.sum(in_top_k & in_top_p, axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(ordered, kept - 1, axis=-1)
    return jnp.where(logits >= cutoff, logits, -jnp.inf)


def sample(keys: jax.Array, positions: jax.Array, stream: int, logits: jax.Array,
           params: SamplingParams) -> jax.Array:
    """Row keys [B], output positions [B] int32, logits [B, V] float32 -> tokens [B] int32.

    A draw from softmax(logits) with the key of (row, position, `stream`) when sampling; the argmax when
    greedy. The keys are derived only when sampling: deriving them is a few hundred tiny XLA ops per draw,
    which a greedy decode loop should not pay every step. Pass processed logits (`process_logits`) or any
    other distribution's logits (BiLD's speculative residual).
    """
    def draw():
        draw_keys = position_keys(keys, positions, stream)
        return jax.vmap(jax.random.categorical)(draw_keys, logits).astype(jnp.int32)

    return lax.cond(params.sampled, draw, lambda: argmax(logits))


def uniform(keys: jax.Array) -> jax.Array:
    """keys [...] -> [...] float32 uniform in [0, 1), one per key."""
    return jax.vmap(jax.random.uniform)(keys.reshape(-1)).reshape(keys.shape)


def row_keys(rng: jax.Array | None, batch: int) -> jax.Array:
    """[batch] typed PRNG keys, one stream per row: `fold_in(rng, row)` for one key, or `rng` itself when it
    already holds one key per row ([batch] typed keys, or [batch, 2] raw `PRNGKey` data). None: a fixed
    key, for greedy decoding, which draws nothing.

    Row b of a batched run equals a run of that row alone with `rng=row_keys(rng, batch)[b:b + 1]`.
    """
    if rng is None:
        rng = jax.random.key(0)
    dtype = getattr(rng, "dtype", None)
    if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key):
        keys = rng
    elif dtype == jnp.uint32:
        keys = jax.random.wrap_key_data(rng)
    else:
        raise InputError(f"rng must be a PRNG key (jax.random.key(seed) or jax.random.PRNGKey(seed)) or one key "
                         f"per row, got {type(rng).__name__} {rng!r}")
    if keys.ndim == 0:
        return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(keys, jnp.arange(batch, dtype=jnp.uint32))
    if keys.shape != (batch,):
        raise InputError(f"rng holds keys of shape {keys.shape} for a batch of {batch}: pass one key, or one "
                         f"key per row")
    return keys


def position_keys(keys: jax.Array, positions: jax.Array, stream: int) -> jax.Array:
    """keys [B] (per row), positions [B] or [B, D] int32 output positions -> keys of positions' shape:
    `fold_in(fold_in(keys[b], position), stream)`."""
    positions = jnp.asarray(positions, jnp.int32)
    per_row = jnp.broadcast_to(keys.reshape(keys.shape + (1,) * (positions.ndim - 1)), positions.shape)

    def derive(key, position):
        return jax.random.fold_in(jax.random.fold_in(key, position), stream)

    return jax.vmap(derive)(per_row.reshape(-1), positions.reshape(-1)).reshape(positions.shape)
