"""Trains the bundled small/large Llama-family pair on the Python standard library's sources.

Steps (each resumable; run from the repository root):

    python experiments/train_pair.py tokenizer --out runs/pair
    python experiments/train_pair.py train --size small --out runs/pair
    python experiments/train_pair.py train --size large --steps 900 --out runs/pair   # ~35 min on 2 idle cores
    python experiments/train_pair.py train --size large --out runs/pair      # resumes at 900, to 2400: ~56 min
    python experiments/align.py --small runs/pair/small/hf --large runs/pair/large/hf \
        --out runs/pair/small-aligned/hf --work-dir runs/pair/small-aligned  # the aligned small model
    python experiments/train_pair.py bundle --out runs/pair                  # copy into bild_jax/bundled/

The bundled large model was trained in those two phases: the second restarts the cosine learning-rate schedule
at step 900 (a warm restart), so one uninterrupted 2400-step run would give a different model. The small
model takes about 25 min. Training checkpoints go to `--out/<size>/checkpoints` (orbax); an interrupted
`train` resumes from the latest one. Seeds are fixed; the data order is a function of the step. Results are
HF-format directories (config.json, model.safetensors in bfloat16, tokenizer files) that transformers loads.
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
import optax
from flax import traverse_util

sys.path.insert(0, str(Path(__file__).parent))
import pair_data  # noqa: E402

from bild_jax.finetune import batch_indices, fine_tune, write_history  # noqa: E402
from bild_jax.models.llama import LlamaConfig, LlamaForCausalLM  # noqa: E402

VOCAB_SIZE = 4096
SEQ_LEN = 256
# Sizes measured on a 2-core CPU (experiments/measure_sizes.py): the large model costs 9.3-9.7x the small one per
# generated token, and verifying 11 tokens 1.92-2.03x one large step. A 2 x 128 small model (0.9M) was cheaper
# still but too weak a drafter next to the trained large one (0.74 fallbacks per token at the default thresholds).
SIZES = {
    "small": dict(hidden_size=160, intermediate_size=448, num_layers=3, num_heads=5, num_kv_heads=1, head_dim=32),
    "large": dict(hidden_size=384, intermediate_size=1024, num_layers=6, num_heads=6, num_kv_heads=2, head_dim=64),
    "tiny": dict(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16),
}
SCHEDULES = {  # steps, batch size, peak learning rate
    "small": (3000, 16, 3e-3),
    "large": (2400, 16, 1.5e-3),
    "tiny": (30, 4, 3e-3),
}
BUNDLE_DIR = Path(__file__).resolve().parents[1] / "bild_jax" / "bundled"
DEMO_PROMPT_TOKENS, DEMO_CONTINUATION_TOKENS = 64, 48


def model_config(size: str, vocab_size: int = VOCAB_SIZE) -> LlamaConfig:
    return LlamaConfig(model_type="llama", vocab_size=vocab_size, rms_norm_eps=1e-5, rope_theta=10000.0,
                       rope_scaling=(("rope_type", "default"),), max_positions=1024, tie_word_embeddings=True,
                       eos_token_id=(pair_data.EOS_ID,), pad_token_id=pair_data.PAD_ID, **SIZES[size])


def init_params(config: LlamaConfig, seed: int):
    """Flax defaults give std-1 embeddings, far too large for a tied output head: use std 0.02 there."""
    params = LlamaForCausalLM(config).init(jax.random.PRNGKey(seed), jnp.zeros((1, 8), jnp.int32))["params"]
    params["embed_tokens"]["embedding"] = 0.02 * jax.random.normal(jax.random.PRNGKey(seed + 1),
                                                                  params["embed_tokens"]["embedding"].shape)
    return params


def language_model_loss(module: LlamaForCausalLM, params, batch: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy of batch [B, T + 1] int32."""
    logits, _ = module.apply({"params": params}, batch[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


def batch_at(chunks: np.ndarray, step: int, batch_size: int, seed: int) -> np.ndarray:
    """The batch of a step (`bild_jax.finetune.batch_indices`): resuming repeats no data."""
    return chunks[batch_indices(len(chunks), step, batch_size, seed)]


def train(module: LlamaForCausalLM, params, chunks: np.ndarray, steps: int, batch_size: int, peak_lr: float,
          checkpoint_dir: Path, seed: int = 0, save_every: int = 250, description: str = "train"):
    """Trains with `bild_jax.finetune` (AdamW, warmup + cosine, orbax checkpoints in `checkpoint_dir`, resume).

    chunks [n, SEQ_LEN + 1] int32. Returns (params, list of (step, loss)).
    """
    return fine_tune(lambda p, batch: language_model_loss(module, p, batch), params,
                     lambda step: jnp.asarray(batch_at(chunks, step, batch_size, seed)), steps, peak_lr,
                     checkpoint_dir, tokens_per_step=batch_size * (chunks.shape[1] - 1), save_every=save_every,
                     description=description)


def hf_config(config: LlamaConfig) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_dim, "hidden_act": "silu",
        "rms_norm_eps": config.rms_norm_eps, "rope_theta": config.rope_theta,
        "max_position_embeddings": config.max_positions, "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": pair_data.EOS_ID, "eos_token_id": pair_data.EOS_ID, "pad_token_id": pair_data.PAD_ID,
        "torch_dtype": "bfloat16",
    }


def hf_tensor_name(path: tuple[str, ...]) -> str:
    """(`layers_3`, `mlp`, `up_proj`, `kernel`) -> `model.layers.3.mlp.up_proj.weight`."""
    parts = []
    for part in path[:-1]:
        head, _, index = part.rpartition("_")
        parts.extend([head, index] if index.isdigit() else [part])
    parts.append("bias" if path[-1] == "bias" else "weight")
    name = ".".join(parts)
    return name if name.startswith("lm_head") else f"model.{name}"


def save_hf(config: LlamaConfig, params, directory: Path, tokenizer_dir: Path) -> None:
    """Writes an HF-format directory: config.json, model.safetensors (bfloat16), tokenizer files."""
    from safetensors.flax import save_file

    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for path, value in traverse_util.flatten_dict(params).items():
        value = value.T if path[-1] == "kernel" else value  # HF linear weights are [out, in]
        tensors[hf_tensor_name(path)] = jnp.asarray(value, jnp.bfloat16)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(hf_config(config), indent=2))
    for file in tokenizer_dir.iterdir():
        shutil.copy(file, directory / file.name)


def corpus_chunks(tokenizer_dir: Path, limit_files: int | None = None) -> np.ndarray:
    """The training files as [n, SEQ_LEN + 1] int32 chunks (cached next to the tokenizer)."""
    cache = tokenizer_dir.parent / "train_tokens.npy"
    if cache.is_file() and limit_files is None:
        stream = np.load(cache)
    else:
        from transformers import AutoTokenizer

        train_files, _ = pair_data.stdlib_files()
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        stream = pair_data.token_stream(tokenizer, pair_data.load_texts(train_files[:limit_files]))
        if limit_files is None:
            np.save(cache, stream)
    n = (len(stream) - 1) // SEQ_LEN
    return np.stack([stream[i * SEQ_LEN:i * SEQ_LEN + SEQ_LEN + 1] for i in range(n)])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["tokenizer", "train", "bundle"])
    parser.add_argument("--out", type=Path, default=Path("runs/pair"))
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--name", help="output sub-directory (default: the size)")
    parser.add_argument("--steps", type=int, help="override the size's step count")
    parser.add_argument("--limit-files", type=int, help="train on the first N files only (quick checks)")
    parser.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    args = parser.parse_args(argv)
    tokenizer_dir = args.out / "tokenizer"
    if args.step == "tokenizer":
        train_files, held_out = pair_data.stdlib_files()
        texts = pair_data.load_texts(train_files[:args.limit_files])
        pair_data.train_tokenizer(texts, args.vocab_size, tokenizer_dir)
        print(f"tokenizer: {args.vocab_size} tokens from {len(texts)} files ({len(held_out)} held out)")
    elif args.step == "train":
        config = model_config(args.size, vocab_size=args.vocab_size)
        steps, batch_size, peak_lr = SCHEDULES[args.size]
        steps = args.steps or steps
        chunks = corpus_chunks(tokenizer_dir, args.limit_files)
        print(f"{args.size}: {sum(x.size for x in jax.tree_util.tree_leaves(init_params(config, 0))):,} params, "
              f"{chunks.size:,} training tokens, {steps} steps of {batch_size} x {SEQ_LEN}")
        run_dir = args.out / (args.name or args.size)
        params, history = train(LlamaForCausalLM(config), init_params(config, seed=0), chunks, steps, batch_size,
                                peak_lr, run_dir / "checkpoints", description=args.size)
        save_hf(config, params, run_dir / "hf", tokenizer_dir)
        write_history(run_dir / "history.json", history)
    else:
        BUNDLE_DIR.mkdir(exist_ok=True)
        for name in ("large", "small", "small-aligned"):
            target = BUNDLE_DIR / name
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(args.out / name / "hf", target)
        write_demo_prompts(tokenizer_dir, BUNDLE_DIR / "demo_prompts.json")
        print(f"bundled into {BUNDLE_DIR}")


def write_demo_prompts(tokenizer_dir: Path, path: Path, count: int = 64) -> None:
    """Held-out (prompt, continuation) windows for `bild-jax demo` and `sweep`, as token ids."""
    from transformers import AutoTokenizer

    _, held_out = pair_data.stdlib_files()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    samples = pair_data.eval_samples(tokenizer, pair_data.load_texts(held_out), prompt_tokens=DEMO_PROMPT_TOKENS,
                                     continuation_tokens=DEMO_CONTINUATION_TOKENS, count=count)
    path.write_text(json.dumps(samples))


if __name__ == "__main__":
    main()
