"""`bild-jax demo --task summarize`: the Table-1 run on a tiny random T5 pair, bad --task, and exactness of
the bundled T5 pair on held-out inputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

import bild_jax
from bild_jax.demo import FAST_PROFILE_FILE, SUMMARIZE_SAMPLES, run_summarize_demo
from bild_jax.hub import BUNDLED_DIR
from bild_jax.profile import PairProfile, write_profile

sys.path.insert(0, str(Path(__file__).parents[1] / "experiments"))
import train_summarizer  # noqa: E402


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """Two tiny random T5s of one config (so the pair compiles one greedy and one BiLD program), a fast
    profile for the 'aligned' one, and two held-out samples."""
    root = tmp_path_factory.mktemp("t5pair")
    large = train_summarizer.write_init("tiny", root / "large", train_summarizer.TOKENIZER_DIR, seed=0)
    small = train_summarizer.write_init("tiny", root / "small", train_summarizer.TOKENIZER_DIR, seed=1)
    aligned = train_summarizer.write_init("tiny", root / "aligned", train_summarizer.TOKENIZER_DIR, seed=2)
    # max_draft 10 as the library default's, so that every BiLD row runs one compiled program.
    write_profile(PairProfile(0.9, 1.0, 10, speedup=1.0, quality={}, measured_on={}), aligned / FAST_PROFILE_FILE)
    tokenizer = bild_jax.load_tokenizer(large)
    samples = [{"prompt": tokenizer(source)["input_ids"], "continuation": tokenizer(summary)["input_ids"]}
               for source, summary in [("def add(a, b):\n    return a + b\n", "Add two numbers."),
                                       ("def name(self):\n    return self._name\n", "The object's name.")]]
    samples_file = root / "samples.json"
    samples_file.write_text(json.dumps(samples))
    return large, small, aligned, samples_file


def test_summarize_demo_prints_the_table_one_row_per_operating_point(tiny_pair):
    large, small, aligned, samples_file = tiny_pair
    console = Console(record=True, width=120)
    rows = run_summarize_demo(small=str(small), aligned=str(aligned), large=str(large), samples_file=samples_file,
                              num_prompts=2, max_new_tokens=6, console=console)
    # The unaligned model has no profile: the library defaults, no fast point; the aligned one has a fast one.
    assert [r["system"] for r in rows] == ["large", "small", "BiLD unaligned, quality", "BiLD aligned, quality",
                                           "BiLD aligned, fast", "BiLD exact"]
    assert rows[0]["speedup"] == 1.0 and rows[0]["rouge_l_change"] == 0.0
    assert rows[-1]["exact_match"] == 1.0 and rows[-1]["rouge_l_change"] == 0.0
    assert rows[4]["settings"] == "fallback 0.9, rollback 1, max_draft 10"
    assert rows[2]["settings"] == "fallback 0.6, rollback 5, max_draft 10"
    printed = console.export_text()
    for row in rows[2:]:
        assert 0 <= row["fallback_rate"] <= 1 and 0 <= row["rollback_rate"] <= 1
        assert row["rouge_l_change_low"] <= row["rouge_l_change"] <= row["rouge_l_change_high"]
    for row in rows[2:-1]:
        assert (f"\n  {row['system']}: {row['rouge_l_change']:+.1f} ({row['rouge_l_change_low']:+.1f} to "
                f"{row['rouge_l_change_high']:+.1f})\n") in printed
    for header in ("speedup", "ROUGE-L", "vs large", "fallback/tok", "rollback/tok"):
        assert header in printed
    assert "│ BiLD unaligned, quality │" in printed  # the table fits 120 columns: no name wraps
    assert "BiLD aligned, fast: fallback 0.9, rollback 1, max_draft 10\n" in printed
    assert "BiLD exact: fallback 0.6, rollback 5, max_draft 10, exact\n" in printed


def test_unknown_task_is_one_line_and_exit_code_2():
    result = subprocess.run([sys.executable, "-m", "bild_jax.cli", "demo", "--task", "translate"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and "unknown --task 'translate'; choose one of continue, summarize" in result.stderr


@pytest.mark.skipif(not (BUNDLED_DIR / "t5-large").is_dir(), reason="the T5 pair is not bundled in this checkout")
def test_bundled_pair_exact_mode_is_the_large_models_greedy_output():
    samples = json.loads(SUMMARIZE_SAMPLES.read_text())[:3]
    prompts = [s["prompt"] for s in samples]
    large = bild_jax.load_model("bundled:t5-large")
    small = bild_jax.load_model("bundled:t5-small-aligned")
    greedy = bild_jax.greedy_generate(large, prompts, max_new_tokens=24)
    # max_draft 3: fewer verification widths to compile (1, 2, 4) than the default's six.
    config = bild_jax.BiLDConfig(max_new_tokens=24, exact=True, fallback_threshold=0.3, max_draft=3)
    out = bild_jax.bild_generate(small, large, prompts, config=config)
    np.testing.assert_array_equal(np.asarray(out.lengths), np.asarray(greedy.lengths))
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(greedy.tokens))
    assert int(np.asarray(out.stats.small_tokens).sum()) > 0  # the small model did draft


def test_one_sweep_gives_a_profile_per_allowed_loss():
    from bild_jax.evaluation import SystemRun
    from bild_jax.tune import recommend

    outputs = [[1, 2], [3, 4], [5, 6], [7, 8]]
    references = ["1 2", "3 4", "5 6", "7 8"]
    runs = [SystemRun("large", outputs=outputs, batch_seconds=[[1.0] * 4]),
            SystemRun("BiLD", outputs=outputs, batch_seconds=[[0.5] * 4]),                   # 2x, no loss
            SystemRun("BiLD", outputs=outputs[:3] + [[9]], batch_seconds=[[1 / 3] * 4])]     # 3x, 25 points lost
    rows = [{"fallback": f, "rollback": 5.0, "max_draft": 10, "rouge_l": q, "speedup": s, "exact_match": e}
            for f, q, s, e in [(0.6, 100.0, 2.0, 1.0), (0.3, 75.0, 3.0, 0.75)]]
    result = {"rows": rows, "baseline": {"rouge_l": 100.0}, "runs": runs, "references": references,
              "with_references": True}
    decode = lambda ids: " ".join(map(str, ids))  # noqa: E731
    quality, _ = recommend(result, decode, 1.0, max_new_tokens=8, small_dtype="bfloat16")
    fast, spread = recommend(result, decode, 30.0, max_new_tokens=8, small_dtype="bfloat16")
    assert (quality.fallback_threshold, quality.speedup) == (0.6, 2.0)
    assert (fast.fallback_threshold, fast.speedup, fast.quality["max_loss"]) == (0.3, 3.0, 30.0)
    assert fast.quality["reference"] == "continuations" and spread["speedup"][0] >= 2.0
    assert fast.measured_on["small_dtype"] == "bfloat16"
    assert recommend({**result, "rows": rows[1:]}, decode, 1.0, max_new_tokens=8,
                     small_dtype="bfloat16") == (None, None)
