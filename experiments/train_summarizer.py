"""Trains the bundled T5 pair (small and large) on code summarization of the standard library
(`summarize_data.py`): the paper's encoder-decoder setting, offline.

Steps (each resumable; run from the repository root):

    python experiments/train_summarizer.py data --out runs/t5            # examples as token ids (~30 s)
    python experiments/train_summarizer.py train --size small --steps 800 --out runs/t5
    python experiments/train_summarizer.py train --size small --out runs/t5     # resumes at 800, to 1600
    python experiments/train_summarizer.py train --size large --steps 800 --out runs/t5
    python experiments/train_summarizer.py train --size large --out runs/t5     # resumes at 800, to 1400
    python experiments/train_summarizer.py align --out runs/t5           # bild_jax.align: runs/t5/small-aligned
    python experiments/train_summarizer.py bundle --out runs/t5          # copy into bild_jax/bundled/t5-*
    python experiments/tune_summarizer.py                                # the small models' operating points

The bundled models were trained in those two phases each, on a shared 2-core CPU (small: ~25 + 10 min, large:
~55 + 30 min, with pauses): the second phase restarts the cosine learning-rate schedule at step 800 (a warm
restart), so one uninterrupted run would give a different model. Each size starts from transformers' own T5 initialisation (seeded), written as an HF directory in bfloat16
(`OUT/SIZE/init`) and loaded with `bild_jax.load_model`; training (`bild_jax.finetune.fine_tune`: AdamW,
warmup + cosine, orbax checkpoints in `OUT/SIZE/checkpoints`, resume) minimises the summary tokens'
cross-entropy (`bild_jax.align.distillation_loss`, the same teacher-forced loss as alignment), and the result
is written next to it as `OUT/SIZE/hf` by `bild_jax.export.save_like` (model.safetensors in bfloat16,
config, tokenizer files), which `load_model` and transformers' T5ForConditionalGeneration both load.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import pair_data  # noqa: E402
import summarize_data  # noqa: E402

from bild_jax import demo  # noqa: E402
from bild_jax.align import Distillation, distillation_loss, training_arrays  # noqa: E402
from bild_jax.export import save_like  # noqa: E402
from bild_jax.finetune import batch_indices, fine_tune, write_history  # noqa: E402
from bild_jax.hub import BUNDLED_DIR, load_model  # noqa: E402

TOKENIZER_DIR = BUNDLED_DIR / "large"  # the decoder pair's tokenizer (see summarize_data's docstring)
# T5 v1.0 layout (ReLU MLP, tied embeddings). Sizes measured on a 2-core CPU (experiments/measure_sizes.py
# --pair t5): the large costs 7.6x the small per generated token and its 11-token verification 2.92x one
# step, at a load of ~2.6 (short of the >= 8x / <= 2x aimed for, which later kernels met: README, the paper's
# setting).
SIZES = {
    "small": dict(d_model=96, d_kv=32, num_heads=3, d_ff=384, num_layers=2, num_decoder_layers=2),
    "large": dict(d_model=256, d_kv=64, num_heads=4, d_ff=768, num_layers=2, num_decoder_layers=6),
    "tiny": dict(d_model=32, d_kv=8, num_heads=2, d_ff=64, num_layers=1, num_decoder_layers=1),
}
SCHEDULES = {  # steps, batch size, peak learning rate
    "small": (1600, 32, 3e-3),
    "large": (1400, 32, 1.5e-3),
    "tiny": (30, 4, 3e-3),
}
BUNDLE_NAMES = {"large": "t5-large", "small": "t5-small", "small-aligned": "t5-small-aligned"}
# Alignment (bild_jax.align): the large model's greedy summaries of this many training inputs (the last 64 held
# out for its agreement report), then fine-tuning the small model on them.
ALIGN_PROMPTS, ALIGN_STEPS, ALIGN_BATCH, ALIGN_LR = 4096, 400, 32, 1e-3
DEMO_SAMPLES = 64  # held-out examples bundled for the demo; the rest tune the operating points
TUNE_SAMPLES = Path("experiments/results/summarize_tune_samples.json")  # relative: profiles record it as given
MIN_INPUT_WIDTH = 32  # batches are padded to a power of two >= this: a few compiled shapes, little padding


def hf_config(size: str, vocab_size: int = 4096) -> dict:
    """The HF config.json of a size."""
    return {"architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "vocab_size": vocab_size,
            "feed_forward_proj": "relu", "tie_word_embeddings": True, "relative_attention_num_buckets": 32,
            "relative_attention_max_distance": 128, "dropout_rate": 0.0, "layer_norm_epsilon": 1e-6,
            "decoder_start_token_id": pair_data.PAD_ID, "pad_token_id": pair_data.PAD_ID,
            "eos_token_id": pair_data.EOS_ID, **SIZES[size]}


def write_init(size: str, directory: Path, tokenizer_dir: Path, seed: int = 0, vocab_size: int = 4096) -> Path:
    """Writes a freshly initialised T5 of `size` (transformers' initialisation, seeded) as an HF directory in
    bfloat16 with the tokenizer files; it is also the template `save_like` lays the trained model out by."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(T5Config(**hf_config(size, vocab_size))).to(torch.bfloat16)
    model.save_pretrained(directory)
    for file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / file, directory / file)
    return directory


def as_distillation(examples: list[dict]) -> Distillation:
    """Encoded examples as alignment's padded arrays: inputs [N, <= MAX_INPUT_TOKENS], targets [N, C]."""
    inputs, input_lengths = summarize_data.padded([e["input"] for e in examples], summarize_data.MAX_INPUT_TOKENS)
    targets, target_lengths = summarize_data.padded([e["target"] for e in examples],
                                                    summarize_data.MAX_SUMMARY_TOKENS + 1)
    return Distillation(inputs, input_lengths, targets, target_lengths)


def length_batches(input_lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """The examples' indices grouped into batches of similar input length (sorted by length, then cut), so
    that a batch is padded little; [batch_size] int arrays, the remainder dropped."""
    order = np.argsort(input_lengths, kind="stable")
    return [order[i:i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]


def batch_at(arrays: dict[str, np.ndarray], batches: list[np.ndarray], step: int, seed: int) -> dict:
    """The batch of a step: one of `batches` in a seeded per-epoch order (`bild_jax.finetune.batch_indices`),
    its encoder inputs cut to the power of two >= MIN_INPUT_WIDTH that holds its longest input."""
    rows = batches[int(batch_indices(len(batches), step, 1, seed)[0])]
    longest = int(arrays["attention_mask"][rows].sum(1).max())
    width = max(MIN_INPUT_WIDTH, 1 << (longest - 1).bit_length())
    return {k: jnp.asarray(v[rows][:, :width] if k in ("input_ids", "attention_mask") else v[rows])
            for k, v in arrays.items()}


def train(size: str, out: Path, examples: list[dict], steps: int, tokenizer_dir: Path = TOKENIZER_DIR,
          vocab_size: int = 4096, seed: int = 0, save_every: int = 100) -> Path:
    """Trains `size` on the encoded examples into `out/size` (resuming there); returns the HF directory."""
    run_dir = out / size
    init_dir = run_dir / "init"
    if not (init_dir / "model.safetensors").is_file():
        write_init(size, init_dir, tokenizer_dir, seed, vocab_size)
    model = load_model(init_dir)
    _, batch_size, peak_lr = SCHEDULES[size]
    arrays = training_arrays(as_distillation(examples), model)
    batches = length_batches(arrays["attention_mask"].sum(1), batch_size)
    print(f"{size}: {sum(x.size for x in jax.tree_util.tree_leaves(model.params)):,} params, {len(examples)} "
          f"examples, {len(batches)} batches of {batch_size}, {steps} steps")
    params, history = fine_tune(lambda p, batch: distillation_loss(model, p, batch), model.params,
                                lambda step: batch_at(arrays, batches, step, seed), steps, peak_lr,
                                run_dir / "checkpoints", tokens_per_step=int(arrays["weights"].sum()) // len(batches),
                                save_every=save_every, description=size)
    write_history(run_dir / "history.json", history)
    return save_like(model.replace(params=params), init_dir, run_dir / "hf")


def align_small(out: Path, train_examples: list[dict], seed: int = 0) -> dict:
    """Aligns the trained small model to the trained large one (`bild_jax.align.align`) on ALIGN_PROMPTS
    training inputs in a seeded order, into `out/small-aligned/hf`; returns align's report."""
    from bild_jax.align import align

    order = np.random.default_rng(seed).permutation(len(train_examples))[:ALIGN_PROMPTS]
    return align(out / "small" / "hf", out / "large" / "hf", [train_examples[i]["input"] for i in order],
                 out / "small-aligned" / "hf", work_dir=out / "small-aligned", steps=ALIGN_STEPS,
                 batch_size=ALIGN_BATCH, lr=ALIGN_LR, max_new_tokens=summarize_data.MAX_SUMMARY_TOKENS + 1,
                 measure_speed=False)


def write_samples(held_out: list[dict], demo_path: Path, tune_path: Path, seed: int = 0) -> None:
    """Splits the held-out examples in a seeded order: the first DEMO_SAMPLES to `demo_path`, the rest to
    `tune_path`, as demo-format JSON {"prompt": input ids, "continuation": summary ids (no EOS), "path",
    "name"}, so that the demo does not score the inputs its operating points were tuned on."""
    order = np.random.default_rng(seed).permutation(len(held_out))
    samples = [{"prompt": held_out[i]["input"], "continuation": held_out[i]["target"][:-1],
                "path": held_out[i]["path"], "name": held_out[i]["name"]} for i in order]
    demo_path.write_text(json.dumps(samples[:DEMO_SAMPLES]))
    tune_path.parent.mkdir(parents=True, exist_ok=True)
    tune_path.write_text(json.dumps(samples[DEMO_SAMPLES:]))


def load_examples(out: Path) -> tuple[list[dict], list[dict]]:
    """(training, held-out) encoded examples, built once and kept in `out/examples.json`."""
    cache = out / "examples.json"
    if not cache.is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
        train_examples, held_out = summarize_data.split_examples()
        out.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"train": summarize_data.encode(tokenizer, train_examples),
                                     "held_out": summarize_data.encode(tokenizer, held_out)}))
    data = json.loads(cache.read_text())
    return data["train"], data["held_out"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["data", "train", "align", "bundle"])
    parser.add_argument("--out", type=Path, default=Path("runs/t5"))
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--steps", type=int, help="override the size's step count")
    args = parser.parse_args(argv)
    train_examples, held_out = load_examples(args.out)
    if args.step == "data":
        print(f"{len(train_examples)} training and {len(held_out)} held-out examples in {args.out / 'examples.json'}")
    elif args.step == "train":
        train(args.size, args.out, train_examples, args.steps or SCHEDULES[args.size][0])
    elif args.step == "align":
        align_small(args.out, train_examples)
    else:
        for name, bundled in BUNDLE_NAMES.items():
            target = BUNDLED_DIR / bundled
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(args.out / name / "hf", target)
        write_samples(held_out, demo.SUMMARIZE_SAMPLES, TUNE_SAMPLES)
        print(f"bundled into {BUNDLED_DIR}")


if __name__ == "__main__":
    main()
