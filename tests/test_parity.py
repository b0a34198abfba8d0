"""Parity with the HF PyTorch references: logits, cached decoding, greedy generation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import bild_jax
from bild_jax.prompts import prefill
from conftest import ALL_MODELS

ATOL = 1e-4
# Jitted, the cached passes compile once per block width; run eagerly, each operation compiled per shape,
# which cost more in all (this test over the 14 tiny models: 54 s of CPU time jitted, 66 s eagerly).
_decode = jax.jit(lambda model, tokens, cache: model.decode(tokens, cache))
# Encoder-decoder models run their encoder here: jitted too.
_start_cache = jax.jit(lambda model, *encoder_inputs: model.start_cache(3, 16, *encoder_inputs))
_prefill = jax.jit(lambda model, prompts, lengths: prefill(model, prompts, lengths, 16))


def _random_ids(vocab: int, shape, seed: int) -> np.ndarray:
    # Avoid 0..2, the pad/bos/eos ids of the tiny configs, so prompts look like text.
    return np.random.default_rng(seed).integers(3, vocab, size=shape).astype(np.int32)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_forward_logits_match_hf(saved_model, name):
    hf_model, directory = saved_model(name)
    model = bild_jax.load_model(directory)
    vocab = model.vocab_size
    ids = _random_ids(vocab, (2, 9), seed=1)
    with torch.no_grad():
        if model.is_encoder_decoder:
            mask = np.ones_like(ids)
            mask[1, 6:] = 0  # encoder padding on the second row
            decoder_ids = _random_ids(vocab, (2, 5), seed=2)
            ref = hf_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                           decoder_input_ids=torch.tensor(decoder_ids)).logits.numpy()
            got = bild_jax.forward_logits(model, ids, decoder_ids, attention_mask=mask)
        else:
            ref = hf_model(input_ids=torch.tensor(ids)).logits.numpy()
            got = bild_jax.forward_logits(model, ids)
    assert got.shape == ref.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_cached_blocks_match_full_forward(saved_model, name):
    """Prefill, one-token steps and a multi-token block through the cache == the full forward."""
    _, directory = saved_model(name)
    model = bild_jax.load_model(directory)
    ids = _random_ids(model.vocab_size, (3, 10), seed=3)
    blocks = [ids[:, :4], ids[:, 4:5], ids[:, 5:6], ids[:, 6:9], ids[:, 9:10]]
    if model.is_encoder_decoder:
        encoder_ids = _random_ids(model.vocab_size, (3, 7), seed=4)
        encoder_mask = np.ones_like(encoder_ids, bool)
        encoder_mask[2, 3:] = False
        full = bild_jax.forward_logits(model, encoder_ids, ids, attention_mask=encoder_mask)
        cache = _start_cache(model, jnp.asarray(encoder_ids), jnp.asarray(encoder_mask))
    else:
        full = bild_jax.forward_logits(model, ids)
        cache = _start_cache(model)
    pieces = []
    for block in blocks:
        logits, cache = _decode(model, jnp.asarray(block), cache)
        pieces.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), np.asarray(full), atol=ATOL, rtol=0)
    np.testing.assert_array_equal(np.asarray(cache.lengths), [10, 10, 10])
    if not model.is_encoder_decoder:
        # The prompt pass computes the output layer at each row's last prompt token only.
        lengths = np.array([4, 10, 7], np.int32)
        first, cache = _prefill(model, jnp.asarray(ids), jnp.asarray(lengths))
        np.testing.assert_allclose(np.asarray(first), np.asarray(full)[np.arange(3), lengths - 1], atol=ATOL, rtol=0)
        np.testing.assert_array_equal(np.asarray(cache.lengths), lengths)


def _hf_greedy(hf_model, prompt, max_new_tokens, eos):
    generation = hf_model.generation_config
    generation.eos_token_id = eos
    generation.pad_token_id = 0
    # Plain greedy: BART and Marian configs force EOS at max_length (`forced_eos_token_id`).
    generation.forced_bos_token_id = generation.forced_eos_token_id = None
    # HF's encoder-decoder cache assumes as many decoder layers as encoder layers; the reference runs uncached.
    out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                            use_cache=not hf_model.config.is_encoder_decoder)
    generated = out[0].tolist()
    return generated[1:] if hf_model.config.is_encoder_decoder else generated[len(prompt):]


@pytest.mark.parametrize("name", ALL_MODELS)
def test_greedy_matches_hf_generate(saved_model, name):
    """Ragged batch of 3 == HF generate(do_sample=False) per row, without EOS and with an EOS that fires."""
    hf_model, directory = saved_model(name)
    model = bild_jax.load_model(directory)
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, model.vocab_size, size=n).tolist() for n in (5, 11, 1)]
    max_new = 10
    no_eos = bild_jax.greedy_generate(model, prompts, max_new_tokens=max_new, eos_token_id=[])
    references = [_hf_greedy(hf_model, p, max_new, None) for p in prompts]
    np.testing.assert_array_equal(np.asarray(no_eos.lengths), [max_new] * 3)
    for row, reference in enumerate(references):
        assert np.asarray(no_eos.tokens[row]).tolist() == reference

    eos = references[0][3]  # a token the first row really emits, so EOS ends it early
    with_eos = bild_jax.greedy_generate(model, prompts, max_new_tokens=max_new, eos_token_id=eos)
    assert int(with_eos.lengths[0]) <= 4
    for row, prompt in enumerate(prompts):
        reference = _hf_greedy(hf_model, prompt, max_new, eos)
        reference = reference[:reference.index(eos) + 1] if eos in reference else reference
        n = int(with_eos.lengths[row])
        assert np.asarray(with_eos.tokens[row, :n]).tolist() == reference
        assert (np.asarray(with_eos.tokens[row, n:]) == bild_jax.generate.output_pad_id(model)).all()


@pytest.mark.parametrize("name", ["llama-gqa", "gpt2", "t5-v1.0"])
def test_bfloat16_logits_close_to_float32(saved_model, name):
    """bfloat16 params and activations: logits within 0.05 of float32 (tiny random models, |logits| < ~2)."""
    _, directory = saved_model(name)
    model32 = bild_jax.load_model(directory)
    model16 = bild_jax.load_model(directory, dtype=jnp.bfloat16)
    assert model16.dtype == jnp.bfloat16
    ids = _random_ids(model32.vocab_size, (2, 8), seed=6)
    decoder_ids = ids[:, :4] if model32.is_encoder_decoder else None
    ref = np.asarray(bild_jax.forward_logits(model32, ids, decoder_ids))
    got = np.asarray(bild_jax.forward_logits(model16, ids, decoder_ids))
    assert np.abs(ref).max() > 0.1
    np.testing.assert_allclose(got, ref, atol=0.05, rtol=0)


def test_untied_mt5_head_matches_hf(saved_model, tmp_path):
    """An mT5 checkpoint with its own lm_head (as on the hub): transformers 5 only unties a fresh model when
    the file holds the head, so the directory is made by adding one."""
    import json

    from safetensors.numpy import load_file, save_file
    from transformers import MT5ForConditionalGeneration

    _, directory = saved_model("mt5")
    tensors = load_file(directory / "model.safetensors")
    tensors["lm_head.weight"] = np.random.default_rng(0).normal(size=tensors["shared.weight"].shape).astype(np.float32)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    hf_model = MT5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    model = bild_jax.load_model(tmp_path)
    ids, decoder_ids = _random_ids(model.vocab_size, (2, 7), seed=8), _random_ids(model.vocab_size, (2, 4), seed=9)
    with torch.no_grad():
        ref = hf_model(input_ids=torch.tensor(ids), decoder_input_ids=torch.tensor(decoder_ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(bild_jax.forward_logits(model, ids, decoder_ids)), ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("dim", [32, 33])
def test_marian_sinusoids_equal_hf_table(dim):
    """The fixed position table, odd widths included (one more sine than cosine feature)."""
    from transformers.models.marian.modeling_marian import MarianSinusoidalPositionalEmbedding

    from bild_jax.models.bart import sinusoidal_positions

    reference = MarianSinusoidalPositionalEmbedding(50, dim).create_weight().numpy()
    np.testing.assert_array_equal(sinusoidal_positions(50, dim), reference)
