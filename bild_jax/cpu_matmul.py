"""Weight products of decode steps on CPU through bild-jax's native kernel (`native/matmul.cc`).

XLA:CPU computes a matrix-vector product on one core, at about half the memory bandwidth the machine has,
and a decode step is a chain of them over every weight of the model. The kernel streams each weight once
with all cores (XLA's own intra-op threads) and sums every output in one fixed order, so a row's result is
the same whatever rows share the call: the logits of a verification block equal those of one-token steps.

The kernel reads a Dense kernel panel-major (`native/panels.h`: blocks of 64 columns, each read from start to
end, so the weight is one sequential read and a panel's outputs stay in registers): the CPU decode loop holds
such kernels as `PanelKernel`s (`panel_kernel`, `model.with_panels`), which keep the [K, N] kernel too for
XLA's dot, and a token table used as the output layer as a `PanelTable` (its transpose so). It takes the
products that are worth it and leaves the rest to XLA, decided at trace time from static shapes: float32 rows
times a panel-major float32 kernel of at least `MIN_WEIGHT_BYTES` (or a group of kernels read with one input,
`dense_products`; smaller ones sit in cache, where XLA's dot is as fast) and at most `MAX_ROWS` rows (a decode
step, a verification block, or a prompt pass of up to 64 tokens: its tiles are as fast as XLA's dot up to
about 128 rows, 0.8-1.0x the time at 32-64, and slower past that; long prompts and training batches go to
XLA), or times a bfloat16 kernel or tied table of any size and rows; one CPU device (a sharded model keeps
XLA's dot, which the SPMD partitioner splits), the kernels built (`native_library`). Differentiable:
derivatives are XLA dots.

bfloat16 weights take their rows rounded to bfloat16 (`bfloat16_rows`), the arithmetic of llama.cpp's and
HF's bfloat16 models: every product of two bfloat16 values is exact in float32 and summed in float32, and
CPUs with AVX512-BF16 do twice the multiply-adds per instruction of float32 FMAs, with no widening (a C++
harness of the bundled large model's shapes: 2x the widening tiles' speed for 4 to 64 rows, 1.5x for one).
XLA's dot, where it meets such a weight on the same terms (an unpacked kernel, T5's cross-attention
projections), rounds the rows too, so a model computes one function whichever path a product takes; without
the native kernels (or on several devices) a bfloat16 weight is widened and meets float32 rows. On CPUs with
AMX, XLA's bfloat16 dot is the faster one for many rows, and prompt passes give it theirs
(`xla_bfloat16_products`, `model.for_prompt_pass`).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import struct
from flax.linen.dtypes import promote_dtype as flax_promote_dtype
from jax import lax

from bild_jax import native_library

MIN_WEIGHT_BYTES = 128 * 1024
MAX_ROWS = 64
MIN_AMX_ROWS = 16
# weight dtype -> FFI target of the transposed product (`native_library.TARGETS`); `bild_matmul` takes either.
_TRANSPOSED_TARGETS = {"float32": "bild_matmul_transposed", "bfloat16": "bild_matmul_transposed_bf16"}


@struct.dataclass
class PanelKernel:
    """A Dense kernel [K, N] as the CPU decode loop holds it: `dense` as it is (for XLA's dot) and `panels`,
    the same values panel-major (`native/panels.h`; same dtype, [K, N], or [K + K % 2, N] for bfloat16) for
    the native kernel.
    Made by `panel_kernel`; flax's Dense takes it as its [K, N] kernel param."""

    dense: jax.Array
    panels: jax.Array
    # Set by `model.for_prompt_pass`: a bfloat16 kernel's products of many rows may go to XLA's dot.
    in_prompt_pass: bool = struct.field(pytree_node=False, default=False)
    # Set by `model.with_panels`: its model's panels fit in the cores' L2 caches together
    # (`native_library.l2_cache_bytes`), so the native threads split its products from both ends.
    in_cache: bool = struct.field(pytree_node=False, default=False)

    shape = property(lambda self: self.dense.shape)
    dtype = property(lambda self: self.dense.dtype)
    ndim = property(lambda self: self.dense.ndim)
    size = property(lambda self: self.dense.size)


@struct.dataclass
class PanelTable:
    """A token table [V, K] used as the output layer, as the CPU decode loop holds it: `table` as it is (for
    lookups and XLA's dot) and `panels`, its transpose [K, V] panel-major (as `PanelKernel.panels`), which
    the native products read. The transposed product sums each logit in vector lanes added after; the
    panels' tiles need no such sums: in a loop of output-layer products alone a step took 0.5-0.6x the
    time with the bundled small models' bfloat16 tables, an 11-row block 0.7x with the large ones' float32
    tables (2-core Xeon; in their decode loops, 0.96-0.98x the small models' greedy time).
    Made by `panel_table`; `attend` reads it, and `promote_table` lets `nn.Embed` take it."""

    table: jax.Array
    panels: jax.Array
    in_cache: bool = struct.field(pytree_node=False, default=False)  # as `PanelKernel.in_cache`

    shape = property(lambda self: self.table.shape)
    dtype = property(lambda self: self.table.dtype)
    ndim = property(lambda self: self.table.ndim)
    size = property(lambda self: self.table.size)


def packable(kernel) -> bool:
    """Whether `panel_kernel` packs this param: a 2-D float32 or bfloat16 kernel, on one CPU device with the
    native kernels built."""
    return (not isinstance(kernel, (PanelKernel, PanelTable)) and kernel.ndim == 2
            and kernel.dtype in (jnp.float32, jnp.bfloat16) and native_library.runs_here())


def panel_kernel(kernel: jax.Array, in_cache: bool = False) -> PanelKernel:
    """kernel [K, N] (`packable`) -> `PanelKernel` (one native copy, about as fast as memory copies; a
    bfloat16 kernel's panels have K + K % 2 rows, in pairs). Derivatives flow through `dense` only
    (`_native_products`' rule reads it). `in_cache`: see `PanelKernel`."""
    rows = kernel.shape[0] + kernel.shape[0] % 2 if kernel.dtype == jnp.bfloat16 else kernel.shape[0]
    call = jax.ffi.ffi_call("bild_panels", jax.ShapeDtypeStruct((rows, kernel.shape[1]), kernel.dtype),
                            vmap_method="sequential")
    return PanelKernel(dense=kernel, panels=call(lax.stop_gradient(kernel)), in_cache=in_cache)


def panel_table(table: jax.Array, in_cache: bool = False) -> PanelTable:
    """table [V, K] (`packable`) -> `PanelTable` (its transpose packed as `panel_kernel` packs a kernel)."""
    return PanelTable(table=table, panels=panel_kernel(table.T).panels, in_cache=in_cache)


def promote_table(*arrays, dtype=None, inexact: bool = True) -> list:
    """`nn.Embed(promote_dtype=...)`: flax's promotion of a token table that may be a `PanelTable`."""
    return flax_promote_dtype(*map(unpacked, arrays), dtype=dtype, inexact=inexact)


def unpacked(param):
    """The plain values of a param that may be packed: a `PanelKernel`'s [K, N] kernel, a `PanelTable`'s
    [V, K] table; any other param as it is."""
    if isinstance(param, PanelKernel):
        return param.dense
    return param.table if isinstance(param, PanelTable) else param


def dense_dot_general(lhs: jax.Array, rhs, dimension_numbers, precision=None,
                      preferred_element_type=None) -> jax.Array:
    """`lax.dot_general` for `nn.Dense(dot_general=...)`: x [..., K] @ kernel [K, N] through the native
    kernel where `native_applies` (a `PanelKernel`), else XLA's dot (a bfloat16 kernel meeting float32 rows:
    `_xla_product`)."""
    dense = dimension_numbers == (((lhs.ndim - 1,), (0,)), ((), ()))
    if (dense and preferred_element_type in (None, jnp.float32) and isinstance(rhs, PanelKernel)
            and native_applies(lhs, rhs)):
        return _native_products(lhs, rhs)[0]
    return _xla_product(lhs, unpacked(rhs), dimension_numbers, precision, preferred_element_type)


def dense_products(x: jax.Array, kernels: Sequence[jax.Array]) -> list[jax.Array]:
    """x [..., K] @ kernel [K, N_i] for each kernel, as `dense_dot_general` computes each: [..., N_i].

    Where the native kernel takes the whole group (`native_applies_group`), one call streams every kernel
    with all cores: a decode step's query/key/value projections, or its gate and up projections, cost one
    call and one wake-up of the helper threads instead of one per kernel (bundled large model's greedy step:
    1.02-1.05x faster). Each product is summed as it would be alone, so the values are those of separate calls."""
    if native_applies_group(x, kernels):
        return list(_native_products(x, *kernels))
    return [dense_dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ()))) for kernel in kernels]


def promote_dtype(inputs, kernel, bias, dtype=None, inexact: bool = True) -> list:
    """`nn.Dense(promote_dtype=...)`: flax's promotion, except that a bfloat16 kernel meeting float32 rows
    stays bfloat16 for `dense_dot_general` (the CPU decode loop keeps the weights the kernel reads so), and
    a `PanelKernel` meeting float32 rows stays one."""
    if (dtype is None and inputs.dtype == jnp.float32 and kernel is not None
            and (kernel.dtype == jnp.bfloat16 or isinstance(kernel, PanelKernel))):
        return [inputs, kernel, None if bias is None else bias.astype(jnp.float32)]
    return flax_promote_dtype(inputs, unpacked(kernel), bias, dtype=dtype, inexact=inexact)


def attend(table, x: jax.Array) -> jax.Array:
    """x [..., D] @ table [V, D]^T -> [..., V]: a token table (an array or a `PanelTable`) used as the
    output layer (what `nn.Embed.attend` computes, with both operands promoted to one dtype)."""
    values = unpacked(table)
    if native_applies(x, values):
        if isinstance(table, PanelTable):
            return _native_products(x, PanelKernel(dense=values.T, panels=table.panels, in_cache=table.in_cache))[0]
        return _native_transposed(x, values)
    return _xla_product(x, values, (((x.ndim - 1,), (1,)), ((), ())))


def _xla_product(rows: jax.Array, weight: jax.Array, dimension_numbers, precision=None,
                 preferred_element_type=None) -> jax.Array:
    """XLA's dot of rows with a weight, in their promoted dtype. A bfloat16 weight meeting float32 rows on
    one CPU device with the native kernels takes the rows rounded as the kernel rounds them: a bfloat16 dot
    summing in float32 where `xla_bfloat16_products` says it is fast, else rows rounded to float32 values
    (`bfloat16_rows`) times the weight widened by the native `bild_widen_after`, which XLA orders after the
    rows (a plain convert would run at the start of the program for every layer at once, `native/widen.cc`);
    the two compute the same exact products (the bfloat16 dot's derivatives for the rows are bfloat16)."""
    dtype = jnp.promote_types(rows.dtype, weight.dtype)
    if rows.dtype == jnp.float32 and weight.dtype == jnp.bfloat16 and native_library.runs_here():
        if xla_bfloat16_products(math.prod(rows.shape[:-1])):
            return lax.dot_general(rows.astype(jnp.bfloat16), weight, dimension_numbers, precision=precision,
                                   preferred_element_type=preferred_element_type or jnp.float32)
        rows, weight = bfloat16_rows(rows), _widen_after(rows, weight)
    return lax.dot_general(rows.astype(dtype), weight.astype(dtype), dimension_numbers, precision=precision,
                           preferred_element_type=preferred_element_type)


def xla_bfloat16_products(rows: int) -> bool:
    """Whether XLA's dot multiplies `rows` rows (rounded to bfloat16) by a bfloat16 weight faster than the
    native kernel: at least `MIN_AMX_ROWS` rows on a CPU with AMX (`native_library.has_amx`), where it took
    0.3-0.8x the kernel's time at 16 rows and 0.14-0.5x at 32-256 (the bundled models' kernels, 2-core Xeon;
    0.4-1.25x at 8 rows, 1.1-10x at one). Unpacked bfloat16 weights take it wherever this holds (T5's
    cross-attention projections, a model outside the decode loop); `PanelKernel`s only in prompt passes
    (`model.for_prompt_pass`), so that the decode loop's blocks still equal its steps bitwise."""
    return rows >= MIN_AMX_ROWS and native_library.has_amx()


@jax.custom_jvp
def bfloat16_rows(rows: jax.Array) -> jax.Array:
    """float32 rows [..., K] -> the same, rounded to bfloat16 (to nearest even): what a bfloat16 weight's
    products read on CPU, in the native kernel (`native/matmul.cc`) and in XLA's dot alike. Derivatives pass
    through unrounded, as the kernel's do."""
    return rows.astype(jnp.bfloat16).astype(jnp.float32)


bfloat16_rows.defjvp(lambda primals, tangents: (bfloat16_rows(*primals), tangents[0]))


@jax.custom_jvp
def _widen_after(rows: jax.Array, weight: jax.Array) -> jax.Array:
    call = jax.ffi.ffi_call("bild_widen_after", jax.ShapeDtypeStruct(weight.shape, jnp.float32),
                            vmap_method="sequential")
    return call(rows, weight)


@_widen_after.defjvp
def _widen_after_jvp(primals, tangents):
    (rows, weight), (_, weight_dot) = primals, tangents
    return _widen_after(rows, weight), weight_dot.astype(jnp.float32)


def native_applies(x: jax.Array, weight) -> bool:
    """Whether x [..., K] times the 2-D `weight` (a `PanelKernel`, or a tied table [V, K] used transposed)
    runs in the native kernel (static: shapes, dtypes, backend)."""
    rows = math.prod(x.shape[:-1])
    return (x.dtype == jnp.float32 and weight.ndim == 2 and native_reads(weight, rows)
            and not _to_xla_in_prompt_pass(weight, rows))


def native_applies_group(x: jax.Array, kernels: Sequence[jax.Array]) -> bool:
    """Whether x [..., K] times every kernel [K, N_i] runs in one native call: `PanelKernel`s of one dtype,
    float32 ones together weighing at least `MIN_WEIGHT_BYTES` (kernels of mixed dtypes go one by one)."""
    rows = math.prod(x.shape[:-1])
    if (x.dtype != jnp.float32 or len({k.dtype for k in kernels}) != 1
            or not all(isinstance(k, PanelKernel) for k in kernels)
            or any(_to_xla_in_prompt_pass(k, rows) for k in kernels)):
        return False
    return native_reads(kernels[0], rows, sum(4 * k.size for k in kernels))


def _to_xla_in_prompt_pass(weight, rows: int) -> bool:
    return (isinstance(weight, PanelKernel) and weight.in_prompt_pass and weight.dtype == jnp.bfloat16
            and xla_bfloat16_products(rows))


def native_reads(weight: jax.Array, rows: int, group_bytes: int | None = None) -> bool:
    """Whether products of up to `rows` rows with the 2-D `weight` run in the native kernel; `group_bytes`:
    the bytes of the float32 kernels it runs with (`native_applies_group`), else its own. A bfloat16 weight
    always does (one CPU device, kernels built): its rows are rounded (`bfloat16_rows`), and with AVX512-BF16
    the kernel took 0.5-0.9x the time of XLA's float32 dot on a float32 copy from 8 to 1024 rows (a
    [384, 2048] kernel, 2-core EPYC)."""
    if not (rows > 0 and native_library.runs_here()):
        return False
    if weight.dtype == jnp.bfloat16:
        return True
    group_bytes = 4 * weight.size if group_bytes is None else group_bytes
    return weight.dtype == jnp.float32 and rows <= MAX_ROWS and group_bytes >= MIN_WEIGHT_BYTES


@jax.custom_jvp
def _native_products(x: jax.Array, *kernels: PanelKernel) -> tuple[jax.Array, ...]:
    outputs = tuple(jax.ShapeDtypeStruct(x.shape[:-1] + (kernel.shape[1],), x.dtype) for kernel in kernels)
    return jax.ffi.ffi_call("bild_matmul", outputs, vmap_method="sequential")(
        x, *(k.panels for k in kernels), in_cache=all(k.in_cache for k in kernels))


@_native_products.defjvp
def _native_products_jvp(primals, tangents):
    (x, *kernels), (x_dot, *kernel_dots) = primals, tangents
    return _native_products(x, *kernels), tuple(
        (x_dot @ kernel.dense.astype(jnp.float32) + x @ kernel_dot.dense.astype(jnp.float32)).astype(jnp.float32)
        for kernel, kernel_dot in zip(kernels, kernel_dots))


@jax.custom_jvp
def _native_transposed(x: jax.Array, table: jax.Array) -> jax.Array:
    call = jax.ffi.ffi_call(_TRANSPOSED_TARGETS[jnp.dtype(table.dtype).name],
                            jax.ShapeDtypeStruct(x.shape[:-1] + (table.shape[0],), x.dtype), vmap_method="sequential")
    return call(x, table)


@_native_transposed.defjvp
def _native_transposed_jvp(primals, tangents):
    (x, table), (x_dot, table_dot) = primals, tangents
    return _native_transposed(x, table), (x_dot @ table.astype(jnp.float32).T
                                          + x @ table_dot.astype(jnp.float32).T).astype(jnp.float32)
