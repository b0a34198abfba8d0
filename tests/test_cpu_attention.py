"""The native CPU kernel for decode-step attention: values (with and without a position bias), a token's output
bitwise the same in a step and in a block, gradients, and when it is used; XLA's attention in both score
layouts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bild_jax import cpu_attention, native_library
from bild_jax.cache import attended_positions
from bild_jax.models import layers

native = pytest.mark.skipif(not native_library.available(), reason="no C++ compiler for the native kernels")

B, H, HKV, D, S = 2, 6, 2, 40, 37  # D not a multiple of the kernel's 16 lanes
SCALE = D ** -0.5


def _normal(rng, shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def _block(width: int, lengths, seed: int = 0, dim: int = D):
    """A query block, a cache with its own segment, and the decode mask of `width` tokens at `lengths`."""
    rng = np.random.default_rng(seed)
    query = _normal(rng, (B, width, H, dim))
    keys = (_normal(rng, (B, HKV, S, dim)), _normal(rng, (B, HKV, width, dim)))
    values = (_normal(rng, (B, HKV, S, dim)), _normal(rng, (B, HKV, width, dim)))
    return query, keys, values, attended_positions(jnp.asarray(lengths, jnp.int32), S, width)[1]


def _native(query, keys, values, mask, bias=None):
    assert cpu_attention.applies(query, keys, values, query.shape[1])
    return jax.jit(lambda *a: layers.attention(*a, scale=query.shape[-1] ** -0.5))(query, keys, values, mask, bias)


def _position_bias(lengths, width: int) -> jax.Array:
    """A bias [B, H, K, S + K] that depends only on the query's and key's positions, as T5's does."""
    key_positions = attended_positions(jnp.asarray(lengths, jnp.int32), S, width)[0]      # [B, S']
    distance = (key_positions[:, S:, None] - key_positions[:, None, :]).astype(jnp.float32)  # [B, K, S']
    return jnp.sin(distance[:, None] * jnp.arange(1, H + 1, dtype=jnp.float32)[None, :, None, None] / 7.0)


def _float64_reference(query, keys, values, mask, bias=None, score_cap=None) -> np.ndarray:
    q = np.asarray(query, np.float64)
    k = np.concatenate([np.asarray(x, np.float64) for x in keys], axis=2).repeat(H // HKV, axis=1)
    v = np.concatenate([np.asarray(x, np.float64) for x in values], axis=2).repeat(H // HKV, axis=1)
    scores = np.einsum("bkhd,bhsd->bhks", q, k) * q.shape[-1] ** -0.5
    if score_cap is not None:
        scores = score_cap * np.tanh(scores / score_cap)
    if bias is not None:
        scores = scores + np.asarray(bias, np.float64)
    scores = np.where(np.asarray(mask)[:, None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bhks,bhsd->bkhd", probs, v)


# 64 queries: a prompt pass, split between threads; 80 dimensions: more than the 64 summed in registers at once.
@native
@pytest.mark.parametrize("width, dim", [(1, D), (5, D), (cpu_attention.MAX_WIDTH, 80)])
def test_matches_float64_attention(width, dim):
    block = _block(width, [0, 30], dim=dim)  # a row with an empty cache sees only its block
    np.testing.assert_allclose(_native(*block), _float64_reference(*block), rtol=1e-5, atol=1e-5)


@native
def test_a_position_bias_is_added_to_the_scores():
    query, keys, values, mask = _block(5, [3, 30])
    bias = _position_bias([3, 30], 5)
    for shared in (bias, bias[:1]):  # one bias per row, or one for all rows
        np.testing.assert_allclose(_native(query, keys, values, mask, shared),
                                   _float64_reference(query, keys, values, mask, shared), rtol=1e-5, atol=1e-5)


@native
@pytest.mark.parametrize("biased", [False, True])
def test_token_in_a_block_equals_its_one_token_step_bitwise(biased):
    query, keys, values, mask = _block(4, [9, 30])
    in_block = _native(query, keys, values, mask, _position_bias([9, 30], 4) if biased else None)
    # The block's tokens 0..2 already in the cache at each row's cursor; token 3 alone.
    lengths = np.array([9, 30])
    cached = [np.array(x) for x in (keys[0], values[0])]
    for row, start in enumerate(lengths):
        cached[0][row, :, start:start + 3] = keys[1][row, :, :3]
        cached[1][row, :, start:start + 3] = values[1][row, :, :3]
    step_mask = attended_positions(jnp.asarray(lengths + 3, jnp.int32), S, 1)[1]
    step = _native(query[:, 3:], (jnp.asarray(cached[0]), keys[1][:, :, 3:]),
                   (jnp.asarray(cached[1]), values[1][:, :, 3:]), step_mask,
                   _position_bias(lengths + 3, 1) if biased else None)
    assert (np.asarray(step[:, 0]) == np.asarray(in_block[:, 3])).all()


@native
def test_sliding_window_mask_and_a_query_that_sees_nothing():
    query, keys, values, mask = _block(3, [20, 30])
    positions, key_positions = jnp.asarray([[20, 21, 22], [30, 31, 32]]), attended_positions(
        jnp.asarray([20, 30]), S, 3)[0]
    window = layers.sliding_window_mask(mask, positions, key_positions, 4)
    np.testing.assert_allclose(_native(query, keys, values, window),
                               _float64_reference(query, keys, values, window), rtol=1e-5, atol=1e-5)
    blind = window.at[0, 1].set(False)  # a padding query: zeros, not NaN
    assert (np.asarray(_native(query, keys, values, blind))[0, 1] == 0).all()


@native
def test_gradients_are_xla_attentions():
    query, keys, values, mask = _block(2, [5, 11])
    bias = _position_bias([5, 11], 2)

    def loss(attend):
        return lambda q, k, v, b: (attend(q, k, v, mask, b, scale=SCALE) ** 2).sum()

    native = jax.grad(loss(layers.attention), argnums=(0, 1, 2, 3))(query, keys, values, bias)
    xla = jax.grad(loss(layers._xla_attention), argnums=(0, 1, 2, 3))(query, keys, values, bias)
    for got, want in zip(jax.tree.leaves(native), jax.tree.leaves(xla)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@native
def test_xla_keeps_wide_half_precision_and_capped_attention():
    query, keys, values, mask = _block(2, [5, 11])
    assert not cpu_attention.applies(query, keys, values, cpu_attention.MAX_WIDTH + 1)
    half = tuple(k.astype(jnp.bfloat16) for k in keys)
    assert not cpu_attention.applies(query.astype(jnp.bfloat16), half, half, 2)

    def primitives(**kwargs):
        jaxpr = jax.make_jaxpr(lambda q: layers.attention(q, keys, values, mask, **kwargs))(query)
        return {str(eqn.primitive) for eqn in jaxpr.eqns}

    assert "custom_jvp_call" in primitives(scale=SCALE)
    assert "custom_jvp_call" not in primitives(scale=SCALE, score_cap=50.0)
    assert "custom_jvp_call" in primitives(scale=SCALE, bias=jnp.zeros((1, H, 2, S + 2)))


# Every block query-major (a prompt pass's layout), or every one key-major (a decode step's).
@pytest.mark.parametrize("query_major_width", [0, 1 << 20])
def test_xla_attention_in_either_score_layout(monkeypatch, query_major_width):
    monkeypatch.setattr(layers, "QUERY_MAJOR_WIDTH", query_major_width)
    query, keys, values, mask = _block(5, [3, 30])
    bias = _position_bias([3, 30], 5)
    for shared, cap in ((bias, None), (bias[:1], None), (None, 2.0)):
        got = layers._xla_attention(query, keys, values, mask, shared, SCALE, cap)
        np.testing.assert_allclose(got, _float64_reference(query, keys, values, mask, shared, cap),
                                   rtol=1e-5, atol=1e-5)
