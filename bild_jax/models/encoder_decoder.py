"""What the encoder-decoder families (T5, BART, Marian) share: the decoder cache that also holds the encoder's
cross-attention keys/values, the encoder masks, and running the encoder once into that cache.

A family's module provides `encoder_cross_keys_values(input_ids [B, T], encoder_mask [B, T], dtype)`, which runs the
encoder with its token rows looked up in `dtype` and returns per decoder layer the cross-attention keys and
values, head-major [B, H, T, D]. The rows' dtype is the cache's: the CPU decode loop may keep a bfloat16
token table for the output layer while it computes in float32 (`ModelFamily.output_table`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from bild_jax.cache import KVBlock, KVCache


@struct.dataclass
class EncoderDecoderCache:
    """Decoder cache: self-attention keys/values with per-row cursors, plus the encoder's cross-attention inputs."""

    self_attn: KVCache
    cross_keys: tuple[jax.Array, ...]    # num_decoder_layers x [B, H, T_enc, D], head-major as in KVCache
    cross_values: tuple[jax.Array, ...]  # num_decoder_layers x [B, H, T_enc, D]
    encoder_mask: jax.Array              # [B, T_enc] bool: real (non-padding) encoder tokens

    @property
    def lengths(self) -> jax.Array:
        return self.self_attn.lengths

    @property
    def capacity(self) -> int:
        return self.self_attn.capacity

    def with_lengths(self, lengths: jax.Array) -> "EncoderDecoderCache":
        """The same cache with its self-attention cursors moved (truncation or commit); [B] int32."""
        return self.replace(self_attn=self.self_attn.with_lengths(lengths))

    def write(self, block: KVBlock, after: jax.Array | None = None) -> "EncoderDecoderCache":
        """The self-attention block written at the cursors, which stay where they are (see `KVCache.write`)."""
        return self.replace(self_attn=self.self_attn.write(block, after))

    def append(self, block: KVBlock) -> "EncoderDecoderCache":
        """The self-attention block written at the cursors, cursors moved past it."""
        return self.replace(self_attn=self.self_attn.append(block))


def empty_cache(num_layers: int, batch: int, capacity: int, num_heads: int, head_dim: int,
                dtype=jnp.float32) -> EncoderDecoderCache:
    """An empty [B, capacity] decoder cache of `num_layers` layers with `num_heads` x `head_dim` keys; its
    cross-attention entries stay empty until `encode_into_cache`."""
    empty = jnp.zeros((batch, num_heads, 0, head_dim), dtype)
    return EncoderDecoderCache(
        self_attn=KVCache.create(num_layers, batch, capacity, num_heads, head_dim, dtype),
        cross_keys=(empty,) * num_layers,
        cross_values=(empty,) * num_layers,
        encoder_mask=jnp.zeros((batch, 0), bool),
    )


def encoder_mask(input_ids: jax.Array, attention_mask: jax.Array | None) -> jax.Array:
    """[B, T] bool of the real encoder tokens: attention_mask [B, T] (any dtype), or all of input_ids [B, T]."""
    if attention_mask is None:
        return jnp.ones(input_ids.shape, bool)
    return attention_mask.astype(bool)


def key_mask(mask: jax.Array, width: int) -> jax.Array:
    """[B, T] bool mask of real keys -> [B, K, T] for K queries."""
    return jnp.broadcast_to(mask[:, None, :], (mask.shape[0], width, mask.shape[1]))


def encode_into_cache(module, params, input_ids: jax.Array, attention_mask: jax.Array | None,
                      cache: EncoderDecoderCache) -> EncoderDecoderCache:
    """Runs the encoder over input_ids [B, T] (attention_mask [B, T], None for all real) and stores the
    cross-attention keys/values, in the cache's dtype, and the encoder mask in the cache."""
    mask = encoder_mask(input_ids, attention_mask)
    dtype = cache.self_attn.dtype
    keys, values = module.apply({"params": params}, input_ids, mask, dtype,
                                method=module.encoder_cross_keys_values)
    return cache.replace(cross_keys=tuple(k.astype(dtype) for k in keys),
                         cross_values=tuple(v.astype(dtype) for v in values), encoder_mask=mask)
