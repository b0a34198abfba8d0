"""`bild-jax bench`: what decoding costs on the machine at hand, measured with JAX alone (CPU, GPU or TPU).

For a small/large pair (checkpoints, or random-weight Llama models of real sizes with `shape`):
- per model: parameters, weight bytes, the cost of a one-token decode step and of a (max_draft + 1)-token
  verification block, each timed as a jitted `lax.fori_loop` of `model.decode` calls on a half-full cache,
  and of the first prompt's prompt pass; the model bandwidth utilization: bytes read per step / step time,
  against the copy bandwidth of the device measured by the same run;
- end to end at batch 1: large and small greedy decoding, BiLD, BiLD exact (each with the share of its time
  in prompt passes, and its speedup without them: `with_prompt_pass_shares`), and the loop overhead factor
  (BiLD handing every token to the large model, per token, over large + small greedy per token), the
  systems taking turns prompt by prompt after a first, compiling call;
- optionally greedy and BiLD throughput at several batch sizes.

`run_bench` returns all of it as one JSON-ready dict and `print_report` prints it as tables. Every system
generates exactly `max_new_tokens` tokens (EOS is ignored), so that all do the same work per prompt.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax import lax
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

import bild_jax
from bild_jax import reductions
from bild_jax.bild import BiLDConfig, bild_generate
from bild_jax.demo import DEMO_PROMPTS, load_demo_prompts
from bild_jax.errors import InputError
from bild_jax.evaluation import SystemRun, padded_shape, run_systems
from bild_jax.generate import GenerateOutput, greedy_generate, prepare_inputs
from bild_jax.hub import BUNDLED_PREFIX, SMALL_MODEL_DTYPE, load_model
from bild_jax.model import Model, for_decode_loop, with_panels
from bild_jax.models.llama import LlamaConfig
from bild_jax.prompts import decoder_capacity, prefill, prepare_prompts
from bild_jax.schedule import BatchSchedule, resolve

DEFAULT_SMALL = "bundled:small-aligned"
DEFAULT_LARGE = "bundled:large"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
STEP_LOOP = 32               # decode calls per jitted loop
# Jitted loops per timing, dispatched back to back: each one's host-side call (~0.2 ms: the model's
# parameter leaves checked and passed) then overlaps the one before, where alone it added 7% to the
# 0.07 ms steps of the bundled T5 small model (timed alone, one loop per timing).
STEP_DISPATCHES = 8
STEP_REPEATS = 5             # interleaved timings per step cost; the median is reported
COPY_REPEATS = 10
RANDOM_PROMPT_TOKENS = 64    # prompt length when no prompt set is given (the bundled prompts' length)
NO_EOS = ()                  # every system generates exactly max_new_tokens tokens


def _copy_buffer_bytes(platform: str) -> int:
    """A buffer far larger than the last-level cache: 256 MiB on CPUs, 1 GiB on accelerators."""
    return (256 if platform == "cpu" else 1024) << 20


# ---------------------------------------------------------------------------------------------------------
# Random-weight Llama models of real sizes

_LLAMA_32_ROPE = (("factor", 32.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
                  ("original_max_position_embeddings", 8192), ("rope_type", "llama3"))
_LLAMA_31_ROPE = (("factor", 8.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
                  ("original_max_position_embeddings", 8192), ("rope_type", "llama3"))


def _llama(hidden: int, layers: int, heads: int, kv_heads: int, head_dim: int, intermediate: int,
           vocab: int = 128256, tied: bool = True, rope: tuple = _LLAMA_32_ROPE,
           max_positions: int = 131072) -> LlamaConfig:
    return LlamaConfig(model_type="llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                       num_layers=layers, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                       rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=rope, max_positions=max_positions,
                       tie_word_embeddings=tied)


@dataclasses.dataclass(frozen=True)
class Shape:
    """A random-weight pair for `--shape`: the large model has a released model's dimensions, the small one
    is a narrower, shallower Llama with the same vocabulary (about 10-15x fewer bytes read per step)."""

    large: LlamaConfig
    small: LlamaConfig
    about: str


SHAPES: dict[str, Shape] = {
    # Llama 3.2 1B (1.24B parameters) / 4 layers x 768 (133M, 9.3x fewer).
    "llama-1b": Shape(_llama(2048, 16, 32, 8, 64, 8192), _llama(768, 4, 12, 4, 64, 3072),
                      "Llama 3.2 1B dims / small 4 layers x 768"),
    # Llama 3.2 3B (3.21B) / 8 layers x 1024 (257M, 12.5x fewer).
    "llama-3b": Shape(_llama(3072, 28, 24, 8, 128, 8192), _llama(1024, 8, 16, 8, 64, 4096),
                      "Llama 3.2 3B dims / small 8 layers x 1024"),
    # Llama 3.1 8B (8.03B, untied; a step reads 7.5B of them) / 6 layers x 2048 (628M, 12x fewer).
    "llama-8b": Shape(_llama(4096, 32, 32, 8, 128, 14336, tied=False, rope=_LLAMA_31_ROPE),
                      _llama(2048, 6, 32, 8, 64, 8192, rope=_LLAMA_31_ROPE),
                      "Llama 3.1 8B dims / small 6 layers x 2048"),
    # For tests: milliseconds per step.
    "tiny": Shape(_llama(64, 2, 4, 2, 16, 128, vocab=512, rope=(("rope_type", "default"),), max_positions=4096),
                  _llama(32, 1, 2, 1, 16, 64, vocab=512, rope=(("rope_type", "default"),), max_positions=4096),
                  "2 layers x 64 / small 1 layer x 32, vocabulary 512"),
}


def random_model(config, dtype=jnp.bfloat16, seed: int = 0) -> Model:
    """A decoder-only `Model` of `config` with random params in `dtype`, made on the default device by one
    jitted program (no float32 copy of the model): weight matrices N(0, 0.02^2), vectors (norm weights)
    ones. Costs depend on shapes only, so this stands in for a checkpoint of the same dimensions."""
    module = Model(config=config, params=None).module
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))["params"]
    flat = traverse_util.flatten_dict(shapes)

    def init(key: jax.Array) -> dict:
        return {path: jnp.ones(leaf.shape, dtype) if len(leaf.shape) == 1
                else 0.02 * jax.random.normal(jax.random.fold_in(key, i), leaf.shape, dtype)
                for i, (path, leaf) in enumerate(flat.items())}

    return Model(config=config, params=traverse_util.unflatten_dict(jax.jit(init)(jax.random.key(seed))))


# ---------------------------------------------------------------------------------------------------------
# Decode-step costs and bandwidth

def weight_bytes_per_step(model: Model) -> int:
    """Bytes of params one decode step reads: every weight, except that an embedding table used only for
    lookups (not as the output head) is read one row per token, and an encoder (run once per prompt) not
    at all. Works on abstract params (`jax.eval_shape`) too."""
    tied = getattr(model.config, "tie_word_embeddings", False)
    total = 0
    for path, leaf in traverse_util.flatten_dict(model.params).items():
        if path[0] == "encoder":
            continue
        lookup_only = path[-1] == "embedding" and path[0] != "lm_head" \
            and not (tied and leaf.shape[0] == model.vocab_size)
        total += (leaf.shape[-1] if lookup_only else leaf.size) * leaf.dtype.itemsize
    return total


def cache_bytes(cache) -> int:
    """Bytes of a decode cache: attention reads every slot of its fixed-shape buffers at each step."""
    return sum(x.nbytes for x in jax.tree_util.tree_leaves(cache))


@functools.partial(jax.jit, static_argnames=("loop",))
def _decode_loop(model: Model, tokens: jax.Array, cache, loop: int) -> jax.Array:
    """`loop` calls of `model.decode(tokens [B, K] int32, cache)`, each from the cache's starting cursors;
    returns the [B, 1] int32 token fed back by the last call."""
    lengths = cache.lengths

    def body(_, carry):
        cache, feedback = carry
        logits, cache = model.decode(tokens + feedback, cache)
        # A token derived from every row of the logits feeds the next call, so that XLA can neither hoist
        # work out of the loop nor drop the logits of the block's other tokens.
        return cache.with_lengths(lengths), reductions.argmax(logits).sum(axis=1, keepdims=True) % 2

    return lax.fori_loop(0, loop, body, (cache, jnp.zeros((tokens.shape[0], 1), jnp.int32)))[1]


def _half_full_cache(model: Model, capacity: int, width: int, context: Sequence[int]):
    """A batch-1 cache of `capacity` slots, its cursor at half (leaving room for `width` tokens); an
    encoder-decoder model encodes `context` first. Attention reads every slot whatever they hold, so the
    slots stay zero."""
    encoder = {}
    if model.is_encoder_decoder:
        ids = jnp.asarray([context], jnp.int32)
        encoder = dict(encoder_input_ids=ids, encoder_mask=jnp.ones(ids.shape, bool))
    cache = model.start_cache(1, capacity, **encoder)
    return cache.with_lengths(jnp.full((1,), min(capacity // 2, capacity - width), jnp.int32))


def _loop_timer(model: Model, width: int, capacity: int, context: Sequence[int], loop: int
                ) -> tuple[Callable[[], float], int]:
    """(run, cache bytes): `run()` times STEP_DISPATCHES jitted loops of `loop` decode calls of a [1, width]
    block each, on a half-full cache of `capacity` slots, and returns seconds per call (its first call
    compiles)."""
    cache = _half_full_cache(model, capacity, width, context)
    tokens = jnp.ones((1, width), jnp.int32)

    def run() -> float:
        start = time.perf_counter()
        jax.block_until_ready([_decode_loop(model, tokens, cache, loop) for _ in range(STEP_DISPATCHES)])
        return (time.perf_counter() - start) / (STEP_DISPATCHES * loop)

    return run, cache_bytes(cache)


def _prompt_timer(model: Model, prompt: Sequence[int], max_new_tokens: int) -> Callable[[], float]:
    """`run()` times STEP_DISPATCHES prompt passes (`prompts.prefill`) of one prompt, padded to its bucket and
    into a cache sized as the generate functions size it, dispatched back to back; returns seconds per pass
    (its first call compiles)."""
    ids, lengths = prepare_prompts([list(prompt)], vocab_size=model.vocab_size)
    capacity = decoder_capacity(model, ids.shape[1], max_new_tokens)
    prompt_pass = jax.jit(lambda model, ids, lengths: prefill(model, ids, lengths, capacity))  # logits, cache

    def run() -> float:
        start = time.perf_counter()
        jax.block_until_ready([prompt_pass(model, ids, lengths) for _ in range(STEP_DISPATCHES)])
        return (time.perf_counter() - start) / STEP_DISPATCHES

    return run


def copy_bandwidth(nbytes: int, repeats: int = COPY_REPEATS, on_call: Callable[[], None] = lambda: None) -> float:
    """Bytes per second of the default device's memory: an elementwise in-place update (read + write) of a
    float32 buffer of `nbytes`, donated so that no call allocates; the median of `repeats` calls after one
    compiling call."""
    update = jax.jit(lambda x: x + 1.0, donate_argnums=0)
    buffer = jax.block_until_ready(update(jnp.zeros((nbytes // 4,), jnp.float32)))
    on_call()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        buffer = jax.block_until_ready(update(buffer))
        seconds.append(time.perf_counter() - start)
        on_call()
    return 2 * buffer.nbytes / float(np.median(seconds))


def step_costs(models: dict[str, Model], width: int, capacity: int, context: Sequence[int], max_new_tokens: int,
               loop: int = STEP_LOOP, repeats: int = STEP_REPEATS, on_call: Callable[[], None] = lambda: None
               ) -> dict[str, dict]:
    """Per model: ms per one-token decode step, per [1, width] block and per prompt pass of `context` (the
    first prompt, room for `max_new_tokens` after it), the median of `repeats` timings (all timers
    interleaved, after one compiling call each), with the bytes one step reads (weights as the decode loops
    hold them, plus the cache of `capacity` slots)."""
    decoded = {name: for_decode_loop(model, rows=width) for name, model in models.items()}
    loops = {(name, w): _loop_timer(model, w, capacity, context, loop)
             for name, model in decoded.items() for w in (1, width)}                # (run, cache bytes)
    timers = {key: run for key, (run, _) in loops.items()}
    timers.update({(name, "prompt"): _prompt_timer(model, context, max_new_tokens) for name, model in decoded.items()})
    samples = {key: [] for key in timers}
    for round_ in range(repeats + 1):
        for key, run in timers.items():
            seconds = run()
            if round_:  # round 0 compiles
                samples[key].append(seconds)
            on_call()
    costs = {}
    for name, model in decoded.items():
        step_ms, block_ms, prompt_ms = (1000 * float(np.median(samples[name, w])) for w in (1, width, "prompt"))
        costs[name] = dict(step_ms=step_ms, block_ms=block_ms, block_over_step=block_ms / step_ms,
                           prompt_ms=prompt_ms, bytes_per_step=weight_bytes_per_step(model) + loops[name, 1][1],
                           compute_dtype=str(model.dtype))
    return costs


# ---------------------------------------------------------------------------------------------------------
# End to end

TURNS = "in turns"  # the system taking the two models' steps in turns without the BiLD loop


@functools.partial(jax.jit, static_argnames=("max_new_tokens",))
def _in_turns(small: Model, large: Model, prompts: jax.Array, prompt_lengths: jax.Array,
              max_new_tokens: int) -> GenerateOutput:
    """The models' work of BiLD handing every token to the large model, without the BiLD loop: both prompts
    prefilled, the large model's first token, then per token one small step (fed the last token) and one
    large step (fed the small model's argmax). prompts [B, T] int32 right-padded, prompt_lengths [B] int32 ->
    tokens [B, max_new_tokens] int32."""
    batch, width = prompts.shape
    small, large = for_decode_loop(small, rows=batch), for_decode_loop(large, rows=batch)
    _, small_cache = prefill(small, prompts, prompt_lengths, decoder_capacity(small, width, max_new_tokens))
    logits, large_cache = prefill(large, prompts, prompt_lengths, decoder_capacity(large, width, max_new_tokens))
    tokens = jnp.zeros((batch, max_new_tokens), jnp.int32).at[:, 0].set(reductions.argmax(logits))

    def body(i, carry):
        small_cache, large_cache, tokens = carry
        logits, small_cache = small.decode(lax.dynamic_slice_in_dim(tokens, i - 1, 1, axis=1), small_cache)
        draft = reductions.argmax(logits[:, -1])[:, None]                                # [B, 1]
        logits, large_cache = large.decode(draft, large_cache)                           # [B, 1, V]
        return small_cache, large_cache, tokens.at[:, i].set(reductions.argmax(logits[:, -1]))

    tokens = lax.fori_loop(1, max_new_tokens, body, (small_cache, large_cache, tokens))[2]
    return GenerateOutput(tokens=tokens, lengths=jnp.full((batch,), max_new_tokens, jnp.int32))


def in_turns(small: Model, large: Model, input_ids, max_new_tokens: int) -> GenerateOutput:
    """`_in_turns` on a batch of prompts (ragged lists of ids): what running the two models in turns costs
    with no BiLD loop, the part of the loop overhead factor that no change to the loop can remove."""
    (large, small), prompts, prompt_lengths = prepare_inputs((large, small), input_ids, max_new_tokens, None, None)
    return _in_turns(with_panels(small), with_panels(large), prompts, prompt_lengths,
                     max_new_tokens=int(max_new_tokens))


def _take_turns(systems: dict[str, Callable], items: Sequence, on_call: Callable,
                batch_shape: Callable | None = None) -> dict[str, SystemRun]:
    """Runs the systems on `items` with `run_systems` (a compiling call each, timed apart, on the first item
    and on every new `batch_shape`; then turns item by item): {name: its SystemRun, one pass}."""
    runs = run_systems(list(systems.items()), items, on_call=lambda _: on_call(), batch_shape=batch_shape)
    return {run.name: run for run in runs}


def _median_ms_per_token(run: SystemRun) -> float:
    """ms per generated token of a batch-1 run: the median over its prompts (steady calls only)."""
    per_prompt = [seconds / len(tokens) for seconds, tokens in zip(run.batch_seconds[0], run.outputs)]
    return 1000 * float(np.median(per_prompt))


def _bild_systems(config: BiLDConfig, with_acceptance: bool) -> dict[str, BiLDConfig]:
    """BiLD settings per system name; 'BiLD all-large' hands every token to the large model (the loop's own
    cost). Without meaningful acceptance (random weights), only that one."""
    all_large = dataclasses.replace(config, fallback_threshold=1.0, rollback_threshold=math.inf, exact=False)
    systems = {"BiLD": config, "BiLD exact": dataclasses.replace(config, exact=True)} if with_acceptance else {}
    return {**systems, "BiLD all-large": all_large}


def end_to_end(small: Model, large: Model, prompts: Sequence[Sequence[int]], config: BiLDConfig,
               with_acceptance: bool = True, on_call: Callable[[], None] = lambda: None) -> dict:
    """Batch 1 on each prompt (lists of token ids), every system generating `config.max_new_tokens` tokens:
    {"systems": [{name, tokens_per_s, ms_per_token (median over prompts), speedup (vs large greedy, total
    time), compile_s, and for BiLD large_token_share, large_calls_per_token}], "loop_overhead": BiLD
    all-large ms per token / (large + small greedy ms per token), "turns_overhead": the same for the models
    in turns without the BiLD loop (`in_turns`), "loop_own": BiLD all-large / in turns; medians over
    prompts}."""
    n = config.max_new_tokens
    systems = {"large greedy": lambda p: greedy_generate(large, p, n, eos_token_id=NO_EOS),
               "small greedy": lambda p: greedy_generate(small, p, n, eos_token_id=NO_EOS),
               TURNS: lambda p: in_turns(small, large, p, n)}
    bild = _bild_systems(config, with_acceptance)
    systems.update({name: functools.partial(bild_generate, small, large, config=c) for name, c in bild.items()})
    # Prompts of several buckets (a prompts file, the T5 pair's inputs) compile once per bucket, timed apart.
    results = _take_turns(systems, prompts, on_call, batch_shape=padded_shape)
    baseline = results["large greedy"].seconds
    rows = []
    for name, run in results.items():
        row = dict(system=name, tokens_per_s=run.tokens_per_s, ms_per_token=_median_ms_per_token(run),
                   speedup=baseline / run.seconds, compile_s=run.compile_seconds)
        if run.stats:
            tokens = run.stats["small_tokens"] + run.stats["large_tokens"]
            row.update(large_token_share=run.stats["large_tokens"] / tokens,
                       large_calls_per_token=run.stats["large_calls"] / tokens)
        rows.append(row)
    per_token = {name: _median_ms_per_token(run) for name, run in results.items()}
    apart = per_token["large greedy"] + per_token["small greedy"]
    return {"systems": rows, "loop_overhead": per_token["BiLD all-large"] / apart,
            "turns_overhead": per_token[TURNS] / apart, "loop_own": per_token["BiLD all-large"] / per_token[TURNS]}


def with_prompt_pass_shares(e2e: dict, prompt_ms: dict[str, float], max_new_tokens: int) -> dict:
    """`end_to_end`'s record with, per system, `prompt_share`: the part of its mean time per prompt
    (`max_new_tokens` over its tokens/s: the time its speedup compares) that its prompt passes take
    (`prompt_ms`: per model, timed apart: the large model's for large greedy, the small one's for small
    greedy, both for the rest), and `decode_speedup`: its speedup over large greedy with every system's
    prompt passes taken out, which a system approaches as it generates longer outputs (None where the
    passes, timed apart, took as long as a whole prompt: the remainder is noise)."""
    def passes(name: str) -> float:
        alone = {"large greedy": prompt_ms["large"], "small greedy": prompt_ms["small"]}
        return alone.get(name, prompt_ms["large"] + prompt_ms["small"])

    def decode_ms(name: str) -> float:
        return per_prompt[name] - passes(name)

    per_prompt = {row["system"]: 1000 * max_new_tokens / row["tokens_per_s"] for row in e2e["systems"]}
    rows = [dict(row, prompt_share=passes(row["system"]) / per_prompt[row["system"]],
                 decode_speedup=decode_ms("large greedy") / decode_ms(row["system"])
                 if min(decode_ms("large greedy"), decode_ms(row["system"])) > 0 else None)
            for row in e2e["systems"]]
    return dict(e2e, systems=rows)


def _batches(prompts: Sequence[Sequence[int]], batch_size: int) -> list[list[list[int]]]:
    """Prompts cut to their last `min length` tokens (rows align), cycled into ceil(P / batch_size) batches."""
    length = min(len(p) for p in prompts)
    rows = [list(p[len(p) - length:]) for p in prompts]
    count = math.ceil(len(rows) / batch_size)
    return [[rows[(b * batch_size + i) % len(rows)] for i in range(batch_size)] for b in range(count)]


# The schedules `batch_throughput` tries at each batch size, besides the large model alone: full
# synchronisation of the rows with shorter and shorter drafts (see `bild_jax.schedule`).
CANDIDATE_SCHEDULES = (BatchSchedule(), BatchSchedule(draft_limit=5), BatchSchedule(draft_limit=3),
                       BatchSchedule(draft_limit=2), BatchSchedule(draft_limit=1))


def batch_throughput(small: Model, large: Model, prompts: Sequence[Sequence[int]], config: BiLDConfig,
                     batch_size: int, with_bild: bool = True, on_call: Callable[[], None] = lambda: None) -> dict:
    """Large greedy tokens/s at `batch_size` rows per call, over `_batches(prompts, batch_size)`, and with BiLD:
    under the schedule `bild_generate` picks for `config` at this batch size, and under each of
    `CANDIDATE_SCHEDULES`, all taking turns batch by batch. Returns {batch, greedy_tokens_per_s,
    bild_tokens_per_s, bild_speedup, schedule (what BiLD ran), candidates: [{schedule, tokens_per_s,
    speedup}], best: the fastest candidate's schedule, or large-only where none beats greedy}."""
    n = config.max_new_tokens
    # run_systems hands each item to a system as a one-element list: here the item is a whole batch.
    systems = {"greedy": lambda item: greedy_generate(large, item[0], n, eos_token_id=NO_EOS)}
    candidates = CANDIDATE_SCHEDULES if with_bild else ()
    if with_bild:
        systems["BiLD"] = lambda item: bild_generate(small, large, item[0], config)
    for index, schedule in enumerate(candidates):
        candidate = dataclasses.replace(config, schedule=schedule)
        systems[f"candidate {index}"] = functools.partial(lambda c, item: bild_generate(small, large, item[0], c),
                                                          candidate)
    results = _take_turns(systems, _batches(prompts, batch_size), on_call)  # one batch shape
    greedy_seconds = results["greedy"].seconds
    row = dict(batch=batch_size, greedy_tokens_per_s=results["greedy"].tokens_per_s)
    if not with_bild:
        return row
    tried = [dict(schedule=dataclasses.asdict(schedule), tokens_per_s=results[f"candidate {i}"].tokens_per_s,
                  speedup=greedy_seconds / results[f"candidate {i}"].seconds)
             for i, schedule in enumerate(candidates)]
    fastest = max(tried, key=lambda c: c["speedup"])
    best = fastest["schedule"] if fastest["speedup"] > 1.0 else dataclasses.asdict(BatchSchedule(large_only=True))
    return dict(row, bild_tokens_per_s=results["BiLD"].tokens_per_s,
                bild_speedup=greedy_seconds / results["BiLD"].seconds,
                schedule=dataclasses.asdict(resolve(config.schedule, batch_size)), candidates=tried, best=best)


# ---------------------------------------------------------------------------------------------------------
# The whole bench

class _Tracker:
    """Advances a rich Progress bar (or nothing, without one)."""

    def __init__(self, progress: Progress | None):
        self.progress = progress
        self.task = progress.add_task("loading models", total=None) if progress else None

    def stage(self, description: str, total: int | None = None) -> None:
        if self.progress:
            self.progress.update(self.task, description=description,
                                 **({"total": total, "completed": 0} if total is not None else {}))

    def advance(self) -> None:
        if self.progress:
            self.progress.advance(self.task)


def check_settings(shape: str | None, dtypes: tuple[str | None, ...], num_prompts: int, max_new_tokens: int,
                   max_draft: int, fallback: float, rollback: float, batch_sizes: Sequence[int],
                   prompts_file: Path | None) -> BiLDConfig:
    """The BiLD config of the settings (`dtypes`: the models' dtype names, None for a default); ValueError
    (FileNotFoundError for the prompts) naming the first bad one."""
    if shape is not None and shape not in SHAPES:
        raise InputError(f"unknown shape {shape!r}; shapes: {', '.join(SHAPES)}")
    for dtype in dtypes:
        if dtype is not None and dtype not in DTYPES:
            raise InputError(f"unknown dtype {dtype!r}; dtypes: {', '.join(DTYPES)}")
    if num_prompts < 1:
        raise InputError(f"num_prompts must be >= 1, got {num_prompts}")
    if any(b < 1 for b in batch_sizes):
        raise InputError(f"batch sizes must be >= 1, got {list(batch_sizes)}")
    if prompts_file is not None and not Path(prompts_file).is_file():
        raise FileNotFoundError(f"no prompts file at {prompts_file}")
    return BiLDConfig(fallback_threshold=fallback, rollback_threshold=rollback, max_draft=max_draft,
                      max_new_tokens=max_new_tokens, eos_token_id=NO_EOS)


def _describe(model: Model, source: str) -> dict:
    leaves = jax.tree_util.tree_leaves(model.params)
    return dict(source=source, model_type=model.config.model_type, dtype=str(model.dtype),
                params=sum(x.size for x in leaves), weight_bytes=sum(x.nbytes for x in leaves))


def _pair(small, large, shape: str | None, dtype: str | None, small_dtype: str
          ) -> tuple[dict[str, Model], dict[str, str]]:
    """({"small": Model, "large": Model}, where each comes from) for `run_bench`'s arguments."""
    if shape is not None:
        return ({"small": random_model(SHAPES[shape].small, DTYPES[small_dtype], seed=1),
                 "large": random_model(SHAPES[shape].large, DTYPES[dtype or "bfloat16"], seed=0)},
                {"small": f"shape:{shape} small", "large": f"shape:{shape}"})
    given = {"small": small, "large": large}
    dtypes = {"small": DTYPES[small_dtype], "large": DTYPES[dtype or "float32"]}
    models = {name: m if isinstance(m, Model) else load_model(m, dtypes[name]) for name, m in given.items()}
    sources = {name: f"{m.config.model_type} model in memory" if isinstance(m, Model) else str(m)
               for name, m in given.items()}
    return models, sources


def _prompts(prompts_file: Path | None, bundled: bool, num_prompts: int, vocab_size: int) -> tuple[list, str]:
    """(prompts as lists of token ids, where they come from)."""
    if prompts_file is not None:
        return [s["prompt"] for s in load_demo_prompts(prompts_file, num_prompts)], str(prompts_file)
    if bundled:
        return [s["prompt"] for s in load_demo_prompts(DEMO_PROMPTS, num_prompts)], "bundled held-out"
    rng = np.random.default_rng(0)
    return rng.integers(0, vocab_size, (num_prompts, RANDOM_PROMPT_TOKENS)).tolist(), "random"


def _finite(value: float) -> float | str:
    """JSON has no infinity."""
    return value if math.isfinite(value) else str(value)


def run_bench(small: str | Path | Model = DEFAULT_SMALL, large: str | Path | Model = DEFAULT_LARGE,
              shape: str | None = None, dtype: str | None = None, small_dtype: str = SMALL_MODEL_DTYPE,
              fallback: float = BiLDConfig.fallback_threshold,
              rollback: float = BiLDConfig.rollback_threshold, max_draft: int = BiLDConfig.max_draft,
              num_prompts: int = 16, max_new_tokens: int = 48, batch_sizes: Sequence[int] = (),
              prompts_file: Path | None = None, step_loop: int = STEP_LOOP, step_repeats: int = STEP_REPEATS,
              progress: Progress | None = None) -> dict:
    """Runs the whole bench on JAX's default backend and returns its record (JSON-ready).

    `small`/`large`: `load_model` paths, hub ids or `bundled:NAME`, or `Model`s already loaded; or `shape`
    (a key of `SHAPES`): random-weight Llama models of that size, for which BiLD's acceptance means nothing,
    so the end-to-end part runs greedy decoding and BiLD all-large (the loop overhead) only. `dtype`:
    "float32" or "bfloat16" for the large model it makes or loads (default float32 for checkpoints, bfloat16
    for shapes), `small_dtype` for the small one (default `hub.SMALL_MODEL_DTYPE`, as the other commands load
    it); a `Model` is taken as it is. Prompts: `prompts_file` (the demo's JSON format:
    [{"prompt": [ids]}, ...]), else the bundled held-out prompts for a bundled pair, else random ids of
    `RANDOM_PROMPT_TOKENS` tokens; the first `num_prompts` of them. `progress` shows what runs.
    Raises ValueError (before loading anything) for bad settings.
    """
    config = check_settings(shape, (dtype, small_dtype), num_prompts, max_new_tokens, max_draft, fallback, rollback,
                            batch_sizes, prompts_file)
    tracker = _Tracker(progress)
    models, sources = _pair(small, large, shape, dtype, small_dtype)
    bundled = shape is None and all(str(s).startswith(BUNDLED_PREFIX) for s in (small, large))
    prompts, prompt_source = _prompts(prompts_file, bundled, num_prompts, models["large"].vocab_size)
    with_bild = shape is None

    prompt_tokens = max(len(p) for p in prompts)
    context = 1 if models["large"].is_encoder_decoder else prompt_tokens
    capacity = context + max_new_tokens
    platform = jax.devices()[0].platform
    num_systems = 3 + len(_bild_systems(config, with_bild))
    batches = {b: len(_batches(prompts, b)) for b in batch_sizes}
    tracker.stage("measuring copy bandwidth", total=COPY_REPEATS + 1)
    bandwidth = copy_bandwidth(_copy_buffer_bytes(platform), on_call=tracker.advance)
    tracker.stage(f"timing decode steps, {max_draft + 1}-token blocks and prompt passes", total=6 * (step_repeats + 1))
    costs = step_costs(models, max_draft + 1, capacity, prompts[0], max_new_tokens, step_loop, step_repeats,
                       tracker.advance)
    tracker.stage(f"end to end: {num_systems} systems on {len(prompts)} prompts",
                  total=num_systems * (len(prompts) + 1))
    e2e = end_to_end(models["small"], models["large"], prompts, config, with_bild, tracker.advance)
    e2e = with_prompt_pass_shares(e2e, {name: cost["prompt_ms"] for name, cost in costs.items()}, max_new_tokens)
    by_batch = []
    for b, count in batches.items():
        systems_per_batch = 2 + len(CANDIDATE_SCHEDULES) if with_bild else 1
        tracker.stage(f"batch {b}: {count} batches, {systems_per_batch} systems",
                      total=systems_per_batch * (count + 1))
        by_batch.append(batch_throughput(models["small"], models["large"], prompts, config, b, with_bild,
                                         tracker.advance))

    per_model = {}
    for name, model in models.items():
        cost = costs[name]
        achieved = cost["bytes_per_step"] / (cost["step_ms"] / 1000)
        per_model[name] = {**_describe(model, sources[name]), **cost, "bandwidth_gb_s": achieved / 1e9,
                           "bandwidth_utilization": achieved / bandwidth}
    device = jax.devices()[0]
    return {
        "bild_jax_version": bild_jax.__version__,
        "jax_version": jax.__version__,
        "device": dict(platform=device.platform, kind=device.device_kind, count=jax.device_count(),
                       host_cpus=os.cpu_count()),
        "settings": dict(small=sources["small"], large=sources["large"], shape=shape,
                         shape_about=SHAPES[shape].about if shape else None,
                         fallback=fallback, rollback=_finite(rollback), max_draft=max_draft,
                         num_prompts=len(prompts), max_new_tokens=max_new_tokens, prompts=prompt_source,
                         prompt_tokens=prompt_tokens, cache_capacity=capacity, step_loop=step_loop,
                         step_dispatches=STEP_DISPATCHES, step_repeats=step_repeats,
                         batch_sizes=list(batch_sizes)),
        "copy_bandwidth_gb_s": bandwidth / 1e9,
        "copy_buffer_bytes": _copy_buffer_bytes(platform),
        "models": per_model,
        "large_over_small_step": per_model["large"]["step_ms"] / per_model["small"]["step_ms"],
        "end_to_end": e2e,
        "batches": by_batch,
        # The best schedule by batch size, for `--save-schedule` (`ScheduleTable.from_dict`).
        "schedule_table": dict(measured_on=f"bild-jax bench, {sources['small']} / {sources['large']}, "
                                           f"{device.device_kind}, {os.cpu_count()} host CPUs",
                               entries=[{"batch_size": b["batch"], **b["best"]} for b in by_batch if "best" in b]),
    }


# ---------------------------------------------------------------------------------------------------------
# Report

def _bytes(n: int) -> str:
    """1234567 -> '1.23 MB' (decimal prefixes)."""
    exponent = min(int(math.log10(max(n, 1)) // 3), 4)
    return f"{n / 1000 ** exponent:.3g} {('', 'k', 'M', 'G', 'T')[exponent]}B"


def _params(n: int) -> str:
    """133e6 -> '133M', 1.24e9 -> '1.24B'."""
    return f"{n / 1e9:.3g}B" if n >= 1e9 else f"{n / 1e6:.3g}M"


def _dtypes(model: dict) -> str:
    """'bf16', or 'bf16 -> f32' where the decode loop reads converted weights."""
    short = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}
    stored, computed = (short.get(model[k], model[k]) for k in ("dtype", "compute_dtype"))
    return stored if stored == computed else f"{stored} -> {computed}"


def _table(columns: list[str], rows: list[list[str]]) -> Table:
    table = Table()
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    return table


def print_report(result: dict, console: Console | None = None) -> None:
    """Prints a `run_bench` record as tables: device and settings, step costs, end to end, batch sizes."""
    console = console or Console(width=max(Console().width, 120))
    device, settings = result["device"], result["settings"]
    console.print(f"[bold]bild-jax bench[/bold] {result['bild_jax_version']} on {device['count']} x "
                  f"{device['kind']} ({device['platform']}, {device['host_cpus']} host CPUs), "
                  f"JAX {result['jax_version']}")
    pair = (f"--shape {settings['shape']} (random weights: {settings['shape_about']})" if settings["shape"]
            else f"small {settings['small']}, large {settings['large']}")
    console.print(f"{pair}; fallback {settings['fallback']}, rollback {settings['rollback']}, "
                  f"max_draft {settings['max_draft']}")

    width = settings["max_draft"] + 1
    rows = [[name, _params(m["params"]), _bytes(m["weight_bytes"]), _bytes(m["bytes_per_step"]), _dtypes(m),
             f"{m['step_ms']:.3f}", f"{m['block_ms']:.3f}", f"{m['block_over_step']:.2f}x", f"{m['prompt_ms']:.2f}",
             f"{m['bandwidth_gb_s']:.1f}", f"{m['bandwidth_utilization']:.0%}"]
            for name, m in result["models"].items()]
    console.print(f"\n[bold]decode cost[/bold] in ms, batch 1: a step and a block on a cache of "
                  f"{settings['cache_capacity']} slots half full, the median of {settings['step_repeats']} timings of "
                  f"{settings['step_dispatches']} jitted loops of {settings['step_loop']} calls; a prompt pass of the "
                  f"first prompt, the median of {settings['step_repeats']} timings of {settings['step_dispatches']} "
                  f"passes")
    console.print(_table(
        ["model", "params", "weights", "read/step", "dtype", "step", f"{width}-block", "block/step", "prompt",
         "GB/s", "of copy bw"], rows))
    if any(m["dtype"] != m["compute_dtype"] for m in result["models"].values()):
        console.print("XLA:CPU has no fast half-precision dot for a step's few rows: the decode loops (and these "
                      "timings) compute in float32, the native kernel (where built) reading the bfloat16 weights")
    console.print(f"large / small step: {result['large_over_small_step']:.1f}x; copy bandwidth "
                  f"{result['copy_bandwidth_gb_s']:.1f} GB/s (read + write of {_bytes(result['copy_buffer_bytes'])})")

    e2e = result["end_to_end"]
    rows = [[s["system"], f"{s['tokens_per_s']:.1f}", f"{s['ms_per_token']:.3f}", f"{s['speedup']:.2f}x",
             f"{s['large_token_share']:.0%}" if "large_token_share" in s else "-",
             f"{s['large_calls_per_token']:.2f}" if "large_calls_per_token" in s else "-",
             f"{s['prompt_share']:.0%}", "-" if s["decode_speedup"] is None else f"{s['decode_speedup']:.2f}x",
             f"{s['compile_s']:.1f}"]
            for s in e2e["systems"]]
    console.print(f"\n[bold]end to end[/bold], batch 1: {settings['num_prompts']} prompts ({settings['prompts']}, "
                  f"up to {settings['prompt_tokens']} tokens), {settings['max_new_tokens']} new tokens each, greedy; "
                  f"the systems take turns prompt by prompt")
    console.print(_table(
        ["system", "tokens/s", "ms/token", "speedup", "by large", "large calls/tok", "prompts", "w/o prompts",
         "compile s"], rows))
    prompt_ms = {name: m["prompt_ms"] for name, m in result["models"].items()}
    console.print(f"ms/token: the median over prompts; prompts: the share of a system's time per prompt that its "
                  f"models' prompt passes take (large {prompt_ms['large']:.2f} ms, small {prompt_ms['small']:.2f} ms, "
                  f"timed apart); w/o prompts: the speedup with them left out of every system, which longer "
                  f"outputs approach")
    console.print(f"loop overhead factor: {e2e['loop_overhead']:.2f} = BiLD all-large / (large + small greedy), "
                  f"per token; 1.00: no cost beyond the two models' steps. Of it: the two models' steps {TURNS} "
                  f"{e2e['turns_overhead']:.2f}, the BiLD loop's own work {e2e['loop_own']:.2f} (all-large / in turns)")
    if settings["shape"]:
        console.print("random weights: BiLD and BiLD exact are not run (their acceptance would mean nothing)")

    if result["batches"]:
        rows = []
        for b in result["batches"]:
            row = [str(b["batch"]), f"{b['greedy_tokens_per_s']:.1f}"]
            if "bild_tokens_per_s" in b:
                best = max(b["candidates"], key=lambda c: c["speedup"])
                row += [f"{b['bild_tokens_per_s']:.1f}", f"{b['bild_speedup']:.2f}x",
                        BatchSchedule(**b["schedule"]).describe(),
                        f"{BatchSchedule(**best['schedule']).describe()}: {best['speedup']:.2f}x"]
            rows.append(row + ["-"] * (6 - len(row)))
        console.print("\n[bold]throughput by batch size[/bold] (tokens/s; prompts cut to one length; BiLD under the "
                      "schedule bild_generate picks, and the fastest candidate schedule)")
        console.print(_table(["batch", "large greedy", "BiLD", "BiLD speedup", "schedule", "best candidate"], rows))
