"""Baseline decoding with one model, greedy or sampled: one jitted program, one `lax.while_loop`, one token
per step."""

from __future__ import annotations

import numbers
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax

from bild_jax.errors import InputError
from bild_jax.memory import check_generate_fits
from bild_jax.model import Model, for_decode_loop, with_panels
from bild_jax.prompts import (check_positions, decoder_capacity, eos_array, is_eos, prefill,
                              prepare_prompts)
from bild_jax.sampling import TOKEN, SamplingParams, check_rng, process_logits, row_keys, sample
from bild_jax.sharding import distribute


@struct.dataclass
class GenerateOutput:
    tokens: jax.Array   # [B, max_new_tokens] int32, `pad_token_id` after each row's end
    lengths: jax.Array  # [B] int32 generated tokens per row, a final EOS included


@struct.dataclass
class GenerateState:
    cache: Any             # the model's cache, holding every position fed so far
    next_token: jax.Array  # [B] int32 drawn from the latest logits (argmax when greedy), not yet written
    tokens: jax.Array      # [B, N] int32 output buffer
    lengths: jax.Array     # [B] int32 tokens written per row
    done: jax.Array        # [B] bool row has emitted EOS or is full
    step: jax.Array        # [] int32


def sample_decode(model: Model, prompts: jax.Array, prompt_lengths: jax.Array, eos_ids: jax.Array,
                  params: SamplingParams, rng: jax.Array | None, max_new_tokens: int,
                  pad_token_id: int = 0) -> GenerateOutput:
    """Pure decoding, sampled or greedy (temperature 0), for use inside the caller's own `jax.jit`.

    prompts [B, T] int32 right-padded, prompt_lengths [B] int32, eos_ids [E] int32 (E may be 0); `rng` one
    PRNG key or [B] keys (`sampling.row_keys`), None only when greedy. Token t of row b is drawn with
    `position_keys(row_keys[b], t, TOKEN)`, the key BiLD's large model uses for a token it writes there.
    """
    batch = prompts.shape[0]
    model = for_decode_loop(model, rows=batch)  # one-token steps
    capacity = decoder_capacity(model, prompts.shape[1], max_new_tokens)
    first_logits, cache = prefill(model, prompts, prompt_lengths, capacity)
    keys = row_keys(rng, batch)

    def draw(logits: jax.Array, position: jax.Array) -> jax.Array:
        positions = jnp.full((batch,), position, jnp.int32)
        return sample(keys, positions, TOKEN, process_logits(logits, params), params)

    def write(state: GenerateState) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """The drawn token into the output of every live row: (token, tokens, lengths, done)."""
        token = state.next_token
        live = ~state.done
        tokens = state.tokens.at[:, state.step].set(jnp.where(live, token, pad_token_id))     # [B, N]
        lengths = state.lengths + live                                                     # [B]
        return token, tokens, lengths, state.done | is_eos(token, eos_ids) | (lengths >= max_new_tokens)

    # The loop writes tokens 0 .. N-2 and decodes after each; token N-1 is written after the loop, so that no
    # step computes logits nobody reads.
    def cond(state: GenerateState):
        return (state.step < max_new_tokens - 1) & ~state.done.all()

    def body(state: GenerateState) -> GenerateState:
        token, tokens, lengths, done = write(state)
        live = ~state.done
        logits, block = model.decode_block(token[:, None], state.cache)                    # [B, 1, V]
        next_token = draw(logits[:, 0], state.step + 1)                                    # [B]
        # Finished rows keep their cursor so that they never write past their own slots.
        cache = state.cache.write(block, after=next_token).with_lengths(state.cache.lengths + live)
        return GenerateState(cache=cache, next_token=next_token, tokens=tokens, lengths=lengths, done=done,
                             step=state.step + 1)

    state = GenerateState(
        cache=cache,
        next_token=draw(first_logits, 0),
        tokens=jnp.full((batch, max_new_tokens), pad_token_id, jnp.int32),
        lengths=jnp.zeros((batch,), jnp.int32),
        done=jnp.zeros((batch,), bool),
        step=jnp.zeros((), jnp.int32),
    )
    state = lax.while_loop(cond, body, state)
    _, tokens, lengths, _ = write(state)  # rows already done write nothing
    return GenerateOutput(tokens=tokens, lengths=lengths)


def greedy_decode(model: Model, prompts: jax.Array, prompt_lengths: jax.Array, eos_ids: jax.Array,
                  max_new_tokens: int, pad_token_id: int = 0) -> GenerateOutput:
    """Pure greedy decoding, for use inside the caller's own `jax.jit`: `sample_decode` at temperature 0.

    prompts [B, T] int32 right-padded, prompt_lengths [B] int32, eos_ids [E] int32 (E may be 0).
    """
    return sample_decode(model, prompts, prompt_lengths, eos_ids, SamplingParams.create(), None,
                         max_new_tokens=max_new_tokens, pad_token_id=pad_token_id)


_greedy_decode_jit = jax.jit(greedy_decode, static_argnames=("max_new_tokens", "pad_token_id"))
# Also what `bild_generate` runs when its schedule decodes with the large model alone.
sample_decode_jit = jax.jit(sample_decode, static_argnames=("max_new_tokens", "pad_token_id"))


def greedy_generate(model: Model, input_ids, max_new_tokens: int, attention_mask=None,
                    eos_token_id: int | Sequence[int] | None = None, mesh=None) -> GenerateOutput:
    """Greedy decoding of a batch of prompts (ragged lists, or [B, T] ids with an attention_mask).

    For encoder-decoder models `input_ids` feed the encoder. `eos_token_id=None` uses the model config's
    EOS ids; `[]` never stops early. `mesh` (a jax.sharding.Mesh or {"data": 2, "model": 4}) shards the
    model and the batch over devices (see `bild_jax.sharding`); a model from `shard_params` needs none.
    Returns tokens [B, max_new_tokens] int32 and lengths [B] int32.
    """
    (model,), prompts, prompt_lengths = prepare_inputs((model,), input_ids, max_new_tokens, attention_mask, mesh)
    check_generate_fits(model, prompts, int(max_new_tokens))
    return _greedy_decode_jit(with_panels(model), prompts, prompt_lengths,
                              eos_array(model, eos_token_id), max_new_tokens=int(max_new_tokens),
                              pad_token_id=output_pad_id(model))


def sample_generate(model: Model, input_ids, max_new_tokens: int, rng: jax.Array, temperature: float = 1.0,
                    top_k: int = 0, top_p: float = 1.0, attention_mask=None,
                    eos_token_id: int | Sequence[int] | None = None, mesh=None) -> GenerateOutput:
    """Sampling from one model, for a batch of prompts: `greedy_generate` with a random draw per token.

    `rng`: one PRNG key (row b draws from `fold_in(rng, b)`, so a row's tokens do not depend on its batch)
    or [B] keys, one per row. Each token is drawn from softmax(logits / temperature) restricted to the
    top_k most likely tokens (0 = all), then to the top_p nucleus (1 = all). The settings are traced: new
    values reuse the compiled program. temperature 0 is greedy decoding. Other arguments as in
    `greedy_generate`; returns tokens [B, max_new_tokens] int32 and lengths [B] int32.
    """
    params = SamplingParams.create(temperature, top_k, top_p)
    check_rng(rng, temperature)
    (model,), prompts, prompt_lengths = prepare_inputs((model,), input_ids, max_new_tokens, attention_mask, mesh)
    check_generate_fits(model, prompts, int(max_new_tokens))
    keys = row_keys(rng, len(prompts))
    return sample_decode_jit(with_panels(model), prompts, prompt_lengths, eos_array(model, eos_token_id), params,
                             keys, max_new_tokens=int(max_new_tokens), pad_token_id=output_pad_id(model))


def prepare_inputs(models: Sequence[Model], input_ids, max_new_tokens: int, attention_mask, mesh
                   ) -> tuple[tuple[Model, ...], np.ndarray | jax.Array, np.ndarray | jax.Array]:
    """Checked input of every generate entry point: (models, prompts [B, T] int32, prompt_lengths [B] int32),
    placed on the mesh (host arrays without one: see `distribute`). The first model lays out the batch;
    every model must fit prompt + new tokens. Each entry point then checks the memory a decode needs and
    gives its jit the models `with_panels`."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    prompts, prompt_lengths = prepare_prompts(input_ids, attention_mask, models[0].vocab_size)
    for model in models:
        check_positions(model, int(prompt_lengths.max()), int(max_new_tokens))
    models, (prompts, prompt_lengths) = distribute(mesh, models, (prompts, prompt_lengths))
    return models, prompts, prompt_lengths


def output_pad_id(model: Model) -> int:
    """The id written after a row's end: the model's pad id, else 0."""
    pad = model.config.pad_token_id
    return 0 if pad is None else int(pad)
