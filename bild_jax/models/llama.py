"""Llama family (HF `llama`, `mistral`, `qwen2`): RoPE, RMSNorm, SwiGLU, grouped-query attention."""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from bild_jax.cache import KVCache
from bild_jax.errors import Unsupported
from bild_jax.models.layers import (RMSNorm, activation, attention, cached_keys_values, decoder_positions_and_mask,
                                    kv_block)
from bild_jax.models.family import ModelFamily
from bild_jax.models.hf_config import check_divides, config_float, config_int, token_ids
from bild_jax.weights import hf_name_to_flax_path

MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hyper-parameters read from an HF `config.json` of a Llama-family model."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: tuple = ()          # sorted (key, value) pairs of the rope parameters besides theta
    max_positions: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    sliding_window: int | None = None  # None when every layer attends to the whole context
    eos_token_id: tuple = ()
    pad_token_id: int | None = None
    is_encoder_decoder = False

    @classmethod
    def from_hf(cls, hf: dict) -> "LlamaConfig":
        """Reads an HF config dict (old `rope_theta`/`rope_scaling` or v5 `rope_parameters` form)."""
        model_type = hf["model_type"]
        rope = dict(hf.get("rope_parameters") or {})
        rope.update(hf.get("rope_scaling") or {})
        rope_theta = config_float({"rope_theta": rope.pop("rope_theta", hf.get("rope_theta"))}, "rope_theta", 10000.0)
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise Unsupported(
                f"rope type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
        if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
            raise Unsupported("partial rotary embeddings (partial_rotary_factor < 1) are not supported")
        rope["rope_type"] = rope_type
        hidden_size = config_int(hf, "hidden_size")
        heads = config_int(hf, "num_attention_heads")
        kv_heads = config_int(hf, "num_key_value_heads", heads)
        check_divides("num_key_value_heads", kv_heads, "num_attention_heads", heads)
        head_dim = config_int(hf, "head_dim", None)
        if head_dim is None:
            check_divides("num_attention_heads", heads, "hidden_size", hidden_size)
            head_dim = hidden_size // heads
        sliding_window = hf.get("sliding_window")
        if model_type == "qwen2" and not hf.get("use_sliding_window", False):
            sliding_window = None
        attention_bias = bool(hf.get("attention_bias", False))
        return cls(
            model_type=model_type,
            vocab_size=config_int(hf, "vocab_size"),
            hidden_size=hidden_size,
            intermediate_size=config_int(hf, "intermediate_size"),
            num_layers=config_int(hf, "num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=config_float(hf, "rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=tuple(sorted((k, v) for k, v in rope.items() if not isinstance(v, (list, dict)))),
            max_positions=config_int(hf, "max_position_embeddings", 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=attention_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            hidden_act=hf.get("hidden_act", "silu"),
            sliding_window=sliding_window,
            eos_token_id=token_ids(hf, "eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
        )

def rope_inverse_frequencies(config: LlamaConfig) -> jax.Array:
    """[head_dim // 2] float32 inverse frequencies, with the config's rope scaling applied."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    scaling = dict(config.rope_scaling)
    rope_type = scaling["rope_type"]
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_context = scaling.get("original_max_position_embeddings", config.max_positions)
        wavelength = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelength > old_context / low, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelength - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelength >= old_context / high) & (wavelength <= old_context / low)
        return jnp.where(is_medium, smoothed, scaled)
    return inv_freq


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotates x [B, K, H, D] by its positions [B, K] (HF's rotate-half layout), computed in float32."""
    angles = positions[:, :, None].astype(jnp.float32) * inv_freq[None, None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


class LlamaAttention(nn.Module):
    config: LlamaConfig
    layer: int

    @nn.compact
    def __call__(self, x, positions, mask, cache):
        cfg = self.config
        batch, width, _ = x.shape
        q = nn.Dense(cfg.num_heads * cfg.head_dim, use_bias=cfg.qkv_bias, name="q_proj")(x)
        k = nn.Dense(cfg.num_kv_heads * cfg.head_dim, use_bias=cfg.qkv_bias, name="k_proj")(x)
        v = nn.Dense(cfg.num_kv_heads * cfg.head_dim, use_bias=cfg.qkv_bias, name="v_proj")(x)
        inv_freq = rope_inverse_frequencies(cfg)
        q = apply_rope(q.reshape(batch, width, cfg.num_heads, cfg.head_dim), positions, inv_freq)
        k = apply_rope(k.reshape(batch, width, cfg.num_kv_heads, cfg.head_dim), positions, inv_freq)
        v = v.reshape(batch, width, cfg.num_kv_heads, cfg.head_dim)
        keys, values = cached_keys_values(cache, self.layer, k, v)
        out = attention(q, keys, values, mask, scale=cfg.head_dim ** -0.5)
        out = nn.Dense(cfg.hidden_size, use_bias=cfg.o_bias, name="o_proj")(out.reshape(batch, width, -1))
        return out, k, v


class LlamaMLP(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        gate = nn.Dense(cfg.intermediate_size, use_bias=cfg.mlp_bias, name="gate_proj")(x)
        up = nn.Dense(cfg.intermediate_size, use_bias=cfg.mlp_bias, name="up_proj")(x)
        return nn.Dense(cfg.hidden_size, use_bias=cfg.mlp_bias, name="down_proj")(activation(cfg.hidden_act)(gate) * up)


class LlamaDecoderLayer(nn.Module):
    config: LlamaConfig
    layer: int

    @nn.compact
    def __call__(self, h, positions, mask, cache):
        cfg = self.config
        normed = RMSNorm(cfg.rms_norm_eps, name="input_layernorm")(h)
        attn, keys, values = LlamaAttention(cfg, self.layer, name="self_attn")(normed, positions, mask, cache)
        h = h + attn
        h = h + LlamaMLP(cfg, name="mlp")(RMSNorm(cfg.rms_norm_eps, name="post_attention_layernorm")(h))
        return h, keys, values


class LlamaForCausalLM(nn.Module):
    """Decoder-only Llama-family transformer.

    `__call__(tokens [B, K] int32, cache=None, attention_mask=None) -> (logits [B, K, V] float32, block)`:
    with a cache, the K tokens sit at each row's `cache.lengths`, attend the cache (only read) and return
    their keys/values as a `KVBlock` to write in; without one, the K tokens are the whole sequence (block
    None).
    """

    config: LlamaConfig

    @nn.compact
    def __call__(self, tokens, cache: KVCache | None = None, attention_mask=None):
        cfg = self.config
        batch, width = tokens.shape
        context = cache.capacity if cache is not None else width
        if cfg.sliding_window is not None and context > cfg.sliding_window:
            raise Unsupported(
                f"{cfg.model_type} sliding-window attention (window {cfg.sliding_window}) is not implemented, and a "
                f"context of {context} tokens would need it; use a cache of at most {cfg.sliding_window} slots")
        embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, name="embed_tokens")
        positions, _, mask = decoder_positions_and_mask(batch, width, cache, attention_mask)
        h = embed(tokens)
        layer_keys, layer_values = [], []
        for i in range(cfg.num_layers):
            h, keys, values = LlamaDecoderLayer(cfg, i, name=f"layers_{i}")(h, positions, mask, cache)
            layer_keys.append(keys)
            layer_values.append(values)
        h = RMSNorm(cfg.rms_norm_eps, name="norm")(h)
        if cfg.tie_word_embeddings:
            logits = embed.attend(h)
        else:
            logits = nn.Dense(cfg.vocab_size, use_bias=False, name="lm_head")(h)
        return logits.astype(jnp.float32), kv_block(cache, layer_keys, layer_values)


def init_cache(config: LlamaConfig, batch: int, capacity: int, dtype=jnp.float32) -> KVCache:
    """An empty [B, capacity] cache for this model."""
    return KVCache.create(config.num_layers, batch, capacity, config.num_kv_heads, config.head_dim, dtype)


def hf_param_path(config: LlamaConfig, name: str) -> tuple[str, ...] | None:
    """The Flax parameter path for an HF tensor name; None for tensors that carry nothing."""
    name = name.removeprefix("model.")
    if config.tie_word_embeddings and name == "lm_head.weight":
        return None
    if name.endswith("rotary_emb.inv_freq"):
        return None
    return hf_name_to_flax_path(name)


FAMILY = ModelFamily(
    model_types=MODEL_TYPES,
    config_class=LlamaConfig,
    module=LlamaForCausalLM,
    init_cache=init_cache,
    hf_param_path=hf_param_path,
)
