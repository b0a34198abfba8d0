"""GPT-2 family (HF `gpt2`): learned positions, pre-LayerNorm blocks, fused QKV, LM head tied to the
token embedding (untied when the config says so)."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from bild_jax.cache import KVCache
from bild_jax.cpu_lookup import lookup
from bild_jax.errors import Unsupported
from bild_jax.models.family import ModelFamily
from bild_jax.models.hf_config import check_divides, config_float, config_int, token_ids
from bild_jax.rows import take_at
from bild_jax.models.layers import (Dense, activation, attend, attention, cached_keys_values,
                                    decoder_positions_and_mask, kv_block, token_table)
from bild_jax.weights import hf_name_to_flax_path

# Non-parameter buffers that old GPT-2 checkpoints (the hub `gpt2` one included) still carry.
_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """Hyper-parameters read from an HF `config.json` of a GPT-2 model."""

    model_type: str
    vocab_size: int
    n_embd: int
    n_layer: int
    n_head: int
    n_inner: int
    layer_norm_epsilon: float
    activation_function: str = "gelu_new"
    max_positions: int = 1024
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    tie_word_embeddings: bool = True
    eos_token_id: tuple = ()
    pad_token_id: int | None = None
    is_encoder_decoder = False

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def num_heads(self) -> int:
        """Query heads, under the name the other families use (`bild_jax.memory` reads it)."""
        return self.n_head

    @classmethod
    def from_hf(cls, hf: dict) -> "GPT2Config":
        """Reads an HF GPT-2 config dict; a clear error for options this implementation lacks."""
        if hf.get("add_cross_attention", False):
            raise Unsupported("GPT-2 with add_cross_attention=True (cross-attention layers) is not supported")
        # `reorder_and_upcast_attn` only moves the scaling into a float32 matmul; `attention` already computes
        # scores and softmax in float32, so the option needs nothing here.
        n_embd, n_head = config_int(hf, "n_embd"), config_int(hf, "n_head")
        check_divides("n_head", n_head, "n_embd", n_embd)
        act = hf.get("activation_function", "gelu_new")
        activation(act)  # an unsupported activation fails here, at load time
        return cls(
            model_type=hf["model_type"],
            vocab_size=config_int(hf, "vocab_size"),
            n_embd=n_embd,
            n_layer=config_int(hf, "n_layer"),
            n_head=n_head,
            n_inner=config_int(hf, "n_inner", 4 * n_embd),
            layer_norm_epsilon=config_float(hf, "layer_norm_epsilon", 1e-5),
            activation_function=act,
            max_positions=config_int(hf, "n_positions", 1024),
            scale_attn_weights=bool(hf.get("scale_attn_weights", True)),
            scale_attn_by_inverse_layer_idx=bool(hf.get("scale_attn_by_inverse_layer_idx", False)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
            eos_token_id=token_ids(hf, "eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
        )


def _layer_norm(config: GPT2Config, name: str) -> nn.LayerNorm:
    # HF computes the variance as mean((x - mean)^2); flax's fast variance E[x^2] - E[x]^2 loses precision.
    return nn.LayerNorm(epsilon=config.layer_norm_epsilon, use_fast_variance=False, name=name)


class GPT2Attention(nn.Module):
    config: GPT2Config
    layer: int

    @nn.compact
    def __call__(self, x, mask, cache, query_at=None):
        """x [B, K, n_embd] -> (output [B, K, n_embd], keys and values [B, K, H, D]); with `query_at` [B]
        int32 the output is of that query of each row only, [B, 1, n_embd] (the keys and values of all K)."""
        cfg = self.config
        batch, width, _ = x.shape
        # c_attn's kernel is HF's Conv1D weight as is: [n_embd, 3 * n_embd], columns ordered q | k | v.
        qkv = Dense(3 * cfg.n_embd, name="c_attn")(x).reshape(batch, width, 3, cfg.n_head, cfg.head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        keys, values = cached_keys_values(cache, self.layer, k, v)
        if query_at is not None:
            q, mask = take_at(q, query_at)[:, None], take_at(mask, query_at)[:, None]           # [B, 1, ...]
        scale = cfg.head_dim ** -0.5 if cfg.scale_attn_weights else 1.0
        if cfg.scale_attn_by_inverse_layer_idx:
            scale /= self.layer + 1
        out = attention(q, keys, values, mask, scale=scale)
        out = Dense(cfg.n_embd, name="c_proj")(out.reshape(batch, q.shape[1], -1))
        return out, k, v


class GPT2MLP(nn.Module):
    config: GPT2Config

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        hidden = activation(cfg.activation_function)(Dense(cfg.n_inner, name="c_fc")(x))
        return Dense(cfg.n_embd, name="c_proj")(hidden)


class GPT2Block(nn.Module):
    config: GPT2Config
    layer: int

    @nn.compact
    def __call__(self, h, mask, cache, query_at=None):
        """h [B, K, n_embd] -> (h, keys, values); with `query_at` [B] int32, h of that position of each row
        only, [B, 1, n_embd] (a prompt pass's last layer)."""
        cfg = self.config
        attn, keys, values = GPT2Attention(cfg, self.layer, name="attn")(_layer_norm(cfg, "ln_1")(h), mask, cache,
                                                                         query_at)
        h = h if query_at is None else take_at(h, query_at)[:, None]                              # [B, 1, n_embd]
        h = h + attn
        h = h + GPT2MLP(cfg, name="mlp")(_layer_norm(cfg, "ln_2")(h))
        return h, keys, values


class GPT2LMHeadModel(nn.Module):
    """Decoder-only GPT-2 transformer.

    `__call__(tokens [B, K] int32, cache=None, attention_mask=None, logits_at=None) -> (logits [B, K, V]
    float32, block)`: with a cache, the K tokens sit at each row's `cache.lengths`, attend the cache (only
    read) and return their keys/values as a `KVBlock` to write in; without one, the K tokens are the whole
    sequence (block None). `logits_at` [B] int32: logits [B, 1, V] of that position of each row only.
    """

    config: GPT2Config

    @nn.compact
    def __call__(self, tokens, cache: KVCache | None = None, attention_mask=None, logits_at=None):
        cfg = self.config
        batch, width = tokens.shape
        wte = token_table(cfg.vocab_size, cfg.n_embd, name="wte")
        positions, _, mask = decoder_positions_and_mask(batch, width, cache, attention_mask)
        # Real tokens never pass the table (callers check prompt + new tokens against max_positions), but
        # padding slots of a verification block may: clamp them, as an out-of-range row would read NaNs
        # that masked attention still multiplies (0 * NaN) into every later step.
        positions = jnp.minimum(positions, cfg.max_positions - 1)
        # The CPU decode loop may keep a bfloat16 table for the output layer while it computes in the cache's
        # float32 (FAMILY.output_table).
        h = (wte(tokens) if cache is None else lookup(wte, tokens, cache.dtype)) + nn.Embed(
            cfg.max_positions, cfg.n_embd, name="wpe")(positions)
        layer_keys, layer_values = [], []
        for i in range(cfg.n_layer):
            # With `logits_at`, the last layer computes past its keys and values for those positions only.
            query_at = logits_at if i == cfg.n_layer - 1 else None
            h, keys, values = GPT2Block(cfg, i, name=f"h_{i}")(h, mask, cache, query_at)
            layer_keys.append(keys)
            layer_values.append(values)
        h = _layer_norm(cfg, "ln_f")(h)
        if cfg.tie_word_embeddings:
            logits = attend(wte, h)
        else:
            # An Embed, not a Dense: HF's lm_head is an nn.Linear stored [vocab, n_embd], which the family's
            # untransposed (Conv1D) weight layout would otherwise load the wrong way round.
            logits = attend(token_table(cfg.vocab_size, cfg.n_embd, name="lm_head"), h)
        return logits.astype(jnp.float32), kv_block(cache, layer_keys, layer_values)


def init_cache(config: GPT2Config, batch: int, capacity: int, dtype=jnp.float32) -> KVCache:
    """An empty [B, capacity] cache for this model."""
    return KVCache.create(config.n_layer, batch, capacity, config.n_head, config.head_dim, dtype)


def hf_param_path(config: GPT2Config, name: str) -> tuple[str, ...] | None:
    """The Flax parameter path for an HF tensor name (with or without the `transformer.` prefix of
    GPT2LMHeadModel); None for attention-mask buffers and for a tied `lm_head.weight`."""
    name = name.removeprefix("transformer.")
    if name.endswith(_BUFFER_SUFFIXES):
        return None
    if config.tie_word_embeddings and name == "lm_head.weight":
        return None
    return hf_name_to_flax_path(name)


# c_attn [D, 3D] holds q | k | v side by side: split over its columns, a device would hold a mix of q, k and
# v blocks, so it stays replicated. Attention itself still splits by heads, following the sharded cache.
PARAM_AXES = (
    (r"attn/c_proj/kernel$", ("heads", None)),
    (r"mlp/c_fc/kernel$", (None, "mlp")),
    (r"mlp/c_fc/bias$", ("mlp",)),
    (r"mlp/c_proj/kernel$", ("mlp", None)),
)


def axis_sizes(config: GPT2Config) -> dict[str, int]:
    """How many heads (also key/value heads) and MLP hidden units the model has."""
    return {"heads": config.n_head, "kv_heads": config.n_head, "mlp": config.n_inner}


FAMILY = ModelFamily(
    model_types=("gpt2",),
    config_class=GPT2Config,
    module=GPT2LMHeadModel,
    init_cache=init_cache,
    hf_param_path=hf_param_path,
    axis_sizes=axis_sizes,
    param_axes=PARAM_AXES,
    transpose_linear=False,
    # Its lookups need no cast: wpe, float32 in the loop, promotes the sum.
    output_table=lambda config: ("wte" if config.tie_word_embeddings else "lm_head", "embedding"),
)
