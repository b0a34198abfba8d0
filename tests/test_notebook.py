"""The Colab quickstart notebook runs top to bottom on CPU, offline, on a tiny saved pair."""

from __future__ import annotations

from pathlib import Path

import pytest

from tiny_models import build_hf_model

NOTEBOOK = Path(__file__).parents[1] / "colab" / "bild_jax_quickstart.ipynb"


def _save_tokenizer(directory: Path, vocab_size: int) -> None:
    """A word-level tokenizer over "w3" .. "w{vocab_size - 1}": the tiny models need some tokenizer, and
    every other word maps to <unk>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>",
                            eos_token="</s>").save_pretrained(directory)


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory) -> tuple[Path, Path]:
    """(small, large) directories: two seeds of the tiny GQA Llama, the tokenizer saved with the large one."""
    small, large = tmp_path_factory.mktemp("nb-small"), tmp_path_factory.mktemp("nb-large")
    build_hf_model("llama-gqa", seed=1).save_pretrained(small)
    model = build_hf_model("llama-gqa", seed=0)
    model.save_pretrained(large)
    _save_tokenizer(large, model.config.vocab_size)
    return small, large


def test_committed_notebook_has_no_outputs():
    import nbformat

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)


def test_notebook_runs_offline_on_cpu(tiny_pair, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    small, large = tiny_pair
    # The kernel inherits the environment. The XLA flags halve compilation, nearly all of the run time.
    for name, value in {"BILD_JAX_OFFLINE": "1", "BILD_JAX_SMALL": str(small), "BILD_JAX_LARGE": str(large),
                        "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1",
                        "XLA_FLAGS": "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
                        }.items():
        monkeypatch.setenv(name, value)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # Raises CellExecutionError, with the cell and its traceback, on the first error.
    NotebookClient(notebook, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(output.get("text", "") for cell in notebook.cells for output in cell.get("outputs", []))
    assert "BiLD exact == large greedy: True" in outputs
    assert "skipped: BILD_JAX_OFFLINE=1" in outputs
    assert (tmp_path / "bild_sweep" / "sweep.png").is_file()
