"""Sharded decoding on 8 host CPU devices equals single-device decoding; meshes, rules and errors."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from bild_jax import sharding

MESHES = ("8x1", "1x8", "2x4", "4x2")
# T5 runs on two of them: 8x1 splits rows only, 4x2 rows, heads and MLP; the four meshes' other cases (a model
# axis that does not divide the heads, key/value heads replicated) are Llama's.
T5_MESHES = ("8x1", "4x2")


@pytest.fixture(scope="module")
def summary(bild_pair, tmp_path_factory):
    """The merged JSON summaries of tests/sharding_check.py with 8 host devices, in two processes of about
    equal work (XLA compiles on one core, so two processes halve the time on two)."""
    pairs = {kind: tuple(model.replace(params=jax.tree_util.tree_map(np.asarray, model.params))
                         for model in bild_pair(kind)) for kind in ("llama", "t5", "mixed", "gemma3", "bart")}
    pairs_file = tmp_path_factory.mktemp("sharding") / "pairs.pkl"
    pairs_file.write_bytes(pickle.dumps(pairs))
    # conftest's compile-time flags come along in XLA_FLAGS.
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags)
    script = str(Path(__file__).with_name("sharding_check.py"))
    # Each new family's pair runs on one mesh, both with T5 (Llama's process has the four meshes and the
    # extras), which keeps the two processes' work about equal.
    processes = (["t5", "--meshes", ",".join(T5_MESHES), "--one-mesh", "gemma3", "--one-mesh", "bart"],
                 ["llama", "--extras"])
    runs = [subprocess.Popen([sys.executable, script, str(pairs_file), *args], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for args in processes]
    summary = {}
    for run in runs:
        stdout, stderr = run.communicate(timeout=600)
        assert run.returncode == 0, stderr[-4000:]
        summary.update(json.loads(stdout.strip().splitlines()[-1]))
    return summary


@pytest.mark.parametrize("kind, mesh", [("llama", mesh) for mesh in MESHES] + [("t5", mesh) for mesh in T5_MESHES])
def test_sharded_output_equals_single_device(summary, kind, mesh):
    assert summary["devices"] == 8
    result = summary[kind][mesh]
    assert result["greedy_equal"], result
    assert result["bild_equal"], result


def test_new_decoder_family_sharded_equals_single_device(summary):
    """Gemma 3 (sliding-window layers, q/k norms) on a 4 x 2 mesh: both head kinds and the cache split."""
    result = summary["gemma3"]["4x2"]
    assert result["greedy_equal"] and result["bild_equal"], result
    assert result["params"] == {"heads": [None, "model"], "kv_heads": [None, "model"], "mlp": ["model", None]}
    assert result["cache_keys"] == ["data", "model", None, None]
    assert not result["warnings"]


def test_new_encoder_decoder_family_sharded_equals_single_device(summary):
    """BART (4 encoder and 2 decoder heads, 64 and 48 MLP units) on a 4 x 2 mesh: heads, MLP and rows split."""
    result = summary["bart"]["4x2"]
    assert result["greedy_equal"] and result["bild_equal"], result
    assert result["params"] == {"heads": ["model", None], "mlp": [None, "model"]}
    assert not result["warnings"]


@pytest.mark.parametrize("kind", ["llama", "t5", "gemma3", "bart"])
def test_reference_bild_run_uses_both_models(summary, kind):
    """Equality only means something if the BiLD runs draft, fall back and roll back."""
    stats = summary[kind]["reference_stats"]
    assert stats["small_tokens"] > 0 and stats["large_calls"] > 8 and stats["rollbacks"] > 0, stats


def test_params_and_caches_are_split_as_the_rules_say(summary):
    llama, t5 = summary["llama"], summary["t5"]
    # 4 heads and 2 kv heads over 4-way model axis: q split, k/v (and the cache's heads) replicated.
    assert llama["2x4"]["params"] == {"heads": [None, "model"], "kv_heads": [None, None], "mlp": ["model", None]}
    assert llama["2x4"]["cache_keys"] == ["data", None, None, None]  # [B, heads, S, D]
    assert llama["4x2"]["params"]["kv_heads"] == [None, "model"]
    assert llama["4x2"]["cache_keys"] == ["data", "model", None, None]
    assert llama["8x1"]["params"]["heads"] == [None, None]
    assert llama["8x1"]["cache_keys"] == ["data", None, None, None]
    assert t5["4x2"]["params"] == {"heads": ["model", None], "mlp": [None, "model"]}


def test_non_divisible_model_axis_falls_back_with_a_warning_or_raises_when_strict(summary):
    warned = " ".join(summary["llama"]["1x8"]["warnings"])
    assert "does not divide the 4 attention heads" in warned and "replicated" in warned
    assert "does not divide the 2 key/value heads" in warned
    assert summary["llama"]["1x8"]["params"]["mlp"] == ["model", None]  # 64 hidden units do split 8 ways
    assert not summary["llama"]["4x2"]["warnings"]
    assert "does not divide the 4 attention heads" in summary["strict_error"]


def test_models_with_different_rules_decode_together(summary):
    assert summary["mixed_rules_equal"]


def test_gpt2_small_model_sharded_equals_single_device(summary):
    assert summary["gpt2_small_equal"]


@pytest.mark.parametrize("name", ["llama-gqa", "qwen2-bias", "gemma3-untied", "phi3", "gpt2", "t5-v1.0", "t5-v1.1",
                                  "bart"])
def test_rules_name_parameters_of_each_family(name):
    """With every logical axis split: which parameters each family's rules match, and at which dimension."""
    import transformers
    from flax import traverse_util

    from bild_jax.model import Model, param_shapes
    from bild_jax.models import family_for
    from tiny_models import TINY_CONFIGS

    config_class, _, kwargs = TINY_CONFIGS[name]
    hf = getattr(transformers, config_class)(**kwargs).to_dict()
    family = family_for(hf["model_type"])
    config = family.config_class.from_hf(hf)
    params = traverse_util.unflatten_dict({path: jax.ShapeDtypeStruct(shape, np.float32)
                                           for path, shape in param_shapes(family, config).items()})
    specs = sharding._param_specs(Model(config=config, params=params),
                                  {"heads": "model", "kv_heads": "model", "mlp": "model"})
    split = {"/".join(path): tuple(spec) for path, spec in traverse_util.flatten_dict(
        specs, is_leaf=lambda _, x: isinstance(x, jax.sharding.PartitionSpec)).items() if any(spec)}
    layer = {"llama-gqa": "layers_0/", "qwen2-bias": "layers_0/", "gemma3-untied": "layers_0/", "phi3": "layers_0/",
             "gpt2": "h_0/",
             "t5-v1.0": "decoder/block_0/", "t5-v1.1": "decoder/block_0/", "bart": "decoder/layers_0/"}[name]
    expected = {
        "llama-gqa": {"self_attn/q_proj/kernel": (None, "model"), "self_attn/k_proj/kernel": (None, "model"),
                      "self_attn/v_proj/kernel": (None, "model"), "self_attn/o_proj/kernel": ("model", None),
                      "mlp/gate_proj/kernel": (None, "model"), "mlp/up_proj/kernel": (None, "model"),
                      "mlp/down_proj/kernel": ("model", None)},
        "gpt2": {"attn/c_proj/kernel": ("model", None), "mlp/c_fc/kernel": (None, "model"),
                 "mlp/c_fc/bias": ("model",), "mlp/c_proj/kernel": ("model", None)},
        "t5-v1.0": {f"layer_{i}/{a}/{p}/kernel": spec for i, a in ((0, "SelfAttention"), (1, "EncDecAttention"))
                    for p, spec in (("q", (None, "model")), ("k", (None, "model")), ("v", (None, "model")),
                                    ("o", ("model", None)))}
                   | {"layer_0/SelfAttention/relative_attention_bias/embedding": (None, "model"),
                      "layer_2/DenseReluDense/wi/kernel": (None, "model"),
                      "layer_2/DenseReluDense/wo/kernel": ("model", None)},
    }
    expected["qwen2-bias"] = expected["llama-gqa"] | {f"self_attn/{p}_proj/bias": ("model",) for p in "qkv"}
    expected["bart"] = {f"{a}/{p}_proj/{leaf}": spec for a in ("self_attn", "encoder_attn") for p in "qkv"
                        for leaf, spec in (("kernel", (None, "model")), ("bias", ("model",)))} | {
        "self_attn/out_proj/kernel": ("model", None), "encoder_attn/out_proj/kernel": ("model", None),
        "fc1/kernel": (None, "model"), "fc1/bias": ("model",), "fc2/kernel": ("model", None)}
    expected["gemma3-untied"] = expected["phi3"] = expected["llama-gqa"]  # q/k and sandwich norms replicated
    expected["t5-v1.1"] = {k: v for k, v in expected["t5-v1.0"].items() if "/wi/" not in k} | {
        "layer_2/DenseReluDense/wi_0/kernel": (None, "model"), "layer_2/DenseReluDense/wi_1/kernel": (None, "model")}
    assert {k.removeprefix(layer): v for k, v in split.items() if k.startswith(layer)} == expected[name]
    replicated = ("embed_tokens/", "embed_positions/", "wte/", "wpe/", "shared/", "lm_head/", "norm", "ln_",
                  "c_attn/", "final_logits_bias")
    assert not [k for k in split if any(part in k for part in replicated)]


def test_make_mesh_errors():
    with pytest.raises(ValueError, match="needs 8 devices but 1 are given"):
        sharding.make_mesh({"data": 2, "model": 4})
    with pytest.raises(ValueError, match="int sizes"):
        sharding.make_mesh({"data": 0})
    with pytest.raises(TypeError, match="jax.sharding.Mesh or a dict"):
        sharding.make_mesh((2, 4))


def test_one_device_mesh_changes_nothing(bild_pair):
    import bild_jax

    small, large = bild_pair("llama")
    prompts = [[5, 6, 7], [8, 9]]
    mesh = {"data": 1, "model": 1}
    np.testing.assert_array_equal(
        np.asarray(bild_jax.greedy_generate(large, prompts, 4, eos_token_id=[], mesh=mesh).tokens),
        np.asarray(bild_jax.greedy_generate(large, prompts, 4, eos_token_id=[]).tokens))
    with pytest.raises(ValueError, match="another mesh"):
        other = sharding.make_mesh({"model": 1})
        bild_jax.bild_generate(sharding.shard_params(small, other), large, prompts, mesh=mesh)
