"""Per-row gathers and scatters: each row of a batch reads or writes at its own index."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def take_at(x: jax.Array, index: jax.Array) -> jax.Array:
    """x [B, K, ...] -> x[b, index[b]] [B, ...]; index [B] int32."""
    index = index.reshape(index.shape + (1,) * (x.ndim - 1))
    return jnp.take_along_axis(x, index, axis=1)[:, 0]


def take_block(tokens: jax.Array, starts: jax.Array, counts: jax.Array, width: int) -> jax.Array:
    """tokens [B, L] -> tokens[b, starts[b] : starts[b] + width] [B, width], zeros past counts[b] [B] int32."""
    offsets = jnp.arange(width, dtype=jnp.int32)[None, :]
    index = jnp.clip(starts[:, None] + offsets, 0, tokens.shape[1] - 1)
    return jnp.where(offsets < counts[:, None], jnp.take_along_axis(tokens, index, axis=1), 0)


def set_at(buffer: jax.Array, index: jax.Array, value: jax.Array, where: jax.Array) -> jax.Array:
    """buffer [B, L, ...] with buffer[b, index[b]] = value[b] for the rows where `where` [B] bool holds."""
    rows = jnp.arange(buffer.shape[0])
    index = jnp.clip(index, 0, buffer.shape[1] - 1)
    value = jnp.asarray(value)
    where = where.reshape(where.shape + (1,) * (value.ndim - 1))
    return buffer.at[rows, index].set(jnp.where(where, value, buffer[rows, index]))


def set_block(buffer: jax.Array, starts: jax.Array, values: jax.Array, counts: jax.Array) -> jax.Array:
    """buffer [B, L, ...] with buffer[b, starts[b] + i] = values[b, i] for i < counts[b]; values [B, W, ...],
    starts and counts [B] int32. Writes past L are dropped."""
    offsets = jnp.arange(values.shape[1], dtype=jnp.int32)[None, :]                       # [1, W]
    index = jnp.where(offsets < counts[:, None], starts[:, None] + offsets, buffer.shape[1])  # [B, W], L: none
    rows = jnp.arange(buffer.shape[0])[:, None]
    return buffer.at[rows, index].set(values, mode="drop")
