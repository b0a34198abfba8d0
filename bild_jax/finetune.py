"""The training loop of alignment and of the bundled pair's training: AdamW with warmup + cosine decay, orbax
checkpoints with resume, progress with loss and tokens/s."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from bild_jax.errors import InputError

LOG_EVERY = 10  # steps between loss readings (each one waits for the device)


def make_optimizer(steps: int, peak_lr: float) -> optax.GradientTransformation:
    """AdamW (weight decay 0.1, gradients clipped to norm 1) with a linear warmup over min(200, steps / 10)
    steps to `peak_lr`, then cosine decay to `peak_lr / 10` at `steps`."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, peak_lr, min(200, steps // 10 + 1), steps, peak_lr / 10)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.1))


def batch_indices(count: int, step: int, batch_size: int, seed: int = 0) -> np.ndarray:
    """[batch_size] int indices into `count` examples for a training step: one seeded permutation per epoch,
    so that the batch of a step is fixed and a resumed run repeats no data."""
    if count < batch_size:
        raise InputError(f"{count} training examples are fewer than one batch of {batch_size}")
    epoch, index = divmod(step, count // batch_size)
    order = np.random.default_rng(seed + epoch).permutation(count)
    return order[index * batch_size:(index + 1) * batch_size]


def fine_tune(loss_fn: Callable[[Any, Any], jax.Array], params, batch_at: Callable[[int], Any], steps: int,
              peak_lr: float, checkpoint_dir: str | Path, tokens_per_step: int, save_every: int = 250,
              description: str = "train") -> tuple[Any, list[tuple[int, float]]]:
    """Trains `params` for `steps` steps of `loss_fn(params, batch_at(step))` (a scalar float32), resuming
    from the latest checkpoint in `checkpoint_dir`.

    `batch_at(step)` must give the same batch for the same step, so that a resumed run repeats the run it
    continues. Params and optimizer state are saved every `save_every` steps and at the end (the last two
    kept). Returns (params, [(step, loss)] every LOG_EVERY steps of this call).
    """
    optimizer = make_optimizer(steps, peak_lr)

    @jax.jit
    def train_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    manager = ocp.CheckpointManager(Path(checkpoint_dir).absolute(),
                                    options=ocp.CheckpointManagerOptions(max_to_keep=2))
    state = {"params": params, "opt_state": optimizer.init(params)}
    start = manager.latest_step() or 0
    if start:
        state = manager.restore(start, args=ocp.args.StandardRestore(state))
        print(f"resumed from step {start}")
    params, opt_state = state["params"], state["opt_state"]
    history = []
    columns = [TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("loss {task.fields[loss]:.3f}"), TextColumn("{task.fields[tps]:.0f} tok/s"),
               TimeRemainingColumn()]
    try:
        with Progress(*columns) as progress:
            task = progress.add_task(description, total=steps, completed=start, loss=float("nan"), tps=0.0)
            tick = time.perf_counter()
            for step in range(start, steps):
                params, opt_state, loss = train_step(params, opt_state, batch_at(step))
                if (step + 1) % LOG_EVERY == 0 or step + 1 == steps:
                    loss = float(loss)
                    history.append((step + 1, loss))
                    now = time.perf_counter()
                    progress.update(task, completed=step + 1, loss=loss,
                                    tps=tokens_per_step * min(LOG_EVERY, step + 1 - start) / (now - tick))
                    tick = now
                if (step + 1) % save_every == 0 or step + 1 == steps:
                    manager.save(step + 1, args=ocp.args.StandardSave({"params": params, "opt_state": opt_state}))
    finally:
        manager.wait_until_finished()  # an interrupted run keeps its last complete checkpoint
    return params, history


def write_history(path: str | Path, history: list[tuple[int, float]]) -> None:
    """Writes (step, loss) pairs as JSON, keeping the earlier runs' entries before this run's first step
    (after a resume)."""
    path = Path(path)
    first = history[0][0] if history else float("inf")
    earlier = [entry for entry in json.loads(path.read_text()) if entry[0] < first] if path.is_file() else []
    path.write_text(json.dumps(earlier + [list(entry) for entry in history]))
