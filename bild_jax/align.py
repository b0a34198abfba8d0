"""Prediction alignment (BiLD paper, section 3.3): fine-tune the small model on the large model's own outputs
(sequence-level distillation), so that it drafts what the large model would write.

`align` generates the large model's outputs for the prompts with bild-jax's batched decoding (greedy, or
sampled), fine-tunes the small model on them with `bild_jax.finetune` (AdamW, warmup + cosine, orbax
checkpoints, resume), writes it in HF format (`bild_jax.export.save_like`), and reports the small model's
top-1 agreement with the large one on held-out prompts and BiLD's speedup, before and after.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from rich.console import Console
from rich.progress import Progress

from bild_jax.errors import InputError
from bild_jax.bild import BiLDConfig, bild_generate
from bild_jax.evaluation import exact_match, run_systems
from bild_jax.export import save_like
from bild_jax.finetune import batch_indices, fine_tune, write_history
from bild_jax.generate import greedy_generate, sample_generate
from bild_jax.hub import load_model
from bild_jax.model import Model, forward_logits
from bild_jax.profile import find_profile, read_profile
from bild_jax.prompts import prepare_prompts

SETTINGS_FILE = "settings.json"


@dataclasses.dataclass(frozen=True)
class Distillation:
    """Prompts and the large model's outputs for them, as padded arrays."""

    prompts: np.ndarray         # [N, P] int32, right-padded with 0
    prompt_lengths: np.ndarray  # [N] int32
    outputs: np.ndarray         # [N, C] int32, the large model's tokens, padded after each row's end
    output_lengths: np.ndarray  # [N] int32, a final EOS included

    def __len__(self) -> int:
        return len(self.prompts)

    def rows(self, indices) -> "Distillation":
        """The examples at `indices`."""
        return Distillation(*(field[indices] for field in dataclasses.astuple(self)))

    def prompt_lists(self) -> list[list[int]]:
        """The prompts as token lists, unpadded."""
        return [row[:n].tolist() for row, n in zip(self.prompts, self.prompt_lengths)]

    def save(self, path: Path) -> None:
        np.savez(path, **dataclasses.asdict(self))

    @classmethod
    def load(cls, path: Path) -> "Distillation":
        with np.load(path) as arrays:
            return cls(**{field.name: arrays[field.name] for field in dataclasses.fields(cls)})


def large_outputs(large: Model, prompts: Sequence[Sequence[int]], max_new_tokens: int, batch_size: int = 64,
                  temperature: float = 0.0, seed: int = 0, eos_token_id: int | Sequence[int] | None = None,
                  on_batch=None) -> Distillation:
    """The large model's outputs for `prompts` (token lists): greedy, or sampled at `temperature` (row i of
    the whole set draws from `fold_in(key(seed), i)`), `batch_size` prompts per call. Every call has the same
    shape (the last batch is padded with repeats), so the decoding compiles once per prompt bucket.
    `on_batch(done)` follows each call."""
    ids, lengths = prepare_prompts([list(p) for p in prompts], vocab_size=large.vocab_size)
    keys = jax.random.split(jax.random.key(seed), len(ids)) if temperature > 0 else None
    outputs, output_lengths = [], []
    for start in range(0, len(ids), batch_size):
        rows = np.arange(start, start + batch_size).clip(max=len(ids) - 1)
        batch = ids[rows], np.arange(ids.shape[1])[None, :] < lengths[rows, None]
        if temperature > 0:
            out = sample_generate(large, batch[0], max_new_tokens, keys[rows], temperature, attention_mask=batch[1],
                                  eos_token_id=eos_token_id)
        else:
            out = greedy_generate(large, batch[0], max_new_tokens, attention_mask=batch[1], eos_token_id=eos_token_id)
        real = min(batch_size, len(ids) - start)
        outputs.append(np.asarray(out.tokens)[:real])
        output_lengths.append(np.asarray(out.lengths)[:real])
        if on_batch:
            on_batch(start + real)
    return Distillation(ids, lengths, np.concatenate(outputs).astype(np.int32),
                        np.concatenate(output_lengths).astype(np.int32))


def training_arrays(data: Distillation, model: Model) -> dict[str, np.ndarray]:
    """The examples as the model trains on them, every array [N, ...]:

    decoder-only: `tokens` [N, P + C] int32 (prompt, then output, right-padded) and `weights` [N, P + C - 1]
    float32, 1 where the next token is an output token; encoder-decoder: `input_ids` [N, P] int32 with
    `attention_mask` [N, P] bool for the encoder, `decoder_input_ids` [N, C] int32 (the start token, then
    the output shifted right), `targets` [N, C] int32 and `weights` [N, C] float32.
    """
    count, width = data.outputs.shape
    in_output = np.arange(width)[None, :] < data.output_lengths[:, None]                  # [N, C]
    if model.is_encoder_decoder:
        start = np.full((count, 1), model.config.decoder_start_token_id, np.int32)
        return {"input_ids": data.prompts,
                "attention_mask": np.arange(data.prompts.shape[1])[None, :] < data.prompt_lengths[:, None],
                "decoder_input_ids": np.concatenate([start, data.outputs[:, :-1]], axis=1),
                "targets": data.outputs, "weights": in_output.astype(np.float32)}
    tokens = np.zeros((count, data.prompts.shape[1] + width), np.int32)
    weights = np.zeros(tokens.shape, np.float32)
    for row in range(count):
        p, c = data.prompt_lengths[row], data.output_lengths[row]
        tokens[row, :p] = data.prompts[row, :p]
        tokens[row, p:p + c] = data.outputs[row, :c]
        weights[row, p:p + c] = 1.0
    return {"tokens": tokens, "weights": weights[:, 1:]}


def _logits_targets_weights(model: Model, batch: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(logits [b, L, V] float32, targets [b, L] int32, weights [b, L] float32) of a `training_arrays` batch."""
    if model.is_encoder_decoder:
        logits = forward_logits(model, batch["input_ids"], batch["decoder_input_ids"], batch["attention_mask"])
        return logits, batch["targets"], batch["weights"]
    tokens = batch["tokens"]
    return forward_logits(model, tokens[:, :-1]), tokens[:, 1:], batch["weights"]


def distillation_loss(model: Model, params, batch: dict) -> jax.Array:
    """Mean cross-entropy [] float32 of `model` with `params` on the output tokens of a `training_arrays` batch."""
    logits, targets, weights = _logits_targets_weights(model.replace(params=params), batch)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return (losses * weights).sum() / jnp.maximum(weights.sum(), 1.0)


@jax.jit
def _agreeing(small: Model, large: Model, batch: dict) -> tuple[jax.Array, jax.Array]:
    small_logits, _, weights = _logits_targets_weights(small, batch)
    large_logits, _, _ = _logits_targets_weights(large, batch)
    same = small_logits.argmax(-1) == large_logits.argmax(-1)
    return (same * weights).sum(), weights.sum()


def agreement(small: Model, large: Model, data: Distillation, batch_size: int = 32) -> float:
    """The small model's top-1 agreement with the large one, in [0, 1]: the share of the large model's output
    positions in `data` where both models' most likely next token is the same (teacher-forced)."""
    arrays = training_arrays(data, small)
    agreeing = total = 0.0
    for start in range(0, len(data), batch_size):
        same, count = _agreeing(small, large, {k: v[start:start + batch_size] for k, v in arrays.items()})
        agreeing, total = agreeing + float(same), total + float(count)
    return agreeing / max(total, 1.0)


def bild_speedups(smalls: dict[str, Model], large: Model, prompts: list[list[int]], config: BiLDConfig,
                  on_call=None) -> dict[str, dict[str, float]]:
    """BiLD with each small model against the large model alone, at batch 1, the systems taking turns prompt
    by prompt: {name: {"speedup", "exact_match"}}."""
    systems = [("large", lambda p: greedy_generate(large, p, config.max_new_tokens, eos_token_id=config.eos_token_id))]
    systems += [(name, lambda p, s=small: bild_generate(s, large, p, config)) for name, small in smalls.items()]
    baseline, *runs = run_systems(systems, prompts, on_call=on_call)
    return {run.name: {"speedup": baseline.seconds / run.seconds, "exact_match": exact_match(run, baseline)}
            for run in runs}


def align(small: str | Path, large: str | Path, prompts: Sequence[Sequence[int]], out_dir: str | Path, *,
          eval_prompts: int = 64, steps: int = 1000, batch_size: int = 16, lr: float = 1e-3,
          max_new_tokens: int = 64, temperature: float = 0.0, seed: int = 0,
          eos_token_id: int | Sequence[int] | None = None, generation_batch_size: int = 64,
          work_dir: str | Path | None = None, save_every: int = 250, measure_speed: bool = True,
          console: Console | None = None) -> dict:
    """Aligns the small model (an HF directory, hub id or bundled:NAME) to the large one on `prompts` (token
    lists; the last `eval_prompts` are held out) and writes it to `out_dir` in HF format.

    The large model's outputs (`max_new_tokens`, greedy or sampled at `temperature`) and the fine-tuning
    checkpoints go to `work_dir` (default `out_dir/alignment`); a run started again with the same settings
    resumes there. Returns the report (also in `work_dir/report.json`): agreement before and after, and with
    `measure_speed` BiLD's speedups at the small model's profile (default thresholds without one).
    """
    console = console or Console()
    out_dir = Path(out_dir)
    work_dir = Path(work_dir) if work_dir is not None else out_dir / "alignment"
    prompts = [list(map(int, p)) for p in prompts]
    if not 1 <= eval_prompts < len(prompts):
        raise InputError(f"eval_prompts must be in [1, {len(prompts) - 1}] for {len(prompts)} prompts, "
                         f"got {eval_prompts}")
    if len(prompts) - eval_prompts < batch_size:
        raise InputError(f"{len(prompts) - eval_prompts} training prompts are fewer than one batch of {batch_size}")
    settings = {"small": str(small), "large": str(large), "prompts": _fingerprint(prompts),
                "eval_prompts": eval_prompts, "steps": steps, "batch_size": batch_size, "lr": lr,
                "max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed,
                "eos_token_id": eos_token_id}
    _claim(work_dir, settings)
    started = time.perf_counter()
    small_model, large_model = load_model(small), load_model(large)
    if small_model.vocab_size != large_model.vocab_size:
        raise InputError(f"vocabularies differ: small {small_model.vocab_size}, large {large_model.vocab_size}")
    if small_model.is_encoder_decoder != large_model.is_encoder_decoder:
        raise InputError("one model is encoder-decoder and the other decoder-only; BiLD needs two of a kind")

    data_file = work_dir / "distillation.npz"
    if data_file.is_file():
        data = Distillation.load(data_file)
    else:
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("large model outputs", total=len(prompts))
            data = large_outputs(large_model, prompts, max_new_tokens, generation_batch_size, temperature, seed,
                                 eos_token_id, on_batch=lambda done: progress.update(task, completed=done))
        data.save(data_file)
        console.print(f"large model outputs: {len(data)} prompts, {int(data.output_lengths.sum())} tokens "
                      f"({'greedy' if temperature == 0 else f'sampled at temperature {temperature:g}'}) in "
                      f"{time.perf_counter() - started:.0f} s")
    train, held_out = data.rows(np.arange(len(data) - eval_prompts)), data.rows(np.arange(len(data) - eval_prompts,
                                                                                         len(data)))
    before = agreement(small_model, large_model, held_out)
    console.print(f"before: top-1 agreement {100 * before:.1f}% on {eval_prompts} held-out prompts")

    arrays = training_arrays(train, small_model)
    tokens_per_step = int(batch_size * arrays["weights"].sum() / len(train))
    params, history = fine_tune(
        lambda p, batch: distillation_loss(small_model, p, batch), small_model.params,
        lambda step: {k: jnp.asarray(v[batch_indices(len(train), step, batch_size, seed)]) for k, v in arrays.items()},
        steps, lr, work_dir / "checkpoints", tokens_per_step=tokens_per_step, save_every=save_every,
        description="align")
    write_history(work_dir / "history.json", history)
    save_like(small_model.replace(params=params), small, out_dir)
    aligned = load_model(out_dir)  # what users get: the params in the checkpoint's dtypes
    after = agreement(aligned, large_model, held_out)
    report = {"agreement_before": before, "agreement_after": after, "eval_prompts": eval_prompts,
              "train_prompts": len(train), "steps": steps, "out": str(out_dir)}
    console.print(f"after: top-1 agreement {100 * after:.1f}% ({100 * (after - before):+.1f} points); "
                  f"alignment took {time.perf_counter() - started:.0f} s")
    if measure_speed:
        profile = find_profile(small)
        config = (read_profile(profile).config if profile else BiLDConfig)(
            max_new_tokens=max_new_tokens, eos_token_id=eos_token_id)
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("timing BiLD before and after", total=3 * (eval_prompts + 1))
            speed = bild_speedups({"before": small_model, "after": aligned}, large_model, held_out.prompt_lists(),
                                  config, on_call=lambda _: progress.advance(task))
        where = f"the profile {profile}" if profile else "the default thresholds"
        report.update(thresholds=dict(fallback=config.fallback_threshold, rollback=config.rollback_threshold,
                                      max_draft=config.max_draft), profile=str(profile) if profile else None,
                      speedup_before=speed["before"]["speedup"], speedup_after=speed["after"]["speedup"])
        console.print(f"BiLD at {where} (fallback {config.fallback_threshold:g}, rollback "
                      f"{config.rollback_threshold:g}, max_draft {config.max_draft}), {eval_prompts} held-out "
                      f"prompts, batch 1: before {speed['before']['speedup']:.2f}x, after "
                      f"{speed['after']['speedup']:.2f}x over the large model alone")
    (work_dir / "report.json").write_text(json.dumps(report, indent=1))
    console.print(f"wrote {out_dir}; `bild-jax tune --small {out_dir} --large {large}` writes its pair profile")
    return report


def _fingerprint(prompts: list[list[int]]) -> str:
    return hashlib.sha256(json.dumps(prompts).encode()).hexdigest()[:16]


def _claim(work_dir: Path, settings: dict) -> None:
    """Records the run's settings in `work_dir`, or checks that a run found there had the same ones."""
    work_dir.mkdir(parents=True, exist_ok=True)
    path = work_dir / SETTINGS_FILE
    settings = json.loads(json.dumps(settings))  # as read back: tuples become lists
    if path.is_file():
        earlier = json.loads(path.read_text())
        changed = sorted(k for k in settings.keys() | earlier.keys() if earlier.get(k) != settings.get(k))
        if changed:
            raise InputError(f"{work_dir} holds an alignment run with other settings ({', '.join(changed)}); "
                             f"resume with the same ones, or use a new output directory")
    else:
        path.write_text(json.dumps(settings, indent=1))
