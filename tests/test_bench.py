"""`bild-jax bench` on tiny random Llama models: the record's fields, the CLI's JSON, bad input.

Every run here uses the `tiny` shape's configs in bfloat16, the default max_draft, 64-token prompts, 4 new
tokens, batch size 1 and the default step loop, so that the programs compiled by the first run serve the
whole file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bild_jax import bench, cli, evaluation
from bild_jax.bench import CANDIDATE_SCHEDULES
from bild_jax.bild import BiLDConfig
from bild_jax.evaluation import padded_shape
from bild_jax.schedule import BatchSchedule, ScheduleTable

SMALL_RUN = dict(num_prompts=2, max_new_tokens=4)


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _check_record(result: dict, systems: list[str], batch_sizes: list[int], with_bild: bool) -> None:
    assert result["device"]["count"] >= 1 and result["device"]["platform"] and result["jax_version"]
    assert _positive(result["copy_bandwidth_gb_s"]) and _positive(result["large_over_small_step"])
    for model in result["models"].values():
        for key in ("params", "weight_bytes", "bytes_per_step", "step_ms", "block_ms", "block_over_step", "prompt_ms",
                    "bandwidth_gb_s", "bandwidth_utilization"):
            assert _positive(model[key]), key
        assert model["bytes_per_step"] > model["weight_bytes"] * 0.5
    assert result["models"]["large"]["params"] > result["models"]["small"]["params"]
    rows = result["end_to_end"]["systems"]
    assert [r["system"] for r in rows] == systems
    for row in rows:
        for key in ("tokens_per_s", "ms_per_token", "speedup", "prompt_share"):
            assert _positive(row[key]), (row["system"], key)
        # Timed apart from the system, tiny models' prompt passes may take as long as a whole prompt.
        assert row["decode_speedup"] is None or _positive(row["decode_speedup"])
        assert row["compile_s"] >= 0
    assert rows[0]["speedup"] == 1.0
    all_large = rows[-1]
    assert all_large["large_token_share"] == 1.0 and all_large["large_calls_per_token"] == 1.0
    assert _positive(result["end_to_end"]["loop_overhead"])
    assert _positive(result["end_to_end"]["turns_overhead"]) and _positive(result["end_to_end"]["loop_own"])
    assert [b["batch"] for b in result["batches"]] == batch_sizes
    for b in result["batches"]:
        assert _positive(b["greedy_tokens_per_s"]) and ("bild_speedup" in b) == with_bild
        if with_bild:
            assert [c["schedule"] for c in b["candidates"]] == [dataclasses.asdict(s) for s in CANDIDATE_SCHEDULES]
            fastest = max(b["candidates"], key=lambda c: c["speedup"])
            assert b["best"] == (fastest["schedule"] if fastest["speedup"] > 1 else
                                 dataclasses.asdict(BatchSchedule(large_only=True)))
    entries = result["schedule_table"]["entries"]
    assert [e["batch_size"] for e in entries] == (batch_sizes if with_bild else [])
    if entries:
        assert [size for size, _ in ScheduleTable.from_dict(result["schedule_table"]).entries] == batch_sizes
    json.dumps(result, allow_nan=False)  # valid JSON: no infinities or NaNs


def test_shape_run_has_step_costs_bandwidth_and_greedy_rows():
    result = bench.run_bench(shape="tiny", batch_sizes=[1], **SMALL_RUN)
    _check_record(result, ["large greedy", "small greedy", "in turns", "BiLD all-large"], [1], with_bild=False)
    assert result["settings"]["prompts"] == "random" and result["settings"]["shape"] == "tiny"
    assert result["models"]["large"]["dtype"] == "bfloat16"


def test_loaded_models_get_bild_and_exact_rows(tmp_path):
    small = bench.random_model(bench.SHAPES["tiny"].small, jnp.bfloat16, seed=1)
    large = bench.random_model(bench.SHAPES["tiny"].large, jnp.bfloat16, seed=0)
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"prompt": list(range(1, 65))}, {"prompt": list(range(100, 164))}]))
    result = bench.run_bench(small, large, prompts_file=prompts, rollback=math.inf, batch_sizes=[1], **SMALL_RUN)
    _check_record(result, ["large greedy", "small greedy", "in turns", "BiLD", "BiLD exact", "BiLD all-large"], [1],
                  with_bild=True)
    assert result["batches"][0]["schedule"] == dataclasses.asdict(BatchSchedule())  # the built-in table at batch 1
    assert result["settings"]["prompts"] == str(prompts) and result["settings"]["rollback"] == "inf"
    for row in result["end_to_end"]["systems"][3:]:
        assert 0 <= row["large_token_share"] <= 1


def test_prompt_pass_shares_take_each_system_its_models_passes():
    # Shares of the mean time per prompt, as the speedups are (not of the median ms per token)
    e2e = {"systems": [{"system": "large greedy", "tokens_per_s": 1000.0, "ms_per_token": 0.9},
                       {"system": "small greedy", "tokens_per_s": 4000.0, "ms_per_token": 0.25},
                       {"system": "BiLD", "tokens_per_s": 2000.0, "ms_per_token": 0.3}], "loop_overhead": 1.1}
    out = bench.with_prompt_pass_shares(e2e, {"large": 8.0, "small": 2.0}, max_new_tokens=40)
    assert out["loop_overhead"] == 1.1
    shares = {row["system"]: (row["prompt_share"], row["decode_speedup"]) for row in out["systems"]}
    # per prompt: large 40 ms (8 in its prompt pass), small 10 ms (2), BiLD 20 ms (8 + 2)
    assert shares == {"large greedy": (0.2, 1.0), "small greedy": (0.2, 4.0), "BiLD": (0.5, 3.2)}
    # passes timed longer than a whole prompt: no speedup to report
    out = bench.with_prompt_pass_shares(e2e, {"large": 8.0, "small": 12.0}, max_new_tokens=40)
    assert [row["decode_speedup"] for row in out["systems"]] == [1.0, None, None]


@dataclasses.dataclass
class _Output:
    tokens: np.ndarray
    lengths: np.ndarray


@dataclasses.dataclass
class _Counters:
    small_tokens: np.ndarray
    large_tokens: np.ndarray
    large_calls: np.ndarray


@dataclasses.dataclass
class _BildOutput(_Output):
    from_large: np.ndarray
    stats: _Counters


def test_end_to_end_compiles_each_prompt_bucket_outside_the_timings(monkeypatch):
    # Fake systems on a fake clock: a steady call takes 1 s for 2 tokens; a system's first call on a prompt
    # bucket also compiles, 4 s for greedy decoding and 9 s for BiLD. Two of the three prompts share a bucket.
    now = [0.0]
    monkeypatch.setattr(evaluation, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    compiled = set()

    def call(program, prompts, compile_seconds: float) -> None:
        now[0] += 1.0 + (0.0 if (program, padded_shape(prompts)) in compiled else compile_seconds)
        compiled.add((program, padded_shape(prompts)))

    def greedy(model, prompts, max_new_tokens, eos_token_id):
        call(model, prompts, 4.0)
        return _Output(np.full((1, 2), 7), np.array([2]))

    def turns(small, large, prompts, max_new_tokens):
        call("in turns", prompts, 4.0)
        return _Output(np.full((1, 2), 7), np.array([2]))

    def bild(small, large, prompts, config):
        call(config, prompts, 9.0)
        ones = np.array([1])
        return _BildOutput(np.full((1, 2), 7), np.array([2]), np.zeros((1, 2), bool), _Counters(ones, ones, ones))

    monkeypatch.setattr(bench, "greedy_generate", greedy)
    monkeypatch.setattr(bench, "in_turns", turns)
    monkeypatch.setattr(bench, "bild_generate", bild)
    prompts = [[1] * 3, [2] * 20, [3] * 5]
    assert padded_shape(prompts[:1]) == padded_shape(prompts[2:]) != padded_shape(prompts[1:2])
    record = bench.end_to_end("small", "large", prompts, BiLDConfig(max_new_tokens=2))
    for row in record["systems"]:
        assert row["speedup"] == 1.0 and row["ms_per_token"] == 500.0 and row["tokens_per_s"] == 2.0, row
        assert row["compile_s"] == (18.0 if row["system"].startswith("BiLD") else 8.0), row
    assert record["loop_overhead"] == 0.5 and record["loop_own"] == 1.0


def test_weight_bytes_per_step_reads_one_row_of_an_untied_embedding():
    config = bench.SHAPES["tiny"].large
    tied = jax.eval_shape(lambda: bench.random_model(config, jnp.float32))
    untied = jax.eval_shape(lambda: bench.random_model(dataclasses.replace(config, tie_word_embeddings=False),
                                                       jnp.float32))

    def all_bytes(model):
        return sum(x.size * 4 for x in jax.tree_util.tree_leaves(model.params))

    assert bench.weight_bytes_per_step(tied) == all_bytes(tied)
    table, row = config.vocab_size * config.hidden_size * 4, config.hidden_size * 4
    assert bench.weight_bytes_per_step(untied) == all_bytes(untied) - table + row


def test_in_turns_feeds_each_model_the_other_ones_token():
    # Untied: a tied random model's argmax is its input token.
    tiny = bench.SHAPES["tiny"]
    small, large = (bench.random_model(dataclasses.replace(config, tie_word_embeddings=False), jnp.float32, seed=seed)
                    for config, seed in ((tiny.small, 1), (tiny.large, 0)))
    prompt = [3, 4, 5]
    small_cache, large_cache = (m.start_cache(1, 8) for m in (small, large))
    _, small_cache = small.decode(jnp.asarray([prompt]), small_cache)
    logits, large_cache = large.decode(jnp.asarray([prompt]), large_cache)
    tokens = [int(jnp.argmax(logits[0, -1]))]
    for _ in range(3):
        logits, small_cache = small.decode(jnp.asarray([[tokens[-1]]]), small_cache)
        logits, large_cache = large.decode(jnp.argmax(logits[:, -1], -1)[:, None], large_cache)
        tokens.append(int(jnp.argmax(logits[0, -1])))
    out = bench.in_turns(small, large, [prompt], max_new_tokens=4)
    assert out.tokens.tolist() == [tokens] and out.lengths.tolist() == [4]


def test_batches_cut_prompts_to_one_length_and_cycle_them():
    batches = bench._batches([[1, 2, 3], [4, 5], [6, 7, 8, 9]], batch_size=2)
    assert batches == [[[2, 3], [4, 5]], [[8, 9], [2, 3]]]


def test_cli_prints_valid_json(capsys):
    assert cli.main(["bench", "--shape", "tiny", *["--num-prompts", "2", "--max-new-tokens", "4"], "--dtype", "float32",
                     "--json", "-"]) == 0
    result = json.loads(capsys.readouterr().out)
    _check_record(result, ["large greedy", "small greedy", "in turns", "BiLD all-large"], [], with_bild=False)
    # --dtype is the large model's; the small one is loaded as the other commands load it
    assert (result["models"]["large"]["dtype"], result["models"]["small"]["dtype"]) == ("float32", "bfloat16")


@pytest.mark.parametrize("argv,message", [
    (["--shape", "tiny", "--max-draft", "0"], "max_draft must be an int >= 1"),
    (["--shape", "nope"], "unknown shape 'nope'"),
    (["--shape", "tiny", "--num-prompts", "0"], "num_prompts must be >= 1"),
    (["--shape", "tiny", "--dtype", "float8"], "unknown dtype 'float8'"),
    (["--shape", "tiny", "--batch-sizes", "1,x"], "--batch-sizes expects comma-separated ints"),
    (["--shape", "tiny", "--batch-sizes", "0"], "batch sizes must be >= 1"),
    (["--shape", "tiny", "--small", "bundled:small"], "--shape makes both models"),
    (["--small", "/no/such/model"], "no model directory at /no/such/model"),
    (["--prompts-file", "/no/such/prompts.json"], "no prompts file at /no/such/prompts.json"),
    (["--save-schedule", "s.json"], "--save-schedule needs --batch-sizes"),
    (["--shape", "tiny", "--batch-sizes", "1", "--save-schedule", "s.json"], "--save-schedule needs --batch-sizes"),
])
def test_bad_input_is_one_line_and_exit_code_2(argv, message, capsys):
    assert cli.main(["bench", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and message in captured.err


def test_an_unknown_small_dtype_is_one_line_and_exit_code_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", "--shape", "tiny", "--small-dtype", "float8"])
    captured = capsys.readouterr()
    assert exit_.value.code == 2 and captured.err.count("\n") == 1
    assert "argument --small-dtype: invalid choice: 'float8'" in captured.err


def test_help_lists_bench():
    assert "bench" in cli.build_parser().format_help()


def test_bench_imports_no_pytorch():
    code = "import sys, bild_jax.cli, bild_jax.bench; assert 'torch' not in sys.modules, 'torch imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
