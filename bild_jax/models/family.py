"""What the rest of bild-jax needs to know about one model family: the one extension point for a family.

A family module (e.g. `llama.py`) defines a config class, a Flax module, and a `FAMILY = ModelFamily(...)` that
names them together with the HF weight-name mapping and the sharding rules; `models/__init__.py` registers it
with one line. Nothing else in the library is specific to a family. See "Adding a model family" in
docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import numpy as np
from jax.sharding import PartitionSpec

# Logical axes a family's parameters and caches are split over; `bild_jax.sharding.ShardingRules` maps each
# to a mesh axis. `batch`: rows (of a cache); `heads`: query heads; `kv_heads`: key/value heads; `mlp`:
# MLP hidden units.
LOGICAL_AXES = ("batch", "heads", "kv_heads", "mlp")

ParamAxes = tuple[tuple[str, tuple[str | None, ...]], ...]


def head_major_cache_axes(cache) -> Any:
    """Logical axes of a cache whose leaves are all [B, ...]: rows on `batch`, and 4-D leaves head-major
    [B, Hkv, S, D] with heads on `kv_heads` (a `KVCache`, or one holding cross-attention keys/values too).
    Returns the cache's tree with a `PartitionSpec` of logical axis names per leaf."""
    def axes(leaf) -> PartitionSpec:
        if leaf.ndim == 0:
            return PartitionSpec()
        if leaf.ndim == 4:
            return PartitionSpec("batch", "kv_heads", None, None)
        return PartitionSpec("batch", *([None] * (leaf.ndim - 1)))

    return jax.tree_util.tree_map(axes, cache)


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """One model family: everything the library needs of it.

    - `model_types`: the HF `model_type`s it loads.
    - `config_class`: a frozen, hashable dataclass with `from_hf(hf_config_dict)` and the fields the library
      reads: `model_type`, `vocab_size`, `eos_token_id` (tuple), `pad_token_id`, `max_positions` (None: no
      limit); encoder-decoder families also `decoder_start_token_id`. `restore_converted` rebuilds it from
      its fields (`config_class(**fields)`, lists made tuples).
    - `module`: the Flax module, built as `module(config)`; decoder-only:
      `(tokens [B, K] int32, cache=None, attention_mask=None, logits_at=None) -> (logits [B, K, V] float32,
      KVBlock | None)`, where `logits_at` [B] int32 asks for logits [B, 1, V] at that position of each row
      (a prompt pass: the last layer then needs only its keys and values at the other positions),
      encoder-decoder: `__call__(input_ids, decoder_input_ids, attention_mask) -> logits` and
      `decode(tokens, cache) -> (logits, KVBlock)`.
    - `init_cache(config, batch, capacity, dtype)`: an empty decoder cache.
    - `hf_param_path(config, hf_name)`: the Flax path of an HF tensor (None to skip it); a last part
      `weight` is matched to kernel/embedding/weight/scale by `weights.convert_hf_tensors`.
    - `axis_sizes(config)`: {logical axis: how many of it the model has} for `heads`, `kv_heads`, `mlp`,
      which the mesh axes must divide to split them.
    - `param_axes`: (regex on the "/"-joined Flax path, one logical axis or None per dimension) pairs, the
      first match wins; unmatched parameters are replicated.
    - `cache_axes(cache)`: the cache's tree with a `PartitionSpec` of logical axes per leaf.
    - `split_hf_tensors(config, tensors)`: the checkpoint's tensors with fused ones split (or renamed) into
      the module's parameters, before the name mapping; None when the checkpoint needs nothing.
    - `transpose_linear`: HF stores linear weights [out, in] (False for GPT-2's Conv1D [in, out]).
    - `encode_into_cache(module, params, input_ids, attention_mask, cache)`: encoder-decoder families run the
      encoder once and keep what cross-attention needs in the cache; None for decoder-only ones.
    - `output_table(config)`: the Flax path of the embedding table used as the output layer
      (`layers.attend`) that the CPU decode loop may keep in bfloat16 (`model.for_decode_loop`): the module
      must then give its looked-up rows in the cache's dtype (an encoder too: `encode_into_cache` passes it).
      None: no such table (an untied head).
    - `native_cached_pass(config, params, tokens, cache)`: a decoder-only family's cached pass (a decode step
      or verification block: `(logits [B, K, V] float32, KVBlock)` as the module computes them) in one native
      call on CPU (`cpu_decoder_step`), or None where it does not apply (the module runs it then); every
      cached pass of a model goes the same way, so blocks still equal steps. None: the family has none.
    """

    model_types: tuple[str, ...]
    config_class: type
    module: type
    init_cache: Callable[..., Any]
    hf_param_path: Callable[[Any, str], tuple[str, ...] | None]
    axis_sizes: Callable[[Any], dict[str, int]]
    param_axes: ParamAxes = ()
    cache_axes: Callable[[Any], Any] = head_major_cache_axes
    split_hf_tensors: Callable[[Any, Mapping[str, np.ndarray]], dict[str, np.ndarray]] | None = None
    transpose_linear: bool = True
    encode_into_cache: Callable[..., Any] | None = None
    output_table: Callable[[Any], tuple[str, ...] | None] = lambda config: None
    native_cached_pass: Callable[..., Any] | None = None

    @property
    def is_encoder_decoder(self) -> bool:
        return self.encode_into_cache is not None
