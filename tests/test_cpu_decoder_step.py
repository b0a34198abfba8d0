"""The native CPU decoder pass (`cpu_decoder_step`): its logits, keys and values against the module's, a token's
outputs bitwise the same in steps and in a block, rows at different cursors, and where it applies."""

from __future__ import annotations

import dataclasses
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from bild_jax import native_library
from bild_jax.model import for_decode_loop, with_panels

pytestmark = pytest.mark.skipif(not native_library.available(), reason="no C++ compiler for the native kernels")

PROMPTS = jnp.asarray([[5, 17, 33, 2, 8, 9, 40, 0], [7, 1, 3, 60, 0, 0, 0, 0]], jnp.int32)
PROMPT_LENGTHS = jnp.asarray([7, 4], jnp.int32)  # the rows' cursors differ
BLOCK = jnp.asarray([[11, 12, 13], [21, 22, 23]], jnp.int32)


def _decode_model(model, dtype):
    """The model as the decode loop holds it, its weights in `dtype`."""
    model = model.replace(params=jax.tree_util.tree_map(lambda x: x.astype(dtype), model.params))
    return for_decode_loop(with_panels(model), rows=PROMPTS.shape[0] * BLOCK.shape[1])


def _after_prompt(model):
    cache = model.start_cache(PROMPTS.shape[0], 24)
    _, cache = jax.jit(lambda m, c: m.decode_prompt(PROMPTS, PROMPT_LENGTHS, c))(model, cache)
    return cache.with_lengths(PROMPT_LENGTHS)


def _module_pass(model, tokens, cache):
    """The same pass through the Flax module (products and attention in their own kernels, the rest XLA)."""
    logits, block = model.module.apply({"params": model.params}, tokens, cache)
    return model._cut(logits), block


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_native_pass_matches_the_module(bild_pair, dtype):
    """Logits and the block's keys and values of a 3-token block over a cache whose rows sit at different
    cursors: those of the module's pass, to float32 rounding (the same products; norms, rotations and the
    activation computed in another order)."""
    model = _decode_model(bild_pair("llama")[1], dtype)
    cache = _after_prompt(model)
    decode_block = jax.jit(lambda m, t, c: m.decode_block(t, c))
    assert "bild_decoder_step" in decode_block.lower(model, BLOCK, cache).as_text()
    logits, block = decode_block(model, BLOCK, cache)
    reference_logits, reference_block = jax.jit(_module_pass)(model, BLOCK, cache)
    np.testing.assert_allclose(logits, reference_logits, rtol=2e-5, atol=2e-5)
    for native, reference in zip(block.keys + block.values, reference_block.keys + reference_block.values):
        np.testing.assert_allclose(native, reference, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("in_cache", [True, False])
def test_a_block_equals_its_one_token_steps_bitwise(bild_pair, monkeypatch, in_cache):
    """Exact mode's guarantee: each token's logits, keys and values from a 3-token and a 5-token block (one
    and two register tiles of rows) are bitwise those of one-token steps, for weights the threads split from
    both ends (a model that fits in L2, as the tiny one does) and for weights streamed from memory, split in
    contiguous runs of panels that prefetch the next one (what a larger model gets)."""
    if not in_cache:
        monkeypatch.setattr(native_library, "l2_cache_bytes", lambda: 0)
    model = _decode_model(bild_pair("llama")[1].replace(), jnp.float32)  # a fresh object: `with_panels` remembers
    assert model.params["layers_0"]["mlp"]["gate_proj"]["kernel"].in_cache == in_cache
    wide = jnp.concatenate([BLOCK, BLOCK + 30], axis=1)[:, :5]
    step = jax.jit(lambda m, t, c: m.decode(t, c))
    for tokens in (BLOCK, wide):
        cache = _after_prompt(model)
        block_logits, block = jax.jit(lambda m, t, c: m.decode_block(t, c))(model, tokens, cache)
        for i in range(tokens.shape[1]):
            logits, cache = step(model, tokens[:, i:i + 1], cache)
            np.testing.assert_array_equal(logits[:, 0], block_logits[:, i])
            for layer in range(model.config.num_layers):
                rows = jnp.arange(tokens.shape[0])
                np.testing.assert_array_equal(cache.keys[layer][rows, :, cache.lengths - 1], block.keys[layer][:, i])
                np.testing.assert_array_equal(cache.values[layer][rows, :, cache.lengths - 1],
                                              block.values[layer][:, i])


def test_the_module_keeps_what_the_native_pass_does_not_compute(bild_pair):
    """Variants the kernel does not compute (Gemma 3's q/k norms; Llama with a sliding window), a model
    without packed weights, and prompt passes keep the module's operations."""
    llama = bild_pair("llama")[1]
    packed = _decode_model(llama, jnp.float32)
    windowed = packed.replace(config=dataclasses.replace(
        llama.config, sliding_window=4, sliding_layers=(True,) * llama.config.num_layers))
    for model in (_decode_model(bild_pair("gemma3")[1], jnp.float32), windowed, llama):
        cache = model.start_cache(1, 16)
        decode_block = jax.jit(lambda m, c: m.decode_block(BLOCK[:1], c))
        assert "bild_decoder_step" not in decode_block.lower(model, cache).as_text()
    cache = packed.start_cache(PROMPTS.shape[0], 24)
    prompt_pass = jax.jit(lambda m, c: m.decode_prompt(PROMPTS, PROMPT_LENGTHS, c))
    assert "bild_decoder_step" not in prompt_pass.lower(packed, cache).as_text()


def test_passes_at_once_from_several_threads_equal_passes_one_at_a_time(bild_pair):
    """Native passes started together from several threads (each its own team of helpers; a helper that
    lingers after one team joins whichever started last) compute what they compute one at a time."""
    model = _decode_model(bild_pair("llama")[1], jnp.float32)
    cache = _after_prompt(model)

    @jax.jit
    def chain(model, first, cache):  # 64 passes, each fed the argmax of the one before: [B, 3] int32
        def body(_, tokens):
            logits, _ = model.decode_block(tokens, cache)
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return lax.fori_loop(0, 64, body, first)

    starts = [BLOCK + i for i in range(4)]
    alone = [np.asarray(chain(model, start, cache)) for start in starts]
    together = [None] * len(starts)

    def run(i):
        together[i] = np.asarray(chain(model, starts[i], cache))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(starts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads)
    for expected, got in zip(alone, together):
        np.testing.assert_array_equal(got, expected)
