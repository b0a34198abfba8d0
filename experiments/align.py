"""Prediction alignment of the bundled pair with `bild-jax align`: the standard library's training files as
the prompt source, the recipe of the shipped `small-aligned` model, and its agreement for comparison.

    python experiments/align.py --out runs/align                        # from bundled:small (~15 min, 2 cores)
    python experiments/align.py --small runs/pair/small/hf --large runs/pair/large/hf --out runs/pair/small-aligned/hf

The shipped model is the previous release's (this recipe with 4096 prompts and 1000 steps: 87.9%) aligned a
second time (90.3% agreement, from 88.3%); from bundled:small this recipe reaches 89.3% in 14 min, against
the shipped model's 89.6% on the same held-out prompts:

    python experiments/align.py --small <previous small-aligned> --out runs/align2 --steps 2500 --lr 5e-4 --seed 7

Writes the training files as JSONL (`--data`, made once), runs `bild-jax align` (12288 prompts of 32 tokens, 64
greedy new tokens with EOS ignored, 2500 steps of 16, peak learning rate 1e-3), then reports the top-1
agreement of `--compare` (default the shipped aligned model) on the same held-out prompts. An interrupted
run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import pair_data  # noqa: E402

import bild_jax  # noqa: E402
from bild_jax import cli  # noqa: E402
from bild_jax.align import Distillation, agreement  # noqa: E402

RECIPE = ["--num-prompts", "12288", "--prompt-tokens", "32", "--max-new-tokens", "64", "--ignore-eos", "--steps", "2500",
          "--batch-size", "16", "--lr", "1e-3"]


def write_training_texts(path: Path, limit_files: int | None = None) -> None:
    """The stdlib training files (`pair_data.stdlib_files`) as JSONL records {"text": file contents}."""
    train_files, _ = pair_data.stdlib_files()
    with path.open("w") as handle:
        for text in pair_data.load_texts(train_files[:limit_files]):
            handle.write(json.dumps({"text": text}) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", default="bundled:small")
    parser.add_argument("--large", default="bundled:large")
    parser.add_argument("--out", type=Path, default=Path("runs/align"))
    parser.add_argument("--work-dir", type=Path, help="large-model outputs and checkpoints (default OUT/alignment)")
    parser.add_argument("--data", type=Path, default=Path("runs/stdlib_train.jsonl"))
    parser.add_argument("--compare", default="bundled:small-aligned", help="an aligned model to compare with")
    parser.add_argument("--limit-files", type=int, help="use the first N training files only (quick checks)")
    args, overrides = parser.parse_known_args(argv)  # other flags go to `bild-jax align`, after the recipe's
    if not args.data.is_file():
        args.data.parent.mkdir(parents=True, exist_ok=True)
        write_training_texts(args.data, args.limit_files)
    started = time.perf_counter()
    work = ["--work-dir", str(args.work_dir)] if args.work_dir else []
    code = cli.main(["align", "--small", args.small, "--large", args.large, "--data", str(args.data), "--out",
                     str(args.out), *work, *RECIPE, *overrides])
    if code:
        sys.exit(code)
    print(f"bild-jax align: {time.perf_counter() - started:.0f} s in all")
    work_dir = args.work_dir or args.out / "alignment"
    report = json.loads((work_dir / "report.json").read_text())
    data = Distillation.load(work_dir / "distillation.npz")
    held_out = data.rows(slice(len(data) - report["eval_prompts"], None))
    compared = agreement(bild_jax.load_model(args.compare), bild_jax.load_model(args.large), held_out)
    print(f"top-1 agreement on {report['eval_prompts']} held-out prompts: {args.small} "
          f"{100 * report['agreement_before']:.1f}%, aligned here {100 * report['agreement_after']:.1f}%, "
          f"{args.compare} {100 * compared:.1f}%")


if __name__ == "__main__":
    main()
