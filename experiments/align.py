"""Prediction alignment (BiLD paper, section 3.3): fine-tune the small model on the large model's own greedy
continuations of training prompts (sequence-level distillation), so that it drafts what the large one would
write.

    python experiments/align.py --out runs/pair      # after train_pair.py trained both sizes (~5 min, 2 cores)

Reads `--out/small/hf` and `--out/large/hf`, writes `--out/small-aligned/hf` (HF format, like the others).
Fine-tuning checkpoints go to `--out/small-aligned/checkpoints` and an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import train_pair  # noqa: E402

import bild_jax  # noqa: E402
from bild_jax.models.llama import LlamaForCausalLM  # noqa: E402

PROMPT_TOKENS = 32
CONTINUATION_TOKENS = 64


def distillation_chunks(large: bild_jax.Model, chunks: np.ndarray, count: int, batch_size: int,
                        seed: int = 0) -> np.ndarray:
    """[count, PROMPT_TOKENS + CONTINUATION_TOKENS] int32: training prompts + the large model's greedy
    continuation (EOS ignored, so every row is full length)."""
    rng = np.random.default_rng(seed)
    picks = chunks[rng.choice(len(chunks), size=count, replace=False)]
    offsets = rng.integers(0, chunks.shape[1] - PROMPT_TOKENS, size=count)
    prompts = np.stack([row[o:o + PROMPT_TOKENS] for row, o in zip(picks, offsets)])
    rows = []
    for start in range(0, count, batch_size):
        batch = prompts[start:start + batch_size]
        out = bild_jax.greedy_generate(large, batch, max_new_tokens=CONTINUATION_TOKENS, eos_token_id=[])
        rows.append(np.concatenate([batch, np.asarray(out.tokens)], axis=1))
        print(f"continuations {start + len(batch)}/{count}", flush=True)
    return np.concatenate(rows).astype(np.int32)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/pair"))
    parser.add_argument("--prompts", type=int, default=4096, help="training prompts to distil")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--limit-files", type=int, help="use the first N training files only (quick checks)")
    args = parser.parse_args(argv)
    small = bild_jax.load_model(args.out / "small" / "hf")
    large = bild_jax.load_model(args.out / "large" / "hf")
    target = args.out / "small-aligned"
    data_file = target / "distillation.npy"
    if data_file.is_file():
        data = np.load(data_file)
    else:
        chunks = train_pair.corpus_chunks(args.out / "tokenizer", args.limit_files)
        data = distillation_chunks(large, chunks, args.prompts, batch_size=64)
        target.mkdir(parents=True, exist_ok=True)
        np.save(data_file, data)
    params, history = train_pair.train(LlamaForCausalLM(small.config), small.params, data, args.steps,
                                       args.batch_size, args.lr, target / "checkpoints", description="align")
    train_pair.save_hf(small.config, params, target / "hf", args.out / "tokenizer")
    train_pair.write_history(target / "history.json", history)


if __name__ == "__main__":
    main()
