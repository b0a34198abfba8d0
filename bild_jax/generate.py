"""Baseline greedy decoding: one jitted program, one `lax.while_loop`, one token per step."""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import struct
from jax import lax

from bild_jax.model import Model
from bild_jax.prompts import (check_positions, decoder_capacity, eos_array, is_eos, prefill,
                              prepare_prompts)


@struct.dataclass
class GenerateOutput:
    tokens: jax.Array   # [B, max_new_tokens] int32, `pad_token_id` after each row's end
    lengths: jax.Array  # [B] int32 generated tokens per row, a final EOS included


@struct.dataclass
class GreedyState:
    cache: Any             # the model's cache, holding every position fed so far
    next_token: jax.Array  # [B] int32 argmax of the latest logits, not yet written
    tokens: jax.Array      # [B, N] int32 output buffer
    lengths: jax.Array     # [B] int32 tokens written per row
    done: jax.Array        # [B] bool row has emitted EOS or is full
    step: jax.Array        # [] int32


def greedy_decode(model: Model, prompts: jax.Array, prompt_lengths: jax.Array, eos_ids: jax.Array,
                  max_new_tokens: int, pad_token_id: int = 0) -> GenerateOutput:
    """Pure greedy decoding, for use inside the caller's own `jax.jit`.

    prompts [B, T] int32 right-padded, prompt_lengths [B] int32, eos_ids [E] int32 (E may be 0).
    """
    batch = prompts.shape[0]
    capacity = decoder_capacity(model, prompts.shape[1], max_new_tokens)
    first_logits, cache = prefill(model, prompts, prompt_lengths, capacity)

    def cond(state: GreedyState):
        return (state.step < max_new_tokens) & ~state.done.all()

    def body(state: GreedyState) -> GreedyState:
        token = state.next_token
        live = ~state.done
        tokens = state.tokens.at[:, state.step].set(jnp.where(live, token, pad_token_id))
        lengths = state.lengths + live
        done = state.done | is_eos(token, eos_ids) | (lengths >= max_new_tokens)
        logits, cache = model.decode(token[:, None], state.cache)
        # Finished rows keep their cursor so that they never write past their own slots.
        cache = cache.with_lengths(jnp.where(live, cache.lengths, state.cache.lengths))
        return GreedyState(cache=cache, next_token=jnp.argmax(logits[:, 0], -1).astype(jnp.int32),
                           tokens=tokens, lengths=lengths, done=done, step=state.step + 1)

    state = GreedyState(
        cache=cache,
        next_token=jnp.argmax(first_logits, -1).astype(jnp.int32),
        tokens=jnp.full((batch, max_new_tokens), pad_token_id, jnp.int32),
        lengths=jnp.zeros((batch,), jnp.int32),
        done=jnp.zeros((batch,), bool),
        step=jnp.zeros((), jnp.int32),
    )
    state = lax.while_loop(cond, body, state)
    return GenerateOutput(tokens=state.tokens, lengths=state.lengths)


_greedy_decode_jit = jax.jit(greedy_decode, static_argnames=("max_new_tokens", "pad_token_id"))


def greedy_generate(model: Model, input_ids, max_new_tokens: int, attention_mask=None,
                    eos_token_id: int | Sequence[int] | None = None) -> GenerateOutput:
    """Greedy decoding of a batch of prompts (ragged lists, or [B, T] ids with an attention_mask).

    For encoder-decoder models `input_ids` feed the encoder. `eos_token_id=None` uses the model config's
    EOS ids; `[]` never stops early. Returns tokens [B, max_new_tokens] int32 and lengths [B] int32.
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    prompts, prompt_lengths = prepare_prompts(input_ids, attention_mask, model.vocab_size)
    check_positions(model, int(prompt_lengths.max()), max_new_tokens)
    return _greedy_decode_jit(model, jnp.asarray(prompts), jnp.asarray(prompt_lengths),
                              eos_array(model, eos_token_id), max_new_tokens=max_new_tokens,
                              pad_token_id=output_pad_id(model))


def output_pad_id(model: Model) -> int:
    """The id written after a row's end: the model's pad id, else 0."""
    pad = model.config.pad_token_id
    return 0 if pad is None else int(pad)
