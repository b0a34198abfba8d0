"""Attention of decode steps on CPU through bild-jax's native kernel (`native/attention.cc`).

XLA:CPU computes a decode step's attention as two small batched products (scores, then the weighted sum of
the values) whose fixed cost per call, not their arithmetic, is most of their time. The kernel does one
query's whole attention in one pass and visits its keys in position order, so a token's output is bitwise
the same in a one-token step and in a verification block (exact mode's guarantee).

Used at trace time where it applies: float32 queries, keys and values, no soft-cap (Gemma 2's caps stay
XLA's; T5's relative position bias is added in the kernel, after each dot product), blocks of at most
`MAX_WIDTH` tokens (decode steps, verification blocks, and prompt passes of up to 64 tokens, where XLA's
transposes, products and softmax each cost more than their arithmetic: the bundled large model's 64-token
prompt pass took 0.86x the time in bfloat16, 0.90x in float32; longer prompts and training batches are
compute-bound, and T5's biased encoder attention over 128-256 tokens measured slower), one CPU device, the
kernels built (`native_library`). Differentiable: derivatives are those of `reference`.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from bild_jax import native_library

MAX_WIDTH = 64


def applies(query: jax.Array, keys: tuple, values: tuple, width: int) -> bool:
    """Whether attention of `width` queries over these segments runs in the native kernel (static)."""
    arrays = (query, *keys, *values)
    return width <= MAX_WIDTH and all(a.dtype == jnp.float32 for a in arrays) and native_library.runs_here()


def attention(query: jax.Array, keys: tuple, values: tuple, mask: jax.Array, bias: jax.Array | None,
              scale: float, reference: Callable) -> jax.Array:
    """softmax(scale * query . keys + bias, masked) . values in the native kernel.

    query [B, K, H, D] float32; keys, values: tuples of head-major [B, Hkv, S_i, D] float32 segments; mask
    [B, K, S'] bool and bias [B or 1, H, K, S'] (any float dtype) or None, over S' = sum S_i keys.
    `reference(query, keys, values, mask, bias)` computes the same in XLA; its derivatives are the kernel's.
    Returns [B, K, H, D] float32.
    """
    return _native(scale, reference, query, keys, values, mask, bias)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _native(scale, reference, query, keys, values, mask, bias):
    segments = [array for pair in zip(keys, values) for array in pair]
    bias = jnp.zeros((0,), jnp.float32) if bias is None else bias.astype(jnp.float32)  # no elements: no bias
    call = jax.ffi.ffi_call("bild_attention", jax.ShapeDtypeStruct(query.shape, jnp.float32),
                            vmap_method="sequential")
    return call(query, mask, bias, *segments, scale=np.float32(scale))


@_native.defjvp
def _native_jvp(scale, reference, primals, tangents):
    _, tangent = jax.jvp(reference, primals, tangents)
    return _native(scale, reference, *primals), tangent
