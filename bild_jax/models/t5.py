"""T5 family (HF `t5`, `mt5`): encoder-decoder with relative position buckets, RMS norms, unscaled attention."""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from bild_jax import cpu_matmul
from bild_jax.cpu_lookup import lookup
from bild_jax.cache import KVBlock, KVCache
from bild_jax.errors import InputError
from bild_jax.models.encoder_decoder import (EncoderDecoderCache, empty_cache, encode_into_cache, encoder_mask,
                                             key_mask)
from bild_jax.models.family import ModelFamily
from bild_jax.models.hf_config import config_float, config_int, token_ids
from bild_jax.models.layers import (Dense, DenseWeights, RMSNorm, activation, attend, attention, cached_keys_values,
                                    decoder_positions_and_mask, dense_group, head_major, kv_block,
                                    token_table)
from bild_jax.weights import hf_name_to_flax_path

MODEL_TYPES = ("t5", "mt5")
# The shared embedding, and the copies of it that some checkpoints also store under the stacks' names.
_EMBEDDING_NAMES = ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Hyper-parameters read from an HF `config.json` of a T5 or mT5 model."""

    model_type: str
    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_decoder_layers: int
    num_heads: int
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    dense_act_fn: str = "relu"
    is_gated_act: bool = False
    tie_word_embeddings: bool = True
    scale_decoder_outputs: bool = True  # decoder output times d_model**-0.5 before the lm head
    eos_token_id: tuple = (1,)
    pad_token_id: int | None = 0
    decoder_start_token_id: int = 0
    max_positions = None  # relative positions: no hard limit on sequence length
    is_encoder_decoder = True

    @classmethod
    def from_hf(cls, hf: dict) -> "T5Config":
        """Reads an HF config dict, resolving tying and output scaling the way transformers 5.23 does."""
        model_type = hf["model_type"]
        feed_forward = hf.get("feed_forward_proj", "gated-gelu" if model_type == "mt5" else "relu")
        parts = feed_forward.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise InputError(f"feed_forward_proj {feed_forward!r} is not of the form 'gated-ACT' or 'ACT'")
        dense_act_fn = "gelu_new" if feed_forward == "gated-gelu" else parts[-1]
        activation(dense_act_fn)  # an unsupported activation fails here, not at the first forward
        tie = hf.get("tie_word_embeddings")
        # T5 v1.0 rescales the decoder output and v1.1 does not. transformers 5.23 saves that choice as
        # `scale_decoder_outputs`, older configs signal v1.1 by `tie_word_embeddings: false`, and its
        # MT5ForConditionalGeneration never rescales.
        if model_type == "mt5":
            scale = False
        else:
            scale = bool(hf.get("scale_decoder_outputs", tie is not False))
        pad_token_id = hf.get("pad_token_id", 0)
        decoder_start = hf.get("decoder_start_token_id")
        num_layers = config_int(hf, "num_layers")
        return cls(
            model_type=model_type,
            vocab_size=config_int(hf, "vocab_size"),
            d_model=config_int(hf, "d_model"),
            d_kv=config_int(hf, "d_kv"),
            d_ff=config_int(hf, "d_ff"),
            num_layers=num_layers,
            num_decoder_layers=config_int(hf, "num_decoder_layers", num_layers),
            num_heads=config_int(hf, "num_heads"),
            relative_attention_num_buckets=config_int(hf, "relative_attention_num_buckets", 32),
            relative_attention_max_distance=config_int(hf, "relative_attention_max_distance", 128),
            layer_norm_epsilon=config_float(hf, "layer_norm_epsilon", 1e-6),
            dense_act_fn=dense_act_fn,
            is_gated_act=len(parts) == 2,
            tie_word_embeddings=tie is not False,
            scale_decoder_outputs=scale,
            eos_token_id=token_ids(hf, "eos_token_id", 1),
            pad_token_id=pad_token_id,
            decoder_start_token_id=decoder_start if decoder_start is not None else (pad_token_id or 0),
        )


def relative_position_bucket(relative_position: jax.Array, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> jax.Array:
    """HF T5's bucket (int32, same shape) of each key-minus-query distance: exact when small, log-spaced beyond.

    Computed in float32 like the reference, so that distances on a bucket boundary land in the same bucket.
    """
    buckets = 0
    if bidirectional:
        num_buckets //= 2
        buckets = (relative_position > 0).astype(jnp.int32) * num_buckets
        distance = jnp.abs(relative_position)
    else:
        distance = -jnp.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    # Clamping to 1 keeps the log finite where the exact branch is taken anyway.
    log_ratio = jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact) / math.log(max_distance / max_exact)
    large = jnp.minimum(max_exact + (log_ratio * (num_buckets - max_exact)).astype(jnp.int32), num_buckets - 1)
    return buckets + jnp.where(distance < max_exact, distance, large)


class T5Attention(nn.Module):
    config: T5Config
    has_relative_bias: bool = False  # only the first block of each stack owns the bias table
    bidirectional: bool = True

    def setup(self):
        cfg = self.config
        inner = cfg.num_heads * cfg.d_kv
        # q/k/v read one input together (`dense_group`: one native call in a decode step).
        self.q = DenseWeights(inner, use_bias=False)
        self.k = DenseWeights(inner, use_bias=False)
        self.v = DenseWeights(inner, use_bias=False)
        self.o = Dense(cfg.d_model, use_bias=False)
        if self.has_relative_bias:
            self.relative_attention_bias = nn.Embed(cfg.relative_attention_num_buckets, cfg.num_heads)

    def heads(self, *projections: jax.Array) -> tuple[jax.Array, ...]:
        """Each [B, S, H x D] projection as [B, S, H, D]."""
        return tuple(p.reshape(p.shape[:2] + (self.config.num_heads, self.config.d_kv)) for p in projections)

    def queries(self, x: jax.Array) -> jax.Array:
        """Queries [B, K, H, D] of hidden states x [B, K, d_model]."""
        return self.heads(*dense_group(x, [self.q]))[0]

    def queries_keys_values(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Queries, keys and values [B, S, H, D] of hidden states x [B, S, d_model]."""
        return self.heads(*dense_group(x, [self.q, self.k, self.v]))

    def key_value_kernels(self, in_features: int) -> tuple[jax.Array, jax.Array]:
        """The key and value kernels [d_model, H x D]."""
        return cpu_matmul.unpacked(self.k(in_features)[0]), cpu_matmul.unpacked(self.v(in_features)[0])

    def position_bias(self, query_positions: jax.Array, key_positions: jax.Array) -> jax.Array:
        """Additive bias [B, H, K, S] float32 for queries at query_positions [B, K] and keys at key_positions
        [B or 1, S] int32."""
        cfg = self.config
        relative = key_positions[:, None, :] - query_positions[:, :, None]
        buckets = relative_position_bucket(relative, self.bidirectional, cfg.relative_attention_num_buckets,
                                           cfg.relative_attention_max_distance)
        return self.relative_attention_bias(buckets).astype(jnp.float32).transpose(0, 3, 1, 2)

    def __call__(self, query, keys, values, mask, bias=None):
        """The attention output [B, K, d_model] of queries [B, K, H, D] over keys and values [B, S, H, D]."""
        batch, width = query.shape[:2]
        # T5 folds the 1/sqrt(d) scaling into its initialisation, so scores are not rescaled.
        out = attention(query, keys, values, mask, bias, scale=1.0)
        return self.o(out.reshape(batch, width, -1))


class T5LayerSelfAttention(nn.Module):
    config: T5Config
    has_relative_bias: bool
    bidirectional: bool

    def setup(self):
        self.SelfAttention = T5Attention(self.config, self.has_relative_bias, self.bidirectional)
        self.layer_norm = RMSNorm(self.config.layer_norm_epsilon)

    def __call__(self, h, mask, bias, cache: KVCache | None, layer: int):
        normed = self.layer_norm(h)
        query, block_keys, block_values = self.SelfAttention.queries_keys_values(normed)
        keys, values = cached_keys_values(cache, layer, block_keys, block_values)
        return h + self.SelfAttention(query, keys, values, mask, bias), block_keys, block_values


class T5LayerCrossAttention(nn.Module):
    config: T5Config

    def setup(self):
        self.EncDecAttention = T5Attention(self.config)
        self.layer_norm = RMSNorm(self.config.layer_norm_epsilon)

    def __call__(self, h, keys, values, mask):
        return h + self.EncDecAttention(self.EncDecAttention.queries(self.layer_norm(h)), keys, values, mask)


class T5DenseReluDense(nn.Module):
    config: T5Config

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        act = activation(cfg.dense_act_fn)
        if cfg.is_gated_act:
            hidden = act(Dense(cfg.d_ff, use_bias=False, name="wi_0")(x)) * Dense(
                cfg.d_ff, use_bias=False, name="wi_1")(x)
        else:
            hidden = act(Dense(cfg.d_ff, use_bias=False, name="wi")(x))
        return Dense(cfg.d_model, use_bias=False, name="wo")(hidden)


class T5LayerFF(nn.Module):
    config: T5Config

    @nn.compact
    def __call__(self, h):
        normed = RMSNorm(self.config.layer_norm_epsilon, name="layer_norm")(h)
        return h + T5DenseReluDense(self.config, name="DenseReluDense")(normed)


class T5Block(nn.Module):
    config: T5Config
    is_decoder: bool
    index: int

    def setup(self):
        self_attention = T5LayerSelfAttention(self.config, self.index == 0, not self.is_decoder)
        if self.is_decoder:
            self.layer = [self_attention, T5LayerCrossAttention(self.config), T5LayerFF(self.config)]
        else:
            self.layer = [self_attention, T5LayerFF(self.config)]

    def __call__(self, h, mask, bias, cache, cross_keys=None, cross_values=None, cross_mask=None):
        h, keys, values = self.layer[0](h, mask, bias, cache, self.index)
        if self.is_decoder:
            h = self.layer[1](h, cross_keys, cross_values, cross_mask)
        return self.layer[-1](h), keys, values


class T5Stack(nn.Module):
    """The encoder or the decoder stack, taking embedded tokens [B, K, d_model]."""

    config: T5Config
    is_decoder: bool

    def setup(self):
        cfg = self.config
        depth = cfg.num_decoder_layers if self.is_decoder else cfg.num_layers
        self.block = [T5Block(cfg, self.is_decoder, i) for i in range(depth)]
        self.final_layer_norm = RMSNorm(cfg.layer_norm_epsilon)

    def cross_keys_values(self, encoder_hidden: jax.Array) -> tuple[tuple, tuple]:
        """Per decoder layer, the cross-attention keys and values [B, H, T, D] (head-major) of the encoder
        output [B, T, d_model]: one product with every layer's kernels side by side, since T rows are a
        prompt pass for XLA's dot, which runs one [d_model, 2 x layers x H x D] product faster than 2 x layers
        narrow ones (bundled T5 large: twelve 256 x 256 products were a third of its first-token call)."""
        attentions = [block.layer[1].EncDecAttention for block in self.block]
        kernels = [k for a in attentions for k in a.key_value_kernels(encoder_hidden.shape[-1])]
        x, wide, _ = cpu_matmul.promote_dtype(encoder_hidden, jnp.concatenate(kernels, axis=1), None)
        projections = jnp.split(cpu_matmul.dense_dot_general(x, wide, (((x.ndim - 1,), (0,)), ((), ()))),
                                len(kernels), axis=-1)                                     # 2L x [B, T, H x D]
        pairs = [attentions[0].heads(*projections[2 * i:2 * i + 2]) for i in range(len(attentions))]
        return tuple(head_major(k) for k, _ in pairs), tuple(head_major(v) for _, v in pairs)

    def __call__(self, h, positions, key_positions, mask, cache: KVCache | None = None, cross_keys=(),
                 cross_values=(), cross_mask=None):
        """h [B, K, d_model] at positions [B, K], attending keys at key_positions [B or 1, S] under the
        self-attention mask [B, K, S] -> (hidden, the block's own keys and values per layer)."""
        # The first block's bias table serves every block of the stack.
        bias = self.block[0].layer[0].SelfAttention.position_bias(positions, key_positions)
        layer_keys, layer_values = [], []
        for i, block in enumerate(self.block):
            cross = (cross_keys[i], cross_values[i], cross_mask) if self.is_decoder else ()
            h, keys, values = block(h, mask, bias, cache, *cross)
            layer_keys.append(keys)
            layer_values.append(values)
        return self.final_layer_norm(h), layer_keys, layer_values


class T5ForConditionalGeneration(nn.Module):
    """T5 / mT5 encoder-decoder with a language-modelling head.

    `__call__(input_ids [B, T], decoder_input_ids [B, K], attention_mask [B, T] or None) -> logits [B, K, V]
    float32` is the uncached forward; `encode` runs the encoder and `decode` the cached decoder.
    """

    config: T5Config

    def setup(self):
        cfg = self.config
        self.shared = token_table(cfg.vocab_size, cfg.d_model)
        self.encoder = T5Stack(cfg, is_decoder=False)
        self.decoder = T5Stack(cfg, is_decoder=True)
        if not cfg.tie_word_embeddings:
            self.lm_head = Dense(cfg.vocab_size, use_bias=False)

    def __call__(self, input_ids, decoder_input_ids, attention_mask=None):
        source_mask = encoder_mask(input_ids, attention_mask)
        cross_keys, cross_values = self.decoder.cross_keys_values(self.encode(input_ids, source_mask))
        batch, width = decoder_input_ids.shape
        positions, key_positions, mask = decoder_positions_and_mask(batch, width, None)
        h, _, _ = self.decoder(self.shared(decoder_input_ids), positions, key_positions, mask, None, cross_keys,
                               cross_values, key_mask(source_mask, width))
        return self._logits(h)

    def encode(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, dtype=None) -> jax.Array:
        """Encoder output [B, T, d_model] of input_ids [B, T] int32; attention_mask [B, T] marks real tokens;
        `dtype`: of the token rows (the table's when None)."""
        width = input_ids.shape[1]
        positions = jnp.arange(width, dtype=jnp.int32)[None, :]
        mask = key_mask(encoder_mask(input_ids, attention_mask), width)
        embedded = self.shared(input_ids) if dtype is None else lookup(self.shared, input_ids, dtype)
        h, _, _ = self.encoder(embedded, positions, positions, mask)
        return h

    def encoder_cross_keys_values(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, dtype=None):
        """Runs the encoder once, its token rows in `dtype`: per decoder layer, the cross-attention keys and
        values [B, H, T, D]."""
        return self.decoder.cross_keys_values(self.encode(input_ids, attention_mask, dtype))

    def decode(self, tokens: jax.Array, cache: EncoderDecoderCache) -> tuple[jax.Array, KVBlock]:
        """tokens [B, K] int32 at `cache.lengths` -> (logits [B, K, V] float32, their self-attention keys and
        values to write in); the cache is only read."""
        batch, width = tokens.shape
        positions, key_positions, mask = decoder_positions_and_mask(batch, width, cache.self_attn)
        # The CPU decode loop may keep a bfloat16 table for the output layer while it computes in the cache's
        # float32 (FAMILY.output_table).
        embedded = lookup(self.shared, tokens, cache.self_attn.dtype)
        h, keys, values = self.decoder(embedded, positions, key_positions, mask, cache.self_attn,
                                       cache.cross_keys, cache.cross_values, key_mask(cache.encoder_mask, width))
        return self._logits(h), kv_block(cache.self_attn, keys, values)

    def _logits(self, h):
        if self.config.scale_decoder_outputs:
            h = h * self.config.d_model ** -0.5
        logits = attend(self.shared, h) if self.config.tie_word_embeddings else self.lm_head(h)
        return logits.astype(jnp.float32)


def init_cache(config: T5Config, batch: int, capacity: int, dtype=jnp.float32) -> EncoderDecoderCache:
    """An empty [B, capacity] decoder cache; its cross-attention entries stay empty until `encode_into_cache`."""
    return empty_cache(config.num_decoder_layers, batch, capacity, config.num_heads, config.d_kv, dtype)


def hf_param_path(config: T5Config, name: str) -> tuple[str, ...] | None:
    """The Flax parameter path for an HF tensor name; None for tensors that carry nothing."""
    if name in _EMBEDDING_NAMES:
        # Sorted loading puts `shared.weight` last, so it wins over its copies; checkpoints that store only
        # the copies (e.g. madlad400) still load.
        return ("shared", "weight")
    if name.endswith("EncDecAttention.relative_attention_bias.weight"):
        return None  # cross-attention has no position bias; HF ignores this tensor too
    # A tied config keeps `lm_head.weight` unmapped on purpose: transformers 5.23 writes
    # `tie_word_embeddings: true` even for untied models, and a checkpoint that stores its own lm head must
    # fail loudly as unexpected rather than load with the wrong head.
    return hf_name_to_flax_path(name)


PARAM_AXES = (
    (r"Attention/q/kernel$", (None, "heads")),
    (r"Attention/[kv]/kernel$", (None, "kv_heads")),
    (r"Attention/o/kernel$", ("heads", None)),
    (r"relative_attention_bias/embedding$", (None, "heads")),
    (r"DenseReluDense/wi(_0|_1)?/kernel$", (None, "mlp")),
    (r"DenseReluDense/wo/kernel$", ("mlp", None)),
)


def axis_sizes(config: T5Config) -> dict[str, int]:
    """How many heads (also key/value heads) and MLP hidden units the model has."""
    return {"heads": config.num_heads, "kv_heads": config.num_heads, "mlp": config.d_ff}


# The cache's leaves (self-attention and cross-attention keys/values [B, H, S, D], lengths [B], encoder
# mask [B, T]) follow the default head-major rule.
FAMILY = ModelFamily(
    model_types=MODEL_TYPES,
    config_class=T5Config,
    module=T5ForConditionalGeneration,
    init_cache=init_cache,
    hf_param_path=hf_param_path,
    axis_sizes=axis_sizes,
    param_axes=PARAM_AXES,
    encode_into_cache=encode_into_cache,
    output_table=lambda config: ("shared", "embedding") if config.tie_word_embeddings else None,
)
