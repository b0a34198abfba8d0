"""The `bild-jax` command end to end on the bundled pair: demo, generate, sweep, and bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

import bild_jax
from bild_jax import cli
from bild_jax.hub import BUNDLED_DIR, SMALL_MODEL_DTYPE
from bild_jax.schedule import BatchSchedule, ScheduleTable

pytestmark = pytest.mark.skipif(not (BUNDLED_DIR / "large").is_dir(), reason="the bundled pair is not built")
SHORT = ["--max-new-tokens", "8"]


def test_version_and_help():
    result = subprocess.run([sys.executable, "-m", "bild_jax.cli", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == f"bild-jax {bild_jax.__version__}"
    result = subprocess.run([sys.executable, "-m", "bild_jax.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for command in ("generate", "demo", "sweep", "align", "tune"):
        assert command in result.stdout


def test_demo_prints_the_table_and_writes_rows(tmp_path, capsys):
    rows_file = tmp_path / "rows.json"
    assert cli.main(["demo", "--num-prompts", "2", *SHORT, "--json", str(rows_file)]) == 0
    printed = capsys.readouterr().out
    for header in ("tokens/s", "speedup", "= large", "ROUGE-L", "fallback/tok", "rollback/tok", "large calls/tok"):
        assert header in printed
    assert "small model" in printed and "large model" in printed
    rows = json.loads(rows_file.read_text())
    assert [r["system"] for r in rows] == ["large", "small", "BiLD", "BiLD aligned", "BiLD exact"]
    assert rows[0]["speedup"] == 1.0 and rows[0]["exact_match"] == 1.0
    assert rows[-1]["exact_match"] == 1.0 and rows[-1]["rouge_l_change"] == 0.0  # exact mode: the large model's
    for row in rows[2:]:
        assert 0 <= row["fallback_rate"] <= 1 and row["large_calls_per_token"] > 0
        assert row["rouge_l_change_low"] <= row["rouge_l_change"] <= row["rouge_l_change_high"]
    for row in rows[2:-1]:  # exact mode's change is 0 by construction: not listed
        assert (f"\n  {row['system']}: {row['rouge_l_change']:+.1f} ({row['rouge_l_change_low']:+.1f} to "
                f"{row['rouge_l_change_high']:+.1f})\n") in printed


def test_generate_json_has_text_tokens_and_stats(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("import os\n\ndef main(argv):\n")
    assert cli.main(["generate", "--prompts-file", str(prompts), *SHORT, "--exact", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["prompt"] for line in lines] == ["import os", "def main(argv):"]
    large = bild_jax.load_model("bundled:large")
    tokenizer = bild_jax.load_tokenizer("bundled:large")
    for line in lines:
        stats = line["stats"]
        assert stats["small_tokens"] + stats["large_tokens"] == len(line["tokens"])
        expected = bild_jax.greedy_generate(large, [tokenizer(line["prompt"])["input_ids"]], max_new_tokens=8)
        assert line["tokens"] == [int(t) for t in expected.tokens[0, :int(expected.lengths[0])]]
        assert line["text"] == tokenizer.decode(line["tokens"], skip_special_tokens=True)
    # The built-in table runs BiLD's loop for 2 rows; a table that hands them to the large model alone gives
    # the same tokens, and says so.
    assert all(line["schedule"].startswith("BiLD") for line in lines)
    table = tmp_path / "schedule.json"
    ScheduleTable(entries=((1, BatchSchedule()), (2, BatchSchedule(large_only=True)))).save(table)
    assert cli.main(["generate", "--prompts-file", str(prompts), *SHORT, "--exact", "--json", "--schedule",
                     str(table)]) == 0
    captured = capsys.readouterr()
    alone = [json.loads(line) for line in captured.out.splitlines()]
    assert [line["tokens"] for line in alone] == [line["tokens"] for line in lines]
    assert "batch of 2: large model alone" in captured.err and "large model alone" in alone[0]["schedule"]
    assert all(line["stats"]["small_tokens"] == 0 for line in alone)


def test_the_small_model_loads_in_the_small_model_dtype_unless_told():
    """Its dtype never changes exact mode's output (`test_generate_json_has_text_tokens_and_stats` runs the
    default bfloat16 small model against the float32 large model's greedy tokens)."""
    parser = cli.build_parser()
    for flags, dtype in (([], SMALL_MODEL_DTYPE), (["--small-dtype", "float32"], "float32")):
        small, large, _ = cli._load_pair(parser.parse_args(["generate", "--prompt", "x", *flags]))
        assert (small.dtype, large.dtype) == (jnp.dtype(dtype), jnp.float32)
    generate_help = next(action for action in parser._subparsers._group_actions[0].choices["generate"]._actions
                         if action.dest == "small_dtype").help
    assert f"default {SMALL_MODEL_DTYPE}" in generate_help


def test_generate_samples_with_the_given_settings_and_seed(capsys):
    tokenizer = bild_jax.load_tokenizer("bundled:large")
    small, large = bild_jax.load_model("bundled:small"), bild_jax.load_model("bundled:large")
    ids = [tokenizer("class Parser:")["input_ids"]]

    def cli_tokens(*flags):
        assert cli.main(["generate", "--prompt", "class Parser:", *SHORT, "--json", *flags]) == 0
        return json.loads(capsys.readouterr().out)["tokens"]

    # Without threshold flags, generate runs at the bundled small model's pair profile.
    config = bild_jax.BiLDConfig.from_profile("bundled:small", max_new_tokens=8, temperature=0.8, top_p=0.9)
    expected = bild_jax.bild_generate(small, large, ids, config, rng=jax.random.key(7))
    assert cli_tokens("--temperature", "0.8", "--top-p", "0.9", "--seed", "7") == \
        [int(t) for t in expected.tokens[0, :int(expected.lengths[0])]]
    # Sampling among the top 1 token is greedy decoding, whatever the temperature and seed.
    assert cli_tokens("--temperature", "5", "--top-k", "1", "--seed", "1") == cli_tokens()


def test_sweep_writes_csv_png_and_recommends(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert cli.main(["sweep", "--num-prompts", "2", *SHORT, "--fallbacks", "0.5,0.9", "--rollbacks", "2,inf",
                     "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "large only: ROUGE-L" in printed and f"wrote {out / 'sweep.csv'}" in printed
    lines = (out / "sweep.csv").read_text().splitlines()
    assert lines[0].startswith("fallback,rollback,max_draft,system,tokens_per_s,speedup,exact_match,rouge_l")
    assert len(lines) == 1 + 4
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv,message", [
    (["generate", "--small", "/no/such/model", "--prompt", "x"], "no model directory at /no/such/model"),
    (["generate", "--prompt", "x", "--fallback", "2"], "fallback_threshold must be in [0, 1]"),
    (["generate", "--prompt", "x", "--max-draft", "0"], "max_draft must be an int >= 1"),
    (["generate", "--prompt", "x", "--lookup-tokens", "-1"], "lookup_tokens must be an int >= 0"),
    (["generate", "--prompt", "x", "--temperature", "-1"], "temperature must be a finite number >= 0"),
    (["generate", "--prompt", "x", "--temperature", "1", "--top-p", "0"], "top_p must be in (0, 1]"),
    (["generate", "--prompt", "x", "--schedule", "/no/such/schedule.json"], "no schedule table at"),
])
def test_bad_input_is_one_line_and_exit_code_2(argv, message):
    result = subprocess.run([sys.executable, "-m", "bild_jax.cli", *argv], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("argv,target,message", [
    (["demo", "--json", "{file}/rows.json"], "bild_jax.demo.run_demo", "{file} is a file"),
    (["bench", "--json", "{dir}"], "bild_jax.bench.run_bench", "{dir} is a directory; give a file name"),
    (["bench", "--save-schedule", "{file}/s.json", "--batch-sizes", "1"], "bild_jax.bench.run_bench", "is a file"),
    (["sweep", "--out", "{file}"], "bild_jax.cli._load_pair", "{file} is a file; give a directory"),
    (["tune", "--out", "{file}/sub/p.json"], "bild_jax.cli._load_pair", "cannot write {file}/sub/p.json"),
    (["tune", "--sweep-out", "{file}/sweep"], "bild_jax.cli._load_pair", "cannot write {file}/sweep"),
    (["align", "--small", "bundled:small", "--large", "bundled:large", "--data", "x.txt", "--out", "{file}"],
     "bild_jax.cli._shared_tokenizer", "{file} is a file; give a directory"),
])
def test_an_unusable_output_path_fails_before_any_work(tmp_path, capsys, monkeypatch, argv, target, message):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    fill = {"file": str(a_file), "dir": str(tmp_path)}

    def work(*_args, **_kwargs):
        raise AssertionError("the command started its work before checking its output path")

    monkeypatch.setattr(target, work)
    assert cli.main([arg.format(**fill) for arg in argv]) == 2
    assert message.format(**fill) in capsys.readouterr().err


def test_written_outputs_get_their_missing_directories(tmp_path):
    from bild_jax.atomic import check_writable, write_text_atomic

    path = tmp_path / "new" / "deeper" / "rows.json"
    check_writable(path)
    write_text_atomic(path, "[]")
    assert path.read_text() == "[]" and sorted(p.name for p in path.parent.iterdir()) == ["rows.json"]


def test_empty_prompts_file_and_mismatched_tokenizers(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    result = subprocess.run([sys.executable, "-m", "bild_jax.cli", "generate", "--prompts-file", str(empty)],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "holds no prompts" in result.stderr
    other = tmp_path / "other-small"
    shutil.copytree(BUNDLED_DIR / "small", other)
    vocab = json.loads((other / "tokenizer.json").read_text())
    merges = vocab["model"]["vocab"]
    first, second = list(merges)[300:302]
    merges[first], merges[second] = merges[second], merges[first]
    (other / "tokenizer.json").write_text(json.dumps(vocab))
    result = subprocess.run([sys.executable, "-m", "bild_jax.cli", "generate", "--small", str(other), "--prompt", "x"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "cannot pair" in result.stderr and "differ in real tokens" in result.stderr
