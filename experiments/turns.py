"""Where BiLD's loop overhead goes: the two models' steps taken in turns, with and without the BiLD loop.

    python experiments/turns.py --num-prompts 12 --repeats 2

Bundled pair (aligned small model), batch 1, float32, 48 new tokens, EOS ignored; the systems take turns
prompt by prompt after a compiling call each (`bild_jax.evaluation.run_systems`):
- large greedy and small greedy, each alone;
- BiLD all-large: fallback 1.0, rollback off (every token handed to the large model), as `bild-jax bench`
  computes the loop overhead factor from;
- turns: both prompts prefilled, then one small and one large one-token step per token in a bare
  `fori_loop`, each fed the other's token: the same work as BiLD all-large without the BiLD loop's own.
Per prompt: BiLD all-large and turns over (large + small greedy), and BiLD all-large over turns; medians
and interquartile ranges.
"""

from __future__ import annotations

import argparse
import json
import math
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import bild_jax
from bild_jax.evaluation import run_systems
from bild_jax.model import for_decode_loop
from bild_jax.prompts import prefill

PROMPTS = Path(bild_jax.__file__).parent / "bundled" / "demo_prompts.json"
NEW_TOKENS = 48


@jax.jit
def in_turns(small, large, prompts: jax.Array) -> jax.Array:
    """prompts [1, T] int32 -> [1, NEW_TOKENS] int32: the large model's first token after the prompt, then
    per token one small step (fed the last token) and one large step (fed the small model's argmax)."""
    small, large = for_decode_loop(small, rows=1), for_decode_loop(large, rows=1)
    lengths = jnp.array([prompts.shape[1]], jnp.int32)
    _, small_cache = prefill(small, prompts, lengths, prompts.shape[1] + NEW_TOKENS)
    logits, large_cache = prefill(large, prompts, lengths, prompts.shape[1] + NEW_TOKENS)
    first = jnp.argmax(logits, -1).astype(jnp.int32)                                   # [1]

    def body(i, carry):
        small_cache, large_cache, tokens = carry
        logits, small_cache = small.decode(lax.dynamic_slice_in_dim(tokens, i - 1, 1, axis=1), small_cache)
        draft = jnp.argmax(logits[:, -1], -1)[:, None].astype(jnp.int32)                # [1, 1]
        logits, large_cache = large.decode(draft, large_cache)
        return small_cache, large_cache, tokens.at[:, i].set(jnp.argmax(logits[:, -1], -1).astype(jnp.int32))

    tokens = jnp.zeros((1, NEW_TOKENS), jnp.int32).at[:, 0].set(first)
    return lax.fori_loop(1, NEW_TOKENS, body, (small_cache, large_cache, tokens))[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-prompts", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    small, large = bild_jax.load_model("bundled:small-aligned"), bild_jax.load_model("bundled:large")
    prompts = [p["prompt"] for p in json.loads(PROMPTS.read_text())[:args.num_prompts]]
    all_large = bild_jax.BiLDConfig(max_new_tokens=NEW_TOKENS, fallback_threshold=1.0, rollback_threshold=math.inf,
                                    eos_token_id=[])
    systems = [
        ("large greedy", lambda p: bild_jax.greedy_generate(large, p, NEW_TOKENS, eos_token_id=[])),
        ("small greedy", lambda p: bild_jax.greedy_generate(small, p, NEW_TOKENS, eos_token_id=[])),
        ("BiLD all-large", lambda p: bild_jax.bild_generate(small, large, p, all_large)),
        # A namespace is no pytree: the call waits for its tokens itself, so that the timing covers them.
        ("turns", lambda p: types.SimpleNamespace(
            tokens=jax.block_until_ready(in_turns(small, large, jnp.asarray(p, jnp.int32))),
            lengths=np.array([NEW_TOKENS]))),
    ]
    runs = {run.name: run for run in run_systems(systems, prompts, repeats=args.repeats)}
    seconds = {name: np.concatenate([np.asarray(s) for s in run.batch_seconds]) for name, run in runs.items()}
    apart = seconds["large greedy"] + seconds["small greedy"]

    def report(label: str, ratio: np.ndarray) -> None:
        low, high = np.percentile(ratio, [25, 75])
        print(f"{label}: {np.median(ratio):.3f} (IQR {low:.3f}-{high:.3f})")

    report("BiLD all-large / (large + small greedy)  [loop overhead factor]", seconds["BiLD all-large"] / apart)
    report("turns / (large + small greedy)            [running two models in turns]", seconds["turns"] / apart)
    report("BiLD all-large / turns                    [the BiLD loop's own work]",
           seconds["BiLD all-large"] / seconds["turns"])
    print("ms per call (median):", {name: round(1000 * float(np.median(s)), 1) for name, s in seconds.items()})


if __name__ == "__main__":
    main()
