"""Building blocks shared by the model families: attention over a cache, norms, activations."""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bild_jax import cpu_attention, cpu_matmul
from bild_jax.cache import KVBlock, KVCache, attended_positions
from bild_jax.errors import Unsupported


# Every weight product of the families: on CPU, decode steps run them in bild-jax's native kernel.
Dense = functools.partial(nn.Dense, dot_general=cpu_matmul.dense_dot_general,
                          promote_dtype=cpu_matmul.promote_dtype)


class DenseWeights(nn.Module):
    """A `Dense` layer's params alone, under the same names and initializers (kernel [in, features], bias
    [features]), for layers that read one input together (`dense_group`). Call: in_features -> (kernel,
    bias or None)."""

    features: int
    use_bias: bool = True

    @nn.compact
    def __call__(self, in_features: int) -> tuple[jax.Array, jax.Array | None]:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (in_features, self.features), jnp.float32)
        if not self.use_bias:
            return kernel, None
        return kernel, self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)


def dense_group(x: jax.Array, layers: list[DenseWeights]) -> list[jax.Array]:
    """x [..., K] through each of `layers` ([..., features_i] each), the values `Dense` computes; on CPU a
    decode step computes the products in one native call (`cpu_matmul.dense_products`)."""
    weights = [layer(x.shape[-1]) for layer in layers]
    promoted = [cpu_matmul.promote_dtype(x, kernel, bias) for kernel, bias in weights]
    if len({inputs.dtype for inputs, _, _ in promoted}) == 1:
        outputs = cpu_matmul.dense_products(promoted[0][0], [kernel for _, kernel, _ in promoted])
    else:
        outputs = [cpu_matmul.dense_products(inputs, [kernel])[0] for inputs, kernel, _ in promoted]
    return [y if bias is None else y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
            for y, (_, _, bias) in zip(outputs, promoted)]


def token_table(vocab_size: int, features: int, name: str | None = None) -> nn.Embed:
    """The token table [vocab_size, features] of a family whose output layer it may be: `nn.Embed`, which
    also takes the CPU decode loop's `cpu_matmul.PanelTable` (`model.with_panels`)."""
    return nn.Embed(vocab_size, features, promote_dtype=cpu_matmul.promote_table, name=name)


def attend(table: nn.Embed, h: jax.Array) -> jax.Array:
    """`table.attend(h)`, the tied embedding as the output layer: h [..., D] -> logits [..., V]."""
    return cpu_matmul.attend(table.embedding, h)


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last axis computed in float32, as the HF Llama and T5 references do.

    `unit_offset` (Gemma): the scale is 1 + weight and multiplies in float32 before the cast back.
    """

    eps: float
    unit_offset: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.zeros if self.unit_offset else nn.initializers.ones
        weight = self.param("weight", init, (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.unit_offset:
            return (normed * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)
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
        raise Unsupported(f"activation {name!r} is not supported (supported: {sorted(ACTIVATIONS)})")
    return ACTIVATIONS[name]


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """cap * tanh(x / cap): Gemma 2's soft-capping of attention scores and logits into (-cap, cap); x unchanged
    when cap is None."""
    return x if cap is None else cap * jnp.tanh(x / cap)


def attention(query: jax.Array, keys, values, mask: jax.Array, bias: jax.Array | None = None,
              scale: float = 1.0, score_cap: float | None = None) -> jax.Array:
    """Grouped-query attention with scores and softmax in float32.

    query [B, K, H, D]; keys and values: head-major [B, Hkv, S, D] arrays (`head_major`), or tuples of such
    segments attended as one sequence of S = sum of their lengths without concatenating them (a decode step
    attends its cache, then its own block); H a multiple of Hkv; mask [B, K, S] bool; bias [B or 1, H, K, S]
    float or None; `score_cap` soft-caps the scaled scores (`softcap`) before the bias and mask (Gemma 2).
    Returns [B, K, H, D] in the query's dtype. On CPU, decode steps without a cap run in bild-jax's native
    kernel (`cpu_attention`).
    """
    keys = keys if isinstance(keys, tuple) else (keys,)
    values = values if isinstance(values, tuple) else (values,)
    if score_cap is None and cpu_attention.applies(query, keys, values, query.shape[1]):
        return cpu_attention.attention(query, keys, values, mask, bias, scale,
                                       functools.partial(_xla_attention, scale=scale))
    return _xla_attention(query, keys, values, mask, bias, scale, score_cap)


# Blocks of more queries than this (prompt passes) take their scores query-major in XLA (`_xla_attention`).
QUERY_MAJOR_WIDTH = 64


def _xla_attention(query: jax.Array, keys: tuple, values: tuple, mask: jax.Array, bias: jax.Array | None = None,
                   scale: float = 1.0, score_cap: float | None = None) -> jax.Array:
    """`attention` in XLA's operations; keys and values are tuples of segments."""
    batch, width, heads, head_dim = query.shape
    kv_heads = keys[0].shape[1]
    groups = heads // kv_heads
    grouped = query.reshape(batch, width, kv_heads, groups, head_dim).transpose(0, 2, 3, 1, 4)
    grouped = grouped.reshape(batch, kv_heads, groups * width, head_dim)               # [B, Hkv, G*K, D]
    batch_dims = ((0, 1), (0, 1))
    # A decode step or block takes its scores key-major, [B, Hkv, S, G, K]: the keys stay the dots' big
    # operand in their stored layout, so XLA reads the cache in place instead of transposing it every step.
    # A prompt pass takes them query-major, [B, Hkv, G, K, S]: the bias and mask in their own layout and the
    # softmax over contiguous keys (the bundled pairs' 128-256-token prompt passes: 0.79-0.98x the time).
    query_major = width > QUERY_MAJOR_WIDTH
    key_axis = 3 if query_major else 2
    pairs = ((grouped, k) if query_major else (k, grouped) for k in keys)
    scores = jnp.concatenate([lax.dot_general(a, b, (((3,), (3,)), batch_dims), preferred_element_type=jnp.float32)
                              for a, b in pairs], axis=key_axis) * scale
    scores = softcap(scores, score_cap)
    if bias is not None:
        bias = bias.reshape(bias.shape[0], kv_heads, groups, width, -1).astype(jnp.float32)  # [B, Hkv, G, K, S]
    if query_major:
        scores = scores.reshape(batch, kv_heads, groups, width, -1)
        visible = mask[:, None, None]                                                  # [B, 1, 1, K, S]
    else:
        scores = scores.reshape(batch, kv_heads, -1, groups, width)
        bias = None if bias is None else bias.transpose(0, 1, 4, 2, 3)
        visible = jnp.swapaxes(mask, 1, 2)[:, None, :, None, :]                        # [B, 1, S, 1, K]
    if bias is not None:
        scores = scores + bias
    scores = jnp.where(visible, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1 if query_major else 2).astype(values[0].dtype)
    probs = probs.reshape((batch, kv_heads, groups * width, -1) if query_major
                          else (batch, kv_heads, -1, groups * width))
    bounds = np.cumsum([0] + [v.shape[2] for v in values])
    out = sum(lax.dot_general(lax.slice_in_dim(probs, start, stop, axis=key_axis), v,
                              (((key_axis,), (2,)), batch_dims))
              for v, start, stop in zip(values, bounds[:-1], bounds[1:]))            # [B, Hkv, G*K, D]
    out = out.reshape(batch, kv_heads, groups, width, head_dim).transpose(0, 3, 1, 2, 4)
    return out.reshape(batch, width, heads, head_dim)


def head_major(x: jax.Array) -> jax.Array:
    """[B, S, H, D] -> [B, H, S, D], the layout `attention` and the caches use."""
    return jnp.swapaxes(x, 1, 2)


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


def sliding_window_mask(mask: jax.Array, positions: jax.Array, key_positions: jax.Array, window: int) -> jax.Array:
    """`mask` [B, K, S'] bool restricted to keys less than `window` positions before each query: positions
    [B, K] and key_positions [B, S'] int32 are absolute, as `decoder_positions_and_mask` gives them, so the
    window slides over a fixed-shape cache by masking alone."""
    return mask & (positions[:, :, None] - key_positions[:, None, :] < window)


def cached_keys_values(cache: KVCache | None, layer: int, keys: jax.Array, values: jax.Array) -> tuple[tuple, tuple]:
    """The key and value segments a layer attends to, for `attention`: its cache slots [B, Hkv, S, D], then
    the block's own keys/values [B, K, Hkv, D] made head-major; or the block alone. The cache is only read:
    the block goes in later (`KVCache.write`)."""
    own_keys, own_values = head_major(keys), head_major(values)
    if cache is None:
        return (own_keys,), (own_values,)
    cached_keys, cached_values = cache.keys[layer], cache.values[layer]
    return ((cached_keys, own_keys.astype(cached_keys.dtype)),
            (cached_values, own_values.astype(cached_values.dtype)))


def kv_block(cache: KVCache | None, layer_keys: list, layer_values: list) -> KVBlock | None:
    """The block's own keys/values per layer, to write into the cache; None without a cache."""
    if cache is None:
        return None
    return KVBlock(keys=tuple(layer_keys), values=tuple(layer_values))
