"""Bad input, broken checkpoints and checkpoint code: one clear error each, never a traceback or a wrong answer.

Nothing here compiles a decode: every case is refused before compiling, and the CLI cases that run to the
end replace the compiled BiLD program with a stub that returns zeros of the right shapes.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bild_jax
from bild_jax import atomic, bild, cli, memory, sweep
from bild_jax.errors import InputError
from bild_jax.hub import BUNDLED_DIR
from bild_jax.prompts import prepare_prompts
from bild_jax.sweep import run_sweep  # before `no_compile` replaces it

BUNDLED = (BUNDLED_DIR / "large").is_dir()
needs_bundled = pytest.mark.skipif(not BUNDLED, reason="the bundled pair is not built")


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """(exit code, stderr) of `bild-jax *argv` run in this process."""
    try:
        code = cli.main(argv)
    except SystemExit as exit_:  # argparse's own exits (bad flags, --help)
        code = exit_.code
    return code, capsys.readouterr().err


def fake_bild_decode(small, large, prompts, prompt_lengths, policy, *, max_new_tokens, max_draft, pad_token_id,
                     rng=None, narrow_widths, lookup_tokens):
    """Stands in for the compiled BiLD program: checks what it is given, returns zeros of the output shapes."""
    assert type(max_new_tokens) is int and type(max_draft) is int and type(pad_token_id) is int
    assert type(lookup_tokens) is int and 0 <= lookup_tokens <= max_draft
    assert type(narrow_widths) is tuple and all(type(width) is int for width in narrow_widths)
    batch = prompts.shape[0]
    zeros = jnp.zeros((batch,), jnp.int32)
    stats = bild.BiLDStats(**{field.name: zeros for field in dataclasses.fields(bild.BiLDStats)})
    return bild.BiLDOutput(tokens=jnp.zeros((batch, max_new_tokens), jnp.int32), lengths=zeros,
                           from_large=jnp.zeros((batch, max_new_tokens), bool), stats=stats)


@pytest.fixture(scope="module")
def no_compile():
    """The compiled BiLD program and model loading replaced for this module: loads are memoized, decoding
    returns zeros, so that a CLI run costs milliseconds."""
    import functools

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bild, "_bild_decode_jit", fake_bild_decode)
        patch.setattr(bild_jax, "load_model", functools.cache(bild_jax.load_model))
        patch.setattr(bild_jax, "load_tokenizer", functools.cache(bild_jax.load_tokenizer))
        patch.setattr(sweep, "run_sweep", lambda *args, **kwargs: {
            "baseline": {"rouge_l": 1.0, "tokens_per_s": 1.0}, "recommended": None, "csv": "c", "png": "p"})
        yield


# --- the CLI: one line and exit code 2 for bad input, a traceback and a report request for a bug ---

@needs_bundled
@pytest.mark.parametrize("argv,message", [
    (["generate", "--prompt", "x", "--top-k", "1099511627776"], "top_k must be an int >= 0"),
    (["generate", "--prompt", "x", "--seed", str(2 ** 64)], "a seed must fit in 64 bits"),
    (["sweep", "--fallbacks", ""], "argument --fallbacks: expected comma-separated numbers"),
    (["sweep", "--num-prompts", "0"], "--num-prompts must be >= 1"),
    (["sweep", "--num-prompts", "-1"], "--num-prompts must be >= 1"),
    (["sweep", "--fallbacks", "2"], "fallback_threshold must be in [0, 1]"),
    (["generate", "--prompt", "x", "--max-draft", "100000"], "lower max_draft"),
    (["generate", "--prompt", "x", "--max-new-tokens", "abc"], "argument --max-new-tokens: invalid int value"),
])
def test_bad_flags_are_one_line_and_exit_code_2(argv, message, capsys, no_compile):
    code, err = run_cli(argv, capsys)
    assert code == 2 and err.count("\n") == 1 and message in err and "Traceback" not in err


@needs_bundled
@pytest.mark.parametrize("content,message", [
    ('[{"a": 1}]', "sample 0 of"),
    ('{"prompt": [1]}', "must hold a JSON list"),
    ('[{"prompt": [1, 2.5], "continuation": [3]}]', "is not of the form"),
    ("[", "is not valid JSON"),
])
def test_prompts_json_of_the_wrong_schema(tmp_path, capsys, no_compile, content, message):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(content)
    code, err = run_cli(["sweep", "--prompts-file", str(prompts)], capsys)
    assert code == 2 and err.count("\n") == 1 and message in err


def test_a_bug_shows_its_traceback_and_asks_for_a_report(capsys, monkeypatch):
    def broken(args):
        raise ValueError("an internal invariant failed")  # a plain ValueError is not an input error

    monkeypatch.setitem(cli.COMMANDS, "generate", broken)
    code, err = run_cli(["generate", "--prompt", "x"], capsys)
    assert code == 1
    assert "Traceback" in err and "an internal invariant failed" in err
    assert err.splitlines()[-1].startswith("bild-jax generate: internal error: this is a bug in bild-jax")


def test_running_out_of_memory_is_one_line_not_a_bug_report(capsys, monkeypatch):
    def exhausted(args):
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 723000000000 bytes.")

    monkeypatch.setitem(cli.COMMANDS, "generate", exhausted)
    code, err = run_cli(["generate", "--prompt", "x"], capsys)
    assert code == 2 and err.count("\n") == 1 and "out of memory (RuntimeError); lower --max-new-tokens" in err


_VALUES = st.one_of(st.integers(-2 ** 70, 2 ** 70).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr),
                    st.sampled_from(["0", "1", "0.5", "inf", "-0", "1e400", "", " ", "nan", "0x10", "1_000"]),
                    st.text(max_size=4))
_FLAGS = {"generate": ["--fallback", "--rollback", "--max-draft", "--max-new-tokens", "--temperature", "--top-k",
                       "--top-p", "--seed", "--prompt"],
          "sweep": ["--fallbacks", "--rollbacks", "--max-draft", "--max-new-tokens", "--num-prompts"]}


@needs_bundled
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_flags_exit_cleanly(data, capsys, no_compile):
    """Any value for any flag: exit 0, or 2 with one line; never a traceback."""
    command = data.draw(st.sampled_from(sorted(_FLAGS)))
    flags = data.draw(st.dictionaries(st.sampled_from(_FLAGS[command]), _VALUES, max_size=4))
    argv = [command, *(["--prompt", "x"] if command == "generate" and "--prompt" not in flags else [])]
    for flag, value in flags.items():
        argv.append(f"{flag}={value}")  # `=`: values that start with '-' stay values
    code, err = run_cli(argv, capsys)
    assert code in (0, 2), (argv, err)
    assert "Traceback" not in err
    if code == 2:
        assert err.count("\n") == 1, (argv, err)


# --- BiLDConfig and bild_generate: random settings are refused before compiling or run ---

_ANY = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 40, 2 ** 40), st.floats(), st.text(max_size=3),
                 st.integers(-5, 40).map(np.int64), st.floats(-1, 2).map(np.float32), st.lists(st.integers(-2, 200),
                                                                                                  max_size=9))
_FIELDS = ["fallback_threshold", "rollback_threshold", "max_draft", "max_new_tokens", "eos_token_id", "exact",
           "verify_tail", "temperature", "top_k", "top_p", "lookup_tokens"]


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_bild_configs_are_refused_or_run(data, bild_pair, no_compile):
    small, large = bild_pair("llama")
    fields = data.draw(st.dictionaries(st.sampled_from(_FIELDS), _ANY, max_size=4))
    try:
        config = bild_jax.BiLDConfig(**fields)
        out = bild_jax.bild_generate(small, large, [[3, 4, 5]], config, rng=jax.random.key(0))
    except InputError:
        return
    assert out.tokens.shape == (1, config.max_new_tokens)
    for name in ("fallback_threshold", "rollback_threshold", "temperature", "top_p"):
        assert type(getattr(config, name)) is float
    for name in ("max_draft", "max_new_tokens", "top_k", "lookup_tokens"):
        assert type(getattr(config, name)) is int


def test_numpy_ints_are_fine_and_stored_as_ints():
    config = bild_jax.BiLDConfig(max_new_tokens=np.int64(4), max_draft=np.int32(3), top_k=np.int64(2))
    assert config == bild_jax.BiLDConfig(max_new_tokens=4, max_draft=3, top_k=2)
    assert type(config.max_new_tokens) is int and hash(config) == hash(bild_jax.BiLDConfig(max_new_tokens=4,
                                                                                             max_draft=3, top_k=2))
    with pytest.raises(InputError, match="fallback_threshold must be a number, got '0.5'"):
        bild_jax.BiLDConfig(fallback_threshold="0.5")
    with pytest.raises(InputError, match="max_draft must be an int >= 1, got 2.0"):
        bild_jax.BiLDConfig(max_draft=2.0)


# --- silent wrong answers ---

@pytest.mark.parametrize("rows", [[[1, 2.7]], [["1", "2"]], [[1, [2, 3]]], [[True, 1]], [[2 ** 70]]])
def test_ragged_prompts_must_hold_integer_ids(rows):
    with pytest.raises(InputError, match="prompt 0 must hold integer token ids"):
        prepare_prompts(rows, vocab_size=100)


def test_eos_ids_must_be_ints(saved_model):
    model = bild_jax.load_model(saved_model("llama-gqa")[1])
    with pytest.raises(InputError, match="eos_token_id must be an int or a list of ints"):
        bild_jax.greedy_generate(model, [[3]], max_new_tokens=2, eos_token_id=[1.5])


def test_integer_dtypes_are_refused_for_weights(saved_model):
    with pytest.raises(InputError, match="dtype must be one of float32, bfloat16, float16, got int8"):
        bild_jax.load_model(saved_model("llama-gqa")[1], dtype=jnp.int8)


# --- memory: refused before compiling, naming the setting ---

def test_sizes_that_cannot_fit_are_refused_naming_the_setting(bild_pair, saved_model):
    small, large = bild_pair("llama")
    with pytest.raises(InputError, match=r"needs about .* GB \(the large model's 1000001-token pass.*lower max_draft"):
        bild_jax.bild_generate(small, large, [[3, 4]], bild_jax.BiLDConfig(max_new_tokens=4, max_draft=10 ** 6))
    t5 = bild_jax.load_model(saved_model("t5-v1.0")[1])  # no position limit: only memory bounds its length
    with pytest.raises(InputError, match=r"the model's cache \(1000000000 slots per row\).*lower max_new_tokens"):
        bild_jax.greedy_generate(t5, [[3, 4]], max_new_tokens=10 ** 9)


def test_memory_estimate_counts_the_cache_and_scores_exactly(saved_model):
    model = bild_jax.load_model(saved_model("llama-gqa")[1])  # 2 layers, 2 kv heads of 8, 4 heads, vocab 97
    held, transient = memory.model_needs(model, "large", batch=3, prompt_width=8, capacity=50, block_width=11,
                                         block_setting="max_draft")
    assert held[0].nbytes == 2 * 2 * 3 * 2 * 50 * 8 * 4 + 3 * 4  # keys + values of 2 layers, and the lengths
    assert transient[1].nbytes == 4 * 3 * 11 * 4 * (50 + 11)     # scores [B, heads, 11, cache + block] float32


class _Device:
    platform = "gpu"

    def __init__(self, stats):
        self.stats = stats

    def memory_stats(self):
        return self.stats


def test_available_memory_from_device_stats_or_the_host(monkeypatch):
    devices = [_Device({"bytes_limit": 100, "bytes_in_use": 30}), _Device({"bytes_limit": 100, "bytes_in_use": 50})]
    assert memory.available_bytes(devices) == 2 * 50  # a decode splits over the devices: the fullest bounds it
    assert memory.host_available_bytes() > 0
    # A device without stats (CPU) gets the host's figure; fixed here, as other processes move the real one.
    monkeypatch.setattr(memory, "host_available_bytes", lambda: 12345)
    assert memory.available_bytes([_Device(None)]) == 12345
    with pytest.raises(InputError, match=r"about 101 B.* but 100 B is available on gpu; lower max_draft"):
        memory.check_fits([memory.Need("ring", "max_draft", 61)], [memory.Need("block", "max_new_tokens", 40)],
                          [_Device({"bytes_limit": 100, "bytes_in_use": 0})])


def test_cpu_memory_check_reads_meminfo_only_beyond_half_the_free_memory(monkeypatch):
    reads = []
    monkeypatch.setattr(memory, "host_available_bytes", lambda: reads.append(1) or 100)
    cpu = jax.devices("cpu")[:1]
    memory.check_fits([memory.Need("ring", "max_draft", 40)], [], cpu)  # far below half of MemFree: no read
    assert reads == []
    monkeypatch.setattr(memory, "_half_of_free_host_memory", lambda: 30)
    memory.check_fits([memory.Need("ring", "max_draft", 40)], [], cpu)  # beyond it: MemAvailable decides
    assert reads == [1]
    with pytest.raises(InputError, match=r"about 101 B.* but 100 B is available on cpu; lower max_draft"):
        memory.check_fits([memory.Need("ring", "max_draft", 101)], [], cpu)


# --- checkpoints: their code never runs, their files stay in their directory, their errors are one line ---

@pytest.fixture
def llama_dir(saved_model, tmp_path):
    copy = tmp_path / "llama"
    shutil.copytree(saved_model("llama-gqa")[1], copy)
    return copy


def _edit_config(directory, **changes):
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    for key, value in changes.items():
        if value is None:
            config.pop(key)
    (directory / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("changes,message", [
    (dict(vocab_size=None), "config.json has no 'vocab_size'"),
    (dict(num_attention_heads=0), "num_attention_heads must be an int >= 1, got 0"),
    (dict(vocab_size="97"), "vocab_size must be an int >= 1, got '97'"),
    (dict(num_key_value_heads=3), r"num_key_value_heads \(3\) must divide num_attention_heads \(4\)"),
    (dict(rms_norm_eps="small"), "rms_norm_eps must be a finite number > 0"),
    (dict(eos_token_id=1.5), "eos_token_id must be a token id"),
    (dict(model_type=None), "has no model_type"),
])
def test_bad_config_fields_are_named(llama_dir, changes, message):
    _edit_config(llama_dir, **changes)
    with pytest.raises(InputError, match=message):
        bild_jax.load_model(llama_dir)


@pytest.mark.parametrize("weight_map,message", [
    ([], "weight_map must map tensor names to shard file names"),
    ({"model.norm.weight": "../outside.safetensors"}, "names shards outside its directory"),
    ({"model.norm.weight": "/etc/outside.safetensors"}, "names shards outside its directory"),
])
def test_sharded_index_must_stay_in_the_checkpoint(llama_dir, weight_map, message):
    (llama_dir / "model.safetensors").rename(llama_dir.parent / "outside.safetensors")
    (llama_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(InputError, match=message):
        bild_jax.load_model(llama_dir)


@needs_bundled
def test_tokenizer_code_from_a_checkpoint_never_runs(tmp_path):
    model = tmp_path / "model"
    shutil.copytree(BUNDLED_DIR / "small", model)
    ran = tmp_path / "custom-code-ran"
    (model / "custom_tokenizer.py").write_text(f"open({str(ran)!r}, 'w').close()\n"
                                               "from transformers import PreTrainedTokenizerFast as Custom\n")
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="Custom", auto_map={"AutoTokenizer": ["custom_tokenizer.Custom", None]})
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="auto_map in tokenizer_config.json.*never runs a checkpoint's code"):
        bild_jax.load_tokenizer(model)
    assert not ran.exists()


def test_folder_without_a_tokenizer_says_so(llama_dir):
    with pytest.raises(InputError, match=r"has no tokenizer files \(one of tokenizer.json, .*\*.tiktoken\)$"):
        bild_jax.load_tokenizer(llama_dir)


def test_relative_path_typo_is_not_a_hub_download(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda **_: pytest.fail("asked the hub"))
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="^no model directory at models/smal$"):
        bild_jax.load_model("models/smal")


def test_damaged_orbax_checkpoint_is_one_short_line(saved_model, tmp_path):
    model = bild_jax.load_model(saved_model("llama-gqa")[1])
    directory = bild_jax.save_converted(model, tmp_path / "converted")
    chunks = sorted((directory / "params").rglob("d/*"), key=lambda p: p.stat().st_size)
    chunks[-1].write_bytes(chunks[-1].read_bytes()[:40])
    with pytest.raises(InputError, match="the checkpoint is damaged") as error:
        bild_jax.restore_converted(directory)
    message = str(error.value)
    assert "\n" not in message and "TensorStore(" not in message and len(message) < 500


# --- outputs: whole or not at all ---

def test_atomic_write_keeps_the_previous_file_on_failure(tmp_path):
    target = tmp_path / "out.csv"
    target.write_text("previous run")
    with pytest.raises(RuntimeError):
        with atomic.atomic_path(target) as partial:
            partial.write_text("half of a new")
            raise RuntimeError("killed")
    assert target.read_text() == "previous run" and sorted(tmp_path.iterdir()) == [target]
    atomic.write_text_atomic(target, "new run")
    assert target.read_text() == "new run" and sorted(tmp_path.iterdir()) == [target]


def test_interrupt_handler_removes_partial_files(tmp_path):
    with atomic.atomic_path(tmp_path / "out.png") as partial:
        partial.write_text("partial")
        atomic.discard_partial()  # what the Ctrl-C handler does before it ends the process
        assert not partial.exists()
        partial.write_text("whole")
    assert (tmp_path / "out.png").read_text() == "whole"


def test_a_failed_sweep_keeps_the_previous_csv_and_png(tmp_path, monkeypatch):
    from bild_jax.evaluation import SystemRun

    (tmp_path / "sweep.csv").write_text("previous csv")
    (tmp_path / "sweep.png").write_text("previous png")

    def fake_runs(systems, prompts, on_call, batch_shape=None):
        return [SystemRun(name, outputs=[[1, 2]], batch_seconds=[[1.0]]) for name, _ in systems]

    def failing_plot(rows, baseline, recommended, path, max_rouge_loss):
        path.write_text("half a png")
        raise RuntimeError("killed while plotting")

    monkeypatch.setattr(sweep, "run_systems", fake_runs)
    monkeypatch.setattr(sweep, "_plot", failing_plot)
    with pytest.raises(RuntimeError, match="killed while plotting"):
        run_sweep(None, None, [[1]], None, str, [0.5], [2.0], 4, 3, tmp_path)
    assert (tmp_path / "sweep.csv").read_text() == "previous csv"
    assert (tmp_path / "sweep.png").read_text() == "previous png"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.csv", "sweep.png"]
