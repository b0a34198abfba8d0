"""Memory a decode needs, estimated from the model configs before anything compiles, and the refusal of one
that cannot fit (instead of XLA failing to allocate hundreds of GB, or the machine swapping, minutes later).

The estimate adds what a decode holds for its whole run (both caches, the draft-logit ring, the output
buffers, CPU's float32 copy of half-precision weights) to the largest single array of its widest pass: the
attention scores of the prompt pass or of a verification block of `max_draft + 1` tokens, [B, heads, width,
cache slots] float32, or its logits, [B, width, vocab] float32. It counts only arrays that a decode cannot
do without, so it stays below the true peak (XLA holds several such arrays at once): a refusal is not a
false alarm, and a decode just under the limit may still fail to allocate.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Sequence

import jax
import numpy as np

from bild_jax.errors import InputError
from bild_jax.model import Model, decode_loop_dtype, loop_copy_bytes, panel_copy_bytes
from bild_jax.prompts import decoder_capacity


@dataclasses.dataclass(frozen=True)
class Need:
    """One part of a decode's memory: what it is, the setting that makes it large, its bytes."""

    what: str
    setting: str
    nbytes: int


def model_needs(model: Model, name: str, batch: int, prompt_width: int, capacity: int, block_width: int,
                block_setting: str) -> tuple[list[Need], list[Need]]:
    """(held, transient) needs of one model decoding `batch` rows: its cache of `capacity` slots (and CPU's
    float32 weights) held; the largest array of its prompt pass over [batch, prompt_width] and of a
    [batch, block_width] block pass transient."""
    cache, prompt_pass, block_pass, loop_weights = _pass_bytes(model, batch, prompt_width, capacity, block_width)
    model_name = f"the {name} model" if name else "the model"
    held = [Need(f"{model_name}'s cache ({capacity} slots per row)", "max_new_tokens", cache)]
    if loop_weights:
        held.append(Need(f"{model_name}'s float32 weights for the CPU loop", "the model size", loop_weights))
    if panels := panel_copy_bytes(model):
        held.append(Need(f"{model_name}'s panel-major kernels (and output table) for the CPU loop", "the model size",
                         panels))
    transient = [Need(f"{model_name}'s prompt pass", "the prompt length", prompt_pass),
                 Need(f"{model_name}'s {block_width}-token pass", block_setting or "max_new_tokens", block_pass)]
    return held, transient


def check_generate_fits(model: Model, prompts: np.ndarray | jax.Array, max_new_tokens: int) -> None:
    """InputError unless one-model decoding of prompts [B, T] (cache `decoder_capacity`, one-token steps,
    tokens [B, N] int32) fits on the prompts' devices."""
    batch, width = prompts.shape
    held, transient = model_needs(model, "", batch, width, decoder_capacity(model, width, max_new_tokens), 1, "")
    held.append(Need("the output tokens", "max_new_tokens", 4 * batch * max_new_tokens))
    check_fits(held, transient, _devices(prompts))


def check_bild_fits(small: Model, large: Model, prompts: np.ndarray | jax.Array, capacities: tuple[int, int],
                    max_new_tokens: int, max_draft: int, small_feed: int) -> None:
    """InputError unless BiLD decoding of prompts [B, T] fits on the prompts' devices: both caches
    (`capacities`: small, large), the draft-logit ring [B, max_draft, V] float32, the outputs [B, N] int32 +
    bool, and the widest passes (the small model's feed of `small_feed` tokens, a large block of
    max_draft + 1)."""
    batch, width = prompts.shape
    small_held, small_transient = model_needs(small, "small", batch, width, capacities[0], small_feed, "lookup_tokens")
    large_held, large_transient = model_needs(large, "large", batch, width, capacities[1], max_draft + 1, "max_draft")
    ring = Need("the draft-logit ring", "max_draft", 4 * batch * max_draft * large.vocab_size)
    outputs = Need("the output tokens", "max_new_tokens", 5 * batch * max_new_tokens)
    check_fits([*small_held, *large_held, ring, outputs], [*small_transient, *large_transient],
               _devices(prompts))


def _devices(prompts) -> list | None:
    """The devices a decode of `prompts` runs on: a sharded array's, None (the default device) for host
    arrays."""
    return list(prompts.devices()) if isinstance(prompts, jax.Array) else None


def check_fits(held: Sequence[Need], transient: Sequence[Need], devices: Sequence | None = None) -> None:
    """InputError naming the largest part and its setting when held + the largest transient need exceed the
    memory available on `devices` (default: the first device); nothing when it fits or is unknown."""
    devices = list(devices or jax.devices()[:1])
    peak = max(transient, key=lambda need: need.nbytes, default=None)
    parts = [*held, *([peak] if peak else [])]
    total = sum(need.nbytes for need in parts)
    if all(device.platform == "cpu" for device in devices) and total <= _half_of_free_host_memory():
        return
    available = available_bytes(devices)
    if available is None or total <= available:
        return
    largest = max(parts, key=lambda need: need.nbytes)
    raise InputError(f"this decode needs about {_gb(total)} ({largest.what}: {_gb(largest.nbytes)}) but "
                     f"{_gb(available)} is available on {devices[0].platform}; lower {largest.setting} or the "
                     f"batch size")


def available_bytes(devices: Sequence) -> int | None:
    """Bytes free for new arrays: the least of the devices' `memory_stats()` limit minus use, times their
    number (a decode splits over them), where the backend reports it (GPU, TPU); else the host's available
    memory (CPU devices share it); None when neither is known."""
    stats = [_memory_stats(device) for device in devices]
    if all(s and "bytes_limit" in s for s in stats):
        return len(stats) * min(s["bytes_limit"] - s.get("bytes_in_use", 0) for s in stats)
    return host_available_bytes()


def host_available_bytes() -> int | None:
    """The host's available memory (Linux MemAvailable: free plus reclaimable caches), None if unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _half_of_free_host_memory() -> int:
    """Half the host's free memory (MemFree, which leaves out the reclaimable caches that MemAvailable counts),
    0 if unknown: what a CPU decode surely fits in. One system call, where reading /proc/meminfo costs
    ~0.3 ms right after a decode ran, on every generate call."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError, AttributeError):
        return 0


def _memory_stats(device) -> dict | None:
    try:
        return device.memory_stats()
    except Exception:  # backends without the call raise various types (NotImplemented, XlaRuntimeError)
        return None


def _pass_bytes(model: Model, batch: int, prompt_width: int, capacity: int,
                block_width: int) -> tuple[int, int, int, int]:
    """(cache bytes, largest array of the prompt pass, of a block pass, bytes of the float32 weight copy the
    CPU loop makes or 0) for `model` at these shapes.

    The largest array of a pass is its attention scores, [B, heads, width, keys] float32, or its logits,
    [B, width, vocab] float32. (Tracing the passes would find it for any family, but costs ~0.5 s per model
    and shape, on every new shape.)"""
    config = model.config
    loop_dtype = decode_loop_dtype(model)
    base, per_slot = _cache_bytes_per_slot(model.family, config, loop_dtype, batch)
    cache_bytes = base + per_slot * capacity
    if model.is_encoder_decoder:
        # Cross-attention keeps keys/values for each encoder position, as self-attention does per slot.
        cache_bytes += per_slot * prompt_width
        prompt_keys, decoder_prompt = prompt_width, 1
    else:
        prompt_keys, decoder_prompt = capacity + prompt_width, prompt_width

    def largest(width: int, keys: int) -> int:
        return 4 * batch * width * max(config.num_heads * keys, config.vocab_size)

    loop_weights = loop_copy_bytes(model, rows=batch * block_width)
    return (cache_bytes, max(largest(prompt_width, prompt_keys), largest(decoder_prompt, capacity)),
            largest(block_width, capacity + block_width), loop_weights)


@functools.lru_cache(maxsize=256)
def _cache_bytes_per_slot(family, config, dtype, batch: int) -> tuple[int, int]:
    """(bytes independent of the slots, bytes per slot) of a `batch`-row cache of this family and config.

    Traced once per key (~2 ms per trace): the check runs on every generate call, which must not pay it
    again. Linear in the slots, so measured at 1 and 2 slots: an absurd capacity is never a shape."""
    def cache_bytes_at(slots: int) -> int:
        cache = jax.eval_shape(lambda: family.init_cache(config, batch, slots, dtype))
        return sum(_nbytes(x) for x in jax.tree_util.tree_leaves(cache))

    per_slot = cache_bytes_at(2) - cache_bytes_at(1)
    return cache_bytes_at(1) - per_slot, per_slot


def _nbytes(x) -> int:
    return math.prod(x.shape) * np.dtype(x.dtype).itemsize


def _gb(nbytes: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6)):
        if nbytes >= size / 10:
            return f"{nbytes / size:.1f} {unit}"
    return f"{nbytes} B"
