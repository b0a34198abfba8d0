"""`Model`: a family's config (static) and its parameters (a pytree), usable inside `jax.jit`."""

from __future__ import annotations

import functools
import weakref
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct, traverse_util

from bild_jax import cpu_matmul, native_library
from bild_jax.cache import KVBlock
from bild_jax.errors import InputError
from bild_jax.models import ModelFamily, family_for


@struct.dataclass
class Model:
    """A loaded model. Pass it straight into jitted functions: the config is static, the params traced."""

    config: Any = struct.field(pytree_node=False)  # a family config: frozen, hashable dataclass
    params: Any                                    # nested dict of arrays
    # A `bild_jax.sharding.ModelSharding` once `shard_params` placed the params on a mesh: it also lays
    # out the caches this model creates. Static, so a sharded model compiles its own program.
    sharding: Any = struct.field(pytree_node=False, default=None)
    # Logits cover only the first `shared_vocab_size` rows when set (`with_vocab_size`): a pair whose
    # checkpoints pad the vocabulary differently decodes over the rows both have. Static: part of the shapes.
    shared_vocab_size: int | None = struct.field(pytree_node=False, default=None)

    @property
    def family(self) -> ModelFamily:
        return family_for(self.config.model_type)

    @property
    def module(self):
        return self.family.module(self.config)

    @property
    def is_encoder_decoder(self) -> bool:
        return self.family.is_encoder_decoder

    @property
    def dtype(self):
        """The dtype it computes in: its params', the widest where they mix (the CPU decode loop keeps some
        bfloat16 weights of a model it runs in float32)."""
        def widest():
            dtypes = {param.dtype for param in jax.tree_util.tree_leaves(self.params)}
            return functools.reduce(jnp.promote_types, dtypes)

        return _remembered(self, "dtype", widest)

    @property
    def vocab_size(self) -> int:
        """The rows its logits have: the config's vocabulary, or the shared part of it (`with_vocab_size`)."""
        return self.config.vocab_size if self.shared_vocab_size is None else self.shared_vocab_size

    def with_vocab_size(self, size: int) -> "Model":
        """The model with its logits cut to the first `size` rows of its vocabulary (an int in
        [1, config.vocab_size]): the padding rows past `size` can then never win, in any decoding mode."""
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= self.config.vocab_size:
            raise InputError(f"vocabulary size must be an int in [1, {self.config.vocab_size}] (the "
                             f"{self.config.model_type} model's rows), got {size!r}")
        return self.replace(shared_vocab_size=None if size == self.config.vocab_size else size)

    def _cut(self, logits: jax.Array) -> jax.Array:
        # A static slice at the output: the decode loops only ever see the shared rows.
        return logits if self.shared_vocab_size is None else logits[..., :self.shared_vocab_size]

    def start_cache(self, batch: int, capacity: int, encoder_input_ids: jax.Array | None = None,
                    encoder_mask: jax.Array | None = None):
        """An empty decoder cache of `capacity` slots per row; for encoder-decoder models the encoder runs
        here once over `encoder_input_ids` [B, T] (with `encoder_mask` [B, T]) and its keys/values are kept."""
        cache = self.family.init_cache(self.config, batch, capacity, self.dtype)
        if self.is_encoder_decoder:
            cache = self.family.encode_into_cache(self.module, self.params, encoder_input_ids, encoder_mask, cache)
        return cache if self.sharding is None else self.sharding.constrain_cache(cache, self.family.cache_axes(cache))

    def decode_block(self, tokens: jax.Array, cache) -> tuple[jax.Array, KVBlock]:
        """The one cached forward: tokens [B, K] int32 at `cache.lengths` -> (logits [B, K, V] float32, their
        keys/values as a `KVBlock`). The cache is only read; `cache.write(block)` puts the block in."""
        native = self.family.native_cached_pass
        if native is not None and self.sharding is None:
            computed = native(self.config, self.params, tokens, cache)
            if computed is not None:
                return self._cut(computed[0]), computed[1]
        method = self.module.decode if self.is_encoder_decoder else self.module.__call__
        logits, block = self.module.apply({"params": self.params}, tokens, cache, method=method)
        return self._cut(logits), block

    def decode(self, tokens: jax.Array, cache) -> tuple[jax.Array, Any]:
        """`decode_block`, then the block written in: logits [B, K, V] float32 and the cache with its lengths
        moved K forward."""
        logits, block = self.decode_block(tokens, cache)
        return logits, cache.append(block)

    def decode_prompt(self, prompts: jax.Array, prompt_lengths: jax.Array, cache) -> tuple[jax.Array, Any]:
        """A decoder-only model's prompt pass: prompts [B, T] int32 (right-padded, prompt_lengths [B] int32)
        into an empty cache -> (logits [B, V] float32 after each row's last prompt token, the cache holding
        the T slots, its lengths still 0). The output layer runs for those B positions only: over all B x T
        it would be a seventh of the bundled large model's multiply-adds, two fifths of the small one's; and so
        does the last layer past its keys and values (a jitted 64-token prefill: the bundled large model's 4.70 ->
        4.25 ms, the small one's 0.88 -> 0.67 ms)."""
        logits, block = self.module.apply({"params": self.params}, prompts, cache, logits_at=prompt_lengths - 1)
        return self._cut(logits)[:, 0], cache.write(block)


def for_decode_loop(model: Model, rows: int) -> Model:
    """The model as a decode loop should hold it, inside the caller's jit, before prefill and the loop.

    `rows`: the most token rows a pass inside the loop computes at once (B for one-token steps, B x
    (max_draft + 1) for verification blocks).

    XLA:CPU has no fast half-precision dot: it converts each bfloat16/float16 weight to float32 before every
    dot, and inside a `lax.while_loop` it does so again on every step (the loop-invariant conversion is not
    hoisted), reading 22 MB and writing 44 MB per token for the bundled large model. On CPU the params are
    converted once per call here, so that the loop runs float32 activations, except the bfloat16 weights
    that bild-jax's native kernel reads (`cpu_matmul.native_reads`: with the kernels built, every Dense
    kernel and output table): they stay as they are, half the bytes of a float32 copy, and their products
    take the rows rounded to bfloat16 (`cpu_matmul.bfloat16_rows`). On GPUs and TPUs,
    which compute in half precision natively, the model is returned unchanged.

    Then the Dense kernels get their panel-major copies for the native kernel (`with_panels`), unless they
    have them: made here, inside a jit, they cost a copy of the kernels on every call (the bundled large
    model: 44 MB in float32), so the generate functions call `with_panels` first, outside their jit, once
    per model; do the same before calling the pure decode functions in your own jit.
    """
    if decode_loop_dtype(model) != model.dtype:
        def in_loop(path, param):
            if _kept_in_loop(model, path, param, rows):
                return param
            return cpu_matmul.unpacked(param).astype(jnp.float32)

        model = model.replace(params=jax.tree_util.tree_map_with_path(in_loop, model.params, is_leaf=_is_packed))
    return with_panels(model)


def for_prompt_pass(model: Model, rows: int) -> Model:
    """The decode loop's model (`for_decode_loop`) as a prompt pass of `rows` token rows should hold it.

    Where XLA's dot multiplies many rows by a bfloat16 weight faster than the native kernel
    (`cpu_matmul.xla_bfloat16_products`: CPUs with AMX, products of 16 rows or more), the pass's bfloat16
    Dense kernels let it (`PanelKernel.in_prompt_pass`): the same exact products, summed in another order.
    Passes inside the loop keep the native kernel at any width, so that a verification block's logits equal
    those of one-token steps bitwise; a prompt pass is the same computation in every decode function, so
    their outputs still agree (exact mode is the large model's greedy output).
    """
    if not cpu_matmul.xla_bfloat16_products(rows):
        return model

    def mark(param):
        return param.replace(in_prompt_pass=True) if isinstance(param, cpu_matmul.PanelKernel) else param

    return model.replace(params=jax.tree_util.tree_map(mark, model.params, is_leaf=_is_packed))


def with_panels(model: Model) -> Model:
    """The model with every Dense kernel (layers.Dense names it "kernel") that the native products can read
    (`cpu_matmul.packable`) held as a `cpu_matmul.PanelKernel`, its [K, N] values and their panel-major copy
    (as many bytes again), and the family's output table as a `cpu_matmul.PanelTable` (its transpose
    panel-major), all marked `in_cache` when they fit in the cores' L2 caches together. Unchanged off CPU or
    without the native kernels. Called outside a jit, the result is kept for as long as `model` lives: the
    next call returns it."""
    output_table = model.family.output_table(model.config)

    def packed() -> Model:
        # Such a model keeps its panels in L2 between steps if each thread takes the same ones call after call.
        size = _packed_bytes(model)
        in_cache = 0 < size <= native_library.l2_cache_bytes()

        def pack(path, param):
            if _packs(output_table, path, param):
                pack_one = cpu_matmul.panel_kernel if path[-1].key == "kernel" else cpu_matmul.panel_table
                return pack_one(param, in_cache)
            return param

        return model.replace(params=jax.tree_util.tree_map_with_path(pack, model.params, is_leaf=_is_packed))

    return _remembered(model, "with_panels", packed)


def panel_copy_bytes(model: Model) -> int:
    """Bytes of the panel-major copies `with_panels(model)` makes (0 where it has made them already)."""
    return 0 if "with_panels" in _REMEMBERED.get(id(model), {}) else _packed_bytes(model)


def _packed_bytes(model: Model) -> int:
    """Bytes of the params `with_panels` packs (as many as their panel-major copies)."""
    output_table = model.family.output_table(model.config)
    leaves = jax.tree_util.tree_leaves_with_path(model.params, is_leaf=_is_packed)
    return sum(param.nbytes for path, param in leaves if _packs(output_table, path, param))


def _packs(output_table: tuple[str, ...] | None, path, param) -> bool:
    """Whether `with_panels` packs this param: a Dense kernel or the output table, `cpu_matmul.packable`."""
    names = tuple(getattr(key, "key", None) for key in path)
    return (names[-1] == "kernel" or names == output_table) and cpu_matmul.packable(param)


# id(model) -> {key: what `_remembered` computed for it}, for the models alive (a finalizer drops each entry).
_REMEMBERED: dict[int, dict] = {}


def _remembered(model: Model, key, compute):
    """compute(), once per live model and key: what depends only on a model object and the process (its
    dtype, panel-major copy, the bytes of its loop copies), which the generate functions need on every call
    (a generate call's host time is part of its latency). A model traced inside a jit is computed afresh."""
    memo = _REMEMBERED.get(id(model))
    if memo is not None and key in memo:
        return memo[key]
    if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(model.params)):
        return compute()
    if memo is None:
        memo = _REMEMBERED[id(model)] = {}
        weakref.finalize(model, _REMEMBERED.pop, id(model), None)
    memo[key] = compute()
    return memo[key]


def _is_packed(param) -> bool:
    return isinstance(param, (cpu_matmul.PanelKernel, cpu_matmul.PanelTable))


def loop_copy_bytes(model: Model, rows: int) -> int:
    """Bytes of the float32 copies `for_decode_loop(model, rows)` makes (0 where it keeps the params)."""
    def copied() -> int:
        if decode_loop_dtype(model) == model.dtype:
            return 0
        leaves = jax.tree_util.tree_leaves_with_path(model.params, is_leaf=_is_packed)
        return sum(4 * p.size for path, p in leaves if not _kept_in_loop(model, path, p, rows))

    return _remembered(model, ("loop_copy_bytes", rows, native_library.available(), jax.default_backend()), copied)


def _kept_in_loop(model: Model, path, param, rows: int) -> bool:
    """Whether a half-precision param stays as it is in the CPU decode loop: a weight the native kernel
    reads, a Dense kernel (layers.Dense names it "kernel") or the family's output table (whose lookups the
    module casts to the cache's dtype; read as a bfloat16 table it costs half the bytes of a float32 copy)."""
    names = tuple(getattr(key, "key", None) for key in path)
    return (param.dtype == jnp.bfloat16 and cpu_matmul.native_reads(param, rows)
            and (names[-1] == "kernel" or names == model.family.output_table(model.config)))


def decode_loop_dtype(model: Model):
    """The dtype of the activations and cache of the decode loop: float32 for half precision on CPU, else
    the model's own."""
    if jax.default_backend() == "cpu" and model.dtype in (jnp.bfloat16, jnp.float16):
        return jnp.dtype(jnp.float32)
    return jnp.dtype(model.dtype)


def param_shapes(family: ModelFamily, config) -> dict[tuple, tuple]:
    """Flat {flax path: shape} of a model's parameters, computed without allocating them."""
    module = family.module(config)
    dummy = jnp.zeros((1, 1), jnp.int32)
    args = (dummy, dummy) if family.is_encoder_decoder else (dummy,)
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *args))["params"]
    return {path: leaf.shape for path, leaf in traverse_util.flatten_dict(shapes).items()}


@jax.jit
def _forward(model: Model, input_ids, decoder_input_ids, attention_mask):
    if model.is_encoder_decoder:
        return model._cut(model.module.apply({"params": model.params}, input_ids, decoder_input_ids, attention_mask))
    return model._cut(model.module.apply({"params": model.params}, input_ids, None, attention_mask)[0])


def forward_logits(model: Model, input_ids, decoder_input_ids=None, attention_mask=None) -> jax.Array:
    """Full forward without a cache: logits [B, T, V] float32 for input_ids [B, T] int32 (V: `model.vocab_size`).

    Encoder-decoder models need `decoder_input_ids` [B, K] and return [B, K, V]; `attention_mask` [B, T]
    marks real tokens of `input_ids` (decoder-only: right padding only, positions count from 0).
    """
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if input_ids.ndim != 2:
        raise InputError(f"input_ids must be [B, T], got shape {input_ids.shape}")
    if model.is_encoder_decoder:
        if decoder_input_ids is None:
            raise InputError(f"{model.config.model_type} is an encoder-decoder model: pass decoder_input_ids")
        decoder_input_ids = jnp.asarray(decoder_input_ids, jnp.int32)
    elif decoder_input_ids is not None:
        raise InputError(f"{model.config.model_type} is decoder-only: decoder_input_ids must be None")
    if attention_mask is not None:
        attention_mask = jnp.asarray(attention_mask, bool)
    return _forward(model, input_ids, decoder_input_ids, attention_mask)
