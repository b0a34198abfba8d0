"""The bundled pair's recipe on a tiny config: tokenizer, training with resume, alignment, HF export."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import bild_jax

sys.path.insert(0, str(Path(__file__).parents[1] / "experiments"))
import align  # noqa: E402
import train_pair  # noqa: E402

FILES = ["--limit-files", "12"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("pair")
    train_pair.main(["tokenizer", "--out", str(out), "--vocab-size", "300", *FILES])
    return out


def _train(out: Path, name: str, steps: int, capsys) -> str:
    train_pair.main(["train", "--size", "tiny", "--name", name, "--steps", str(steps), "--vocab-size", "300",
                     "--out", str(out), *FILES])
    return capsys.readouterr().out


def test_training_lowers_the_loss_and_resumes(run_dir, capsys):
    first = _train(run_dir, "large", 12, capsys)
    assert "resumed" not in first
    before = json.loads((run_dir / "large" / "history.json").read_text())
    resumed = _train(run_dir, "large", 24, capsys)
    assert "resumed from step 12" in resumed
    after = json.loads((run_dir / "large" / "history.json").read_text())
    assert [step for step, _ in before] == [10, 12]
    # The resumed run logs only the steps after its resume point, appended to the first run's log.
    assert [step for step, _ in after] == [10, 12, 20, 24]
    assert after[:2] == before
    assert after[-1][1] < before[0][1] < np.log(300) + 0.5  # from about a uniform guess, going down


def test_exported_model_loads_in_transformers_with_the_same_logits(run_dir, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = run_dir / "large" / "hf"
    if not directory.is_dir():
        _train(run_dir, "large", 12, capsys)
    model = bild_jax.load_model(directory)
    hf_model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    ids = tokenizer("def main():\n    return 1\n")["input_ids"]
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits.numpy()
    np.testing.assert_allclose(np.asarray(bild_jax.forward_logits(model, [ids])), ref, atol=1e-4, rtol=0)


def test_alignment_script_runs_bild_jax_align_with_the_recipe(run_dir, capsys):
    for name in ("small", "large"):
        if not (run_dir / name / "hf").is_dir():
            _train(run_dir, name, 12, capsys)
    small, work = run_dir / "small" / "hf", run_dir / "small-aligned"
    # Flags after the script's own go to `bild-jax align`, after the recipe's.
    align.main(["--small", str(small), "--large", str(run_dir / "large" / "hf"), "--out", str(work / "hf"),
                "--work-dir", str(work), "--data", str(run_dir / "train.jsonl"), "--compare", str(small), *FILES,
                "--num-prompts", "24", "--eval-prompts", "4", "--steps", "10", "--batch-size", "4", "--no-timing"])
    printed = capsys.readouterr().out
    report = json.loads((work / "report.json").read_text())
    before = f"{100 * report['agreement_before']:.1f}%"
    assert f"{small} {before}, aligned here {100 * report['agreement_after']:.1f}%, {small} {before}" in printed
    data = np.load(work / "distillation.npz")
    assert data["outputs"].shape == (24, 64) and (data["output_lengths"] == 64).all()  # the recipe ignores EOS
    assert json.loads((work / "history.json").read_text())[-1][0] == 10
    assert bild_jax.load_model(work / "hf").vocab_size == 300 and not (work / "hf" / "alignment").exists()
