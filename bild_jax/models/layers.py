"""Building blocks shared by the model families: attention over a cache, norms, activations."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from bild_jax.cache import KVBlock, KVCache, attended_positions


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, as the HF Llama and T5 references do."""

    eps: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return weight * normed.astype(x.dtype)


def gelu_tanh(x: jax.Array) -> jax.Array:
    """HF's `gelu_new` / `gelu_pytorch_tanh`: the tanh approximation of GELU."""
    return 0.5 * x * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


ACTIVATIONS = {
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu_new": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


def activation(name: str):
    """The activation function for an HF `hidden_act` name; a clear error for others."""
    if name not in ACTIVATIONS:
        raise NotImplementedError(f"activation {name!r} is not supported (supported: {sorted(ACTIVATIONS)})")
    return ACTIVATIONS[name]


def token_ids(value) -> tuple:
    """An HF config's token-id field (None, an int or a list, e.g. `eos_token_id`) as a tuple of ints."""
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),)


def attention(query: jax.Array, keys: jax.Array, values: jax.Array, mask: jax.Array,
              bias: jax.Array | None = None, scale: float = 1.0) -> jax.Array:
    """Grouped-query attention with scores and softmax in float32.

    query [B, K, H, D]; keys, values [B, S, Hkv, D] with H a multiple of Hkv; mask [B, K, S] bool;
    bias [B or 1, H, K, S] float or None. Returns [B, K, H, D] in the query's dtype.
    """
    batch, width, heads, head_dim = query.shape
    kv_heads = keys.shape[2]
    groups = heads // kv_heads
    grouped = query.reshape(batch, width, kv_heads, groups, head_dim)
    scores = jnp.einsum("bkhgd,bshd->bhgks", grouped, keys, preferred_element_type=jnp.float32) * scale
    if bias is not None:
        scores = scores + bias.reshape(bias.shape[0], kv_heads, groups, width, -1).astype(jnp.float32)
    scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
    out = jnp.einsum("bhgks,bshd->bkhgd", probs, values)
    return out.reshape(batch, width, heads, head_dim)


def decoder_positions_and_mask(batch: int, width: int, cache: KVCache | None, attention_mask: jax.Array | None = None
                               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Positions of a block of K decoder tokens [B, K] int32, of the keys it attends [B, S'] int32, and the
    self-attention mask [B, K, S'] bool.

    With a cache the block sits at each row's cursor and attends the cache's valid slots, then itself
    (S' = S + K, see `cached_keys_values`); without one the block is the whole sequence (S' = K), causal,
    with `attention_mask` [B, K] marking real keys.
    """
    if cache is not None:
        key_positions, mask = attended_positions(cache.lengths, cache.capacity, width)
        return key_positions[:, cache.capacity:], key_positions, mask
    positions = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32), (batch, width))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((width, width), bool)), (batch, width, width))
    if attention_mask is not None:
        mask = mask & attention_mask.astype(bool)[:, None, :]
    return positions, positions, mask


def cached_keys_values(cache: KVCache | None, layer: int, keys: jax.Array,
                       values: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The keys/values [B, S', Hkv, D] a layer attends to: its cache slots followed by the block's own, or the
    block alone. The cache is only read: the block goes in later (`KVCache.write`)."""
    if cache is None:
        return keys, values
    cached_keys, cached_values = cache.keys[layer], cache.values[layer]
    return (jnp.concatenate([cached_keys, keys.astype(cached_keys.dtype)], axis=1),
            jnp.concatenate([cached_values, values.astype(cached_values.dtype)], axis=1))


def kv_block(cache: KVCache | None, layer_keys: list, layer_values: list) -> KVBlock | None:
    """The block's own keys/values per layer, to write into the cache; None without a cache."""
    if cache is None:
        return None
    return KVBlock(keys=tuple(layer_keys), values=tuple(layer_values))
