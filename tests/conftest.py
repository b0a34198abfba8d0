"""Shared fixtures: tiny random HF models saved once per session."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# XLA compilation is most of the suite's time on CPU. These flags (read when the backend starts, so before any
# test runs) cut LLVM's optimisation of the generated code, about halving compile times; they change no
# result the tests compare (every side of a comparison is compiled alike, and HLO-level passes, which the
# cache-copy test inspects, still run). Subprocesses (the sharding check, the notebook) inherit them.
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0",
                                    "--xla_llvm_disable_expensive_passes=true"]).strip()

# BiLD programs compile one large-model branch per verification width: the suite compiles width 1 and
# max_draft + 1 only (subprocesses too). tests/test_bild.py::test_default_verify_widths_* runs the defaults.
os.environ.setdefault("BILD_JAX_VERIFY_WIDTHS", "1")

from tiny_models import TINY_CONFIGS, build_hf_model  # noqa: E402


@pytest.fixture(scope="session")
def saved_model(tmp_path_factory):
    """saved_model(name) -> (HF PyTorch model, directory it was saved to with save_pretrained)."""

    @functools.cache
    def save(name: str):
        hf_model = build_hf_model(name)
        directory = tmp_path_factory.mktemp(name)
        hf_model.save_pretrained(directory)
        return hf_model, directory

    return save


ALL_MODELS = sorted(TINY_CONFIGS)


def _perturbed(model, scale: float, seed: int):
    """The same architecture with every parameter moved by `scale` of its own spread: a small model that
    agrees with the original on most but not all tokens."""
    import jax

    leaves, tree = jax.tree_util.tree_flatten(model.params)
    key = jax.random.PRNGKey(seed)
    noisy = [x + scale * x.std() * jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
             for i, x in enumerate(leaves)]
    return model.replace(params=jax.tree_util.tree_unflatten(tree, noisy))


# Final-norm weights per family: scaling them sharpens the next-token distribution, so that random
# models have confident steps as well as unsure ones.
_FINAL_NORMS = {"llama": [("norm", "weight")], "gemma3_text": [("norm", "weight")], "qwen3": [("norm", "weight")],
                "gpt2": [("ln_f", "scale"), ("ln_f", "bias")], "t5": [("decoder", "final_layer_norm", "weight")],
                # post-LayerNorm: the last decoder layer's last norm (the tiny "bart" config has 2 layers); its
                # bias is the same at every position, so sharpening it would make one token win everywhere
                "bart": [("decoder", "layers_1", "final_layer_norm", "scale")]}


def _sharpened(model, factor: float):
    import jax
    from flax import traverse_util

    flat = traverse_util.flatten_dict(jax.tree_util.tree_map(lambda x: x, model.params))
    for path in _FINAL_NORMS[model.config.model_type]:
        if getattr(model.config, "gemma_norms", False):  # the scale is 1 + weight
            flat[path] = factor * (1 + flat[path]) - 1
        else:
            flat[path] = flat[path] * factor
    return model.replace(params=traverse_util.unflatten_dict(flat))


PADDED_VOCAB = 96  # rows of the small Qwen3 model; the large one ("qwen3", 103 rows) pads 7 more


def _padded_pair(large):
    """A Qwen3 pair whose large model pads the small one's vocabulary: the small model is a perturbed copy
    cut to PADDED_VOCAB rows; the large model's padding rows are made to win most steps (4 x the logits of
    tokens 3..9), so that decoding over them could not go unnoticed. Returns (small, large) unrestricted."""
    import dataclasses

    import jax

    params = jax.tree_util.tree_map(lambda x: x, large.params)
    head = params["lm_head"]["kernel"]
    params["lm_head"]["kernel"] = head.at[:, PADDED_VOCAB:].set(4 * head[:, 3:3 + head.shape[1] - PADDED_VOCAB])
    large = large.replace(params=params)
    small_params = jax.tree_util.tree_map(lambda x: x, params)
    small_params["embed_tokens"]["embedding"] = params["embed_tokens"]["embedding"][:PADDED_VOCAB]
    small_params["lm_head"]["kernel"] = params["lm_head"]["kernel"][:, :PADDED_VOCAB]
    small = large.replace(config=dataclasses.replace(large.config, vocab_size=PADDED_VOCAB), params=small_params)
    return _perturbed(small, 0.2, seed=7), large


@pytest.fixture(scope="session")
def bild_pair(saved_model, tmp_path_factory):
    """bild_pair(kind) -> (small, large) bild_jax Models sharing a vocabulary.

    "llama": a Llama large model and a perturbed copy as the small one; "mixed": a GPT-2 small model with
    the Llama large one; "t5": a T5 v1.0 large model and a perturbed copy; "gemma3": Gemma 3 (sliding
    window, untied) and a perturbed copy; "qwen3-padded": `_padded_pair`, both cut to the shared rows; "bart":
    a BART large model and a perturbed copy.
    """
    import bild_jax
    import jax

    @functools.cache
    def build(kind: str):
        large_name = {"llama": "llama-gqa", "mixed": "llama-gqa", "t5": "t5-v1.0", "gemma3": "gemma3-untied",
                      "qwen3-padded": "qwen3", "bart": "bart"}[kind]
        large = bild_jax.load_model(saved_model(large_name)[1])
        if kind == "t5":
            # Random tied std-1 embeddings dominate T5's residual stream, so greedy decoding just repeats a
            # token; shrunk ones give varied continuations.
            params = jax.tree_util.tree_map(lambda x: x, large.params)
            params["shared"]["embedding"] = 0.1 * params["shared"]["embedding"]
            large = large.replace(params=params)
        if kind == "bart":
            # With tied embeddings and weak layers (init std 0.02) the decoder's output stays closest to its
            # input token's own embedding, so greedy decoding repeats it; stronger position embeddings and
            # cross-attention give continuations that vary with the step and the prompt.
            params = jax.tree_util.tree_map(lambda x: x, large.params)
            params["decoder"]["embed_positions"]["embedding"] *= 10.0
            for layer in range(large.config.decoder_layers):
                out_proj = params["decoder"][f"layers_{layer}"]["encoder_attn"]["out_proj"]
                out_proj["kernel"], out_proj["bias"] = 10.0 * out_proj["kernel"], 10.0 * out_proj["bias"]
            large = large.replace(params=params)
        large = _sharpened(large, 50.0)
        if kind == "mixed":
            directory = tmp_path_factory.mktemp("gpt2-v97")
            build_hf_model("gpt2-v97", seed=3).save_pretrained(directory)
            return _sharpened(bild_jax.load_model(directory), 50.0), large
        if kind == "qwen3-padded":
            small, large = _padded_pair(large)
            return small, large.with_vocab_size(PADDED_VOCAB)
        return _perturbed(large, 0.2, seed=7), large

    return build
