"""The native CPU kernel for decode-step weight products: values, row independence, gradients, when it is
used, and models decoding through it."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bild_jax
from bild_jax import cpu_matmul, native_library
from bild_jax.bild import BiLDConfig, bild_generate
from bild_jax.model import with_panels



def _panels(w):
    """w [K, N] as the decode loop holds a Dense kernel: a `PanelKernel` where `packable`."""
    w = jnp.asarray(w)
    return cpu_matmul.panel_kernel(w) if cpu_matmul.packable(w) else w


def _dense(a, w):
    """What `nn.Dense` asks for in the decode loop: a [..., K] @ w [K, N], w panel-major where it can be."""
    return cpu_matmul.dense_dot_general(a, _panels(w), (((a.ndim - 1,), (0,)), ((), ())))


# K not a multiple of the kernel's 8-row chunk unit or its 16 lanes; N: 10 panels of 64 columns and one of
# 61 (3 vectors and 13 scalar columns); 1.1 MB, above MIN_WEIGHT_BYTES.
K, N = 389, 701
# 4 panels and one of 44 columns.
NARROW = 300

pytestmark = pytest.mark.skipif(not native_library.available(), reason="no C++ compiler for the native kernel")


def _operands(rows: int, seed: int = 0, columns: int = N, inner: int = K):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((rows, inner)).astype(np.float32),
            rng.standard_normal((inner, columns)).astype(np.float32))


def _lowered(fn, *args) -> str:
    return jax.jit(fn).lower(*args).as_text()


def _reference(x, w):
    """x @ w in float64, x rounded to bfloat16 first where w is bfloat16 (what the kernel computes)."""
    if w.dtype == jnp.bfloat16:
        x = np.asarray(jnp.asarray(x).astype(jnp.bfloat16), np.float64)
    return np.asarray(x, np.float64) @ np.asarray(w, np.float64)


# K = 384, a multiple of the 16 lanes: a transposed product of two or more rows adds its lanes in registers.
# bfloat16: K = 389 gives the panels a zero row after the odd last one, and the table's dot products a tail.
def _weight(w, kind: str):
    """w [K, N] as a Dense kernel ("kernel"), or as a token table [N, K] used as the output layer, held as it
    is ("table") or as the decode loop packs it ("panel table")."""
    return {"kernel": w, "table": w.T, "panel table": cpu_matmul.panel_table(w.T)}[kind]


def _product(a, weight, kind: str):
    return _dense(a, weight) if kind == "kernel" else cpu_matmul.attend(weight, a)


def _native_applies(a, weight, kind: str) -> bool:
    weight = _panels(weight) if kind == "kernel" else cpu_matmul.unpacked(weight)
    return cpu_matmul.native_applies(jnp.asarray(a), weight)


@pytest.mark.parametrize("kind,columns,inner,dtype", [
    ("kernel", N, K, jnp.float32), ("kernel", NARROW, K, jnp.float32), ("table", N, K, jnp.float32),
    ("table", N, 384, jnp.float32), ("panel table", N, K, jnp.float32),
    ("kernel", N, K, jnp.bfloat16), ("table", N, K, jnp.bfloat16), ("table", N, 384, jnp.bfloat16),
    ("panel table", N, K, jnp.bfloat16)])
def test_products_match_float64_and_each_row_alone(kind, columns, inner, dtype):
    x, w = _operands(11, columns=columns, inner=inner)
    w = jnp.asarray(w, dtype)
    weight = _weight(w, kind)

    def product(a):
        return _product(a, weight, kind)

    assert _native_applies(x, weight, kind)
    # A table held as it is takes the transposed product; a kernel or a packed table, the panels'.
    assert ("@bild_matmul_transposed" if kind == "table" else "@bild_matmul(") in _lowered(product, x)
    block = np.asarray(jax.jit(product)(x))
    np.testing.assert_allclose(block, _reference(x, w), rtol=1e-5, atol=1e-4)
    # Summed in one order whatever the rows (tiles of 1 to 6 rows): a verification block's logits are the
    # one-token steps' logits.
    for rows in ((0,), (5,), (10,), (3, 4), (0, 1, 2), (2, 3, 4, 5, 6, 7, 8)):
        np.testing.assert_array_equal(np.asarray(jax.jit(product)(x[list(rows)])), block[list(rows)])
    # Leading axes are rows too.
    stacked = np.asarray(jax.jit(product)(x[:10].reshape(2, 5, inner)))
    np.testing.assert_array_equal(stacked.reshape(10, columns), block[:10])
    # A prompt pass of MAX_ROWS rows (many tiles of rows; bfloat16 has no limit) gives each row the same sums too.
    tall = np.resize(x, (cpu_matmul.MAX_ROWS * (1 if dtype == jnp.float32 else 3), inner))
    assert _native_applies(tall, weight, kind)
    np.testing.assert_array_equal(np.asarray(jax.jit(product)(tall))[:11], block)


def test_a_group_of_kernels_is_one_call_with_each_kernel_s_own_sums():
    """q/k/v (or gate/up) products of one row block in one native call: the values of separate calls."""
    x, w = _operands(11, seed=4)
    kernels = [_panels(w), _panels(w[:, :NARROW] * 0.5), _panels(w[:, :100])]  # each native alone too

    def group(a):
        return cpu_matmul.dense_products(a, kernels)

    assert cpu_matmul.native_applies_group(jnp.asarray(x[:1]), kernels)
    assert _lowered(group, x[:1]).count("bild_matmul") == 1
    for rows in (x[:1], x[:2], x):
        grouped = jax.jit(group)(rows)
        for got, kernel in zip(grouped, kernels):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(jax.jit(_dense)(rows, kernel.dense)))
    # Kernels of two dtypes go one by one (the small ones alone too small for the kernel: XLA's dot).
    mixed = [_panels(w.astype(jnp.bfloat16)), _panels(w[:, :40])]
    assert not cpu_matmul.native_applies_group(jnp.asarray(x[:1]), mixed)
    text = _lowered(lambda a: cpu_matmul.dense_products(a, mixed), x[:1])
    assert text.count("bild_matmul") == 1
    np.testing.assert_array_equal(np.asarray(cpu_matmul.dense_products(jnp.asarray(x[:1]), mixed)[1]),
                                  np.asarray(jnp.asarray(x[:1]) @ mixed[1].dense))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_products_split_from_both_ends_give_the_same_sums(dtype):
    """A model that fits in the cores' L2 caches has its threads take panels from both ends of a product
    (`PanelKernel.in_cache`): every panel is still computed once, with the same sums."""
    x, w = _operands(11, seed=2)
    w = jnp.asarray(w, dtype)
    products = {"kernel": lambda a, kernel: cpu_matmul.dense_dot_general(a, kernel, (((1,), (0,)), ((), ()))),
                "panel table": lambda a, table: cpu_matmul.attend(table, a)}
    packs = {"kernel": cpu_matmul.panel_kernel, "panel table": lambda v, flag: cpu_matmul.panel_table(v.T, flag)}
    for kind, pack in packs.items():
        outputs = {}
        for in_cache in (False, True):
            weight = pack(w, in_cache)

            def product(a):
                return products[kind](a, weight)

            assert f"in_cache = {str(in_cache).lower()}" in _lowered(product, x)
            outputs[in_cache] = [np.asarray(jax.jit(product)(x[:rows])) for rows in (1, 2, 11)]
        for split, interleaved in zip(outputs[True], outputs[False]):
            np.testing.assert_array_equal(split, interleaved)


def test_models_that_fit_in_the_l2_caches_are_marked_in_cache(monkeypatch, bild_pair):
    """`with_panels` marks every packed weight of a model whose packed params fit in the cores' L2 caches
    together (sysfs sizes such as "2048K"), and none of a larger one."""
    from bild_jax.model import panel_copy_bytes

    assert native_library._bytes("2048K\n") == 2 << 20 and native_library._bytes("1M") == 1 << 20
    model = bild_pair("llama")[1]
    size = panel_copy_bytes(model.replace())
    for l2_bytes, expected in ((size, True), (size - 1, False), (0, False)):
        monkeypatch.setattr(native_library, "l2_cache_bytes", lambda: l2_bytes)
        packed = with_panels(model.replace())  # a fresh object: `with_panels` remembers per model
        marks = [leaf.in_cache for leaf in jax.tree_util.tree_leaves(packed.params, is_leaf=lambda leaf: isinstance(
            leaf, (cpu_matmul.PanelKernel, cpu_matmul.PanelTable))) if hasattr(leaf, "in_cache")]
        assert marks and set(marks) == {expected}


@pytest.mark.parametrize("kind", ["kernel", "table", "panel table"])
def test_bfloat16_weights_take_their_rows_rounded_to_bfloat16(kind):
    """The kernel reads float32 rows as bfloat16 (to nearest even): rows that are bfloat16 values already
    give the same bits, and XLA's dot on an unpacked kernel computes the same products."""
    x, w = _operands(4, seed=2)
    x[0, :8] = [1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -9), 2 ** -130, np.inf, -np.inf, 0.0, -0.0]  # ties, subnormal
    half = _weight(jnp.asarray(w, jnp.bfloat16), kind)

    def product(a, weight):
        return _product(a, weight, kind)

    text = _lowered(product, x, half)
    target = "@bild_matmul_transposed_bf16(" if kind == "table" else "@bild_matmul("
    assert target in text and "xbf16>" in text
    rounded = cpu_matmul.bfloat16_rows(jnp.asarray(x))
    assert not np.array_equal(np.asarray(rounded), x)
    for rows in (slice(0, 1), slice(None)):  # one row, and a tile of 4
        got = np.asarray(jax.jit(product)(x[rows], half))
        np.testing.assert_array_equal(got, np.asarray(jax.jit(product)(rounded[rows], half)))
    # x[0] holds infinities: its outputs are not finite, the other rows' match float64.
    np.testing.assert_allclose(got[1:], _reference(x[1:], jnp.asarray(w, jnp.bfloat16)), rtol=1e-5, atol=1e-4)
    if kind == "kernel":
        unpacked = cpu_matmul.dense_dot_general(jnp.asarray(x[1:]), half, (((1,), (0,)), ((), ())))
        np.testing.assert_allclose(np.asarray(unpacked), np.asarray(jax.jit(product)(x[1:], half)), rtol=1e-5,
                                   atol=1e-4)


def test_wide_products_widen_unpacked_bfloat16_weights_after_their_rows(monkeypatch):
    # XLA's dot on an unpacked bfloat16 kernel reads a float32 copy, made by `bild_widen_after` once the rows
    # exist, and the rows rounded to bfloat16: the values of a convert, and its derivatives (the rounding
    # passes them through). On a CPU without AMX; with it, XLA's bfloat16 dot (the test below).
    monkeypatch.setattr(native_library, "has_amx", lambda: False)
    x, w = _operands(cpu_matmul.MAX_ROWS + 1, seed=3)
    half = jnp.asarray(w, jnp.bfloat16)
    def chain(product):  # the second widening needs the first product
        return lambda a, weight: product(jnp.tanh(product(a, weight))[:, :K], weight)

    unpacked = chain(lambda a, weight: cpu_matmul.dense_dot_general(a, weight, (((1,), (0,)), ((), ()))))
    converted = chain(lambda a, weight: cpu_matmul.bfloat16_rows(a) @ weight.astype(jnp.float32))
    text = _lowered(unpacked, x, half)
    assert text.count("bild_widen_after") == 2 and "bild_matmul" not in text
    np.testing.assert_array_equal(np.asarray(jax.jit(unpacked)(x, half)), np.asarray(jax.jit(converted)(x, half)))
    grads = [jax.grad(lambda a, b: jnp.sum(fn(a, b) ** 2), argnums=(0, 1))(x, half) for fn in (unpacked, converted)]
    for got, want in zip(*grads):
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


@pytest.mark.parametrize("kind", ["llama", "llama-tied", "gpt2-tied", "t5-tied", "bart-tied"])
def test_decode_loop_keeps_the_bfloat16_weights_the_kernel_reads(bild_pair, every_weight_native, kind):
    """Llama (untied and tied), GPT-2, T5 and BART (tied; T5's and BART's table also feeds the encoder): the
    loop keeps the Dense kernels and the output table in bfloat16 (at any number of rows), computes in float32
    with the rows of those products rounded to bfloat16, close to the model's float32 copy, and a one-token
    step gives the prompt pass's logits."""
    from bild_jax.model import for_decode_loop, loop_copy_bytes

    model = {"llama": lambda: bild_pair("llama")[1], "llama-tied": lambda: bild_jax.load_model("bundled:small"),
             "gpt2-tied": lambda: bild_pair("mixed")[0],
             "t5-tied": lambda: bild_jax.load_model("bundled:t5-small"),
             "bart-tied": lambda: bild_pair("bart")[1]}[kind]()
    half = model.replace(params=jax.tree_util.tree_map(lambda p: p.astype(jnp.bfloat16), model.params))
    widened = half.replace(params=jax.tree_util.tree_map(lambda p: p.astype(jnp.float32), half.params))
    table = model.family.output_table(model.config)
    assert (table is not None) == kind.endswith("tied")
    for rows in (4, cpu_matmul.MAX_ROWS + 1):
        kept = for_decode_loop(half, rows=rows)
        leaves = jax.tree_util.tree_leaves_with_path(kept.params, is_leaf=lambda p: isinstance(
            p, (cpu_matmul.PanelKernel, cpu_matmul.PanelTable)))
        dtypes = {tuple(k.key for k in path): p.dtype for path, p in leaves}
        assert all(dtype == (jnp.bfloat16 if name[-1] == "kernel" or name == table else jnp.float32)
                   for name, dtype in dtypes.items())
        # Dense kernels and the output table are packed panel-major for the native products.
        assert all(isinstance(p, cpu_matmul.PanelKernel) == (name[-1] == "kernel")
                   and isinstance(p, cpu_matmul.PanelTable) == (name == table)
                   for name, p in zip(dtypes, (p for _, p in leaves)))
        assert kept.dtype == jnp.float32  # it computes in float32
        copied = sum(4 * p.size for name, p in zip(dtypes, jax.tree_util.tree_leaves(half.params))
                     if dtypes[name] == jnp.float32)
        assert loop_copy_bytes(half, rows=rows) == copied

    source = jnp.asarray([[4, 6, 8, 10, 12, 14]])
    encoder = dict(encoder_input_ids=source, encoder_mask=source > 0) if model.is_encoder_decoder else {}
    if model.is_encoder_decoder:  # the encoder reads the kept table's rows in float32, as from a float32 copy
        kept = for_decode_loop(half, rows=4)
        copied = jax.tree_util.tree_map(lambda x: x, kept.params,
                                        is_leaf=lambda p: isinstance(p, cpu_matmul.PanelKernel))
        node = copied
        for key in table[:-1]:
            node = node[key]
        node[table[-1]] = cpu_matmul.unpacked(node[table[-1]]).astype(jnp.float32)
        cross_keys = [m.start_cache(1, 16, **encoder).cross_keys[0] for m in (kept, kept.replace(params=copied))]
        np.testing.assert_array_equal(*map(np.asarray, cross_keys))

    def prompt_pass(model, prompts):  # -> (logits [1, V] after the last token, cache)
        cache = model.start_cache(1, 16, **encoder)
        if model.is_encoder_decoder:  # the decoder's prompt is a block on the empty cache
            logits, cache = model.decode(prompts, cache)
            return logits[:, -1], cache
        return model.decode_prompt(prompts, jnp.asarray([prompts.shape[1]]), cache)

    @jax.jit
    def prompt_then_step(model, prompts):  # the loop's passes: a prompt pass, then a one-token step
        model = for_decode_loop(model, rows=4)
        length = prompts.shape[1] - 1
        whole, _ = prompt_pass(model, prompts)
        _, cache = prompt_pass(model, prompts[:, :length])
        step, _ = model.decode(prompts[:, length:], cache.with_lengths(jnp.asarray([length])))
        return whole, step[:, -1]

    prompts = jnp.asarray([[3, 5, 7, 9, 11]])
    whole, step = map(np.asarray, prompt_then_step(half, prompts))
    np.testing.assert_array_equal(step, whole)
    reference = np.asarray(prompt_then_step(widened, prompts)[0])
    assert np.abs(reference).max() > 0.1 and not np.array_equal(whole, reference)
    np.testing.assert_allclose(whole, reference, atol=0.05 * np.abs(reference).max(), rtol=0)


def test_gradients_are_xla_dots():
    x, w = _operands(3, seed=1)

    def loss(product):
        return lambda a, b: jnp.sum(jnp.tanh(product(a, b)) ** 2)

    native = jax.grad(loss(lambda a, b: _dense(a, b)), argnums=(0, 1))(x, w)
    expected = jax.grad(loss(lambda a, b: a @ b), argnums=(0, 1))(x, w)
    for got, want in zip(native, expected):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)
    for table in (lambda b: b.T, lambda b: cpu_matmul.panel_table(b.T)):
        tied = jax.grad(loss(lambda a, b: cpu_matmul.attend(table(b), a)), argnums=(0, 1))(x, w)
        for got, want in zip(tied, expected):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)


def test_xla_keeps_what_the_kernel_does_not_speed_up(monkeypatch):
    x, w = _operands(cpu_matmul.MAX_ROWS + 1)
    # Too many rows (a long prompt pass), too small a weight, another dtype, or switched off: XLA's dot.
    assert not cpu_matmul.native_applies(jnp.asarray(x), jnp.asarray(w))
    assert not cpu_matmul.native_applies(jnp.asarray(x[:1]), jnp.asarray(w[:, :64]))
    # A bfloat16 weight goes to the kernel whatever its size and rows (its products round the rows); not
    # with bfloat16 rows.
    assert cpu_matmul.native_applies(jnp.asarray(x[:1]), jnp.asarray(w[:, :8], jnp.bfloat16))
    assert cpu_matmul.native_applies(jnp.asarray(x), jnp.asarray(w, jnp.bfloat16))
    assert not cpu_matmul.native_applies(jnp.asarray(x[:1], jnp.bfloat16), jnp.asarray(w, jnp.bfloat16))
    assert "bild_matmul" not in _lowered(lambda a: _dense(a, w), x)
    # The kernel reads panel-major kernels only: a [K, N] array goes to XLA's dot.
    assert "bild_matmul" not in _lowered(lambda a: cpu_matmul.dense_dot_general(a, w, (((1,), (0,)), ((), ()))), x[:1])
    monkeypatch.setenv("BILD_JAX_NATIVE_MATMUL", "0")
    assert not cpu_matmul.native_applies(jnp.asarray(x[:1]), jnp.asarray(w))
    np.testing.assert_allclose(np.asarray(_dense(x[:1], w)), x[:1] @ w, rtol=1e-4,
                               atol=1e-3)


def test_concurrent_products_finish():
    """XLA runs independent products of one program at once on its intra-op threads. The kernel's helpers
    are tasks on those same threads, so a caller that waited for helpers not yet started deadlocked when
    every thread was such a caller (the T5 pair's BiLD loop hung so); run in a subprocess, as a hang."""
    script = ("import jax, jax.numpy as jnp\n"
              "from jax import lax\n"
              "from bild_jax import cpu_matmul\n"
              "ws = [jnp.full((256, 256), 1e-3 * i) for i in range(12)]\n"
              "def body(i, x):\n"
              "    ys = [cpu_matmul.dense_dot_general(x, w, (((1,), (0,)), ((), ()))) for w in ws]\n"
              "    return x + 1e-6 * sum(ys)\n"
              "x = jax.jit(lambda x: lax.fori_loop(0, 2000, body, x))(jnp.ones((1, 256)))\n"
              "print(bool(jnp.isfinite(x).all()))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0 and done.stdout.split() == ["True"], done.stderr


def test_without_a_compiler_one_warning_and_xla_computes(tmp_path):
    """No C++ compiler (and an empty kernel cache): one RuntimeWarning, then XLA's dot and attention."""
    script = ("import warnings, jax.numpy as jnp\n"
              "from bild_jax import cpu_attention, cpu_matmul, native_library\n"
              "with warnings.catch_warnings(record=True) as caught:\n"
              "    warnings.simplefilter('always')\n"
              "    first, second = native_library.available(), native_library.available()\n"
              "x, w = jnp.ones((1, 256)), jnp.ones((256, 256))\n"
              "print(first, second, len(caught), caught[0].category.__name__, 'unavailable' in str(caught[0].message),\n"
              "      cpu_matmul.native_applies(x, w), cpu_attention.applies(jnp.ones((1, 1, 2, 8)), (), (), 1))\n")
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "BILD_JAX_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "False", "1", "RuntimeWarning", "True", "False", "False"]


@pytest.fixture
def every_weight_native(monkeypatch):
    """The tiny test models' weights through the kernel (compiled programs traced without it are dropped)."""
    monkeypatch.setattr(cpu_matmul, "MIN_WEIGHT_BYTES", 0)
    jax.clear_caches()
    yield
    jax.clear_caches()


@pytest.mark.parametrize("kind", ["llama", "mixed", "t5"])
def test_models_decode_through_the_kernel(every_weight_native, bild_pair, kind):
    """Llama, GPT-2 (a tied head) and T5: the kernel's logits match XLA's, and exact BiLD, whose
    verification blocks now go through it too, is still token for token the large model's greedy output."""
    small, large = bild_pair(kind)
    prompts = [[3, 5, 7, 9, 11], [4, 6, 8]]
    ids = jnp.asarray([[3, 5, 7, 9], [4, 6, 8, 10]])
    decoder_ids = jnp.asarray([[0, 5, 6], [0, 8, 9]]) if large.is_encoder_decoder else None

    paneled = with_panels(large)

    def step(ids):
        return bild_jax.forward_logits(paneled, ids, decoder_ids)

    text = jax.jit(step).lower(ids).as_text()
    assert "bild_matmul" in text
    if kind == "llama":  # per layer: q/k/v in one call, o, gate/up in one call, down; then the output layer
        config = large.config
        head = 0 if config.tie_word_embeddings else 1
        assert text.count("custom_call @bild_matmul(") == 4 * config.num_layers + head
    native = np.asarray(step(ids))
    reference = np.asarray(jax.jit(bild_jax.forward_logits)(large, ids, decoder_ids))  # [K, N] kernels: XLA
    jax.clear_caches()
    np.testing.assert_allclose(native, reference, rtol=1e-4, atol=1e-4)
    config = BiLDConfig(max_new_tokens=12, max_draft=3, fallback_threshold=0.3, exact=True, eos_token_id=[])
    for row in prompts:
        out = bild_generate(small, large, [row], config)
        greedy = bild_jax.greedy_generate(large, [row], max_new_tokens=12, eos_token_id=[])
        np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(greedy.tokens))


@pytest.fixture
def amx(monkeypatch):
    """XLA's bfloat16 dot taken as fast (`native_library.has_amx`) on any CPU; programs traced without it are
    dropped."""
    monkeypatch.setattr(native_library, "has_amx", lambda: True)
    jax.clear_caches()
    yield
    jax.clear_caches()


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_prompt_passes_take_xla_s_bfloat16_dot_on_amx_cpus(amx, monkeypatch, bild_pair, kind):
    """A bfloat16 model's prompt pass of 16 rows or more goes to XLA's bfloat16 dot where AMX makes it fast:
    the same exact products summed in float32 (logits close to the kernel's), and exact mode is still the
    large model's greedy output."""
    from bild_jax.model import for_decode_loop
    from bild_jax.prompts import prefill

    small, large = (m.replace(params=jax.tree_util.tree_map(lambda p: p.astype(jnp.bfloat16), m.params))
                    for m in bild_pair(kind))
    loop = for_decode_loop(with_panels(large), rows=4)
    prompts = jnp.asarray(np.random.default_rng(0).integers(3, large.vocab_size, (1, 16)), jnp.int32)
    lengths = jnp.asarray([16], jnp.int32)

    def first_logits():  # a new function each time: jax keeps one trace per function
        return lambda model, prompts: prefill(model, prompts, lengths, 24)[0]

    bfloat16_dot = r"stablehlo\.dot_general[^\n]*\(tensor<[^>]*bf16>, tensor<[^>]*bf16>\) -> tensor<[^>]*f32>"
    assert re.search(bfloat16_dot, _lowered(first_logits(), loop, prompts))
    with_xla = np.asarray(jax.jit(first_logits())(loop, prompts))
    monkeypatch.setattr(native_library, "has_amx", lambda: False)
    assert not re.search(bfloat16_dot, _lowered(first_logits(), loop, prompts))
    with_kernel = np.asarray(jax.jit(first_logits())(loop, prompts))
    np.testing.assert_allclose(with_xla, with_kernel, rtol=0, atol=1e-4 * np.abs(with_kernel).max())
    monkeypatch.setattr(native_library, "has_amx", lambda: True)

    greedy = bild_jax.greedy_generate(large, prompts, max_new_tokens=8)
    exact = bild_generate(small, large, prompts, BiLDConfig(max_new_tokens=8, exact=True))
    np.testing.assert_array_equal(np.asarray(exact.tokens), np.asarray(greedy.tokens))


def test_panel_copies_are_made_once_per_model_and_counted_as_memory(bild_pair):
    """The generate functions pack a model's Dense kernels once (kept while the model lives), and the memory
    check counts the copy before it is made."""
    from bild_jax import memory
    from bild_jax.model import panel_copy_bytes

    model = bild_pair("llama")[1].replace()  # a model object no earlier test packed
    kernels = [p for path, p in jax.tree_util.tree_leaves_with_path(model.params) if path[-1].key == "kernel"]
    assert panel_copy_bytes(model) == sum(k.nbytes for k in kernels) > 0
    held, _ = memory.model_needs(model, "large", batch=1, prompt_width=4, capacity=16, block_width=1, block_setting="")
    assert [need.nbytes for need in held if "panel-major" in need.what] == [panel_copy_bytes(model)]
    packed = with_panels(model)
    assert with_panels(model) is packed and panel_copy_bytes(model) == 0
    again = with_panels(packed)  # already packed: the same arrays
    leaves = zip(jax.tree_util.tree_leaves(again.params), jax.tree_util.tree_leaves(packed.params))
    assert all(a is b for a, b in leaves)
    # A tied model's token table is packed too (its transpose, for the output layer): counted as well.
    tied = bild_jax.load_model("bundled:small")
    table = tied.params["embed_tokens"]["embedding"]
    kernels = [p for path, p in jax.tree_util.tree_leaves_with_path(tied.params) if path[-1].key == "kernel"]
    assert panel_copy_bytes(tied) == sum(k.nbytes for k in kernels) + table.nbytes
    packed_table = with_panels(tied).params["embed_tokens"]["embedding"]
    assert isinstance(packed_table, cpu_matmul.PanelTable) and packed_table.table is table
