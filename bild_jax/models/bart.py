"""BART and Marian families (HF `bart`, `marian`): fairseq's post-LayerNorm encoder-decoder transformer.

Both have biased multi-head attention, post-LayerNorm blocks, a two-layer MLP, optionally sqrt(d_model)-scaled
token embeddings (`scale_embedding`) and a `final_logits_bias` added to the LM head's output. They differ in
positions: BART learns a table read at position + 2 and normalizes the embeddings (`layernorm_embedding`);
Marian adds fixed sinusoids (sines in the first half of the features, cosines in the second) and does not.
The decoder starts from `decoder_start_token_id`: BART's EOS, Marian's pad token.

Token embeddings follow transformers 5.23: with `tie_word_embeddings` (the default) the encoder, the decoder
and the LM head share one table; without it each has its own (and HF's `model.shared` goes unused). Marian's
`share_encoder_decoder_embeddings: false` gives the encoder its own table while the head stays tied to the
decoder's.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bild_jax.cache import KVBlock, KVCache
from bild_jax.cpu_lookup import lookup
from bild_jax.models.encoder_decoder import (EncoderDecoderCache, empty_cache, encode_into_cache, encoder_mask,
                                             key_mask)
from bild_jax.models.family import ModelFamily
from bild_jax.errors import Unsupported
from bild_jax.models.hf_config import check_divides, config_int, token_ids
from bild_jax.models.layers import (Dense, activation, attend, attention, cached_keys_values,
                                    decoder_positions_and_mask, head_major, kv_block, token_table)
from bild_jax.weights import hf_name_to_flax_path

MODEL_TYPES = ("bart", "marian")
# BART reads its learned position table at position + 2 (fairseq kept two rows for padding).
LEARNED_POSITION_OFFSET = 2
LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which both HF models use
_TOKEN_EMBEDDING_NAMES = ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


@dataclasses.dataclass(frozen=True)
class BartConfig:
    """Hyper-parameters read from an HF `config.json` of a BART or Marian model."""

    model_type: str
    vocab_size: int
    d_model: int
    encoder_layers: int
    decoder_layers: int
    encoder_attention_heads: int
    decoder_attention_heads: int
    encoder_ffn_dim: int
    decoder_ffn_dim: int
    max_positions: int                    # max_position_embeddings: encoder and decoder tokens, each
    activation_function: str = "gelu"
    scale_embedding: bool = False         # token embeddings times sqrt(d_model)
    learned_positions: bool = True        # BART; Marian: sinusoids
    layernorm_embedding: bool = True      # BART; Marian: none
    tie_word_embeddings: bool = True
    share_encoder_decoder_embeddings: bool = True  # Marian's option; BART always shares
    eos_token_id: tuple = (2,)
    pad_token_id: int | None = 1
    decoder_start_token_id: int = 2
    is_encoder_decoder = True

    @property
    def num_heads(self) -> int:
        """The larger side's attention heads: what the memory estimate sizes attention scores by."""
        return max(self.encoder_attention_heads, self.decoder_attention_heads)

    @property
    def shares_all_embeddings(self) -> bool:
        """One token table for the encoder, the decoder and the LM head (HF's `model.shared`)."""
        return self.tie_word_embeddings and self.share_encoder_decoder_embeddings

    @classmethod
    def from_hf(cls, hf: dict) -> "BartConfig":
        """Reads an HF BART or Marian config dict; a clear error for options this implementation lacks."""
        model_type = hf["model_type"]
        marian = model_type == "marian"
        d_model = config_int(hf, "d_model")
        sizes = {key: config_int(hf, key) for key in (
            "vocab_size", "encoder_layers", "decoder_layers", "encoder_attention_heads", "decoder_attention_heads",
            "encoder_ffn_dim", "decoder_ffn_dim")}
        for side in ("encoder", "decoder"):
            check_divides(f"{side}_attention_heads", sizes[f"{side}_attention_heads"], "d_model", d_model)
        share = bool(hf.get("share_encoder_decoder_embeddings", True)) if marian else True
        decoder_vocab = config_int(hf, "decoder_vocab_size", sizes["vocab_size"])
        if decoder_vocab != sizes["vocab_size"]:
            raise Unsupported(
                f"separate source and target vocabularies (vocab_size {sizes['vocab_size']}, decoder_vocab_size "
                f"{decoder_vocab}) are not supported: bild-jax decodes over one vocabulary")
        act = hf.get("activation_function", "gelu")  # opus-mt checkpoints name "swish"
        activation(act)  # an unsupported activation fails here, at load time
        # Missing ids take the defaults of transformers' BartConfig / MarianConfig.
        pad_token_id = hf.get("pad_token_id", 58100 if marian else 1)
        decoder_start = hf.get("decoder_start_token_id")
        if decoder_start is None:
            decoder_start = pad_token_id if marian else 2
        return cls(
            model_type=model_type,
            d_model=d_model,
            **sizes,
            max_positions=config_int(hf, "max_position_embeddings", 1024),
            activation_function=act,
            scale_embedding=bool(hf.get("scale_embedding", False)),
            learned_positions=not marian,
            layernorm_embedding=not marian,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
            share_encoder_decoder_embeddings=share,
            eos_token_id=token_ids(hf, "eos_token_id", 0 if marian else 2),
            pad_token_id=pad_token_id,
            decoder_start_token_id=int(decoder_start),
        )


@functools.lru_cache(maxsize=8)
def sinusoidal_positions(num_positions: int, dim: int) -> np.ndarray:
    """Marian's fixed position table [num_positions, dim] float32: sin(p * w_i) in the first ceil(dim / 2)
    features, cos(p * w_i) in the rest, w_i = 10000^(-2i / dim); computed in float64 as HF does, so that the
    float32 table is the same."""
    exponents = 2 * (np.arange(dim) // 2) / dim
    angles = np.arange(num_positions, dtype=np.float64)[:, None] / np.power(10000.0, exponents)[None, :]
    sines = (dim + 1) // 2
    table = np.empty((num_positions, dim), np.float64)
    table[:, :sines] = np.sin(angles[:, 0::2])
    table[:, sines:] = np.cos(angles[:, 1::2])
    return table.astype(np.float32)


def _layer_norm(name: str) -> nn.LayerNorm:
    # HF computes the variance as mean((x - mean)^2); flax's fast variance E[x^2] - E[x]^2 loses precision.
    return nn.LayerNorm(epsilon=LAYER_NORM_EPS, use_fast_variance=False, name=name)


class BartAttention(nn.Module):
    """Multi-head attention with biased q/k/v/out projections and 1/sqrt(head_dim) scaling."""

    config: BartConfig
    num_heads: int

    def setup(self):
        d_model = self.config.d_model
        self.q_proj = Dense(d_model)
        self.k_proj = Dense(d_model)
        self.v_proj = Dense(d_model)
        self.out_proj = Dense(d_model)

    @property
    def head_dim(self) -> int:
        return self.config.d_model // self.num_heads

    def keys_values(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Keys and values [B, S, H, D] of hidden states x [B, S, d_model]."""
        shape = x.shape[:2] + (self.num_heads, self.head_dim)
        return self.k_proj(x).reshape(shape), self.v_proj(x).reshape(shape)

    def __call__(self, x, keys, values, mask):
        """x [B, K, d_model] attending head-major keys/values (see `layers.attention`) under mask [B, K, S]."""
        batch, width, _ = x.shape
        query = self.q_proj(x).reshape(batch, width, self.num_heads, self.head_dim)
        out = attention(query, keys, values, mask, scale=self.head_dim ** -0.5)
        return self.out_proj(out.reshape(batch, width, -1))


class BartLayer(nn.Module):
    """One post-LayerNorm block: self-attention, cross-attention (decoder only), MLP; each followed by its norm."""

    config: BartConfig
    is_decoder: bool
    index: int

    def setup(self):
        cfg = self.config
        heads = cfg.decoder_attention_heads if self.is_decoder else cfg.encoder_attention_heads
        self.self_attn = BartAttention(cfg, heads)
        self.self_attn_layer_norm = _layer_norm("self_attn_layer_norm")
        if self.is_decoder:
            self.encoder_attn = BartAttention(cfg, heads)
            self.encoder_attn_layer_norm = _layer_norm("encoder_attn_layer_norm")
        ffn_dim = cfg.decoder_ffn_dim if self.is_decoder else cfg.encoder_ffn_dim
        self.fc1 = Dense(ffn_dim)
        self.fc2 = Dense(cfg.d_model)
        self.final_layer_norm = _layer_norm("final_layer_norm")

    def __call__(self, h, mask, cache: KVCache | None, cross_keys=None, cross_values=None, cross_mask=None):
        block_keys, block_values = self.self_attn.keys_values(h)
        keys, values = cached_keys_values(cache, self.index, block_keys, block_values)
        h = self.self_attn_layer_norm(h + self.self_attn(h, keys, values, mask))
        if self.is_decoder:
            h = self.encoder_attn_layer_norm(h + self.encoder_attn(h, cross_keys, cross_values, cross_mask))
        hidden = activation(self.config.activation_function)(self.fc1(h))
        return self.final_layer_norm(h + self.fc2(hidden)), block_keys, block_values


class BartStack(nn.Module):
    """The encoder or the decoder: positions added to embedded tokens, (BART) an embedding norm, the layers.
    Owns its token table `embed_tokens` when the config does not share one (`shares_all_embeddings`)."""

    config: BartConfig
    is_decoder: bool

    def setup(self):
        cfg = self.config
        if not cfg.shares_all_embeddings:
            self.embed_tokens = token_table(cfg.vocab_size, cfg.d_model)
        if cfg.learned_positions:
            self.embed_positions = nn.Embed(cfg.max_positions + LEARNED_POSITION_OFFSET, cfg.d_model)
        if cfg.layernorm_embedding:
            self.layernorm_embedding = _layer_norm("layernorm_embedding")
        depth = cfg.decoder_layers if self.is_decoder else cfg.encoder_layers
        self.layers = [BartLayer(cfg, self.is_decoder, i) for i in range(depth)]

    def position_embeddings(self, positions: jax.Array) -> jax.Array:
        """[B, K] int32 positions -> [B, K, d_model] float32 (learned dtype for BART)."""
        cfg = self.config
        # Real tokens stay inside the table (`prompts.check_positions`), but padding slots of a prompt bucket or
        # a verification block may not: clamp them, as an out-of-range row would read NaNs that masked
        # attention still multiplies (0 * NaN) into later steps.
        positions = jnp.minimum(positions, cfg.max_positions - 1)
        if cfg.learned_positions:
            return self.embed_positions(positions + LEARNED_POSITION_OFFSET)
        return jnp.asarray(sinusoidal_positions(cfg.max_positions, cfg.d_model))[positions]

    def cross_keys_values(self, encoder_hidden: jax.Array) -> tuple[tuple, tuple]:
        """Per decoder layer, the cross-attention keys and values [B, H, T, D] (head-major) of the encoder output."""
        pairs = [layer.encoder_attn.keys_values(encoder_hidden) for layer in self.layers]
        return tuple(head_major(k) for k, _ in pairs), tuple(head_major(v) for _, v in pairs)

    def __call__(self, embedded, positions, mask, cache: KVCache | None = None, cross_keys=(), cross_values=(),
                 cross_mask=None):
        """Embedded tokens [B, K, d_model] at positions [B, K], under the self-attention mask [B, K, S] ->
        (hidden [B, K, d_model], the block's own keys and values per layer)."""
        h = embedded + self.position_embeddings(positions).astype(embedded.dtype)
        if self.config.layernorm_embedding:
            h = self.layernorm_embedding(h)
        layer_keys, layer_values = [], []
        for i, layer in enumerate(self.layers):
            cross = (cross_keys[i], cross_values[i], cross_mask) if self.is_decoder else ()
            h, keys, values = layer(h, mask, cache, *cross)
            layer_keys.append(keys)
            layer_values.append(values)
        return h, layer_keys, layer_values


class BartForConditionalGeneration(nn.Module):
    """BART / Marian encoder-decoder with a language-modelling head and `final_logits_bias`.

    `__call__(input_ids [B, T], decoder_input_ids [B, K], attention_mask [B, T] or None) -> logits [B, K, V]
    float32` is the uncached forward; `encode` runs the encoder and `decode` the cached decoder.
    """

    config: BartConfig

    def setup(self):
        cfg = self.config
        if cfg.shares_all_embeddings:
            self.shared = token_table(cfg.vocab_size, cfg.d_model)
        self.encoder = BartStack(cfg, is_decoder=False)
        self.decoder = BartStack(cfg, is_decoder=True)
        if not cfg.tie_word_embeddings:
            self.lm_head = Dense(cfg.vocab_size, use_bias=False)
        self.final_logits_bias = self.param("final_logits_bias", nn.initializers.zeros, (1, cfg.vocab_size))

    def _token_table(self, stack: BartStack) -> nn.Embed:
        return self.shared if self.config.shares_all_embeddings else stack.embed_tokens

    def _embed(self, stack: BartStack, tokens: jax.Array, dtype=None) -> jax.Array:
        """The stack's token rows [..., d_model] of tokens [...] int32, in `dtype` (the table's when None)."""
        table = self._token_table(stack)
        embedded = table(tokens) if dtype is None else lookup(table, tokens, dtype)
        return embedded * self.config.d_model ** 0.5 if self.config.scale_embedding else embedded

    def __call__(self, input_ids, decoder_input_ids, attention_mask=None):
        source_mask = encoder_mask(input_ids, attention_mask)
        cross_keys, cross_values = self.decoder.cross_keys_values(self.encode(input_ids, source_mask))
        batch, width = decoder_input_ids.shape
        positions, _, mask = decoder_positions_and_mask(batch, width, None)
        h, _, _ = self.decoder(self._embed(self.decoder, decoder_input_ids), positions, mask, None, cross_keys,
                               cross_values, key_mask(source_mask, width))
        return self._logits(h)

    def encode(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, dtype=None) -> jax.Array:
        """Encoder output [B, T, d_model] of input_ids [B, T] int32; attention_mask [B, T] marks real tokens;
        `dtype`: of the token rows (the table's when None)."""
        batch, width = input_ids.shape
        positions = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32), (batch, width))
        mask = key_mask(encoder_mask(input_ids, attention_mask), width)
        h, _, _ = self.encoder(self._embed(self.encoder, input_ids, dtype), positions, mask)
        return h

    def encoder_cross_keys_values(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, dtype=None):
        """Runs the encoder once, its token rows in `dtype`: per decoder layer, the cross-attention keys and
        values [B, H, T, D]."""
        return self.decoder.cross_keys_values(self.encode(input_ids, attention_mask, dtype))

    def decode(self, tokens: jax.Array, cache: EncoderDecoderCache) -> tuple[jax.Array, KVBlock]:
        """tokens [B, K] int32 at `cache.lengths` -> (logits [B, K, V] float32, their self-attention keys and
        values to write in); the cache is only read."""
        batch, width = tokens.shape
        positions, _, mask = decoder_positions_and_mask(batch, width, cache.self_attn)
        # The CPU decode loop may keep a bfloat16 table for the output layer while it computes in the cache's
        # float32 (FAMILY.output_table).
        embedded = self._embed(self.decoder, tokens, cache.self_attn.dtype)
        h, keys, values = self.decoder(embedded, positions, mask, cache.self_attn,
                                       cache.cross_keys, cache.cross_values, key_mask(cache.encoder_mask, width))
        return self._logits(h), kv_block(cache.self_attn, keys, values)

    def _logits(self, h):
        if self.config.tie_word_embeddings:
            logits = attend(self._token_table(self.decoder), h)
        else:
            logits = self.lm_head(h)
        return logits.astype(jnp.float32) + self.final_logits_bias.astype(jnp.float32)


def _output_table(config: BartConfig) -> tuple[str, ...] | None:
    """The path of the token table that the tied LM head reads (`_logits`); None for an untied head."""
    if not config.tie_word_embeddings:
        return None
    return ("shared", "embedding") if config.shares_all_embeddings else ("decoder", "embed_tokens", "embedding")


def init_cache(config: BartConfig, batch: int, capacity: int, dtype=jnp.float32) -> EncoderDecoderCache:
    """An empty [B, capacity] decoder cache; its cross-attention entries stay empty until `encode_into_cache`."""
    heads = config.decoder_attention_heads
    return empty_cache(config.decoder_layers, batch, capacity, heads, config.d_model // heads, dtype)


def hf_param_path(config: BartConfig, name: str) -> tuple[str, ...] | None:
    """The Flax parameter path for an HF tensor name (with or without the `model.` prefix); None for tensors
    that HF itself does not read under this config."""
    name = name.removeprefix("model.")
    if name in _TOKEN_EMBEDDING_NAMES:
        if config.shares_all_embeddings:
            # Sorted loading puts `shared.weight` last, so it wins over the copies some checkpoints store.
            return ("shared", "weight")
        if name == "shared.weight":
            return None  # untied: HF embeds with the stacks' own tables and never reads this one
    if name.endswith("embed_positions.weight") and not config.learned_positions:
        return None  # Marian's sinusoids, stored by older checkpoints; recomputed
    if name == "lm_head.weight" and config.tie_word_embeddings:
        return None  # tied: HF replaces it with the token table
    return hf_name_to_flax_path(name)


PARAM_AXES = (
    (r"(self_attn|encoder_attn)/q_proj/kernel$", (None, "heads")),
    (r"(self_attn|encoder_attn)/q_proj/bias$", ("heads",)),
    (r"(self_attn|encoder_attn)/[kv]_proj/kernel$", (None, "kv_heads")),
    (r"(self_attn|encoder_attn)/[kv]_proj/bias$", ("kv_heads",)),
    (r"(self_attn|encoder_attn)/out_proj/kernel$", ("heads", None)),
    (r"fc1/kernel$", (None, "mlp")),
    (r"fc1/bias$", ("mlp",)),
    (r"fc2/kernel$", ("mlp", None)),
)


def axis_sizes(config: BartConfig) -> dict[str, int]:
    """How many heads (also key/value heads) and MLP hidden units the model has. Encoder and decoder may
    differ: a mesh axis splits both exactly when it divides their greatest common divisor."""
    heads = math.gcd(config.encoder_attention_heads, config.decoder_attention_heads)
    return {"heads": heads, "kv_heads": heads, "mlp": math.gcd(config.encoder_ffn_dim, config.decoder_ffn_dim)}


# The cache's leaves (self-attention and cross-attention keys/values [B, H, S, D], lengths [B], encoder
# mask [B, T]) follow the default head-major rule.
FAMILY = ModelFamily(
    model_types=MODEL_TYPES,
    config_class=BartConfig,
    module=BartForConditionalGeneration,
    init_cache=init_cache,
    hf_param_path=hf_param_path,
    axis_sizes=axis_sizes,
    param_axes=PARAM_AXES,
    encode_into_cache=encode_into_cache,
    output_table=_output_table,
)
