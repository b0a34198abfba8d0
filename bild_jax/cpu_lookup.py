"""Token lookups of a bfloat16 table in the CPU decode loop, through bild-jax's native kernel
(`native/lookup.cc`).

The loop keeps a tied bfloat16 table for its output layer and computes in float32. XLA:CPU gathers bfloat16
rows in float32, converting the table for it, and the loop's invariant code motion hoists that conversion of
the whole table out of the loop: a float32 copy of the table made on every call (the bundled large model: 6
MB, about 1 ms per call in a profile). The kernel gathers the rows themselves.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from bild_jax import cpu_matmul, native_library


def lookup(table: nn.Embed, tokens: jax.Array, dtype) -> jax.Array:
    """tokens [...] int -> `table(tokens).astype(dtype)` [..., D]: in the native kernel for a bfloat16 table
    and float32 rows on one CPU device (an id outside the table gives NaNs there too), else XLA's gather."""
    embedding = jnp.asarray(cpu_matmul.unpacked(table.embedding))
    if embedding.dtype == jnp.bfloat16 and jnp.dtype(dtype) == jnp.float32 and native_library.runs_here():
        return _native(tokens.astype(jnp.int32), embedding)
    return table(tokens).astype(dtype)


@jax.custom_jvp
def _native(tokens: jax.Array, embedding: jax.Array) -> jax.Array:
    call = jax.ffi.ffi_call("bild_lookup", jax.ShapeDtypeStruct(tokens.shape + embedding.shape[1:], jnp.float32),
                            vmap_method="sequential")
    return call(tokens, embedding)


@_native.defjvp
def _native_jvp(primals, tangents):
    tokens, embedding = primals
    return _native(tokens, embedding), jnp.take(tangents[1], tokens, axis=0).astype(jnp.float32)
