"""Llama family and its variants (HF `llama`, `mistral`, `qwen2`, `qwen3`, `phi3`, `gemma`, `gemma2`,
`gemma3_text`): RoPE, RMSNorm, gated MLP, grouped-query attention, with config switches for what the variants
change: Gemma's scaled embeddings, (1 + w) norms, sandwich norms and soft-capping, q/k norms (Qwen3, Gemma 3),
sliding-window layers (Mistral, Qwen2/3, Phi-3, Gemma 2/3) with their own RoPE base (Gemma 3), and Phi-3's
fused checkpoint tensors."""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bild_jax import cpu_decoder_step, cpu_matmul
from bild_jax.cache import KVBlock, KVCache
from bild_jax.cpu_lookup import lookup
from bild_jax.errors import Unsupported
from bild_jax.models.layers import (Dense, DenseWeights, RMSNorm, activation, attend, attention, cached_keys_values,
                                    decoder_positions_and_mask, dense_group, kv_block, sliding_window_mask, softcap,
                                    token_table)
from bild_jax.models.family import ModelFamily
from bild_jax.models.hf_config import check_divides, config_float, config_int, token_ids
from bild_jax.rows import take_at
from bild_jax.weights import hf_name_to_flax_path

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3_text")
GEMMA_TYPES = ("gemma", "gemma2", "gemma3_text")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
# Layers where a `layer_types` list is absent from the config (older hub configs): which ones slide.
_DEFAULT_SLIDING_PATTERN = {"gemma2": 2, "gemma3_text": 6}


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
    sliding_window: int | None = None  # sliding layers attend keys at distance < sliding_window only
    sliding_layers: tuple = ()         # per layer: True when it is a sliding-window layer
    local_rope_theta: float | None = None  # RoPE base of the sliding layers (Gemma 3), else rope_theta
    attention_scale: float | None = None   # scores scale; None: head_dim ** -0.5
    attn_softcap: float | None = None      # scores -> cap * tanh(scores / cap) (Gemma 2)
    final_softcap: float | None = None     # the same on the logits
    qk_norm: bool = False              # RMSNorm over each query/key head before RoPE (Qwen3, Gemma 3)
    sandwich_norms: bool = False       # norms after attention and around the MLP as well (Gemma 2/3)
    gemma_norms: bool = False          # RMSNorm weights are 1 + w, applied in float32 (Gemma)
    scale_embeddings: bool = False     # embeddings times sqrt(hidden_size) (Gemma)
    eos_token_id: tuple = ()
    pad_token_id: int | None = None
    is_encoder_decoder = False

    @classmethod
    def from_hf(cls, hf: dict) -> "LlamaConfig":
        """Reads an HF config dict (old `rope_theta`/`rope_scaling` or v5 `rope_parameters` form)."""
        model_type = hf["model_type"]
        gemma = model_type in GEMMA_TYPES
        rope = dict(hf.get("rope_parameters") or {})
        local_rope_theta = None
        if model_type == "gemma3_text":
            if hf.get("use_bidirectional_attention"):
                raise Unsupported("bidirectional Gemma 3 (an embedding model) is not a decoder")
            if "full_attention" in rope:  # v5 form: one set of parameters per layer type
                local = dict(rope.get("sliding_attention") or {})
                rope = dict(rope["full_attention"])
            else:
                local = {"rope_theta": hf.get("rope_local_base_freq", 10000.0)}
            if local.get("rope_type", "default") != "default":
                raise Unsupported(f"rope type {local['rope_type']!r} on Gemma 3's sliding layers is not "
                                          "supported (supported: default)")
            local_rope_theta = float(local.get("rope_theta", 10000.0))
            rope.setdefault("rope_theta", hf.get("rope_theta", 1000000.0))
        rope.update(hf.get("rope_scaling") or {})
        rope_theta = config_float({"rope_theta": rope.pop("rope_theta", hf.get("rope_theta"))}, "rope_theta", 10000.0)
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))
        if rope_type in ("su", "longrope"):
            raise Unsupported(
                f"rope type {rope_type!r} (Phi-3 long-context scaling) is not supported: it switches between two "
                "sets of frequencies by the sequence length, which a fixed-shape cache does not know in advance; "
                f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise Unsupported(
                f"rope type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
        if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
            raise Unsupported("partial rotary embeddings (partial_rotary_factor < 1) are not supported")
        rope.pop("partial_rotary_factor", None)
        rope["rope_type"] = rope_type
        hidden_size = config_int(hf, "hidden_size")
        heads = config_int(hf, "num_attention_heads")
        kv_heads = config_int(hf, "num_key_value_heads", heads)
        check_divides("num_key_value_heads", kv_heads, "num_attention_heads", heads)
        head_dim = config_int(hf, "head_dim", None)
        if head_dim is None:
            check_divides("num_attention_heads", heads, "hidden_size", hidden_size)
            head_dim = hidden_size // heads
        num_layers = config_int(hf, "num_hidden_layers")
        sliding_window = hf.get("sliding_window")
        if model_type in ("qwen2", "qwen3") and not hf.get("use_sliding_window", False):
            sliding_window = None
        sliding_layers = _sliding_layers(hf, model_type, num_layers) if sliding_window is not None else ()
        if not any(sliding_layers):
            sliding_window, sliding_layers = None, ()
        attention_bias = bool(hf.get("attention_bias", False))
        hidden_act = hf.get("hidden_activation") or hf.get("hidden_act", "silu")
        if gemma and hidden_act == "gelu":
            hidden_act = "gelu_pytorch_tanh"  # legacy Gemma configs say "gelu" and mean the tanh approximation
        query_scalar = hf.get("query_pre_attn_scalar") if model_type in ("gemma2", "gemma3_text") else None
        return cls(
            model_type=model_type,
            vocab_size=config_int(hf, "vocab_size"),
            hidden_size=hidden_size,
            intermediate_size=config_int(hf, "intermediate_size"),
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=config_float(hf, "rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=tuple(sorted((k, v) for k, v in rope.items() if not isinstance(v, (list, dict)))),
            max_positions=config_int(hf, "max_position_embeddings", 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=attention_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            hidden_act=hidden_act,
            sliding_window=sliding_window,
            sliding_layers=sliding_layers,
            local_rope_theta=local_rope_theta,
            attention_scale=None if query_scalar is None else float(query_scalar) ** -0.5,
            attn_softcap=hf.get("attn_logit_softcapping") if model_type in ("gemma2", "gemma3_text") else None,
            final_softcap=hf.get("final_logit_softcapping") if model_type in ("gemma2", "gemma3_text") else None,
            qk_norm=model_type in ("qwen3", "gemma3_text"),
            sandwich_norms=model_type in ("gemma2", "gemma3_text"),
            gemma_norms=gemma,
            scale_embeddings=gemma,
            eos_token_id=token_ids(hf, "eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
        )


def _sliding_layers(hf: dict, model_type: str, num_layers: int) -> tuple[bool, ...]:
    """Per layer, whether it attends through the sliding window: the config's `layer_types` when given,
    else each family's rule (Qwen: layers from `max_window_layers` on; Gemma: a fixed pattern; others: all)."""
    if hf.get("layer_types"):
        return tuple(kind == "sliding_attention" for kind in hf["layer_types"])
    if model_type in ("qwen2", "qwen3"):
        return tuple(i >= hf.get("max_window_layers", num_layers) for i in range(num_layers))
    if model_type in _DEFAULT_SLIDING_PATTERN:
        pattern = hf.get("sliding_window_pattern", _DEFAULT_SLIDING_PATTERN[model_type])
        return tuple(bool((i + 1) % pattern) for i in range(num_layers))
    return (True,) * num_layers


def rope_inverse_frequencies(config: LlamaConfig, sliding: bool = False) -> np.ndarray:
    """[head_dim // 2] float32 inverse frequencies (computed in float64, then rounded), with the config's rope
    scaling applied; a sliding layer of a model with its own local base (Gemma 3) uses that base, unscaled."""
    dim = config.head_dim
    exponents = np.arange(0, dim, 2, dtype=np.float64) / dim
    if sliding and config.local_rope_theta is not None:
        return (1.0 / config.local_rope_theta ** exponents).astype(np.float32)
    inv_freq = 1.0 / config.rope_theta ** exponents
    scaling = dict(config.rope_scaling)
    rope_type = scaling["rope_type"]
    if rope_type == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif rope_type == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_context = scaling.get("original_max_position_embeddings", config.max_positions)
        wavelength = 2 * math.pi / inv_freq
        scaled = np.where(wavelength > old_context / low, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelength - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelength >= old_context / high) & (wavelength <= old_context / low)
        inv_freq = np.where(is_medium, smoothed, scaled)
    return inv_freq.astype(np.float32)


def rotary_embedding(config: LlamaConfig, positions: jax.Array, size: int, sliding: bool = False
                     ) -> tuple[jax.Array, jax.Array]:
    """cos and sin [B, K, 1, head_dim] float32 of the rotation angles at positions [B, K] int32 (< size).

    The angles are float32 products of position and inverse frequency, as HF computes them; their cosines and
    sines come from a table of every position below `size`, computed here in float64 and rounded: a constant
    of the program, gathered once per forward pass for all layers (XLA:CPU otherwise evaluated cos and sin
    for every element of every head of each layer's queries and keys).
    """
    inv_freq = rope_inverse_frequencies(config, sliding)
    angles = (np.arange(size, dtype=np.float32)[:, None] * inv_freq[None, :]).astype(np.float64)  # [size, D/2]
    cos, sin = (jnp.take(jnp.asarray(table.astype(np.float32)), positions, axis=0, mode="clip")   # [B, K, D/2]
                for table in (np.cos(angles), np.sin(angles)))
    return tuple(jnp.concatenate([half, half], axis=-1)[:, :, None, :] for half in (cos, sin))


def apply_rope(x: jax.Array, rotary: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotates x [B, K, H, D] by `rotary_embedding`'s (cos, sin) [B, K, 1, D] (HF's rotate-half layout),
    computed in float32."""
    cos, sin = rotary
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


class LlamaAttention(nn.Module):
    config: LlamaConfig
    layer: int

    @nn.compact
    def __call__(self, x, rotary, mask, cache, query_at=None):
        """x [B, K, hidden] -> (output [B, K, hidden], keys and values [B, K, Hkv, D]); with `query_at` [B]
        int32 the output is of that query of each row only, [B, 1, hidden] (the keys and values of all K)."""
        cfg = self.config
        batch, width, _ = x.shape
        q, k, v = dense_group(x, [DenseWeights(cfg.num_heads * cfg.head_dim, cfg.qkv_bias, name="q_proj"),
                                  DenseWeights(cfg.num_kv_heads * cfg.head_dim, cfg.qkv_bias, name="k_proj"),
                                  DenseWeights(cfg.num_kv_heads * cfg.head_dim, cfg.qkv_bias, name="v_proj")])
        q = q.reshape(batch, width, cfg.num_heads, cfg.head_dim)
        k = k.reshape(batch, width, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q = RMSNorm(cfg.rms_norm_eps, cfg.gemma_norms, name="q_norm")(q)
            k = RMSNorm(cfg.rms_norm_eps, cfg.gemma_norms, name="k_norm")(k)
        q = apply_rope(q, rotary)
        k = apply_rope(k, rotary)
        v = v.reshape(batch, width, cfg.num_kv_heads, cfg.head_dim)
        keys, values = cached_keys_values(cache, self.layer, k, v)
        if query_at is not None:
            q, mask = take_at(q, query_at)[:, None], take_at(mask, query_at)[:, None]           # [B, 1, ...]
        scale = cfg.head_dim ** -0.5 if cfg.attention_scale is None else cfg.attention_scale
        out = attention(q, keys, values, mask, scale=scale, score_cap=cfg.attn_softcap)
        out = Dense(cfg.hidden_size, use_bias=cfg.o_bias, name="o_proj")(out.reshape(batch, q.shape[1], -1))
        return out, k, v


class LlamaMLP(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        gate, up = dense_group(x, [DenseWeights(cfg.intermediate_size, cfg.mlp_bias, name="gate_proj"),
                                   DenseWeights(cfg.intermediate_size, cfg.mlp_bias, name="up_proj")])
        return Dense(cfg.hidden_size, use_bias=cfg.mlp_bias, name="down_proj")(activation(cfg.hidden_act)(gate) * up)


class LlamaDecoderLayer(nn.Module):
    config: LlamaConfig
    layer: int

    @nn.compact
    def __call__(self, h, rotary, mask, cache, query_at=None):
        """h [B, K, hidden] -> (h [B, K, hidden], keys, values); with `query_at` [B] int32, h of that
        position of each row only, [B, 1, hidden]: all a prompt pass's last layer needs besides the keys and
        values of every position."""
        cfg = self.config

        def norm(name):
            return RMSNorm(cfg.rms_norm_eps, cfg.gemma_norms, name=name)

        attn, keys, values = LlamaAttention(cfg, self.layer, name="self_attn")(
            norm("input_layernorm")(h), rotary, mask, cache, query_at)
        h = h if query_at is None else take_at(h, query_at)[:, None]                             # [B, 1, hidden]
        if cfg.sandwich_norms:
            # Gemma 2/3 name their norm after attention `post_attention_layernorm`, the one before the MLP
            # `pre_feedforward_layernorm`.
            h = h + norm("post_attention_layernorm")(attn)
            return h + norm("post_feedforward_layernorm")(LlamaMLP(cfg, name="mlp")(
                norm("pre_feedforward_layernorm")(h))), keys, values
        h = h + attn
        h = h + LlamaMLP(cfg, name="mlp")(norm("post_attention_layernorm")(h))
        return h, keys, values


class LlamaForCausalLM(nn.Module):
    """Decoder-only Llama-family transformer.

    `__call__(tokens [B, K] int32, cache=None, attention_mask=None, logits_at=None) -> (logits [B, K, V]
    float32, block)`: with a cache, the K tokens sit at each row's `cache.lengths`, attend the cache (only
    read) and return their keys/values as a `KVBlock` to write in; without one, the K tokens are the whole
    sequence (block None). `logits_at` [B] int32: logits [B, 1, V] of that position of each row only.
    Sliding-window layers mask keys by their distance in absolute positions, so a fixed-shape cache longer
    than the window serves them as it is.
    """

    config: LlamaConfig

    @nn.compact
    def __call__(self, tokens, cache: KVCache | None = None, attention_mask=None, logits_at=None):
        cfg = self.config
        batch, width = tokens.shape
        embed = token_table(cfg.vocab_size, cfg.hidden_size, name="embed_tokens")
        positions, key_positions, mask = decoder_positions_and_mask(batch, width, cache, attention_mask)
        window_mask = (sliding_window_mask(mask, positions, key_positions, cfg.sliding_window)
                       if cfg.sliding_window is not None else None)
        # The CPU decode loop may keep a bfloat16 table for the output layer while it computes in the cache's
        # float32 (FAMILY.output_table).
        h = embed(tokens) if cache is None else lookup(embed, tokens, cache.dtype)
        if cfg.scale_embeddings:
            # HF rounds the scale to the weights' dtype first.
            h = h * jnp.asarray(cfg.hidden_size ** 0.5, h.dtype)
        size = width if cache is None else cache.capacity + width  # every position the block can have
        sliding = [bool(cfg.sliding_layers) and cfg.sliding_layers[i] for i in range(cfg.num_layers)]
        # Per layer, whether it rotates with the sliding layers' own base (Gemma 3): one table per base in use.
        local_base = [s and cfg.local_rope_theta is not None for s in sliding]
        rotary = {local: rotary_embedding(cfg, positions, size, sliding=local) for local in set(local_base)}
        layer_keys, layer_values = [], []
        for i in range(cfg.num_layers):
            layer_mask = window_mask if sliding[i] else mask
            # With `logits_at`, the last layer computes past its keys and values for those positions only.
            query_at = logits_at if i == cfg.num_layers - 1 else None
            h, keys, values = LlamaDecoderLayer(cfg, i, name=f"layers_{i}")(h, rotary[local_base[i]], layer_mask,
                                                                            cache, query_at)
            layer_keys.append(keys)
            layer_values.append(values)
        h = RMSNorm(cfg.rms_norm_eps, cfg.gemma_norms, name="norm")(h)
        if cfg.tie_word_embeddings:
            logits = attend(embed, h)
        else:
            logits = Dense(cfg.vocab_size, use_bias=False, name="lm_head")(h)
        return softcap(logits.astype(jnp.float32), cfg.final_softcap), kv_block(cache, layer_keys, layer_values)


def native_cached_pass(config: LlamaConfig, params: dict, tokens: jax.Array, cache: KVCache
                       ) -> tuple[jax.Array, KVBlock] | None:
    """`LlamaForCausalLM`'s cached pass (tokens [B, K] int32 at the cache's cursors -> logits [B, K, V]
    float32 and the block) in one native call on CPU (`cpu_decoder_step`), or None where that does not apply:
    the plain Llama computation only (no biases, soft-caps, sliding windows or Gemma/Qwen3 norms), SiLU."""
    if (config.qk_norm or config.sandwich_norms or config.gemma_norms or config.scale_embeddings
            or config.attn_softcap is not None or config.final_softcap is not None or config.qkv_bias
            or config.o_bias or config.mlp_bias or config.sliding_window is not None
            or config.attention_scale is not None or config.hidden_act not in ("silu", "swish")):
        return None
    layers = [{"input_norm": layer["input_layernorm"]["weight"],
               "post_norm": layer["post_attention_layernorm"]["weight"],
               **{name: layer["self_attn"][f"{name}_proj"]["kernel"] for name in ("q", "k", "v", "o")},
               **{name: layer["mlp"][f"{name}_proj"]["kernel"] for name in ("gate", "up", "down")}}
              for layer in (params[f"layers_{i}"] for i in range(config.num_layers))]
    table = params["embed_tokens"]["embedding"]
    output = table if config.tie_word_embeddings else params["lm_head"]["kernel"]
    kernels = [layer[name] for layer in layers for name in ("q", "k", "v", "o", "gate", "up", "down")]
    if not cpu_decoder_step.applies(kernels, output, cache):
        return None
    batch, width = tokens.shape
    positions, _, mask = decoder_positions_and_mask(batch, width, cache)
    rotary = rotary_embedding(config, positions, cache.capacity + width)
    return cpu_decoder_step.decode(tokens, cpu_matmul.unpacked(table), rotary, mask, params["norm"]["weight"], output,
                                   layers, cache, config.rms_norm_eps, config.head_dim ** -0.5)


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


# Dense kernels are [in, out]: projections into heads or hidden units split their output dimension,
# projections out of them their input one.
PARAM_AXES = (
    (r"self_attn/q_proj/kernel$", (None, "heads")),
    (r"self_attn/q_proj/bias$", ("heads",)),
    (r"self_attn/[kv]_proj/kernel$", (None, "kv_heads")),
    (r"self_attn/[kv]_proj/bias$", ("kv_heads",)),
    (r"self_attn/o_proj/kernel$", ("heads", None)),
    (r"mlp/(gate|up)_proj/kernel$", (None, "mlp")),
    (r"mlp/(gate|up)_proj/bias$", ("mlp",)),
    (r"mlp/down_proj/kernel$", ("mlp", None)),
)


def axis_sizes(config: LlamaConfig) -> dict[str, int]:
    """How many heads, key/value heads and MLP hidden units the model has (what a mesh axis must divide)."""
    return {"heads": config.num_heads, "kv_heads": config.num_kv_heads, "mlp": config.intermediate_size}


def split_hf_tensors(config: LlamaConfig, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Phi-3 checkpoints fuse q/k/v into `qkv_proj` ([(H + 2 Hkv) * hd, D]) and gate/up into `gate_up_proj`
    ([2 I, D]); they are split into the separate projections here, so that each can be sharded by heads."""
    q_rows, kv_rows = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    split: dict[str, np.ndarray] = {}
    for name, tensor in tensors.items():
        if name.endswith("self_attn.qkv_proj.weight"):
            prefix = name.removesuffix("qkv_proj.weight")
            q, k, v = np.split(tensor, [q_rows, q_rows + kv_rows])
            split.update({prefix + "q_proj.weight": q, prefix + "k_proj.weight": k, prefix + "v_proj.weight": v})
        elif name.endswith("mlp.gate_up_proj.weight"):
            prefix = name.removesuffix("gate_up_proj.weight")
            gate, up = np.split(tensor, 2)
            split.update({prefix + "gate_proj.weight": gate, prefix + "up_proj.weight": up})
        else:
            split[name] = tensor
    return split


FAMILY = ModelFamily(
    model_types=MODEL_TYPES,
    config_class=LlamaConfig,
    module=LlamaForCausalLM,
    init_cache=init_cache,
    hf_param_path=hf_param_path,
    axis_sizes=axis_sizes,
    param_axes=PARAM_AXES,
    split_hf_tensors=split_hf_tensors,
    output_table=lambda config: ("embed_tokens", "embedding") if config.tie_word_embeddings else None,
    native_cached_pass=native_cached_pass,
)
