"""Fixed-shape key/value caches with a per-row write cursor.

A cache holds `capacity` slots per row. `lengths[b]` is both the number of valid slots of row b and the
slot where the next block is written. Nothing is ever cleared: truncating a row (a rollback) only moves
its length back, and the stale slots behind it are masked until a later block overwrites them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct
from jax import lax


@struct.dataclass
class KVCache:
    """Self-attention cache of a decoder stack."""

    keys: tuple[jax.Array, ...]    # num_layers x [B, S, Hkv, D]
    values: tuple[jax.Array, ...]  # num_layers x [B, S, Hkv, D]
    lengths: jax.Array             # [B] int32: valid slots per row == next write slot

    @classmethod
    def create(cls, num_layers: int, batch: int, capacity: int, num_kv_heads: int, head_dim: int,
               dtype=jnp.float32) -> "KVCache":
        """An empty cache: every row has length 0."""
        shape = (batch, capacity, num_kv_heads, head_dim)
        return cls(
            keys=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
            values=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
            lengths=jnp.zeros((batch,), jnp.int32),
        )

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[1]

    def with_lengths(self, lengths: jax.Array) -> "KVCache":
        """The same cache with its write cursors moved (truncation or commit); [B] int32."""
        return self.replace(lengths=lengths.astype(jnp.int32))


def write_block(buffer: jax.Array, block: jax.Array, starts: jax.Array) -> jax.Array:
    """Writes `block` [B, K, ...] into `buffer` [B, S, ...] at slot `starts[b]` of each row.

    `lax.dynamic_update_slice` clamps a start that would overflow, which would silently overwrite valid
    entries; callers size caches so that `starts + K <= S` always holds (see `check_capacity`).
    """
    def write_row(row_buffer, row_block, start):
        index = (start,) + (0,) * (row_buffer.ndim - 1)
        return lax.dynamic_update_slice(row_buffer, row_block.astype(row_buffer.dtype), index)

    return jax.vmap(write_row)(buffer, block, starts)


def block_positions(lengths: jax.Array, block_width: int) -> jax.Array:
    """Absolute positions [B, K] int32 of a K-token block written at the rows' cursors."""
    return lengths[:, None] + jnp.arange(block_width, dtype=jnp.int32)[None, :]


def block_causal_mask(lengths: jax.Array, block_width: int, capacity: int) -> jax.Array:
    """[B, K, S] bool: query i of row b may attend slot j iff j <= lengths[b] + i."""
    positions = block_positions(lengths, block_width)
    return jnp.arange(capacity, dtype=jnp.int32)[None, None, :] <= positions[:, :, None]


def check_capacity(capacity: int, needed: int, what: str) -> None:
    """Raises a clear error when a cache of `capacity` slots cannot hold `needed` positions."""
    if needed > capacity:
        raise ValueError(f"{what} needs {needed} cache slots but the cache holds only {capacity}")
