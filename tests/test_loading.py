"""Checkpoint loading: formats, every error a user can hit, and the orbax fast-reload round trip."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import bild_jax


@pytest.fixture
def llama_dir(saved_model, tmp_path):
    """A private copy of the tiny Llama checkpoint that a test may damage."""
    _, directory = saved_model("llama-gqa")
    copy = tmp_path / "llama"
    shutil.copytree(directory, copy)
    return copy


def _edit_tensors(directory, edit):
    tensors = load_file(directory / "model.safetensors")
    edit(tensors)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


def _edit_config(directory, **changes):
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


def test_sharded_checkpoint_loads_like_a_single_file(saved_model, tmp_path):
    hf_model, directory = saved_model("llama-gqa")
    hf_model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and not (tmp_path / "model.safetensors").exists()
    ids = np.array([[5, 6, 7, 8]])
    sharded = bild_jax.forward_logits(bild_jax.load_model(tmp_path), ids)
    single = bild_jax.forward_logits(bild_jax.load_model(directory), ids)
    np.testing.assert_array_equal(np.asarray(sharded), np.asarray(single))


def test_missing_shard_is_named(saved_model, tmp_path):
    saved_model("llama-gqa")[0].save_pretrained(tmp_path, max_shard_size="20KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        bild_jax.load_model(tmp_path)


def test_missing_tensor_is_named(llama_dir):
    _edit_tensors(llama_dir, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensors for parameters \['layers_1/mlp/up_proj/kernel'\]"):
        bild_jax.load_model(llama_dir)


def test_unexpected_tensor_is_named(llama_dir):
    _edit_tensors(llama_dir, lambda t: t.update({"model.layers.0.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(ValueError, match=r"unexpected tensors \['model.layers.0.extra.weight'\]"):
        bild_jax.load_model(llama_dir)


def test_wrong_shape_is_named(llama_dir):
    _edit_tensors(llama_dir, lambda t: t.update({"model.norm.weight": np.ones(31, np.float32)}))
    with pytest.raises(ValueError, match=r"model.norm.weight: checkpoint \(31,\), model expects \(32,\)"):
        bild_jax.load_model(llama_dir)


def test_pickle_checkpoint_is_refused_with_a_reason(llama_dir):
    (llama_dir / "model.safetensors").rename(llama_dir / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickle checkpoints.*safetensors only.*save_pretrained"):
        bild_jax.load_model(llama_dir)


def test_corrupt_safetensors_is_reported(llama_dir):
    data = (llama_dir / "model.safetensors").read_bytes()
    (llama_dir / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        bild_jax.load_model(llama_dir)


def test_unknown_model_type_lists_supported_ones(llama_dir):
    _edit_config(llama_dir, model_type="bert")
    from bild_jax.models import FAMILIES

    supported = ", ".join(sorted(FAMILIES))
    assert {"gemma", "gemma2", "gemma3_text", "qwen3", "phi3", "bart", "marian"} <= set(FAMILIES)
    with pytest.raises(ValueError, match=f"unsupported model_type 'bert'; supported: {supported}"):
        bild_jax.load_model(llama_dir)


def test_missing_or_broken_config(llama_dir):
    (llama_dir / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        bild_jax.load_model(llama_dir)
    (llama_dir / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        bild_jax.load_model(llama_dir)


def test_unsupported_config_features_raise(llama_dir):
    _edit_config(llama_dir, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0})
    with pytest.raises(NotImplementedError, match="rope type 'yarn' is not supported"):
        bild_jax.load_model(llama_dir)
    _edit_config(llama_dir, model_type="phi3", rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0})
    with pytest.raises(NotImplementedError, match="rope type 'longrope' \\(Phi-3 long-context scaling\\) is not "
                                                  "supported: it switches between two sets of frequencies"):
        bild_jax.load_model(llama_dir)
    _edit_config(llama_dir, rope_parameters={"rope_theta": 10000.0, "partial_rotary_factor": 0.75})
    with pytest.raises(NotImplementedError, match="partial rotary embeddings"):
        bild_jax.load_model(llama_dir)


def test_encoder_decoder_position_limits_and_unsupported_marian_vocabularies(saved_model, tmp_path):
    """BART/Marian encoders and decoders each have max_position_embeddings (64 in the tiny configs)."""
    model = bild_jax.load_model(saved_model("bart")[1])
    with pytest.raises(ValueError, match="a prompt of 65 tokens exceeds the bart model's 64 encoder positions"):
        bild_jax.greedy_generate(model, [[3] * 65], max_new_tokens=4)
    with pytest.raises(ValueError, match="max_new_tokens=65 exceeds the bart model's 64 decoder positions"):
        bild_jax.greedy_generate(model, [[3] * 64], max_new_tokens=65)
    marian_dir = tmp_path / "marian"
    shutil.copytree(saved_model("marian-untied")[1], marian_dir)
    _edit_config(marian_dir, share_encoder_decoder_embeddings=False, decoder_vocab_size=90)
    with pytest.raises(NotImplementedError, match="separate source and target vocabularies"):
        bild_jax.load_model(marian_dir)


def test_bad_paths_and_offline_hub_ids(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no model directory at"):
        bild_jax.load_model(str(tmp_path / "absent"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        bild_jax.load_model(tmp_path / "file")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="could not get 'someone/not-cached-model' from the Hugging Face Hub"):
        bild_jax.load_model("someone/not-cached-model")


def test_orbax_round_trip_restores_identical_params(saved_model, tmp_path):
    import jax.numpy as jnp

    for name in ("llama-gqa", "t5-v1.0"):
        model = bild_jax.load_model(saved_model(name)[1], dtype=jnp.bfloat16)
        restored = bild_jax.restore_converted(bild_jax.save_converted(model, tmp_path / name))
        assert restored.config == model.config
        import jax

        same = jax.tree_util.tree_map(lambda a, b: a.dtype == b.dtype and bool((a == b).all()),
                                      model.params, restored.params)
        assert all(jax.tree_util.tree_leaves(same))


def test_orbax_restore_errors(saved_model, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a bild-jax converted checkpoint"):
        bild_jax.restore_converted(tmp_path)
    model = bild_jax.load_model(saved_model("llama-gqa")[1])
    directory = bild_jax.save_converted(model, tmp_path / "ok")
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        bild_jax.save_converted(model, directory)
    config = json.loads((directory / "bild_config.json").read_text())
    config["num_layers"] = 3
    (directory / "bild_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="do not match its config"):
        bild_jax.restore_converted(directory)


def test_greedy_input_errors(saved_model):
    model = bild_jax.load_model(saved_model("llama-gqa")[1])
    with pytest.raises(ValueError, match=r"empty prompt in row\(s\) \[1\]"):
        bild_jax.greedy_generate(model, [[3], []], max_new_tokens=4)
    with pytest.raises(ValueError, match=r"token ids \[97\] are outside the vocabulary \[0, 97\)"):
        bild_jax.greedy_generate(model, [[3, 97]], max_new_tokens=4)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive int"):
        bild_jax.greedy_generate(model, [[3]], max_new_tokens=0)
    with pytest.raises(ValueError, match="a prompt of 100 tokens plus max_new_tokens=40 exceeds the llama model's 128"):
        bild_jax.greedy_generate(model, [[3] * 100], max_new_tokens=40)
    with pytest.raises(ValueError, match=r"attention_mask shape \(1, 2\) does not match input_ids shape \(1, 3\)"):
        bild_jax.greedy_generate(model, np.array([[3, 4, 5]]), max_new_tokens=4, attention_mask=np.ones((1, 2)))
    with pytest.raises(ValueError, match="must be \\[B, T\\] or a list of token lists"):
        bild_jax.greedy_generate(model, np.zeros((1, 2, 3), np.int32), max_new_tokens=4)


def test_padded_ids_with_attention_mask_equal_ragged_lists(saved_model):
    """Left-padded ids + mask, right-padded ids + mask and ragged lists give the same generations."""
    model = bild_jax.load_model(saved_model("llama-gqa")[1])
    ragged = [[5, 6, 7], [8, 9, 10, 11, 12]]
    left = np.array([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    left_mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    right = np.array([[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]])
    expected = bild_jax.greedy_generate(model, ragged, max_new_tokens=6, eos_token_id=[])
    for ids, mask in ((left, left_mask), (right, left_mask[:, ::-1])):
        out = bild_jax.greedy_generate(model, ids, max_new_tokens=6, attention_mask=mask, eos_token_id=[])
        np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(expected.tokens))


def test_older_hub_configs_without_layer_types():
    """Configs written before transformers v5 (no `layer_types`, Gemma 3's `rope_local_base_freq`): the
    sliding layers and RoPE bases follow each family's rule, as HF derives them."""
    from bild_jax.models.llama import LlamaConfig

    base = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=4, head_dim=8)
    gemma3 = LlamaConfig.from_hf(dict(base, model_type="gemma3_text", num_hidden_layers=7, sliding_window=512,
                                      sliding_window_pattern=6, rope_theta=1000000.0, rope_local_base_freq=10000.0,
                                      rope_scaling={"rope_type": "linear", "factor": 8.0}, query_pre_attn_scalar=256))
    assert gemma3.sliding_layers == (True, True, True, True, True, False, True)
    assert (gemma3.rope_theta, gemma3.local_rope_theta) == (1000000.0, 10000.0)
    assert dict(gemma3.rope_scaling) == {"rope_type": "linear", "factor": 8.0}
    assert gemma3.attention_scale == 256 ** -0.5 and gemma3.qk_norm and gemma3.sandwich_norms
    gemma2 = LlamaConfig.from_hf(dict(base, model_type="gemma2", num_hidden_layers=4, sliding_window=4096,
                                      attn_logit_softcapping=50.0, final_logit_softcapping=30.0, hidden_act="gelu"))
    assert gemma2.sliding_layers == (True, False, True, False) and gemma2.tie_word_embeddings
    assert (gemma2.attn_softcap, gemma2.final_softcap, gemma2.hidden_act) == (50.0, 30.0, "gelu_pytorch_tanh")
    qwen2 = dict(base, model_type="qwen2", num_hidden_layers=4, sliding_window=4096, max_window_layers=2)
    assert LlamaConfig.from_hf(qwen2).sliding_window is None  # use_sliding_window defaults to False
    assert LlamaConfig.from_hf(dict(qwen2, use_sliding_window=True)).sliding_layers == (False, False, True, True)
