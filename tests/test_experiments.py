"""experiments/reproduce.py and experiments/bench.py end to end on tiny fixtures: the real code paths, offline.

Checks the shape of what they write (JSON fields, Markdown tables), never timings. Sizes are chosen so that the
runs share compiled programs: one prompt bucket for all T5 tasks, and the same Llama shapes in the WikiText
run and the benchmark.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import bild_jax
from experiment_fixtures import TASK_DATA, save_pairs

sys.path.insert(0, str(Path(__file__).parents[1] / "experiments"))
import bench  # noqa: E402
import reproduce  # noqa: E402

T5_TASKS = ["iwslt2017", "wmt14", "xsum", "cnndm"]
SYSTEMS = ["large", "small (unaligned)", "small (aligned)", "BiLD (unaligned) FB=0.6 RB=5",
           "BiLD (unaligned) FB=0.9 RB=2", "BiLD (aligned) FB=0.6 RB=5", "BiLD (aligned) FB=0.9 RB=2"]


@pytest.fixture(scope="session")
def pairs(tmp_path_factory):
    """{"t5" | "llama": {"large" | "small" | "small-aligned": HF-format directory}}."""
    return save_pairs(tmp_path_factory.mktemp("experiment-pairs"))


def _pair_args(pair: dict) -> list[str]:
    return ["--large", str(pair["large"]), "--small", str(pair["small"]), "--small-aligned", str(pair["small-aligned"])]


def _table_rows(markdown: str, header_start: str) -> list[list[str]]:
    """The cells of the Markdown table whose header row starts with `header_start`, header included."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        if not line.startswith("|:"):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def _check_task(task: dict, metric: str) -> None:
    assert task["metric"] == metric and task["num_examples"] == 3
    assert [r["name"] for r in task["systems"]] == SYSTEMS
    for r in task["systems"]:
        assert r["quality"] == r["metrics"][metric] and 0 <= r["quality"] <= 100
        assert r["seconds"] > 0 and r["speedup"] > 0 and r["tokens"] > 0 and r["compile_seconds"] >= 0
        assert 0 <= r["exact_match_with_large"] <= 1
        if r["kind"] == "bild":
            assert r["stats"]["small_tokens"] + r["stats"]["large_tokens"] == r["tokens"]
            assert 0 <= r["fallback_rate"] <= 1 and 0 <= r["rollback_rate"] <= 1
    assert task["systems"][0]["exact_match_with_large"] == 1.0
    assert set(task["table1"]) == {f"BiLD ({v}), {label}" for v in ("unaligned", "aligned")
                                   for label in ("matched", "1-point drop")}
    assert all(name in SYSTEMS for name in task["table1"].values() if name)


def test_reproduce_t5_tasks_end_to_end(pairs, tmp_path):
    assert reproduce.main(["--data-dir", str(TASK_DATA), "--tasks", *T5_TASKS, *_pair_args(pairs["t5"]),
                           "--max-new-tokens", "8", "--max-source-tokens", "16", "--batch-size", "3",
                           "--out-dir", str(tmp_path), "--name", "t5"]) == 0
    results = json.loads((tmp_path / "t5.json").read_text())
    assert list(results["tasks"]) == T5_TASKS
    assert {"cpu", "cores", "versions", "torch_threads"} <= set(results["machine"])
    for name, metric in zip(T5_TASKS, ["bleu", "bleu", "rougeL", "rougeLsum"]):
        _check_task(results["tasks"][name], metric)
    assert set(results["tasks"]["cnndm"]["systems"][0]["metrics"]) == {"rouge1", "rouge2", "rougeL", "rougeLsum"}

    markdown = (tmp_path / "t5.md").read_text()
    table = _table_rows(markdown, "| System | IWSLT2017")
    assert len(table[0]) == 1 + 2 * len(T5_TASKS)
    assert [row[0] for row in table[1:]] == ["large", "small (unaligned)", "small (aligned)",
                                            "BiLD (unaligned), matched", "BiLD (unaligned), 1-point drop",
                                            "BiLD (aligned), matched", "BiLD (aligned), 1-point drop"]
    assert all(len(row) == len(table[0]) for row in table)
    assert markdown.count("| System | BLEU |") == 2 and "| System | ROUGE-Lsum |" in markdown


def test_reproduce_wikitext_continuation(pairs, tmp_path):
    assert reproduce.main(["--data-dir", str(TASK_DATA), "--tasks", "wikitext2", *_pair_args(pairs["llama"]),
                           "--prompt-tokens", "8", "--max-new-tokens", "8", "--batch-size", "2",
                           "--out-dir", str(tmp_path), "--name", "wiki"]) == 0
    task = json.loads((tmp_path / "wiki.json").read_text())["tasks"]["wikitext2"]
    _check_task(task, "rougeL")
    assert task["split"] == "test" and task["max_new_tokens"] == 8


def test_reproduce_refuses_a_pair_of_the_wrong_kind(pairs, tmp_path, capsys):
    assert reproduce.main(["--data-dir", str(TASK_DATA), "--tasks", "xsum", *_pair_args(pairs["llama"]),
                           "--variants", "unaligned", "--out-dir", str(tmp_path)]) == 2
    assert "xsum needs an encoder-decoder pair" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_pickle_only_checkpoint_is_converted_to_safetensors_once(pairs, tmp_path):
    import torch
    import transformers

    source = pairs["t5"]["large"]
    assert reproduce.safetensors_checkpoint(str(source), tmp_path) == str(source)
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(source)
    pickled = tmp_path / "pickled"
    model.config.save_pretrained(pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    converted = reproduce.safetensors_checkpoint(str(pickled), tmp_path / "converted")
    assert Path(converted).parent == tmp_path / "converted" and (Path(converted) / "model.safetensors").is_file()
    assert reproduce.safetensors_checkpoint(str(pickled), tmp_path / "converted") == converted
    expected, got = bild_jax.load_model(source).params, bild_jax.load_model(converted).params
    for a, b in zip(jax.tree_util.tree_leaves(expected), jax.tree_util.tree_leaves(got), strict=True):
        np.testing.assert_array_equal(a, b)


def test_table1_picks_the_fastest_points_within_tolerance():
    records = [{"name": "large", "kind": "large", "variant": None, "quality": 30.0, "speedup": 1.0}]
    for name, quality, speedup in [("a", 30.0, 1.2), ("b", 29.95, 1.5), ("c", 29.2, 2.0), ("d", 28.0, 3.0)]:
        records.append({"name": name, "kind": "bild", "variant": "aligned", "quality": quality, "speedup": speedup})
    assert reproduce.pick_points(records) == {"BiLD (aligned), matched": "b", "BiLD (aligned), 1-point drop": "c"}
    records = records[:1] + [{**records[-1]}]
    assert reproduce.pick_points(records) == {"BiLD (aligned), matched": None, "BiLD (aligned), 1-point drop": None}


def test_bench_end_to_end(pairs, tmp_path):
    import torch

    pair = pairs["llama"]
    threads = torch.get_num_threads()
    try:  # one torch thread: spinning OpenMP threads make HF very slow on a busy CI machine
        assert bench.main(["--small", str(pair["small-aligned"]), "--large", str(pair["large"]),
                           "--num-prompts", "2", "--prompt-tokens", "8", "--max-new-tokens", "8",
                           "--batch-sizes", "1", "2", "--repeats", "1", "--torch-threads", "1",
                           "--out-dir", str(tmp_path), "--name", "bench"]) == 0
    finally:
        torch.set_num_threads(threads)
    data = json.loads((tmp_path / "bench.json").read_text())
    results = data["results"]
    assert {"cpu", "cores", "torch_threads", "jax_backend", "versions"} <= set(data["machine"])
    assert data["machine"]["torch_threads"] == 1
    assert results["prompts"] == "random ids"
    assert set(results["batches"]["1"]["systems"]) == {"bild-jax greedy", "HF greedy", "bild-jax BiLD",
                                                       "bild-jax BiLD exact", "HF assisted"}
    assert set(results["batches"]["2"]["systems"]) == {"bild-jax greedy", "HF greedy", "bild-jax BiLD"}
    for batch in results["batches"].values():
        assert batch["bild_speedup"] > 0
        for r in batch["systems"].values():
            assert r["tokens"] > 0 and r["tokens_per_s"] > 0 and len(r["passes_s"]) == 1
            assert r["first_call_s"] > 0 and r["compile_s"] >= 0
    comparisons = results["comparisons"]
    # Same weights, lossless decoding on both sides: the outputs must agree token for token.
    assert comparisons["greedy_identical_to_hf"] == 1.0
    assert comparisons["exact_identical_to_assisted"] == 1.0
    assert comparisons["assisted_identical_to_hf_greedy"] == 1.0
    assert set(results["targets"]) == {"greedy >= 2x HF greedy tokens/s", "BiLD >= 2x faster than HF assisted",
                                       "exact mode identical to HF assisted"}
    markdown = (tmp_path / "bench.md").read_text()
    rows = _table_rows(markdown, "| batch |")
    assert [row[0] for row in rows[1:]] == ["1", "2"]
    assert rows[2][-1] == "n/a (HF assisted generation supports batch 1 only)"


def test_bench_device_info(capsys):
    assert bench.main(["--device-info"]) == 0
    machine = json.loads(capsys.readouterr().out)
    assert machine["cores"] >= 1 and machine["jax_backend"] in {"cpu", "gpu", "tpu"}
