"""Prompt lookup: the continuation of the latest earlier occurrence of the last n tokens, exact values."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from bild_jax.prompt_lookup import prompt_lookup
from bild_jax.rows import set_block

STALE = 77  # in slots past a row's real tokens: never looked up


def _rows(rows: list[tuple[list[int], list[int]]], prompt_width: int = 8, output_width: int = 6):
    """(prompt, output) pairs -> prompts [B, T] right-padded with 0, lengths, tokens [B, N] with STALE past each
    row's output, num_tokens."""
    prompts = np.zeros((len(rows), prompt_width), np.int32)
    tokens = np.full((len(rows), output_width), STALE, np.int32)
    for i, (prompt, output) in enumerate(rows):
        prompts[i, :len(prompt)] = prompt
        tokens[i, :len(output)] = output
    lengths = np.array([len(p) for p, _ in rows], np.int32)
    num_tokens = np.array([len(o) for _, o in rows], np.int32)
    return jnp.asarray(prompts), jnp.asarray(lengths), jnp.asarray(tokens), jnp.asarray(num_tokens)


def test_continuation_of_the_latest_occurrence():
    rows = [([5, 1, 2, 7, 8, 1, 2, 9], [3, 1, 2]),  # key [1, 2] at 1 and 5 in the prompt: 5 is the latest
            ([5, 6, 7], [8]),                       # key [7, 8] occurs nowhere earlier
            ([4, 4], [4]),                          # key [4, 4] at 0 (at 1 is the key itself): one token after
            ([7], []),                              # fewer tokens than the n-gram
            ([6], [0, 0])]                          # key [0, 0]: the prompt's padding zeros are no tokens
    continuation, count = prompt_lookup(*_rows(rows), width=3, ngram=2)
    np.testing.assert_array_equal(np.asarray(count), [3, 0, 1, 0, 0])
    np.testing.assert_array_equal(np.asarray(continuation), [[9, 3, 1], [0, 0, 0], [4, 0, 0], [0, 0, 0], [0, 0, 0]])


def test_continuation_stops_at_the_rows_end():
    """Tokens run on from the prompt into the output; a continuation holds real tokens only, never a stale
    slot past num_tokens."""
    rows = [([1, 2, 3], [1, 2]),        # 1 2 3 1 2: key [1, 2] at 0, then 3 1 2 (the end)
            ([9, 1, 2], [3, 4, 1, 2])]  # 9 1 2 3 4 1 2: key at 1, then 3 4 1 (width)
    continuation, count = prompt_lookup(*_rows(rows), width=3, ngram=2)
    np.testing.assert_array_equal(np.asarray(count), [3, 3])
    np.testing.assert_array_equal(np.asarray(continuation), [[3, 1, 2], [3, 4, 1]])
    continuation, count = prompt_lookup(*_rows([([1, 2, 5, 1], [2])]), width=4, ngram=2)
    np.testing.assert_array_equal(np.asarray(count), [3])
    np.testing.assert_array_equal(np.asarray(continuation), [[5, 1, 2, 0]])


def test_set_block_writes_counts_and_drops_past_the_end():
    buffer = jnp.zeros((3, 5), jnp.int32)
    values = jnp.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]], jnp.int32)
    out = set_block(buffer, jnp.array([0, 3, 2]), values, jnp.array([2, 3, 0]))
    np.testing.assert_array_equal(np.asarray(out), [[1, 2, 0, 0, 0], [0, 0, 0, 4, 5], [0, 0, 0, 0, 0]])
