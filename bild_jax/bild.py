"""Big Little Decoder: the small model drafts, the large model falls back and rolls back, in one jitted
`lax.while_loop` over a batch with per-row state.

Per row, the output buffer holds `num_tokens` tokens. `large_seen` of them are in the large model's cache;
token `large_seen` is verified (written or already judged by the large model) and the ones after it are
unverified drafts. The small model's cache holds all but the last one or two tokens. Each iteration:
1. small step, every live row: feed the 1-2 tokens the small model has not seen, then either append a
   draft (its argmax, or a sample) or, when its confidence is below `fallback_threshold`, fall back;
2. if any row falls back, has `max_draft` drafts since the large model last wrote, or (with tail
   verification) has drafted its end: one large pass over every live row's unseen tokens, a padded
   [B, max_draft + 1] block. Rows that asked for it get their first rejected draft replaced (rollback) or
   the large model's next token appended; the other rows get their drafts judged without a new token, so
   that a row's output never depends on the rest of the batch.
Caches are kept consistent by moving per-row lengths only; no second large pass is ever needed.

Sampling (temperature > 0) draws every random number from a key of (row, output position, stream) (see
`sampling`), so a verdict on a draft is the same whenever it is computed. With `exact`, drafts are judged
by speculative rejection sampling, which keeps the large model's distribution.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import struct
from jax import lax

from bild_jax import policies
from bild_jax.generate import output_pad_id
from bild_jax.sampling import (ACCEPT, DRAFT, TOKEN, SamplingParams, check_rng, check_sampling, position_keys,
                               process_logits, row_keys, sample, uniform)
from bild_jax.model import Model
from bild_jax.prompts import (check_positions, decoder_capacity, eos_array, is_eos, prefill,
                              prepare_prompts)
from bild_jax.sharding import distribute


@dataclasses.dataclass(frozen=True)
class BiLDConfig:
    """BiLD settings. Thresholds, `exact`, `verify_tail`, EOS ids and the sampling settings are traced:
    changing them reuses the compiled program; `max_draft` and `max_new_tokens` fix shapes.

    temperature 0 is greedy decoding, where the policies measure the models' plain softmax. With
    temperature > 0 both models' distributions are processed alike (temperature, then top-k, then top-p)
    and the policies measure the processed ones: the small model samples its drafts, a rollback replaces a
    draft by a sample of the large model, and `exact` switches to speculative rejection sampling, whose
    output is distributed as sampling from the large model alone.
    """

    fallback_threshold: float = 0.6   # in [0, 1]: fall back when max softmax prob of the small model < this
    rollback_threshold: float = 5.0   # >= 0 or inf: roll back a draft token when -log p_large(token) > this
    max_draft: int = 10               # >= 1: consecutive small-model tokens before the large model verifies
    max_new_tokens: int = 64
    eos_token_id: int | Sequence[int] | None = None  # None: the large model config's EOS ids
    exact: bool = False               # output = the large model's own: greedy, or its sampling distribution
    verify_tail: bool = True          # a row ends only after the large model has verified its last drafts
    temperature: float = 0.0          # >= 0; 0 = greedy
    top_k: int = 0                    # >= 0; sample among the top_k most likely tokens, 0 = all
    top_p: float = 1.0                # in (0, 1]; sample from the nucleus holding this mass, 1 = all

    def __post_init__(self):
        if not 0.0 <= float(self.fallback_threshold) <= 1.0:
            raise ValueError(f"fallback_threshold must be in [0, 1], got {self.fallback_threshold}")
        if math.isnan(float(self.rollback_threshold)) or float(self.rollback_threshold) < 0:
            raise ValueError(f"rollback_threshold must be >= 0 (inf allowed), got {self.rollback_threshold}")
        for name in ("max_draft", "max_new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        check_sampling(self.temperature, self.top_k, self.top_p)


@struct.dataclass
class BiLDPolicy:
    """The traced part of a BiLDConfig."""

    fallback_threshold: jax.Array  # [] float32
    rollback_threshold: jax.Array  # [] float32
    exact: jax.Array               # [] bool
    verify_tail: jax.Array         # [] bool, always True when exact
    eos_ids: jax.Array             # [MAX_EOS_IDS] int32, -1 padded
    sampling: SamplingParams

    @classmethod
    def from_config(cls, config: BiLDConfig, eos_ids: jax.Array) -> "BiLDPolicy":
        return cls(fallback_threshold=jnp.float32(config.fallback_threshold),
                   rollback_threshold=jnp.float32(config.rollback_threshold),
                   exact=jnp.bool_(config.exact), verify_tail=jnp.bool_(config.verify_tail or config.exact),
                   eos_ids=eos_ids,
                   sampling=SamplingParams.create(config.temperature, config.top_k, config.top_p))


@struct.dataclass
class BiLDStats:
    """Per-row counters. small_tokens + large_tokens == lengths: every output token has one author."""

    small_tokens: jax.Array        # [B] int32 output tokens drafted by the small model and kept
    large_tokens: jax.Array        # [B] int32 output tokens written by the large model
    small_calls: jax.Array         # [B] int32 small-model steps the row took part in
    large_calls: jax.Array         # [B] int32 large-model passes that wrote a token for the row
    fallbacks: jax.Array           # [B] int32 small steps whose confidence was below the threshold
    rollbacks: jax.Array           # [B] int32 draft tokens replaced by the large model
    rolled_back_tokens: jax.Array  # [B] int32 draft tokens discarded by rollbacks (replaced one included)


@struct.dataclass
class BiLDOutput:
    tokens: jax.Array      # [B, max_new_tokens] int32, pad id after each row's end
    lengths: jax.Array     # [B] int32 generated tokens per row, a final EOS included
    from_large: jax.Array  # [B, max_new_tokens] bool the large model wrote this token (False past the end)
    stats: BiLDStats


@struct.dataclass
class DecodeState:
    small_cache: Any       # holds prompt + output[:small_seen]; small_seen = lengths - small_base
    large_cache: Any       # holds prompt + output[:large_seen]; large_seen = lengths - large_base
    tokens: jax.Array      # [B, N + 2] int32 output buffer (room for a bonus token past N)
    from_large: jax.Array  # [B, N + 2] bool the large model wrote this token
    num_tokens: jax.Array  # [B] int32 tokens in the buffer, verified and drafts
    last_large: jax.Array  # [B] int32 index of the last token the large model wrote
    # [B, max_draft, V] float32: the small model's processed logits for the draft at position p, in slot
    # p % max_draft. Exact sampling needs the whole p_small of each judged draft (the residual
    # max(0, p_large - p_small) at a rejection), not only p_small(draft); every unverified draft lies within
    # max_draft positions after last_large, so the slots never collide. Costs B * max_draft * V * 4 bytes.
    draft_logits: jax.Array
    done: jax.Array        # [B] bool
    small_calls: jax.Array         # [B] int32
    large_calls: jax.Array         # [B] int32
    fallbacks: jax.Array           # [B] int32
    rollbacks: jax.Array           # [B] int32
    rolled_back_tokens: jax.Array  # [B] int32


def _take_block(tokens: jax.Array, starts: jax.Array, counts: jax.Array, width: int) -> jax.Array:
    """tokens[b, starts[b] : starts[b] + width] [B, width] int32, zeros past counts[b]."""
    offsets = jnp.arange(width, dtype=jnp.int32)[None, :]
    index = jnp.clip(starts[:, None] + offsets, 0, tokens.shape[1] - 1)
    return jnp.where(offsets < counts[:, None], jnp.take_along_axis(tokens, index, axis=1), 0)


def _take_at(x: jax.Array, index: jax.Array) -> jax.Array:
    """x [B, K, V] -> x[b, index[b]] [B, V]."""
    return jnp.take_along_axis(x, index[:, None, None], axis=1)[:, 0]


def _set_at(buffer: jax.Array, index: jax.Array, value: jax.Array, where: jax.Array) -> jax.Array:
    """buffer [B, L, ...] with buffer[b, index[b]] = value[b] for the rows where `where` [B] holds."""
    rows = jnp.arange(buffer.shape[0])
    index = jnp.clip(index, 0, buffer.shape[1] - 1)
    value = jnp.asarray(value)
    where = where.reshape(where.shape + (1,) * (value.ndim - 1))
    return buffer.at[rows, index].set(jnp.where(where, value, buffer[rows, index]))


# Narrower verification blocks than max_draft + 1 compiled alongside it. On CPUs a one-token block is a
# matrix-vector product, far cheaper than a wide block (bundled large model, 2 cores: 1.4 ms for 1 token,
# 1.8 ms for 4, 2.8 ms for 11; experiments/measure_sizes.py), and a fallback right after the large model's
# own token has just that one token to feed.
NARROW_VERIFY_WIDTHS = (1, 4)


def _decode_narrowest(model: Model, block: jax.Array, counts: jax.Array, cache, narrow_widths: tuple[int, ...]):
    """`model.decode` of block [B, W] int32 cut to the narrowest of `narrow_widths` (static) and W that holds
    every row's counts [B] int32 tokens. Returns logits [B, W, V] float32, zero past the chosen width, and
    the cache; its lengths are the caller's to set."""
    full = block.shape[1]
    widths = tuple(w for w in sorted(set(narrow_widths)) if w < full) + (full,)

    def branch(width: int):
        def run(block, cache):
            logits, cache = model.decode(block[:, :width], cache)
            return jnp.pad(logits, ((0, 0), (0, full - width), (0, 0))), cache
        return run

    if len(widths) == 1:
        return branch(full)(block, cache)
    index = jnp.searchsorted(jnp.asarray(widths), counts.max())
    return lax.switch(index, [branch(w) for w in widths], block, cache)


def bild_decode(small: Model, large: Model, prompts: jax.Array, prompt_lengths: jax.Array, policy: BiLDPolicy,
                max_new_tokens: int, max_draft: int, pad_token_id: int = 0, rng: jax.Array | None = None
                ) -> BiLDOutput:
    """Pure BiLD decoding, for use inside the caller's own `jax.jit`.

    prompts [B, T] int32 right-padded with prompt_lengths [B] int32 (the encoder input for T5 pairs);
    `max_new_tokens`, `max_draft` and `pad_token_id` are static. `rng`: one PRNG key or [B] keys, one per
    row (`sampling.row_keys`); None uses a fixed key, fine for greedy decoding, which draws nothing.
    """
    batch, width = prompts.shape
    n = max_new_tokens
    verify_width = max_draft + 1
    small_base = jnp.ones_like(prompt_lengths) if small.is_encoder_decoder else prompt_lengths
    large_base = jnp.ones_like(prompt_lengths) if large.is_encoder_decoder else prompt_lengths
    _, small_cache = prefill(small, prompts, prompt_lengths, decoder_capacity(small, width, n + 2))
    large_capacity = decoder_capacity(large, width, n + verify_width)
    large_logits, large_cache = prefill(large, prompts, prompt_lengths, large_capacity)
    keys = row_keys(rng, batch)
    speculative = policy.exact & policy.sampling.sampled  # exact sampling: speculative rejection

    def draw(logits: jax.Array, positions: jax.Array, stream: int) -> jax.Array:
        """[B] int32 tokens for output positions [B] from logits [B, V], with the rows' keys for `stream`."""
        return sample(keys, positions, stream, logits, policy.sampling)

    zeros = jnp.zeros((batch,), jnp.int32)
    first = draw(process_logits(large_logits, policy.sampling), zeros, TOKEN)

    def small_step(state: DecodeState):
        live = ~state.done
        small_seen = state.small_cache.lengths - small_base
        count = state.num_tokens - small_seen  # 1 or 2 for live rows
        block = _take_block(state.tokens, small_seen, count, 2)
        logits, cache = _decode_narrowest(small, block, jnp.where(live, count, 0), state.small_cache, (1,))
        cache = cache.with_lengths(jnp.where(live, small_base + state.num_tokens, state.small_cache.lengths))
        next_logits = process_logits(_take_at(logits, jnp.clip(count - 1, 0, 1)), policy.sampling)
        falls_back = policies.fallback(next_logits, policy.fallback_threshold)
        draft = draw(next_logits, state.num_tokens, DRAFT)
        accept = live & ~falls_back
        tokens = _set_at(state.tokens, state.num_tokens, draft, accept)
        draft_logits = _set_at(state.draft_logits, state.num_tokens % max_draft, next_logits, accept)
        from_large = _set_at(state.from_large, state.num_tokens, False, accept)
        num_tokens = state.num_tokens + accept
        ended = accept & (is_eos(draft, policy.eos_ids) | (num_tokens >= n))
        needs_large = live & (falls_back | (num_tokens - 1 - state.last_large >= max_draft)
                              | (ended & policy.verify_tail))
        state = state.replace(small_cache=cache, tokens=tokens, from_large=from_large, num_tokens=num_tokens,
                              draft_logits=draft_logits, small_calls=state.small_calls + live,
                              fallbacks=state.fallbacks + (live & falls_back))
        return state, needs_large

    def large_verify(state: DecodeState, needs_large: jax.Array) -> DecodeState:
        live = ~state.done
        # Without tail verification a row may end on unjudged drafts; judging other rows' drafts early
        # would then make a row's output depend on its batch.
        takes_part = needs_large | (live & policy.verify_tail)
        large_seen = state.large_cache.lengths - large_base
        count = jnp.where(takes_part, state.num_tokens - large_seen, 0)  # 1 .. max_draft + 1
        block = _take_block(state.tokens, large_seen, count, verify_width)
        logits, cache = _decode_narrowest(large, block, count, state.large_cache, NARROW_VERIFY_WIDTHS)
        logits = process_logits(logits, policy.sampling)
        drafts, num_drafts = block[:, 1:], count - 1

        def speculative_rule():
            positions = large_seen[:, None] + 1 + jnp.arange(max_draft)[None, :]  # [B, max_draft] of the drafts
            small_logits = jnp.take_along_axis(state.draft_logits, (positions % max_draft)[:, :, None], axis=1)
            return policies.first_rejection_speculative(logits[:, :-1], small_logits, drafts, num_drafts,
                                                        uniform(position_keys(keys, positions, ACCEPT)))

        def bild_rule():
            rolls_back, index = policies.first_rollback(logits[:, :-1], drafts, num_drafts, policy.rollback_threshold,
                                                        policy.exact, greedy=~policy.sampling.sampled)
            return rolls_back, index, _take_at(logits, index)

        # (rolls back, first rejected draft, logits of the distribution to replace it from)
        rolls_back, index, replacement = lax.cond(speculative, speculative_rule, bild_rule)
        rolls_back = takes_part & rolls_back
        # The large model's token: a replacement, or its prediction after the row's last token.
        target = jnp.where(rolls_back[:, None], replacement, _take_at(logits, jnp.maximum(count - 1, 0)))
        appends = needs_large & ~rolls_back
        writes = rolls_back | appends
        position = jnp.where(rolls_back, large_seen + 1 + index, state.num_tokens)
        tokens = _set_at(state.tokens, position, draw(target, position, TOKEN), writes)
        from_large = _set_at(state.from_large, position, True, writes)
        new_large_seen = jnp.where(writes, position, jnp.where(takes_part, state.num_tokens - 1, large_seen))
        small_lengths = jnp.where(rolls_back, jnp.minimum(state.small_cache.lengths, small_base + position),
                                  state.small_cache.lengths)
        return state.replace(
            small_cache=state.small_cache.with_lengths(small_lengths),
            large_cache=cache.with_lengths(large_base + new_large_seen),
            tokens=tokens, from_large=from_large,
            num_tokens=jnp.where(writes, position + 1, state.num_tokens),
            last_large=jnp.where(writes, position, state.last_large),
            large_calls=state.large_calls + writes,
            rollbacks=state.rollbacks + rolls_back,
            rolled_back_tokens=state.rolled_back_tokens + jnp.where(rolls_back, state.num_tokens - position, 0),
        )

    def finished(state: DecodeState) -> jax.Array:
        """Rows whose output is complete: EOS or N tokens, among the verified ones with tail verification."""
        settled = jnp.where(policy.verify_tail, state.large_cache.lengths - large_base + 1, state.num_tokens)
        ended_at = _first_eos(state.tokens, state.num_tokens, policy.eos_ids)
        return state.done | (ended_at < settled) | (settled >= n)

    def body(state: DecodeState) -> DecodeState:
        state, needs_large = small_step(state)
        state = lax.cond(needs_large.any(), large_verify, lambda s, _: s, state, needs_large)
        return state.replace(done=finished(state))

    state = DecodeState(
        small_cache=small_cache, large_cache=large_cache,
        tokens=jnp.zeros((batch, n + 2), jnp.int32).at[:, 0].set(first),
        from_large=jnp.zeros((batch, n + 2), bool).at[:, 0].set(True),
        num_tokens=jnp.ones((batch,), jnp.int32), last_large=zeros, done=jnp.zeros((batch,), bool),
        draft_logits=jnp.zeros((batch, max_draft, large.vocab_size), jnp.float32),
        small_calls=zeros, large_calls=jnp.ones((batch,), jnp.int32), fallbacks=zeros, rollbacks=zeros,
        rolled_back_tokens=zeros,
    )
    # The first token may already end a row (EOS, or max_new_tokens == 1).
    first_ends = is_eos(first, policy.eos_ids) | (n == 1)
    state = state.replace(done=first_ends)
    state = lax.while_loop(lambda s: ~s.done.all(), body, state)
    return _output(state, n, policy.eos_ids, pad_token_id)


def _first_eos(tokens: jax.Array, num_tokens: jax.Array, eos_ids: jax.Array) -> jax.Array:
    """[B] int32 index of the first EOS among the first num_tokens tokens, or the buffer width if none."""
    positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]
    hits = is_eos(tokens, eos_ids) & (positions < num_tokens[:, None])
    return jnp.where(hits.any(-1), jnp.argmax(hits, -1), tokens.shape[1]).astype(jnp.int32)


def _output(state: DecodeState, n: int, eos_ids: jax.Array, pad_token_id: int) -> BiLDOutput:
    lengths = jnp.minimum(jnp.minimum(_first_eos(state.tokens, state.num_tokens, eos_ids) + 1, state.num_tokens), n)
    kept = jnp.arange(n)[None, :] < lengths[:, None]
    by_large = (state.from_large[:, :n] & kept).sum(-1).astype(jnp.int32)
    stats = BiLDStats(small_tokens=lengths - by_large, large_tokens=by_large, small_calls=state.small_calls,
                      large_calls=state.large_calls, fallbacks=state.fallbacks, rollbacks=state.rollbacks,
                      rolled_back_tokens=state.rolled_back_tokens)
    return BiLDOutput(tokens=jnp.where(kept, state.tokens[:, :n], pad_token_id), lengths=lengths,
                      from_large=state.from_large[:, :n] & kept, stats=stats)


def make_bild_decode(small: Model, large: Model, max_new_tokens: int, max_draft: int):
    """A pure, jittable `fn(small_params, large_params, prompts [B, T] int32, prompt_lengths [B] int32,
    policy: BiLDPolicy, rng=None) -> BiLDOutput` for the given pair's architectures and static sizes; use it
    inside your own `jax.jit`. Build `policy` with `BiLDPolicy.from_config(config, eos_array(large, ids))`;
    `rng` (one key or [B] keys) is needed when the policy samples."""
    check_pair(small, large)

    def decode(small_params, large_params, prompts, prompt_lengths, policy: BiLDPolicy, rng=None) -> BiLDOutput:
        return bild_decode(small.replace(params=small_params), large.replace(params=large_params), prompts,
                           prompt_lengths, policy, max_new_tokens=max_new_tokens, max_draft=max_draft,
                           pad_token_id=output_pad_id(large), rng=rng)

    return decode


def check_pair(small: Model, large: Model) -> None:
    """Clear errors for a small/large pair that cannot decode together."""
    if small.is_encoder_decoder != large.is_encoder_decoder:
        kinds = {True: "encoder-decoder", False: "decoder-only"}
        raise ValueError(f"cannot pair a {kinds[small.is_encoder_decoder]} small model "
                         f"({small.config.model_type}) with a {kinds[large.is_encoder_decoder]} large model "
                         f"({large.config.model_type})")
    if small.vocab_size != large.vocab_size:
        raise ValueError(f"the models' vocabularies differ: small has {small.vocab_size} tokens, large has "
                         f"{large.vocab_size}; BiLD needs one shared tokenizer")


_bild_decode_jit = jax.jit(bild_decode, static_argnames=("max_new_tokens", "max_draft", "pad_token_id"))


def bild_generate(small: Model, large: Model, input_ids, config: BiLDConfig = BiLDConfig(),
                  attention_mask=None, mesh=None, rng: jax.Array | None = None) -> BiLDOutput:
    """BiLD decoding of a batch of prompts (ragged lists, or [B, T] ids with an attention_mask).

    `rng`, needed when `config.temperature > 0`: one PRNG key (row b draws from `fold_in(rng, b)`) or [B]
    keys, one per row; see `bild_jax.sampling` for how draws are keyed.

    `mesh` (a jax.sharding.Mesh or {"data": 2, "model": 4}) shards both models and the batch over devices
    (see `bild_jax.sharding`); models from `shard_params` need none, and may use different rules.
    Returns tokens [B, config.max_new_tokens] int32, lengths [B] int32 and per-row stats. Every input
    problem raises ValueError before any compute.
    """
    check_pair(small, large)
    check_rng(rng, config.temperature)
    prompts, prompt_lengths = prepare_prompts(input_ids, attention_mask, large.vocab_size)
    for model in (small, large):
        check_positions(model, int(prompt_lengths.max()), config.max_new_tokens)
    policy = BiLDPolicy.from_config(config, eos_array(large, config.eos_token_id))
    # Checked here, before any compute; greedy runs (rng None) get their fixed key inside the jit, saving
    # an eager dispatch per call.
    keys = None if rng is None else row_keys(rng, len(prompts))
    (large, small), (prompts, prompt_lengths) = distribute(mesh, (large, small), (prompts, prompt_lengths))
    return _bild_decode_jit(small, large, prompts, prompt_lengths, policy,
                            max_new_tokens=config.max_new_tokens, max_draft=config.max_draft,
                            pad_token_id=output_pad_id(large), rng=keys)
