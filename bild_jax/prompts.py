"""Prompt batches: ragged input -> right-padded bucket + per-row lengths, and prefill of a model's cache."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bild_jax.errors import InputError
from bild_jax.model import Model, for_prompt_pass

MIN_BUCKET = 8
MAX_EOS_IDS = 8


def bucket_length(length: int) -> int:
    """The padded prompt width for a prompt of `length` tokens: the next power of two, at least 8, so that
    new prompts of similar length reuse the same compiled program."""
    return max(MIN_BUCKET, 1 << max(0, length - 1).bit_length())


def prepare_prompts(input_ids, attention_mask=None, vocab_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Host-side: prompts -> (ids [B, T_bucket] int32 right-padded with 0, lengths [B] int32).

    `input_ids`: a list of token lists (ragged), or a [B, T] int array whose `attention_mask` [B, T] marks
    real tokens (left or right padding). Every row must hold at least one token, all ids in [0, vocab_size).
    """
    rows = _rows(input_ids, attention_mask)
    if not rows:
        raise InputError("input_ids holds no prompts (batch of size 0)")
    empty = [i for i, row in enumerate(rows) if len(row) == 0]
    if empty:
        raise InputError(f"empty prompt in row(s) {empty}: every prompt needs at least one token")
    lengths = np.array([len(row) for row in rows], np.int32)
    width = bucket_length(int(lengths.max()))
    ids = np.zeros((len(rows), width), np.int32)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = row
    if vocab_size is not None:
        values = np.concatenate(rows)
        bad = np.unique(values[(values < 0) | (values >= vocab_size)])
        if bad.size:
            raise InputError(f"token ids {bad[:10].tolist()} are outside the vocabulary [0, {vocab_size})")
    return ids, lengths


def _rows(input_ids, attention_mask) -> list[np.ndarray]:
    if isinstance(input_ids, (list, tuple)) and (not input_ids or not np.isscalar(input_ids[0])):
        if attention_mask is not None:
            raise InputError("attention_mask is only for padded [B, T] arrays; ragged lists need none")
        return [_integer_row(row, i) for i, row in enumerate(input_ids)]
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None, :]
    if ids.ndim != 2:
        raise InputError(f"input_ids must be [B, T] or a list of token lists, got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise InputError(f"input_ids must hold integer token ids, got dtype {ids.dtype}")
    if attention_mask is None:
        return list(ids)
    mask = np.asarray(attention_mask).astype(bool)
    if mask.shape != ids.shape:
        raise InputError(f"attention_mask shape {mask.shape} does not match input_ids shape {ids.shape}")
    return [row[m] for row, m in zip(ids, mask)]


def _integer_row(row, index: int) -> np.ndarray:
    """One ragged prompt as [T] int64; an error for anything but integers (np.asarray(row, np.int64) would
    truncate 3.7 to 3 and parse "12" as 12)."""
    try:
        values = np.asarray(row)
    except (ValueError, TypeError):  # nested lists of different lengths
        values = np.asarray(None)
    if values.size == 0:
        return values.astype(np.int64).reshape(-1)
    # numpy turns [True, 1] into integers; a bool is never a token id.
    bools = isinstance(row, (list, tuple)) and not {bool, np.bool_}.isdisjoint(map(type, row))
    if bools or values.dtype == bool or not np.issubdtype(values.dtype, np.integer):
        raise InputError(f"prompt {index} must hold integer token ids, got {str(row)[:60]} ({values.dtype})")
    return values.astype(np.int64).reshape(-1)


def eos_array(model: Model, eos_token_id: int | Sequence[int] | None) -> jax.Array:
    """[MAX_EOS_IDS] int32 end-of-sequence ids padded with -1: the given ones, or the model config's when
    None. A fixed width keeps one compiled program for any set of EOS ids."""
    if eos_token_id is None:
        eos_token_id = model.config.eos_token_id
    eos = np.atleast_1d(np.asarray(eos_token_id)).reshape(-1)
    if eos.size and (eos.dtype == bool or not np.issubdtype(eos.dtype, np.integer)):
        raise InputError(f"eos_token_id must be an int or a list of ints, got {eos_token_id!r}")
    eos = eos.astype(np.int64)
    if eos.size > MAX_EOS_IDS:
        raise InputError(f"at most {MAX_EOS_IDS} eos_token_id values are supported, got {eos.size}")
    if eos.size and not ((eos >= 0) & (eos < model.vocab_size)).all():
        raise InputError(f"eos_token_id {eos.tolist()} outside the vocabulary [0, {model.vocab_size})")
    return np.pad(eos, (0, MAX_EOS_IDS - eos.size), constant_values=-1).astype(np.int32)


def is_eos(tokens: jax.Array, eos_ids: jax.Array) -> jax.Array:
    """tokens [...] int32, eos_ids [E] int32 -> [...] bool."""
    return (tokens[..., None] == eos_ids).any(-1)


def check_positions(model: Model, longest_prompt: int, max_new_tokens: int) -> None:
    """A clear error when a prompt plus the new tokens exceeds the model's position limit (encoder-decoder
    models: the prompt and the new tokens each, as encoder and decoder count positions apart)."""
    limit = model.config.max_positions
    if limit is None:
        return
    if model.is_encoder_decoder:
        if longest_prompt > limit:
            raise InputError(f"a prompt of {longest_prompt} tokens exceeds the {model.config.model_type} model's "
                             f"{limit} encoder positions")
        if max_new_tokens > limit:
            raise InputError(f"max_new_tokens={max_new_tokens} exceeds the {model.config.model_type} model's "
                             f"{limit} decoder positions")
        return
    if longest_prompt + max_new_tokens > limit:
        raise InputError(f"a prompt of {longest_prompt} tokens plus max_new_tokens={max_new_tokens} exceeds the "
                         f"{model.config.model_type} model's {limit} positions")


def decoder_capacity(model: Model, prompt_width: int, new_positions: int) -> int:
    """Cache slots a decoder needs: the prompt bucket (decoder-only) plus `new_positions`."""
    return new_positions if model.is_encoder_decoder else prompt_width + new_positions


def prefill(model: Model, prompts: jax.Array, prompt_lengths: jax.Array, capacity: int):
    """Runs the prompt through a fresh cache of `capacity` slots.

    prompts [B, T] int32 right-padded, prompt_lengths [B] int32. Returns (logits [B, V] float32 of the first
    new token, cache holding every prompt position). For encoder-decoder models the prompt feeds the
    encoder and the decoder starts from `decoder_start_token_id`.
    """
    batch, width = prompts.shape
    prompt_pass = for_prompt_pass(model, batch * width)
    if model.is_encoder_decoder:
        encoder_mask = jnp.arange(width)[None, :] < prompt_lengths[:, None]
        cache = prompt_pass.start_cache(batch, capacity, prompts, encoder_mask)
        start = jnp.full((batch, 1), model.config.decoder_start_token_id, jnp.int32)
        logits, cache = model.decode(start, cache)
        return logits[:, 0], cache
    logits, cache = prompt_pass.decode_prompt(prompts, prompt_lengths, model.start_cache(batch, capacity))
    return logits, cache.with_lengths(prompt_lengths)
