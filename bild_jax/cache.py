"""Fixed-shape key/value caches with a per-row write cursor, and the blocks a forward pass adds to them.

A cache holds `capacity` slots per row. `lengths[b]` is both the number of valid slots of row b and the
slot where the next block is written. Nothing is ever cleared: truncating a row (a rollback) only moves
its length back, and the stale slots behind it are masked until a later block overwrites them.

A cached forward pass reads the cache and returns the keys/values of its own tokens as a `KVBlock`; writing
the block in is a separate step (`KVCache.write`). Decode loops keep the write outside their `lax.cond`
branches: a branch that only reads a cache lets XLA leave it in place, while one that writes it makes XLA
copy every layer's buffer on each iteration.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct
from jax import lax


@struct.dataclass
class KVBlock:
    """The self-attention keys/values of a K-token block, per layer, not yet in a cache."""

    keys: tuple[jax.Array, ...]    # num_layers x [B, K, Hkv, D]
    values: tuple[jax.Array, ...]  # num_layers x [B, K, Hkv, D]

    @property
    def width(self) -> int:
        return self.keys[0].shape[1]

    def padded(self, width: int) -> "KVBlock":
        """The block with zero slots appended up to `width` (static), so that differently wide blocks from
        `lax.switch` branches share one shape; the padding lands in slots past the cursor, which stay stale."""
        def pad(x):
            return jnp.pad(x, ((0, 0), (0, width - x.shape[1])) + ((0, 0),) * (x.ndim - 2))
        return KVBlock(keys=tuple(map(pad, self.keys)), values=tuple(map(pad, self.values)))


@struct.dataclass
class KVCache:
    """Self-attention cache of a decoder stack."""

    # Head-major, the layout attention's batched dots read without a transpose.
    keys: tuple[jax.Array, ...]    # num_layers x [B, Hkv, S, D]
    values: tuple[jax.Array, ...]  # num_layers x [B, Hkv, S, D]
    lengths: jax.Array             # [B] int32: valid slots per row == next write slot

    @classmethod
    def create(cls, num_layers: int, batch: int, capacity: int, num_kv_heads: int, head_dim: int,
               dtype=jnp.float32) -> "KVCache":
        """An empty cache: every row has length 0."""
        shape = (batch, num_kv_heads, capacity, head_dim)
        return cls(
            keys=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
            values=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
            lengths=jnp.zeros((batch,), jnp.int32),
        )

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    @property
    def dtype(self):
        """The dtype of its keys and values: the one the model computes in (`Model.start_cache`)."""
        return self.keys[0].dtype

    def with_lengths(self, lengths: jax.Array) -> "KVCache":
        """The same cache with its write cursors moved (truncation or commit); [B] int32."""
        return self.replace(lengths=lengths.astype(jnp.int32))

    def write(self, block: KVBlock, after: jax.Array | None = None) -> "KVCache":
        """The block written at each row's cursor; the cursors stay where they are (the caller moves them).

        `after` [B] int32 >= 0, when given, is a value computed from every read of this cache (a decode step's
        next token): the write position is made to depend on it, which is how XLA learns to order the write
        after the reads and update the buffers in place. Without that order (a read-only pass written outside
        of any `lax.cond`/`lax.switch` that did the reading) XLA copies every layer's buffer on each step.
        """
        starts = self.lengths if after is None else self.lengths + jnp.minimum(after, 0)
        return self.replace(keys=tuple(write_block(c, b, starts) for c, b in zip(self.keys, block.keys)),
                            values=tuple(write_block(c, b, starts) for c, b in zip(self.values, block.values)))

    def append(self, block: KVBlock) -> "KVCache":
        """The block written at each row's cursor, cursors moved past it."""
        return self.write(block).with_lengths(self.lengths + block.width)


def write_block(buffer: jax.Array, block: jax.Array, starts: jax.Array) -> jax.Array:
    """Writes `block` [B, K, Hkv, D] into the head-major `buffer` [B, Hkv, S, D] at slot `starts[b]` of each row.

    `lax.dynamic_update_slice` clamps a start that would overflow, which would silently overwrite valid
    entries; callers size caches so that `starts + K <= S` always holds (`prompts.decoder_capacity`).
    """
    def write_row(row_buffer, row_block, start):
        return lax.dynamic_update_slice(row_buffer, row_block.astype(row_buffer.dtype), (0, start, 0))

    return jax.vmap(write_row)(buffer, jnp.swapaxes(block, 1, 2), starts)


def attended_positions(lengths: jax.Array, capacity: int, block_width: int) -> tuple[jax.Array, jax.Array]:
    """What a K-token block at the rows' cursors attends: the cache's slots, then the block itself.

    Returns (positions [B, S + K] int32 of those keys, mask [B, K, S + K] bool): query i of row b sees the
    cache slots before lengths[b] and the block's tokens up to itself.
    """
    slots = jnp.arange(capacity, dtype=jnp.int32)
    block = lengths[:, None] + jnp.arange(block_width, dtype=jnp.int32)[None, :]          # [B, K]
    positions = jnp.concatenate([jnp.broadcast_to(slots, (lengths.shape[0], capacity)), block], axis=1)
    in_cache = jnp.broadcast_to((slots[None, :] < lengths[:, None])[:, None, :],
                                (lengths.shape[0], block_width, capacity))                 # [B, K, S]
    causal = jnp.tril(jnp.ones((block_width, block_width), bool))                          # [K, K]
    mask = jnp.concatenate([in_cache, jnp.broadcast_to(causal, in_cache.shape[:2] + (block_width,))], axis=2)
    return positions, mask
