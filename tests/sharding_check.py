"""Sharded decoding vs single-device decoding, run by tests/test_sharding.py in a subprocess that sees 8 host
devices (XLA_FLAGS=--xla_force_host_platform_device_count=8).

    python tests/sharding_check.py PAIRS_PICKLE KIND [--meshes 8x1,4x2] [--extras] [--one-mesh KIND2 ...]

PAIRS_PICKLE holds {kind: (small, large)} Models with numpy params. Prints one JSON object: per mesh (all four
data x model meshes, or those --meshes names), whether
the KIND pair's greedy and BiLD outputs equal the unsharded ones, the warnings raised and where a few
parameters (and, decoder-only, the cache's keys) ended up; with --extras also a run with different rules
per model, a GPT-2 small model (the "mixed" pair) on one mesh, and the error of strict mode on a mesh that
does not divide the model; with --one-mesh (repeatable) the same checks for the KIND2 pair on the 4 x 2 mesh
only.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np

import bild_jax
from bild_jax import sharding

MESHES = ((8, 1), (1, 8), (2, 4), (4, 2))  # (data, model)
N = 8
# BiLD's own loop: the built-in table would hand the 8 prompts below to the large model alone on a CPU.
CONFIG = bild_jax.BiLDConfig(max_new_tokens=N, max_draft=3, fallback_threshold=0.4, rollback_threshold=1.0,
                             eos_token_id=[], schedule=bild_jax.BatchSchedule())
# One parameter per logical axis and family, to show that sharding really happened.
PROBES = {"llama": {"heads": ("layers_0", "self_attn", "q_proj", "kernel"),
                    "kv_heads": ("layers_0", "self_attn", "k_proj", "kernel"),
                    "mlp": ("layers_0", "mlp", "down_proj", "kernel")},
          "t5": {"heads": ("decoder", "block_0", "layer_1", "EncDecAttention", "o", "kernel"),
                 "mlp": ("encoder", "block_0", "layer_1", "DenseReluDense", "wi", "kernel")},
          "gemma3": {"heads": ("layers_0", "self_attn", "q_proj", "kernel"),
                     "kv_heads": ("layers_0", "self_attn", "k_proj", "kernel"),
                     "mlp": ("layers_0", "mlp", "down_proj", "kernel")},
          "bart": {"heads": ("decoder", "layers_0", "encoder_attn", "out_proj", "kernel"),
                   "mlp": ("encoder", "layers_0", "fc1", "kernel")}}


def _leaf(params, path):
    for key in path:
        params = params[key]
    return params


def _spec(array) -> list:
    return [axis for axis in array.sharding.spec] + [None] * (array.ndim - len(array.sharding.spec))


def _same(out, ref) -> bool:
    return all(np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(ref)))


def check_pair(kind: str, small, large, prompts, meshes=MESHES) -> dict:
    ref_greedy = bild_jax.greedy_generate(large, prompts, N, eos_token_id=[])
    ref_bild = bild_jax.bild_generate(small, large, prompts, CONFIG)
    stats = {name: int(np.asarray(value).sum()) for name, value in dataclasses.asdict(ref_bild.stats).items()}
    results = {"reference_stats": stats}
    for data, model in meshes:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            greedy = bild_jax.greedy_generate(large, prompts, N, eos_token_id=[], mesh={"data": data, "model": model})
            mesh = sharding.make_mesh({"data": data, "model": model})
            bild = bild_jax.bild_generate(small, large, prompts, CONFIG, mesh=mesh)
            sharded = sharding.shard_params(large, mesh)
        results[f"{data}x{model}"] = {
            "greedy_equal": _same(greedy, ref_greedy), "bild_equal": _same(bild, ref_bild),
            "warnings": sorted({str(w.message) for w in caught}),
            "params": {axis: _spec(_leaf(sharded.params, path)) for axis, path in PROBES[kind].items()},
        }
        if not large.is_encoder_decoder:  # T5's start_cache runs the encoder, op by op here: too slow
            results[f"{data}x{model}"]["cache_keys"] = _spec(sharded.start_cache(len(prompts), 16).keys[0])
    return results


def _prompts(vocab_size: int) -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [rng.integers(3, vocab_size, size=n).tolist() for n in (3, 9, 1, 6, 5, 2, 7, 4)]


def main(pairs_file: str, kind: str, meshes: tuple, extras: bool, one_mesh: list[str]) -> None:
    with open(pairs_file, "rb") as handle:
        pairs = {name: tuple(model.replace(params=jax.tree_util.tree_map(jnp.asarray, model.params))
                             for model in pair) for name, pair in pickle.load(handle).items()}
    small, large = pairs[kind]
    prompts = _prompts(large.vocab_size)
    summary = {"devices": jax.device_count(), kind: check_pair(kind, small, large, prompts, meshes)}
    for other in one_mesh:
        other_small, other_large = pairs[other]
        summary[other] = check_pair(other, other_small, other_large, _prompts(other_large.vocab_size),
                                    meshes=((4, 2),))
    if extras:
        # Different rules per model: the small one whole on every device, the large one tensor parallel.
        mesh = sharding.make_mesh({"data": 2, "model": 4})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mixed = bild_jax.bild_generate(sharding.shard_params(small, mesh, sharding.DATA_PARALLEL),
                                           sharding.shard_params(large, mesh), prompts, CONFIG)
        summary["mixed_rules_equal"] = _same(mixed, bild_jax.bild_generate(small, large, prompts, CONFIG))
        # GPT-2's rules, on one mesh: a GPT-2 small model with the Llama large one.
        gpt2 = pairs["mixed"][0]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sharded = bild_jax.bild_generate(gpt2, large, prompts, CONFIG, mesh=mesh)
        summary["gpt2_small_equal"] = _same(sharded, bild_jax.bild_generate(gpt2, large, prompts, CONFIG))
        try:
            sharding.shard_params(large, {"data": 1, "model": 8}, strict=True)
            summary["strict_error"] = None
        except ValueError as error:
            summary["strict_error"] = str(error)
    print(json.dumps(summary))


if __name__ == "__main__":
    options = sys.argv[3:]
    named = options[options.index("--meshes") + 1].split(",") if "--meshes" in options else None
    main(sys.argv[1], sys.argv[2], MESHES if named is None else tuple(tuple(map(int, m.split("x"))) for m in named),
         extras="--extras" in options,
         one_mesh=[options[i + 1] for i, option in enumerate(options) if option == "--one-mesh"])
