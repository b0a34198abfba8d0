"""Per-token cost of the bundled pairs' sizes on this machine: one-token decode steps and K-token blocks.

    python experiments/measure_sizes.py              # the decoder-only pair (train_pair.py)
    python experiments/measure_sizes.py --pair t5    # the T5 pair (train_summarizer.py), 128 encoder tokens

Random weights (cost does not depend on them); batch 1; a cache of 128 slots, half full; each timing is a
jitted loop of 32 blocks (as inside the decode loop: no per-call dispatch), median of 20 interleaved
repeats after compilation. The pairs' sizes were chosen with this: the large model should cost >= 8x the
small one per token, and an 11-token verification <= 2x one large step.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import train_pair  # noqa: E402
import train_summarizer  # noqa: E402

from bild_jax.model import Model  # noqa: E402
from bild_jax.models.t5 import T5Config  # noqa: E402

WIDTHS = (1, 2, 4, 11)
LOOP = 32
ENCODER_TOKENS = 128  # a T5 pair's input: about the 75th percentile of the summarization inputs


def random_model(pair: str, size: str) -> Model:
    """A model of the pair's size with random weights."""
    if pair == "llama":
        config = train_pair.model_config(size)
        return Model(config=config, params=train_pair.init_params(config, seed=0))
    config = T5Config.from_hf(train_summarizer.hf_config(size))
    ids = jnp.zeros((1, 8), jnp.int32)
    return Model(config=config, params=Model(config, None).module.init(jax.random.PRNGKey(0), ids, ids)["params"])


def block_timer(model: Model, width: int):
    encoder_ids = jnp.ones((1, ENCODER_TOKENS), jnp.int32) if model.is_encoder_decoder else None
    cache = model.start_cache(1, 128, encoder_ids).with_lengths(jnp.array([64]))
    tokens = jnp.ones((1, width), jnp.int32)

    @jax.jit
    def blocks(model, tokens, cache):
        def body(_, carry):
            logits, next_cache = model.decode(tokens + carry[1], carry[0])
            # Feed back a token that depends on the logits so that XLA cannot hoist the work out of the loop.
            return next_cache.with_lengths(cache.lengths), jnp.argmax(logits[:, :1, :], -1).astype(jnp.int32) % 2
        return jax.lax.fori_loop(0, LOOP, body, (cache, jnp.zeros((1, 1), jnp.int32)))[1]

    jax.block_until_ready(blocks(model, tokens, cache))

    def run() -> float:
        start = time.perf_counter()
        jax.block_until_ready(blocks(model, tokens, cache))
        return (time.perf_counter() - start) / LOOP

    return run


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", choices=["llama", "t5"], default="llama")
    args = parser.parse_args(argv)
    models = {size: random_model(args.pair, size) for size in ("small", "large")}
    for size, model in models.items():
        count = sum(x.size for x in jax.tree_util.tree_leaves(model.params))
        print(f"{size}: {count:,} params, {2 * count / 1e6:.1f} MB in bfloat16")
    timers = {(size, width): block_timer(models[size], width) for size in models for width in WIDTHS}
    samples = {key: [] for key in timers}
    for _ in range(20):
        for key, run in timers.items():
            samples[key].append(run())
    ms = {key: 1000 * float(np.median(v)) for key, v in samples.items()}
    for (size, width), value in ms.items():
        print(f"{size:5s} block of {width:2d}: {value:.3f} ms")
    print(f"large / small per one-token step: {ms[('large', 1)] / ms[('small', 1)]:.1f}x")
    print(f"large 11-token block / one-token step: {ms[('large', 11)] / ms[('large', 1)]:.2f}x")


if __name__ == "__main__":
    main()
