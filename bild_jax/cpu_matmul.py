"""float32 weight products of decode steps on CPU through bild-jax's native kernel (`native/matmul.cc`).

XLA:CPU computes a matrix-vector product on one core, at about half the memory bandwidth the machine has,
and a decode step is a chain of them over every weight of the model. The kernel streams each weight once
with all cores (XLA's own intra-op threads) and sums every output in one fixed order, so a row's result is
the same whatever rows share the call: the logits of a verification block equal those of one-token steps.

It takes the products that are worth it and leaves the rest to XLA, decided at trace time from static
shapes: float32 rows times a float32 or bfloat16 weight (widened exactly as it is read, so a bfloat16 model
reads half the bytes of its float32 copy and gets the same sums), a weight of at least `MIN_WEIGHT_BYTES`
(smaller ones sit in cache, where XLA's dot is as fast), at most `MAX_ROWS` rows (a decode step or a verification block; prompt passes and
training batches are compute-bound), one CPU device (a sharded model keeps XLA's dot, which the SPMD
partitioner splits), the kernels built (`native_library`). Differentiable: derivatives are XLA dots.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype as flax_promote_dtype
from jax import lax

from bild_jax import native_library

MIN_WEIGHT_BYTES = 128 * 1024
MAX_ROWS = 16
# (transposed, weight dtype) -> FFI target (`native_library.TARGETS`)
_TARGETS = {(False, "float32"): "bild_matmul", (False, "bfloat16"): "bild_matmul_bf16",
            (True, "float32"): "bild_matmul_transposed", (True, "bfloat16"): "bild_matmul_transposed_bf16"}


def dense_dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers, precision=None,
                      preferred_element_type=None) -> jax.Array:
    """`lax.dot_general` for `nn.Dense(dot_general=...)`: x [..., K] @ kernel [K, N] through the native
    kernel where `native_applies`, else XLA's dot (a bfloat16 kernel with float32 rows widened first)."""
    dense = dimension_numbers == (((lhs.ndim - 1,), (0,)), ((), ()))
    if dense and preferred_element_type in (None, jnp.float32) and native_applies(lhs, rhs):
        return _native_product(lhs, rhs, False)
    lhs, rhs = widened(lhs, rhs)
    return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                           preferred_element_type=preferred_element_type)


def promote_dtype(inputs, kernel, bias, dtype=None, inexact: bool = True) -> list:
    """`nn.Dense(promote_dtype=...)`: flax's promotion, except that a bfloat16 kernel meeting float32 rows
    stays bfloat16 for `dense_dot_general` (the CPU decode loop keeps the weights the kernel reads so)."""
    if dtype is None and inputs.dtype == jnp.float32 and kernel is not None and kernel.dtype == jnp.bfloat16:
        return [inputs, kernel, None if bias is None else bias.astype(jnp.float32)]
    return flax_promote_dtype(inputs, kernel, bias, dtype=dtype, inexact=inexact)


def attend(table: jax.Array, x: jax.Array) -> jax.Array:
    """x [..., D] @ table [V, D]^T -> [..., V]: a tied embedding table used as the output layer (what
    `nn.Embed.attend` computes, with both operands promoted to one dtype)."""
    if native_applies(x, table):
        return _native_product(x, table, True)
    x, table = widened(x, table)
    return jnp.dot(x, table.T)


def widened(rows: jax.Array, weight: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(rows, weight) in their promoted dtype, for XLA's dot. A bfloat16 weight meeting float32 rows on one
    CPU device is widened by the native `bild_widen_after`, which XLA orders after the rows: a plain convert
    would run at the start of the program for every layer at once (`native/widen.cc`)."""
    dtype = jnp.promote_types(rows.dtype, weight.dtype)
    if (rows.dtype == jnp.float32 and weight.dtype == jnp.bfloat16 and native_library.on_cpu_device()
            and native_library.available()):
        return rows, _widen_after(rows, weight)
    return rows.astype(dtype), weight.astype(dtype)


@jax.custom_jvp
def _widen_after(rows: jax.Array, weight: jax.Array) -> jax.Array:
    call = jax.ffi.ffi_call("bild_widen_after", jax.ShapeDtypeStruct(weight.shape, jnp.float32),
                            vmap_method="sequential")
    return call(rows, weight)


@_widen_after.defjvp
def _widen_after_jvp(primals, tangents):
    (rows, weight), (_, weight_dot) = primals, tangents
    return _widen_after(rows, weight), weight_dot.astype(jnp.float32)


def native_applies(x: jax.Array, weight: jax.Array) -> bool:
    """Whether x [..., K] times the 2-D `weight` runs in the native kernel (static: shapes, dtypes, backend)."""
    return x.dtype == jnp.float32 and weight.ndim == 2 and native_reads(weight, math.prod(x.shape[:-1]))


def native_reads(weight: jax.Array, rows: int) -> bool:
    """Whether products of up to `rows` rows with the 2-D `weight` run in the native kernel."""
    return (weight.dtype in (jnp.float32, jnp.bfloat16) and 0 < rows <= MAX_ROWS
            and weight.size * weight.dtype.itemsize >= MIN_WEIGHT_BYTES
            and native_library.on_cpu_device() and native_library.available())


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _native_product(x: jax.Array, weight: jax.Array, transposed: bool) -> jax.Array:
    columns = weight.shape[0] if transposed else weight.shape[1]
    call = jax.ffi.ffi_call(_TARGETS[transposed, jnp.dtype(weight.dtype).name],
                            jax.ShapeDtypeStruct(x.shape[:-1] + (columns,), x.dtype), vmap_method="sequential")
    return call(x, weight)


@_native_product.defjvp
def _native_product_jvp(transposed, primals, tangents):
    (x, weight), (x_dot, weight_dot) = primals, tangents
    def product(rows, w):
        w = w.astype(jnp.float32)
        return rows @ (w.T if transposed else w)

    return _native_product(x, weight, transposed), (product(x_dot, weight) + product(x, weight_dot)
                                                   ).astype(jnp.float32)
