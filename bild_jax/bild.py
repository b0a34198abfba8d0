"""Big Little Decoder: the small model drafts, the large model falls back and rolls back, in one jitted
`lax.while_loop` over a batch with per-row state.

Per row, the output buffer holds `num_tokens` tokens. `large_seen` of them are in the large model's cache;
token `large_seen` is verified (written or already judged by the large model) and the ones after it are
unverified drafts. The small model's cache holds all but the last one or two tokens (up to lookup_tokens + 1
after a pass kept prompt-lookup drafts). Each iteration:
1. `small_step`, every drafting row: feed the tokens the small model has not seen, then either append
   a draft (its argmax, or a sample) or, when its confidence is below `fallback_threshold`, fall back (in
   exact mode appending that draft all the same, for the large pass to judge; exact greedy mode appends a
   prompt lookup's drafts instead where it finds some, `bild_jax.prompt_lookup`); a row that falls back, has
   `draft_limit` drafts since the large model last wrote, or (with tail verification) has drafted its end
   starts waiting, and sits out small steps until its pass;
2. `large_pass`, when the schedule says so (`runs_large_pass`, `bild_jax.schedule`): one large pass over
   the waiting rows' unseen tokens and the other live rows' that fit, a block cut to the narrowest
   compiled width that holds the waiting rows'. A verification rule (`policies.RULES`) finds each row's
   first rejected draft; waiting rows get it replaced (rollback) or the large model's next token
   appended; the other rows get their drafts judged without a new token, so that a row's output never
   depends on the rest of the batch. `commit_large` applies the result;
3. `finished`: rows whose output is complete stop.
Caches are kept consistent by moving per-row lengths only; no second large pass is ever needed. The passes
only read the caches; their new keys/values are written outside the `lax.switch` that picks the block
width (see `cache`), so that XLA never copies a cache inside the loop.

Sampling (temperature > 0) draws every random number from a key of (row, output position, stream) (see
`sampling`), so a verdict on a draft is the same whenever it is computed. With `exact`, drafts are judged
by speculative rejection sampling, which keeps the large model's distribution.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax

from bild_jax import policies
from bild_jax.cache import KVBlock
from bild_jax.errors import InputError
from bild_jax.generate import output_pad_id, prepare_inputs, sample_decode_jit
from bild_jax.memory import check_bild_fits
from bild_jax.model import Model, for_decode_loop, with_panels
from bild_jax.prompts import decoder_capacity, eos_array, is_eos, prefill
from bild_jax.prompt_lookup import prompt_lookup
from bild_jax.rows import set_at, set_block, take_at, take_block
from bild_jax.sampling import DRAFT, TOKEN, SamplingParams, check_rng, check_sampling, process_logits, row_keys, sample
from bild_jax.schedule import BatchSchedule, ScheduleTable, resolve, traced_limits


@dataclasses.dataclass(frozen=True)
class BiLDConfig:
    """BiLD settings. Thresholds, `exact`, `verify_tail`, EOS ids and the sampling settings are traced:
    changing them reuses the compiled program; `max_draft`, `lookup_tokens` and `max_new_tokens` fix shapes.

    temperature 0 is greedy decoding, where the policies measure the models' plain softmax. With
    temperature > 0 both models' distributions are processed alike (temperature, then top-k, then top-p)
    and the policies measure the processed ones: the small model samples its drafts, a rollback replaces a
    draft by a sample of the large model, and `exact` switches to speculative rejection sampling, whose
    output is distributed as sampling from the large model alone.
    """

    fallback_threshold: float = 0.6   # in [0, 1]: fall back when max softmax prob of the small model < this
    rollback_threshold: float = 5.0   # >= 0 or inf: roll back a draft token when -log p_large(token) > this
    max_draft: int = 10               # >= 1: consecutive small-model tokens before the large model verifies
    # >= 0, exact greedy mode: where the small model is unsure, draft up to this many tokens by prompt lookup
    # (`bild_jax.prompt_lookup`), at most max_draft; 0: the small model's unsure token alone.
    lookup_tokens: int = 4
    max_new_tokens: int = 64
    eos_token_id: int | Sequence[int] | None = None  # None: the large model config's EOS ids
    exact: bool = False               # output = the large model's own: greedy, or its sampling distribution
    verify_tail: bool = True          # a row ends only after the large model has verified its last drafts
    temperature: float = 0.0          # >= 0; 0 = greedy
    top_k: int = 0                    # >= 0; sample among the top_k most likely tokens, 0 = all
    top_p: float = 1.0                # in (0, 1]; sample from the nucleus holding this mass, 1 = all
    # How a batch shares the large model's passes (`bild_jax.schedule`): one BatchSchedule for every batch
    # size, a ScheduleTable by batch size, or None for the built-in table of the backend.
    schedule: BatchSchedule | ScheduleTable | None = None

    def __post_init__(self):
        # Values are checked by type as well as range (a string or float where an int belongs would be
        # converted silently), then stored as plain Python numbers: numpy scalars are fine input, and the
        # sizes become static jit arguments.
        for name in ("fallback_threshold", "rollback_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise InputError(f"{name} must be a number, got {value!r}")
            object.__setattr__(self, name, float(value))
        if not 0.0 <= self.fallback_threshold <= 1.0:
            raise InputError(f"fallback_threshold must be in [0, 1], got {self.fallback_threshold}")
        if math.isnan(self.rollback_threshold) or self.rollback_threshold < 0:
            raise InputError(f"rollback_threshold must be >= 0 (inf allowed), got {self.rollback_threshold}")
        for name, least in (("max_draft", 1), ("max_new_tokens", 1), ("lookup_tokens", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
                raise InputError(f"{name} must be an int >= {least}, got {value!r}")
            object.__setattr__(self, name, int(value))
        for name in ("exact", "verify_tail"):
            value = getattr(self, name)
            if not isinstance(value, (bool, np.bool_)):
                raise InputError(f"{name} must be True or False, got {value!r}")
            object.__setattr__(self, name, bool(value))
        check_sampling(self.temperature, self.top_k, self.top_p)
        if self.schedule is not None and not isinstance(self.schedule, (BatchSchedule, ScheduleTable)):
            raise InputError(f"schedule must be a BatchSchedule, a ScheduleTable or None, got {self.schedule!r}")
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_k", int(self.top_k))
        object.__setattr__(self, "top_p", float(self.top_p))

    @classmethod
    def from_profile(cls, source, **settings) -> "BiLDConfig":
        """The fallback and rollback thresholds and max_draft of a pair profile (`bild_pair.json`, written by
        `bild-jax tune`), the other fields from `settings`. `source`: the profile file, or the small model it
        was written for (a directory, hub id or bundled:NAME). A missing or broken profile raises one error
        line."""
        from bild_jax.profile import profile_of

        return profile_of(source).config(**settings)


@struct.dataclass
class BiLDPolicy:
    """The traced part of a BiLDConfig."""

    fallback_threshold: jax.Array  # [] float32
    rollback_threshold: jax.Array  # [] float32
    rule: jax.Array                # [] int32 index into policies.RULES: BiLD rollback, exact greedy, speculative
    verify_tail: jax.Array         # [] bool, always True when exact
    eos_ids: jax.Array             # [MAX_EOS_IDS] int32, -1 padded
    sampling: SamplingParams
    draft_limit: jax.Array         # [] int32 <= max_draft (see `schedule.BatchSchedule`)
    wait_fraction: jax.Array       # [] float32
    max_wait: jax.Array            # [] int32

    @property
    def drafts_when_unsure(self) -> jax.Array:
        """[] bool: a falling-back row still drafts, for the large pass to judge (the exact rules)."""
        return self.rule != policies.BILD

    @classmethod
    def from_config(cls, config: BiLDConfig, eos_ids: jax.Array, batch_size: int = 1) -> "BiLDPolicy":
        """The traced settings of `config` for a call of `batch_size` rows (which picks the schedule)."""
        sampling = SamplingParams.create(config.temperature, config.top_k, config.top_p)
        schedule = resolve(config.schedule, batch_size)
        draft_limit, max_wait = traced_limits(schedule, config.max_draft)
        # numpy scalars: the loop traces them all the same, and building them costs no device dispatch.
        return cls(fallback_threshold=np.float32(config.fallback_threshold),
                   rollback_threshold=np.float32(config.rollback_threshold),
                   rule=policies.rule_id(config.exact, bool(sampling.sampled)),
                   verify_tail=np.bool_(config.verify_tail or config.exact), eos_ids=eos_ids, sampling=sampling,
                   draft_limit=np.int32(draft_limit),
                   wait_fraction=np.float32(schedule.wait_fraction),
                   max_wait=np.int32(max_wait))


@struct.dataclass
class LoopCounters:
    """Per-row counts of what the loop did; `BiLDStats` reports them with the token authorship.

    With a fixed schedule, a row's tokens and `rollbacks` (and BiLDStats' small_tokens / large_tokens) are
    the same in any batch. The others depend on the batch: another row's pass may judge this row's drafts
    early, so a rejected draft is replaced before the small model drafts past it (fewer `small_calls`,
    `fallbacks` and `rolled_back_tokens`) and the row's verification is split over more passes."""

    small_calls: jax.Array         # [B] int32 small-model steps the row drafted in
    large_calls: jax.Array         # [B] int32 large-model passes that wrote a token for the row
    fallbacks: jax.Array           # [B] int32 small steps whose confidence was below the threshold
    rollbacks: jax.Array           # [B] int32 draft tokens replaced by the large model (in exact mode, the
                                   # drafts of fallbacks too)
    rolled_back_tokens: jax.Array  # [B] int32 draft tokens discarded by rollbacks (replaced one included)
    verify_passes: jax.Array       # [B] int32 large passes the row took part in, its own or its batch's


@struct.dataclass
class BiLDStats(LoopCounters):
    """Per-row counters. small_tokens + large_tokens == lengths: every output token has one author."""

    small_tokens: jax.Array        # [B] int32 output tokens drafted by the small model and kept
    large_tokens: jax.Array        # [B] int32 output tokens written by the large model


@struct.dataclass
class BiLDOutput:
    tokens: jax.Array      # [B, max_new_tokens] int32, pad id after each row's end
    lengths: jax.Array     # [B] int32 generated tokens per row, a final EOS included
    from_large: jax.Array  # [B, max_new_tokens] bool the large model wrote this token (False past the end)
    stats: BiLDStats
    # What `bild_generate` ran for this call's batch size (`schedule.large_only`: the large model alone).
    schedule: BatchSchedule | None = struct.field(pytree_node=False, default=None)


@struct.dataclass
class DecodeContext:
    """What every step reads and none changes: the models, the settings, the rows' keys, static sizes."""

    small: Model
    large: Model
    policy: BiLDPolicy
    keys: jax.Array                                        # [B] PRNG keys, one stream per row
    prompts: jax.Array                                     # [B, T] int32 right-padded, for prompt lookup
    prompt_lengths: jax.Array                              # [B] int32
    max_new_tokens: int = struct.field(pytree_node=False)
    max_draft: int = struct.field(pytree_node=False)
    narrow_widths: tuple[int, ...] = struct.field(pytree_node=False)   # verification widths besides max_draft + 1
    lookup_tokens: int = struct.field(pytree_node=False)  # <= max_draft, 0: no prompt lookup

    def draw(self, logits: jax.Array, positions: jax.Array, stream: int) -> jax.Array:
        """[B] int32 tokens for output positions [B] from processed logits [B, V], with the rows' keys for
        `stream` (the argmax when greedy)."""
        return sample(self.keys, positions, stream, logits, self.policy.sampling)


@struct.dataclass
class DecodeState:
    small_cache: Any       # holds prompt + output[:small_seen]
    large_cache: Any       # holds prompt + output[:large_seen]
    tokens: jax.Array      # [B, N + 2] int32 output buffer (room for a bonus token past N)
    from_large: jax.Array  # [B, N + 2] bool the large model wrote this token
    num_tokens: jax.Array  # [B] int32 tokens in the buffer, verified and drafts
    large_wrote_at: jax.Array  # [B] int32 index of the last token the large model wrote
    # [B, max_draft, V] float32: the small model's processed logits for the draft at position p, in slot
    # p % max_draft. Exact sampling needs the whole p_small of each judged draft (the residual
    # max(0, p_large - p_small) at a rejection), not only p_small(draft); every unverified draft lies within
    # max_draft positions after large_wrote_at, so the slots never collide. Costs B * max_draft * V * 4 bytes.
    draft_logits: jax.Array
    done: jax.Array        # [B] bool
    waiting: jax.Array     # [B] bool the row needs the large model and sits out small steps until its pass
    waited: jax.Array      # [B] int32 small steps the waiting row has sat out
    counters: LoopCounters
    # [B] int32 cache slots before output token 0: the prompt, or T5's decoder start token. Constant.
    small_offset: jax.Array
    large_offset: jax.Array

    @property
    def live(self) -> jax.Array:
        return ~self.done                                                 # [B] bool

    @property
    def drafting(self) -> jax.Array:
        return self.live & ~self.waiting                                  # [B] bool rows the small model steps

    @property
    def small_seen(self) -> jax.Array:
        return self.small_cache.lengths - self.small_offset               # [B] output tokens in the small cache

    @property
    def large_seen(self) -> jax.Array:
        return self.large_cache.lengths - self.large_offset               # [B] output tokens in the large cache


@struct.dataclass
class LargePass:
    """What one large pass decided, per row; applied by `commit_large`."""

    block: KVBlock          # the fed tokens' keys/values, padded to max_draft + 1 slots
    takes_part: jax.Array   # [B] bool the row's unseen tokens were fed and judged
    rolls_back: jax.Array   # [B] bool a draft was rejected
    position: jax.Array     # [B] int32 where the large model's token goes: the rejected draft, or num_tokens
    token: jax.Array        # [B] int32 the large model's token (written where needs_large or rolls_back)


# Verification block widths compiled besides max_draft + 1. On CPUs a one-token block is a matrix-vector
# product, far cheaper than a wide block (bundled large model, 2 cores: 1.4 ms for 1 token, 1.8 ms for 4,
# 2.8 ms for 11; experiments/measure_sizes.py), and a pass costs the width it runs at, not the tokens it
# needs. (1, 2, 4, 6, 8) against (1, 4), aligned bundled pair, 32 held-out prompts, two interleaved runs
# each: BiLD 1.91x/1.97x vs 1.75x/1.83x over large greedy, exact 1.61x/1.66x vs 1.52x/1.53x; every width
# 1..10 was slower again (1.78x/1.85x). Each width is one more branch to compile.
NARROW_VERIFY_WIDTHS = (1, 2, 4, 6, 8)
VERIFY_WIDTHS_ENV = "BILD_JAX_VERIFY_WIDTHS"


def narrow_verify_widths() -> tuple[int, ...]:
    """The narrow widths a BiLD call compiles: $BILD_JAX_VERIFY_WIDTHS where set ("1,4"; "" for max_draft + 1
    alone), else NARROW_VERIFY_WIDTHS. Fewer widths compile faster, each being one more branch of the large
    model, and run some passes wider than they need."""
    value = os.environ.get(VERIFY_WIDTHS_ENV)
    if value is None:
        return NARROW_VERIFY_WIDTHS
    parts = [part.strip() for part in value.split(",") if part.strip()]
    if not all(part.isdigit() and int(part) >= 1 for part in parts):
        raise InputError(f"{VERIFY_WIDTHS_ENV} must be comma-separated integers >= 1 (e.g. 1,4), got {value!r}")
    return tuple(sorted({int(part) for part in parts}))


def block_widths(narrow: tuple[int, ...], full: int) -> tuple[int, ...]:
    """The compiled block widths: the narrow ones below `full`, then `full`."""
    return tuple(w for w in sorted(set(narrow)) if w < full) + (full,)


def small_feed_width(lookup_tokens: int) -> int:
    """The most tokens a small step feeds: its last draft and the large model's token, or that token after
    `lookup_tokens` accepted drafts of a prompt lookup."""
    return max(2, lookup_tokens + 1)


def small_step(ctx: DecodeContext, state: DecodeState) -> DecodeState:
    """Feeds every drafting row's unseen tokens to the small model and drafts or falls back; a row that
    falls back, reaches `max_draft` drafts or (with tail verification) drafts its end starts waiting."""
    drafting, n, widest = state.drafting, ctx.max_new_tokens, small_feed_width(ctx.lookup_tokens)
    count = jnp.where(drafting, state.num_tokens - state.small_seen, 0)             # [B] 1 .. widest to feed
    block = take_block(state.tokens, state.small_seen, count, widest)               # [B, F]

    def feed(width: int):
        def run(block, cache):
            logits, kv = ctx.small.decode_block(block[:, :width], cache)           # [B, width, V]
            return take_at(logits, jnp.clip(count - 1, 0, width - 1)), kv.padded(widest)   # [B, V] after the last
        return run

    # Mostly one token, two after a large pass, more only after accepted lookup drafts.
    widths = tuple(sorted({1, 2, widest}))
    branch = (jnp.asarray(widths) < count.max()).sum()                               # [] the narrowest that holds
    logits, kv = lax.switch(branch, [feed(w) for w in widths], block, state.small_cache)
    small_cache = state.small_cache.write(kv).with_lengths(
        jnp.where(drafting, state.small_offset + state.num_tokens, state.small_cache.lengths))
    next_logits = process_logits(logits, ctx.policy.sampling)                      # [B, V]
    falls_back = policies.fallback(next_logits, ctx.policy.fallback_threshold)                        # [B]
    draft = ctx.draw(next_logits, state.num_tokens, DRAFT)                                            # [B]
    # In exact mode the pass a fallback calls judges the unsure draft like any other, keeping it when the
    # large model agrees: a token more per such pass at the cost of one more block column. BiLD's own
    # fallback has the large model write that token, as the paper defines it.
    drafts = drafting & (~falls_back | ctx.policy.drafts_when_unsure)
    appended, appended_count = draft[:, None], drafts.astype(jnp.int32)                 # [B, L], [B]
    if ctx.lookup_tokens:
        appended, appended_count = _prefer_lookup(ctx, state, drafting & falls_back, appended, appended_count)
    num_tokens = state.num_tokens + appended_count
    # A row appending lookup drafts falls back, and waits whatever they hold.
    ended = drafts & (is_eos(draft, ctx.policy.eos_ids) | (num_tokens >= n))
    needs_large = drafting & (falls_back | (num_tokens - 1 - state.large_wrote_at >= ctx.policy.draft_limit)
                              | (ended & ctx.policy.verify_tail))
    counters = state.counters
    return state.replace(
        small_cache=small_cache, num_tokens=num_tokens,
        waiting=state.waiting | needs_large, waited=jnp.where(state.waiting, state.waited + 1, 0),
        tokens=set_block(state.tokens, state.num_tokens, appended, appended_count),
        from_large=set_block(state.from_large, state.num_tokens, jnp.zeros_like(appended, bool), appended_count),
        draft_logits=set_at(state.draft_logits, state.num_tokens % ctx.max_draft, next_logits, drafts),
        counters=counters.replace(small_calls=counters.small_calls + drafting,
                                  fallbacks=counters.fallbacks + (drafting & falls_back)))


def _prefer_lookup(ctx: DecodeContext, state: DecodeState, unsure: jax.Array, appended: jax.Array,
                   appended_count: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The drafts to append, [B, lookup_tokens] and their count [B]: a prompt lookup's where exact greedy mode's
    small model is `unsure` [B] bool and the lookup finds some, else `appended` [B, 1] (its count [B]). A
    row never holds more than draft_limit drafts or runs past max_new_tokens. Sampled exact mode keeps its
    drafts: speculative rejection needs the distribution each was drawn from."""
    width = ctx.lookup_tokens
    appended = jnp.pad(appended, ((0, 0), (0, width - 1)))                               # [B, L]
    looks_up = unsure & (ctx.policy.rule == policies.EXACT_GREEDY)                       # [B]
    room = jnp.minimum(ctx.policy.draft_limit - (state.num_tokens - 1 - state.large_wrote_at),
                       ctx.max_new_tokens - state.num_tokens)                            # [B] >= 1 where drafting

    def look_up(_):
        found, found_count = prompt_lookup(ctx.prompts, ctx.prompt_lengths, state.tokens, state.num_tokens, width)
        uses = looks_up & (found_count > 0)                                               # [B]
        return (jnp.where(uses[:, None], found, appended),
                jnp.where(uses, jnp.minimum(found_count, room), appended_count))

    # Most steps have no unsure row: they skip the search.
    return lax.cond(looks_up.any(), look_up, lambda _: (appended, appended_count), None)


def large_pass(ctx: DecodeContext, state: DecodeState, needs_large: jax.Array, takes_part: jax.Array,
               width: int) -> LargePass:
    """The large model over each taking-part row's unseen tokens (a block of `width`, static, holding them
    all), judged by the policy's verification rule. Reads the caches, writes nothing."""
    count = jnp.where(takes_part, state.num_tokens - state.large_seen, 0)           # [B] 1 .. width
    block = take_block(state.tokens, state.large_seen, count, width)                # [B, W]
    logits, kv = ctx.large.decode_block(block, state.large_cache)                   # [B, W, V]
    logits = process_logits(logits, ctx.policy.sampling)
    rolls_back, index, replacement = jnp.zeros_like(takes_part), jnp.zeros_like(count), logits[:, 0]
    if width > 1:  # a one-token block holds no draft to judge
        positions = state.large_seen[:, None] + 1 + jnp.arange(width - 1)[None, :]  # [B, W - 1] of the drafts
        verdict = lax.switch(ctx.policy.rule, policies.RULES, policies.Verification(
            large_logits=logits, drafts=block[:, 1:], num_drafts=jnp.maximum(count - 1, 0),
            draft_logits=state.draft_logits, keys=ctx.keys, positions=positions,
            rollback_threshold=ctx.policy.rollback_threshold, sampled=ctx.policy.sampling.sampled))
        rolls_back, index, replacement = takes_part & verdict.rejects, verdict.index, verdict.replacement
    # The large model's token: a replacement, or its prediction after the row's last token.
    target = jnp.where(rolls_back[:, None], replacement, take_at(logits, jnp.maximum(count - 1, 0)))   # [B, V]
    position = jnp.where(rolls_back, state.large_seen + 1 + index, state.num_tokens)                  # [B]
    token = jnp.where(needs_large | rolls_back, ctx.draw(target, position, TOKEN), 0)
    return LargePass(block=kv.padded(ctx.max_draft + 1), takes_part=takes_part, rolls_back=rolls_back,
                     position=position, token=token)


def commit_large(state: DecodeState, needs_large: jax.Array, result: LargePass) -> DecodeState:
    """Applies a large pass: the block into the large cache, the large model's token, the cursors."""
    writes = needs_large | result.rolls_back                                                       # [B]
    position, large_seen = result.position, state.large_seen
    new_large_seen = jnp.where(writes, position, jnp.where(result.takes_part, state.num_tokens - 1, large_seen))
    small_lengths = jnp.where(result.rolls_back, jnp.minimum(state.small_cache.lengths, state.small_offset + position),
                              state.small_cache.lengths)
    counters = state.counters
    return state.replace(
        small_cache=state.small_cache.with_lengths(small_lengths),
        large_cache=state.large_cache.write(result.block).with_lengths(state.large_offset + new_large_seen),
        tokens=set_at(state.tokens, position, result.token, writes),
        from_large=set_at(state.from_large, position, True, writes),
        num_tokens=jnp.where(writes, position + 1, state.num_tokens),
        large_wrote_at=jnp.where(writes, position, state.large_wrote_at),
        counters=counters.replace(
            large_calls=counters.large_calls + writes, rollbacks=counters.rollbacks + result.rolls_back,
            verify_passes=counters.verify_passes + result.takes_part,
            rolled_back_tokens=counters.rolled_back_tokens + jnp.where(result.rolls_back,
                                                                       state.num_tokens - position, 0)))


def finished(ctx: DecodeContext, state: DecodeState) -> jax.Array:
    """[B] bool rows whose output is complete: EOS or N tokens, among the verified ones with tail
    verification."""
    settled = jnp.where(ctx.policy.verify_tail, state.large_seen + 1, state.num_tokens)
    ended_at = _first_eos(state.tokens, state.num_tokens, ctx.policy.eos_ids)
    return state.done | (ended_at < settled) | (settled >= ctx.max_new_tokens)


def runs_large_pass(ctx: DecodeContext, state: DecodeState) -> jax.Array:
    """[] bool: run the large pass now, because waiting rows make up `wait_fraction` of the live rows or
    one of them has waited `max_wait` small steps. Waiting longer lets one pass serve more rows and
    longer drafts, at the price of small steps in which the waiting rows make no progress."""
    waiting = state.waiting & state.live                                                   # [B]
    enough = waiting.sum() >= jnp.ceil(ctx.policy.wait_fraction * state.live.sum())
    overdue = jnp.where(waiting, state.waited, 0).max() >= ctx.policy.max_wait
    return waiting.any() & (enough | overdue)


def decode_step(ctx: DecodeContext, state: DecodeState) -> DecodeState:
    """One loop iteration: a small step, the large pass if the schedule runs it, the termination test."""
    state = small_step(ctx, state)
    runs = runs_large_pass(ctx, state)                                                    # []
    needs_large = runs & state.waiting                                                     # [B]
    unseen = jnp.where(state.live, state.num_tokens - state.large_seen, 0)                # [B]
    widths = block_widths(ctx.narrow_widths, ctx.max_draft + 1)
    width_values = jnp.asarray(widths)                                                     # [W] int32
    # The narrowest width >= the waiting rows' tokens (jnp.searchsorted would be a nested while loop).
    branch = (width_values < jnp.where(needs_large, unseen, 0).max()).sum()                # []
    # The other live rows have their drafts judged too, when they fit the block the waiting rows need.
    # Without tail verification a row may end on unjudged drafts; judging other rows' drafts early would
    # then make a row's output depend on its batch.
    takes_part = needs_large | (runs & state.live & ctx.policy.verify_tail & (unseen <= width_values[branch]))

    def run_large_pass(state: DecodeState) -> DecodeState:
        passes = [functools.partial(large_pass, width=w) for w in widths]
        return commit_large(state, needs_large, lax.switch(branch, passes, ctx, state, needs_large, takes_part))

    # Most iterations run no large pass: they skip it whole, the large cache's write included.
    state = lax.cond(runs, run_large_pass, lambda state: state, state)
    done = finished(ctx, state)
    return state.replace(done=done, waiting=state.waiting & ~needs_large & ~done,
                         waited=jnp.where(needs_large, 0, state.waited))


def cache_capacities(small: Model, large: Model, prompt_width: int, max_new_tokens: int,
                     max_draft: int, lookup_tokens: int) -> tuple[int, int]:
    """Slots per row of the small and the large cache: prompt bucket (T5: the start token) + max_new_tokens
    + the small model's widest feed (`small_feed_width`), and + max_draft + 1, so that a write never runs
    past the end (`dynamic_update_slice` would clamp)."""
    return (decoder_capacity(small, prompt_width, max_new_tokens + small_feed_width(lookup_tokens)),
            decoder_capacity(large, prompt_width, max_new_tokens + max_draft + 1))


def init_state(ctx: DecodeContext, prompts: jax.Array, prompt_lengths: jax.Array) -> DecodeState:
    """Prefills both caches and writes the large model's first token."""
    def offset(model: Model) -> jax.Array:
        return jnp.ones_like(prompt_lengths) if model.is_encoder_decoder else prompt_lengths

    batch, width = prompts.shape
    n = ctx.max_new_tokens
    small_capacity, large_capacity = cache_capacities(ctx.small, ctx.large, width, n, ctx.max_draft,
                                                      ctx.lookup_tokens)
    _, small_cache = prefill(ctx.small, prompts, prompt_lengths, small_capacity)
    large_logits, large_cache = prefill(ctx.large, prompts, prompt_lengths, large_capacity)
    zeros = jnp.zeros((batch,), jnp.int32)
    first = ctx.draw(process_logits(large_logits, ctx.policy.sampling), zeros, TOKEN)              # [B]
    return DecodeState(
        small_cache=small_cache, large_cache=large_cache,
        tokens=jnp.zeros((batch, n + 2), jnp.int32).at[:, 0].set(first),
        from_large=jnp.zeros((batch, n + 2), bool).at[:, 0].set(True),
        num_tokens=jnp.ones((batch,), jnp.int32), large_wrote_at=zeros,
        draft_logits=jnp.zeros((batch, ctx.max_draft, ctx.large.vocab_size), jnp.float32),
        # The first token may already end a row (EOS, or max_new_tokens == 1).
        done=is_eos(first, ctx.policy.eos_ids) | (n == 1),
        waiting=jnp.zeros((batch,), bool), waited=zeros,
        counters=LoopCounters(small_calls=zeros, large_calls=jnp.ones((batch,), jnp.int32), fallbacks=zeros,
                              rollbacks=zeros, rolled_back_tokens=zeros, verify_passes=zeros),
        small_offset=offset(ctx.small), large_offset=offset(ctx.large))


def make_context(small: Model, large: Model, prompts: jax.Array, prompt_lengths: jax.Array, policy: BiLDPolicy,
                 max_new_tokens: int, max_draft: int, rng: jax.Array | None, narrow_widths: tuple[int, ...],
                 lookup_tokens: int) -> DecodeContext:
    """The loop's context for `bild_decode`'s arguments (inside its jit): the models as the loop holds them."""
    batch = prompts.shape[0]
    lookup_tokens = min(lookup_tokens, max_draft)
    # The widest passes in the loop: the small model's widest feed, the large model's full block.
    return DecodeContext(small=for_decode_loop(small, rows=small_feed_width(lookup_tokens) * batch),
                         large=for_decode_loop(large, rows=(max_draft + 1) * batch), policy=policy,
                         keys=row_keys(rng, batch), prompts=prompts, prompt_lengths=prompt_lengths,
                         max_new_tokens=max_new_tokens, max_draft=max_draft, narrow_widths=tuple(narrow_widths),
                         lookup_tokens=lookup_tokens)


def bild_decode(small: Model, large: Model, prompts: jax.Array, prompt_lengths: jax.Array, policy: BiLDPolicy,
                max_new_tokens: int, max_draft: int, pad_token_id: int = 0, rng: jax.Array | None = None,
                narrow_widths: tuple[int, ...] = NARROW_VERIFY_WIDTHS,
                lookup_tokens: int = BiLDConfig.lookup_tokens) -> BiLDOutput:
    """Pure BiLD decoding, for use inside the caller's own `jax.jit`.

    prompts [B, T] int32 right-padded with prompt_lengths [B] int32 (the encoder input for T5 pairs);
    `max_new_tokens`, `max_draft`, `pad_token_id`, `narrow_widths` (the verification block widths compiled
    besides max_draft + 1) and `lookup_tokens` (`BiLDConfig`'s, at most max_draft) are static. `rng`: one
    PRNG key or [B] keys, one per row (`sampling.row_keys`); None uses a fixed key, fine for greedy
    decoding, which draws nothing.
    """
    ctx = make_context(small, large, prompts, prompt_lengths, policy, max_new_tokens, max_draft, rng, narrow_widths,
                       lookup_tokens)
    state = init_state(ctx, prompts, prompt_lengths)
    state = lax.while_loop(lambda s: ~s.done.all(), functools.partial(decode_step, ctx), state)
    return _output(state, max_new_tokens, policy.eos_ids, pad_token_id)


def _first_eos(tokens: jax.Array, num_tokens: jax.Array, eos_ids: jax.Array) -> jax.Array:
    """[B] int32 index of the first EOS among the first num_tokens tokens, or the buffer width if none."""
    positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]
    hits = is_eos(tokens, eos_ids) & (positions < num_tokens[:, None])
    return jnp.where(hits.any(-1), jnp.argmax(hits, -1), tokens.shape[1]).astype(jnp.int32)


def _output(state: DecodeState, n: int, eos_ids: jax.Array, pad_token_id: int) -> BiLDOutput:
    lengths = jnp.minimum(jnp.minimum(_first_eos(state.tokens, state.num_tokens, eos_ids) + 1, state.num_tokens), n)
    kept = jnp.arange(n)[None, :] < lengths[:, None]
    by_large = (state.from_large[:, :n] & kept).sum(-1).astype(jnp.int32)
    counters = {field.name: getattr(state.counters, field.name) for field in dataclasses.fields(LoopCounters)}
    stats = BiLDStats(**counters, small_tokens=lengths - by_large, large_tokens=by_large)
    return BiLDOutput(tokens=jnp.where(kept, state.tokens[:, :n], pad_token_id), lengths=lengths,
                      from_large=state.from_large[:, :n] & kept, stats=stats)


def make_bild_decode(small: Model, large: Model, max_new_tokens: int, max_draft: int,
                     lookup_tokens: int = BiLDConfig.lookup_tokens):
    """A pure, jittable `fn(small_params, large_params, prompts [B, T] int32, prompt_lengths [B] int32,
    policy: BiLDPolicy, rng=None) -> BiLDOutput` for the given pair's architectures and static sizes; use it
    inside your own `jax.jit`. Build `policy` with `BiLDPolicy.from_config(config, eos_array(large, ids))`;
    `rng` (one key or [B] keys) is needed when the policy samples. The verification widths are
    `narrow_verify_widths()`'s when it is made."""
    check_pair(small, large)
    narrow_widths = narrow_verify_widths()

    def decode(small_params, large_params, prompts, prompt_lengths, policy: BiLDPolicy, rng=None) -> BiLDOutput:
        return bild_decode(small.replace(params=small_params), large.replace(params=large_params), prompts,
                           prompt_lengths, policy, max_new_tokens=max_new_tokens, max_draft=max_draft,
                           pad_token_id=output_pad_id(large), rng=rng, narrow_widths=narrow_widths,
                           lookup_tokens=lookup_tokens)

    return decode


def check_pair(small: Model, large: Model) -> None:
    """Clear errors for a small/large pair that cannot decode together."""
    if small.is_encoder_decoder != large.is_encoder_decoder:
        kinds = {True: "an encoder-decoder", False: "a decoder-only"}
        raise InputError(f"cannot pair {kinds[small.is_encoder_decoder]} small model "
                         f"({small.config.model_type}) with {kinds[large.is_encoder_decoder]} large model "
                         f"({large.config.model_type})")
    if small.vocab_size != large.vocab_size:
        raise InputError(f"the models' vocabularies differ: small has {small.vocab_size} rows, large has "
                         f"{large.vocab_size}; BiLD needs one shared tokenizer. If one tokenizer serves both and "
                         "the extra rows only pad the embedding, decode over the shared rows: small, large = "
                         "bild_jax.shared_vocabulary(small, large, small_tokenizer, large_tokenizer)")


_bild_decode_jit = jax.jit(bild_decode, static_argnames=("max_new_tokens", "max_draft", "pad_token_id",
                                                         "narrow_widths", "lookup_tokens"))


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
    narrow_widths = narrow_verify_widths()
    (large, small), prompts, prompt_lengths = prepare_inputs((large, small), input_ids, config.max_new_tokens,
                                                             attention_mask, mesh)
    lookup_tokens = min(config.lookup_tokens, config.max_draft)
    check_bild_fits(small, large, prompts, cache_capacities(small, large, prompts.shape[1], config.max_new_tokens,
                                                            config.max_draft, lookup_tokens),
                    config.max_new_tokens, config.max_draft, small_feed_width(lookup_tokens))
    small, large = with_panels(small), with_panels(large)
    schedule = resolve(config.schedule, len(prompts))
    eos_ids = eos_array(large, config.eos_token_id)
    policy = BiLDPolicy.from_config(config, eos_ids, len(prompts))
    # Checked here, before any compute; greedy runs (rng None) get their fixed key inside the jit, saving
    # an eager dispatch per call.
    keys = None if rng is None else row_keys(rng, len(prompts))
    if schedule.large_only:
        out = sample_decode_jit(large, prompts, prompt_lengths, eos_ids, policy.sampling, keys,
                                 max_new_tokens=config.max_new_tokens, pad_token_id=output_pad_id(large))
        return large_only_output(out.tokens, out.lengths, schedule)
    out = _bild_decode_jit(small, large, prompts, prompt_lengths, policy, max_new_tokens=config.max_new_tokens,
                           max_draft=config.max_draft, pad_token_id=output_pad_id(large), rng=keys,
                           narrow_widths=narrow_widths, lookup_tokens=lookup_tokens)
    return out.replace(schedule=schedule)


def large_only_output(tokens: jax.Array, lengths: jax.Array, schedule: BatchSchedule) -> BiLDOutput:
    """A BiLDOutput for tokens [B, N] int32 and lengths [B] int32 that the large model decoded alone: it wrote
    every token, one pass each (the same tokens as BiLD writes with fallback_threshold 1)."""
    kept = jnp.arange(tokens.shape[1])[None, :] < lengths[:, None]
    zeros = jnp.zeros_like(lengths)
    stats = BiLDStats(small_calls=zeros, large_calls=lengths, fallbacks=zeros, rollbacks=zeros,
                      rolled_back_tokens=zeros, verify_passes=lengths, small_tokens=zeros, large_tokens=lengths)
    return BiLDOutput(tokens=tokens, lengths=lengths, from_large=kept, stats=stats, schedule=schedule)
