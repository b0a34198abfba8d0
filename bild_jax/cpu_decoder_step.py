"""A decoder's cached passes on CPU in one native call (`native/decoder_step.cc`).

A decode step run as XLA operations is about 70 of them for the bundled small model (norms, rotary
embeddings, residual adds, the gated activation, the native products and attention), each with 1-3 us of
fixed cost: about 90 us per step for 1.5M multiply-adds, most of a BiLD token's small-model time. The native
pass does the whole decoder, lookup to logits, in one call, with the same products and attention kernels,
so a token's keys, values and logits are bitwise the same in a one-token step and in a verification block
(exact mode's guarantee); every cached pass of a model that takes it goes through it, steps and blocks alike,
at any number of rows (float32 blocks of more than `cpu_matmul.MAX_ROWS` rows included, which the module
would give to XLA's dot: greedy decoding at batch 4 and 16 ran as fast as before, in alternating runs).
Prompt passes keep the module (compute-bound; `model.for_prompt_pass`).

Used where it applies (`applies`): a family that offers it (`ModelFamily.native_cached_pass`: Llama's plain
variants), one CPU device with the native kernels built, a float32 cache, and every Dense kernel and the
output layer packed for the native products (`model.with_panels`) in one dtype, float32 or bfloat16.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bild_jax import native_library
from bild_jax.cache import KVBlock, KVCache
from bild_jax.cpu_matmul import PanelKernel, PanelTable


def applies(kernels: Sequence, output, cache: KVCache) -> bool:
    """Whether a pass over `cache` with these Dense `kernels` and `output` layer (a `PanelKernel`, or the
    tied token table as a `PanelTable`) runs natively (static)."""
    dtypes = {weight.dtype for weight in (*kernels, output)}
    return (all(isinstance(kernel, PanelKernel) and not kernel.in_prompt_pass for kernel in kernels)
            and isinstance(output, (PanelKernel, PanelTable)) and len(dtypes) == 1
            and dtypes <= {jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)} and cache.dtype == jnp.float32
            and native_library.runs_here())


def decode(tokens: jax.Array, table: jax.Array, rotary: tuple[jax.Array, jax.Array], mask: jax.Array,
           final_norm: jax.Array, output, layers: Sequence[dict], cache: KVCache, eps: float, scale: float
           ) -> tuple[jax.Array, KVBlock]:
    """A Llama decoder's cached pass: tokens [B, K] int32 at the cache's cursors -> (logits [B, K, V] float32,
    the block's keys and values, per layer [B, K, Hkv, Dh] float32, keys rotated).

    table [V, D] (float32 or bfloat16) the token table; rotary: cos and sin [B, K, 1, Dh] float32 at the
    tokens' positions; mask [B, K, S + K] bool (the cache's slots, then the block); final_norm [D]; output
    the output layer (`applies`); layers: per layer a dict of `input_norm` and `post_norm` [D] and the
    `PanelKernel`s `q`, `k`, `v`, `o`, `gate`, `up`, `down`; eps the norms' epsilon, scale the scores'.
    """
    batch, width = tokens.shape
    _, kv_heads, _, head_dim = cache.keys[0].shape
    vocab = output.shape[0] if isinstance(output, PanelTable) else output.shape[1]
    block = jax.ShapeDtypeStruct((batch, width, kv_heads, head_dim), jnp.float32)
    shapes = (jax.ShapeDtypeStruct((batch, width, vocab), jnp.float32), *[block] * (2 * len(layers)))
    per_layer = [array for layer, keys, values in zip(layers, cache.keys, cache.values) for array in (
        layer["input_norm"].astype(jnp.float32), *(layer[name].panels for name in ("q", "k", "v", "o")),
        layer["post_norm"].astype(jnp.float32), *(layer[name].panels for name in ("gate", "up", "down")),
        keys, values)]
    in_cache = all(layer[name].in_cache for layer in layers for name in ("q", "k", "v", "o", "gate", "up", "down"))
    cos, sin = rotary
    logits, *outputs = jax.ffi.ffi_call("bild_decoder_step", shapes, vmap_method="sequential")(
        tokens.astype(jnp.int32), table, cos, sin, mask, final_norm.astype(jnp.float32), output.panels, *per_layer,
        eps=np.float32(eps), scale=np.float32(scale), in_cache=in_cache)
    return logits, KVBlock(keys=tuple(outputs[0::2]), values=tuple(outputs[1::2]))
