"""The T5 pair's recipe on a tiny config: training with resume, HF export that transformers loads."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import bild_jax

sys.path.insert(0, str(Path(__file__).parents[1] / "experiments"))
import summarize_data  # noqa: E402
import train_summarizer  # noqa: E402


@pytest.fixture(scope="module")
def examples():
    from transformers import AutoTokenizer

    train, _ = summarize_data.split_examples(limit_files=20)
    # Short inputs only: every batch then has the same width, and the test compiles one training step.
    encoded = summarize_data.encode(AutoTokenizer.from_pretrained(train_summarizer.TOKENIZER_DIR), train)
    return [e for e in encoded if len(e["input"]) <= train_summarizer.MIN_INPUT_WIDTH][:48]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, examples):
    out = tmp_path_factory.mktemp("t5")
    train_summarizer.train("tiny", out, examples, steps=12, save_every=12)
    return out


def test_training_lowers_the_loss_and_resumes(run_dir, examples, capsys):
    before = json.loads((run_dir / "tiny" / "history.json").read_text())
    train_summarizer.train("tiny", run_dir, examples, steps=30, save_every=12)
    assert "resumed from step 12" in capsys.readouterr().out
    after = json.loads((run_dir / "tiny" / "history.json").read_text())
    assert [step for step, _ in after] == [10, 12, 20, 30]
    assert after[:2] == before
    assert after[-1][1] < before[0][1] < np.log(4096) + 0.5  # from about a uniform guess, going down


def test_length_batches_group_similar_inputs():
    lengths = np.array([5, 200, 7, 190, 6, 210])
    batches = train_summarizer.length_batches(lengths, 2)
    assert [sorted(lengths[b].tolist()) for b in batches] == [[5, 6], [7, 190], [200, 210]]


def test_exported_model_loads_in_transformers_with_the_same_logits(run_dir, examples):
    from transformers import T5ForConditionalGeneration

    directory = run_dir / "tiny" / "hf"
    config = json.loads((directory / "config.json").read_text())
    assert config["model_type"] == "t5" and config["d_model"] == train_summarizer.SIZES["tiny"]["d_model"]
    model = bild_jax.load_model(directory)
    hf_model = T5ForConditionalGeneration.from_pretrained(directory, dtype=torch.float32).eval()
    inputs = np.array([examples[0]["input"]])
    decoder_inputs = np.array([[0] + examples[0]["target"][:-1]])
    with torch.no_grad():
        ref = hf_model(input_ids=torch.tensor(inputs), decoder_input_ids=torch.tensor(decoder_inputs)).logits.numpy()
    ours = np.asarray(bild_jax.forward_logits(model, inputs, decoder_inputs))
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)
    # Training moved the weights away from the initialisation the export was laid out by.
    init = bild_jax.load_model(run_dir / "tiny" / "init")
    assert not np.allclose(np.asarray(bild_jax.forward_logits(init, inputs, decoder_inputs)), ours, atol=1e-3)
