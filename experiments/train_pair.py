"""Trains the bundled small/large Llama-family pair on the Python standard library's sources.

Steps (each resumable; run from the repository root):

    python experiments/train_pair.py tokenizer --out runs/pair
    python experiments/train_pair.py train --size small --out runs/pair
    python experiments/train_pair.py train --size large --steps 900 --out runs/pair   # ~35 min on 2 idle cores
    python experiments/train_pair.py train --size large --out runs/pair      # resumes at 900, to 2400: ~56 min
    python experiments/align.py --out runs/pair                              # the aligned small model
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
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import traverse_util
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

sys.path.insert(0, str(Path(__file__).parent))
import pair_data  # noqa: E402

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


def make_optimizer(steps: int, peak_lr: float) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(0.0, peak_lr, min(200, steps // 10 + 1), steps, peak_lr / 10)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.1))


def batch_at(chunks: np.ndarray, step: int, batch_size: int, seed: int) -> np.ndarray:
    """The batch of a step: a fixed permutation of the chunks per epoch, so resuming repeats no data."""
    per_epoch = len(chunks) // batch_size
    epoch, index = divmod(step, per_epoch)
    order = np.random.default_rng(seed + epoch).permutation(len(chunks))
    return chunks[order[index * batch_size:(index + 1) * batch_size]]


def train(module: LlamaForCausalLM, params, chunks: np.ndarray, steps: int, batch_size: int, peak_lr: float,
          checkpoint_dir: Path, seed: int = 0, save_every: int = 250, description: str = "train"):
    """Trains with AdamW, checkpointing to `checkpoint_dir` and resuming from its latest step.

    chunks [n, SEQ_LEN + 1] int32. Returns (params, list of (step, loss)).
    """
    optimizer = make_optimizer(steps, peak_lr)

    @jax.jit
    def train_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(lambda p: language_model_loss(module, p, batch))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    manager = ocp.CheckpointManager(checkpoint_dir.absolute(), options=ocp.CheckpointManagerOptions(max_to_keep=2))
    state = {"params": params, "opt_state": optimizer.init(params)}
    start = 0
    if manager.latest_step() is not None:
        start = manager.latest_step()
        state = manager.restore(start, args=ocp.args.StandardRestore(state))
        print(f"resumed from step {start}")
    params, opt_state = state["params"], state["opt_state"]
    history = []
    tokens_per_step = batch_size * (chunks.shape[1] - 1)
    columns = [TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("loss {task.fields[loss]:.3f}"), TextColumn("{task.fields[tps]:.0f} tok/s"),
               TimeRemainingColumn()]
    with Progress(*columns) as progress:
        task = progress.add_task(description, total=steps, completed=start, loss=float("nan"), tps=0.0)
        tick = time.perf_counter()
        for step in range(start, steps):
            batch = jnp.asarray(batch_at(chunks, step, batch_size, seed))
            params, opt_state, loss = train_step(params, opt_state, batch)
            if (step + 1) % 10 == 0 or step + 1 == steps:
                loss = float(loss)
                history.append((step + 1, loss))
                now = time.perf_counter()
                progress.update(task, completed=step + 1, loss=loss,
                                tps=tokens_per_step * min(10, step + 1 - start) / (now - tick))
                tick = now
            if (step + 1) % save_every == 0 or step + 1 == steps:
                manager.save(step + 1, args=ocp.args.StandardSave({"params": params, "opt_state": opt_state}))
    manager.wait_until_finished()
    return params, history


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


def write_history(path: Path, history: list[tuple[int, float]]) -> None:
    """Writes (step, loss) pairs, keeping the earlier runs' entries before this run's first step (resumes)."""
    first = history[0][0] if history else float("inf")
    earlier = [entry for entry in json.loads(path.read_text()) if entry[0] < first] if path.is_file() else []
    path.write_text(json.dumps(earlier + [list(entry) for entry in history]))


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
