"""Pairs whose vocabularies differ only by padding rows: decoding over the shared rows, and the checks that tell
padding from real tokens (library and CLI)."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

import bild_jax
from conftest import PADDED_VOCAB

N = 16


def _word_tokenizer(tokens: list[str]):
    """A transformers tokenizer whose vocabulary is `tokens`, token i having id i."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({t: i for i, t in enumerate(tokens)},
                                                                        unk_token=tokens[0])))


def test_greedy_over_the_shared_rows_never_picks_padding(bild_pair):
    """The restricted large model's greedy output: every token is the argmax over the shared rows of the
    unrestricted model's logits (teacher-forced, one full forward), and padding rows, which win most steps
    of the unrestricted model, never appear."""
    _, large = bild_pair("qwen3-padded")
    padded = large.replace(shared_vocab_size=None)
    assert large.vocab_size == PADDED_VOCAB and padded.vocab_size == PADDED_VOCAB + 7
    prompt = list(range(5, 12))
    unrestricted = np.asarray(bild_jax.greedy_generate(padded, [prompt], N, eos_token_id=[]).tokens[0])
    assert (unrestricted >= PADDED_VOCAB).sum() > N // 2, "the padding rows must be able to win"
    restricted = np.asarray(bild_jax.greedy_generate(large, [prompt], N, eos_token_id=[]).tokens[0])
    logits = np.asarray(bild_jax.forward_logits(padded, [prompt + restricted.tolist()]))[0]
    assert logits.shape[-1] == PADDED_VOCAB + 7
    expected = logits[len(prompt) - 1:-1, :PADDED_VOCAB].argmax(-1)
    np.testing.assert_array_equal(restricted, expected)


def test_different_sizes_are_refused_with_the_way_out(bild_pair):
    small, large = bild_pair("qwen3-padded")
    with pytest.raises(ValueError, match="small has 96 rows, large has 103.*bild_jax.shared_vocabulary"):
        bild_jax.bild_generate(small, large.replace(shared_vocab_size=None), [[5, 6, 7]])
    with pytest.raises(ValueError, match=r"vocabulary size must be an int in \[1, 103\]"):
        large.with_vocab_size(104)


def test_shared_vocabulary_tells_padding_from_real_tokens(bild_pair):
    small, large = bild_pair("qwen3-padded")
    large = large.replace(shared_vocab_size=None)
    words = [f"w{i}" for i in range(90)]
    tokenizer = _word_tokenizer(words)
    shared_small, shared_large = bild_jax.shared_vocabulary(small, large, tokenizer, _word_tokenizer(words))
    assert (shared_small.vocab_size, shared_large.vocab_size) == (PADDED_VOCAB, PADDED_VOCAB)
    assert shared_small.shared_vocab_size is None and shared_large.shared_vocab_size == PADDED_VOCAB

    swapped = words[:10] + [words[11], words[10]] + words[12:]
    with pytest.raises(ValueError, match=r"differ in real tokens \(2 tokens with different ids"):
        bild_jax.shared_vocabulary(small, large, tokenizer, _word_tokenizer(swapped))
    with pytest.raises(ValueError, match=r"1 tokens only in the large tokenizer \(e.g. \['extra'\]\)"):
        bild_jax.shared_vocabulary(small, large, tokenizer, _word_tokenizer(words + ["extra"]))
    longer = [f"w{i}" for i in range(100)]
    with pytest.raises(ValueError, match="token id 99, past the 96 rows of the small model"):
        bild_jax.shared_vocabulary(small, large, _word_tokenizer(longer), _word_tokenizer(longer))


def test_cli_decodes_a_padded_pair_over_the_shared_rows(tmp_path, capsys):
    """A copy of the bundled large model with 64 padding rows: the CLI's tokenizer check says it is padding
    and cuts both models to the shared 4096 rows."""
    import jax.numpy as jnp
    from safetensors.flax import save_file

    from bild_jax import cli
    from bild_jax.hub import BUNDLED_DIR, read_safetensors

    padded = tmp_path / "large-padded"
    shutil.copytree(BUNDLED_DIR / "large", padded)
    tensors = {name: jnp.asarray(t) for name, t in read_safetensors(padded).items()}
    embedding = tensors["model.embed_tokens.weight"]
    tensors["model.embed_tokens.weight"] = jnp.concatenate([embedding, embedding[:64]])
    save_file(tensors, padded / "model.safetensors")
    config = json.loads((padded / "config.json").read_text())
    (padded / "config.json").write_text(json.dumps({**config, "vocab_size": 4096 + 64}))

    small, large, _ = cli._load_pair(SimpleNamespace(small="bundled:small", small_dtype=None, large=str(padded)))
    assert (small.vocab_size, large.vocab_size, large.config.vocab_size) == (4096, 4096, 4160)
    assert "differ only by padding rows (small 4096, large 4160" in capsys.readouterr().err
