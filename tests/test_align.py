"""`bild-jax align`, `bild-jax tune` and pair profiles on tiny random pairs (tests/experiment_fixtures.py)."""

from __future__ import annotations

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import bild_jax
from bild_jax import cli
from bild_jax.align import Distillation, agreement, align, large_outputs, training_arrays
from bild_jax.finetune import fine_tune
from bild_jax.hub import SMALL_MODEL_DTYPE
from bild_jax.profile import PROFILE_FILE, PairProfile, find_profile, read_profile, write_profile
from bild_jax.prompt_sources import prompt_windows, read_texts

SHORT = ["--max-new-tokens", "8"]
# One BiLD program serves every test here: the Llama pair, prompt bucket 8, 8 new tokens, max_draft 10.
ALIGN_FLAGS = ["--num-prompts", "40", "--prompt-tokens", "8", *SHORT, "--eval-prompts", "4", "--steps", "30",
               "--batch-size", "8", "--lr", "1e-2"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    from experiment_fixtures import fixture_texts, save_pairs

    root = tmp_path_factory.mktemp("align")
    saved = save_pairs(root)
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"text": text}) + "\n" for text in fixture_texts()))
    return saved, data, root


@pytest.fixture(scope="module")
def aligned_llama(pairs):
    """`bild-jax align` run end to end on the Llama pair: (small dir, large dir, output dir, printed text)."""
    saved, data, root = pairs
    out = root / "llama-aligned"
    small, large = saved["llama"]["small"], saved["llama"]["large"]
    code = cli.main(["align", "--small", str(small), "--large", str(large), "--data", str(data), "--out", str(out),
                     *ALIGN_FLAGS])
    assert code == 0
    return small, large, out


def test_align_cli_distils_lowers_the_loss_and_reports(aligned_llama, capsys):
    small, large, out = aligned_llama
    report = json.loads((out / "alignment" / "report.json").read_text())
    history = json.loads((out / "alignment" / "history.json").read_text())
    assert [step for step, _ in history] == [10, 20, 30] and history[-1][1] < history[0][1]
    assert report["agreement_after"] > report["agreement_before"]
    assert report["speedup_before"] > 0 and report["speedup_after"] > 0 and report["profile"] is None
    # The training targets are the large model's greedy outputs of the prompts.
    data = Distillation.load(out / "alignment" / "distillation.npz")
    assert len(data) == 40 and report["train_prompts"] == 36
    expected = bild_jax.greedy_generate(bild_jax.load_model(large), data.prompt_lists()[:3], max_new_tokens=8)
    np.testing.assert_array_equal(data.outputs[:3], np.asarray(expected.tokens))
    np.testing.assert_array_equal(data.output_lengths[:3], np.asarray(expected.lengths))
    # Same settings again: nothing left to train, the data is reused; other settings: a clear error.
    assert cli.main(["align", "--small", str(small), "--large", str(large), "--data", str(data_path(out)),
                     "--out", str(out), *ALIGN_FLAGS, "--no-timing"]) == 0
    assert "resumed from step 30" in capsys.readouterr().out
    assert cli.main(["align", "--small", str(small), "--large", str(large), "--data", str(data_path(out)),
                     "--out", str(out), *ALIGN_FLAGS[:-2], "--lr", "1e-3"]) == 2
    assert "other settings (lr)" in capsys.readouterr().err


def data_path(out):
    return out.parent / "data.jsonl"


def test_aligned_directory_loads_in_bild_jax_and_transformers_with_the_same_logits(aligned_llama):
    from transformers import AutoModelForCausalLM

    small, _, out = aligned_llama
    aligned, original = bild_jax.load_model(out), bild_jax.load_model(small)
    ids = [[5, 17, 42, 99, 3, 250, 7]]
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        reference = hf(torch.tensor(ids)).logits.numpy()
    logits = np.asarray(bild_jax.forward_logits(aligned, ids))
    np.testing.assert_allclose(logits, reference, atol=1e-4, rtol=0)
    assert np.abs(logits - np.asarray(bild_jax.forward_logits(original, ids))).max() > 1e-2  # it was trained
    assert bild_jax.load_tokenizer(out).get_vocab() == bild_jax.load_tokenizer(small).get_vocab()
    assert not (out / PROFILE_FILE).exists()


def test_t5_alignment_writes_a_seq2seq_checkpoint(pairs):
    from transformers import AutoModelForSeq2SeqLM

    saved, data, root = pairs
    small_dir, large_dir = saved["t5"]["small"], saved["t5"]["large"]
    tokenizer = bild_jax.load_tokenizer(large_dir)
    prompts = prompt_windows(tokenizer, read_texts(data), prompt_tokens=12, count=24)
    out = root / "t5-aligned"
    report = align(small_dir, large_dir, prompts, out, eval_prompts=4, steps=20, batch_size=8, lr=1e-2,
                   max_new_tokens=8, measure_speed=False)
    history = json.loads((out / "alignment" / "history.json").read_text())
    assert history[-1][1] < history[0][1] and report["agreement_after"] > report["agreement_before"]
    aligned = bild_jax.load_model(out)
    held_out = Distillation.load(out / "alignment" / "distillation.npz").rows(slice(20, None))
    assert agreement(aligned, bild_jax.load_model(large_dir), held_out) == report["agreement_after"]
    hf = AutoModelForSeq2SeqLM.from_pretrained(out, dtype=torch.float32).eval()
    encoder, decoder = [prompts[0]], [[0, 9, 33, 4]]
    with torch.no_grad():
        reference = hf(input_ids=torch.tensor(encoder), decoder_input_ids=torch.tensor(decoder)).logits.numpy()
    np.testing.assert_allclose(np.asarray(bild_jax.forward_logits(aligned, encoder, decoder)), reference,
                               atol=1e-4, rtol=0)


def test_training_arrays_put_loss_only_on_the_large_models_tokens():
    data = Distillation(prompts=np.array([[5, 6, 7], [8, 0, 0]], np.int32), prompt_lengths=np.array([3, 1], np.int32),
                        outputs=np.array([[1, 2], [3, 0]], np.int32), output_lengths=np.array([2, 1], np.int32))

    class DecoderOnly:
        is_encoder_decoder = False

    arrays = training_arrays(data, DecoderOnly())
    np.testing.assert_array_equal(arrays["tokens"], [[5, 6, 7, 1, 2], [8, 3, 0, 0, 0]])
    # weights[t] is 1 where tokens[t + 1] is an output token.
    np.testing.assert_array_equal(arrays["weights"], [[0, 0, 1, 1], [1, 0, 0, 0]])

    class EncoderDecoder:
        is_encoder_decoder = True

        class config:
            decoder_start_token_id = 0

    arrays = training_arrays(data, EncoderDecoder())
    np.testing.assert_array_equal(arrays["decoder_input_ids"], [[0, 1], [0, 3]])
    np.testing.assert_array_equal(arrays["targets"], [[1, 2], [3, 0]])
    np.testing.assert_array_equal(arrays["weights"], [[1, 1], [1, 0]])
    np.testing.assert_array_equal(arrays["attention_mask"], [[1, 1, 1], [1, 0, 0]])


def test_interrupted_fine_tuning_resumes_into_the_same_run(tmp_path, capsys):
    target = jnp.arange(4, dtype=jnp.float32)
    batches = [jnp.full((4,), 0.1 * step) + target for step in range(6)]

    def loss(params, batch):
        return jnp.sum((params["w"] - batch) ** 2)

    def interrupted(step):
        if step == 3:
            raise KeyboardInterrupt
        return batches[step]

    start = {"w": jnp.zeros(4)}
    whole, whole_history = fine_tune(loss, start, batches.__getitem__, 6, 0.1, tmp_path / "a", 4, save_every=2)
    with pytest.raises(KeyboardInterrupt):
        fine_tune(loss, start, interrupted, 6, 0.1, tmp_path / "b", 4, save_every=2)
    capsys.readouterr()
    resumed, history = fine_tune(loss, start, batches.__getitem__, 6, 0.1, tmp_path / "b", 4, save_every=2)
    assert "resumed from step 2" in capsys.readouterr().out  # the last checkpoint before the interruption
    np.testing.assert_array_equal(np.asarray(resumed["w"]), np.asarray(whole["w"]))
    assert history == whole_history and [step for step, _ in history] == [6]
    assert not np.array_equal(np.asarray(whole["w"]), np.zeros(4))


def test_large_outputs_are_sampled_per_row_independently_of_the_batch(pairs):
    saved, _, _ = pairs
    large = bild_jax.load_model(saved["llama"]["large"])
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]
    whole = large_outputs(large, prompts, 6, batch_size=4, temperature=1.0, seed=3)
    pieces = large_outputs(large, prompts, 6, batch_size=3, temperature=1.0, seed=3)
    np.testing.assert_array_equal(whole.outputs, pieces.outputs)
    other_seed = large_outputs(large, prompts, 6, batch_size=4, temperature=1.0, seed=4)
    assert not np.array_equal(whole.outputs, other_seed.outputs)


def test_prompt_sources_read_files_and_cut_windows(tmp_path):
    (tmp_path / "a.txt").write_text("first line\n\nsecond line\n")
    assert read_texts(tmp_path / "a.txt") == ["first line", "second line"]
    (tmp_path / "b.jsonl").write_text('{"id": 1, "prompt": "x y"}\n{"id": 2, "prompt": "z"}\n')
    assert read_texts(tmp_path / "b.jsonl") == ["x y", "z"]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["p", "q"], "n": [1, 2]}), tmp_path / "c.parquet")
    assert read_texts(tmp_path / "c.parquet", text_field="body") == ["p", "q"]
    with pytest.raises(ValueError, match="has no field one of text, prompt"):
        read_texts(tmp_path / "c.parquet")
    with pytest.raises(FileNotFoundError, match="no data file at ./missing.jsonl"):
        read_texts("./missing.jsonl")

    class Tokenizer:
        def __call__(self, texts):
            return {"input_ids": [list(range(len(t))) for t in texts]}

    windows = prompt_windows(Tokenizer(), ["a" * 7, "b" * 2], prompt_tokens=3, count=10)
    assert windows == [[0, 1, 2], [3, 4, 5], [0, 1]]  # the partial window [6] is dropped
    assert len(prompt_windows(Tokenizer(), ["a" * 30], prompt_tokens=3, count=4)) == 4


def test_a_datasets_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(OSError, match="could not load the dataset 'nobody/no-such-set'.*local .txt, .jsonl"):
        read_texts("nobody/no-such-set")


def _profile(**changes) -> PairProfile:
    fields = dict(fallback_threshold=0.3, rollback_threshold=3.0, max_draft=10, speedup=1.5,
                  quality={"metric": "ROUGE-L"}, measured_on={"large": "L"})
    return PairProfile(**{**fields, **changes})


def test_profile_round_trip_and_broken_profiles(tmp_path):
    path = write_profile(_profile(rollback_threshold=float("inf")), tmp_path)
    assert path == tmp_path / PROFILE_FILE and read_profile(tmp_path) == read_profile(path)
    config = bild_jax.BiLDConfig.from_profile(path, max_new_tokens=5, exact=True)
    assert (config.fallback_threshold, config.rollback_threshold, config.max_draft) == (0.3, float("inf"), 10)
    assert config.max_new_tokens == 5 and config.exact
    broken = {"not json": "{", "a list": "[]", "no format": json.dumps({"max_draft": 3})}
    good = json.loads(path.read_text())
    broken["missing max_draft"] = json.dumps({k: v for k, v in good.items() if k != "max_draft"})
    broken["fallback out of range"] = json.dumps({**good, "fallback_threshold": 2})
    broken["max_draft a string"] = json.dumps({**good, "max_draft": "10"})
    messages = {"not json": "not JSON", "a list": "expected a JSON object", "no format": "format is None",
                "missing max_draft": "missing max_draft", "fallback out of range": "fallback_threshold must be in",
                "max_draft a string": "max_draft must be an int"}
    for name, text in broken.items():
        path.write_text(text)
        with pytest.raises(ValueError) as error:
            read_profile(path)
        assert str(error.value).startswith(f"{path} is not a valid pair profile") and "\n" not in str(error.value)
        assert messages[name] in str(error.value)


def _generate(small, large, *flags, capsys):
    assert cli.main(["generate", "--small", str(small), "--large", str(large), "--prompt", "the quick", *SHORT,
                     "--json", *flags]) == 0
    captured = capsys.readouterr()
    return json.loads(captured.out)["tokens"], captured.err


def test_generate_uses_the_profile_and_says_so_unless_thresholds_are_given(aligned_llama, tmp_path, capsys):
    small_dir, large_dir, _ = aligned_llama
    small = tmp_path / "small"
    shutil.copytree(small_dir, small)
    write_profile(_profile(fallback_threshold=0.9, rollback_threshold=0.5), small)
    models = bild_jax.load_model(small), bild_jax.load_model(large_dir)
    ids = [bild_jax.load_tokenizer(small)("the quick")["input_ids"]]

    def expected(**settings):
        out = bild_jax.bild_generate(*models, ids, bild_jax.BiLDConfig(max_new_tokens=8, **settings))
        return [int(t) for t in out.tokens[0, :int(out.lengths[0])]]

    tokens, said = _generate(small, large_dir, capsys=capsys)
    assert tokens == expected(fallback_threshold=0.9, rollback_threshold=0.5)
    assert f"using the pair profile {small / PROFILE_FILE}" in said and "fallback 0.9, rollback 0.5" in said
    tokens, said = _generate(small, large_dir, "--rollback", "inf", capsys=capsys)
    assert tokens == expected(fallback_threshold=0.9, rollback_threshold=float("inf"))
    assert "given on the command line: rollback_threshold inf" in said
    tokens, said = _generate(small, large_dir, "--fallback", "0.1", "--rollback", "5", "--max-draft", "10",
                             capsys=capsys)
    assert tokens == expected(fallback_threshold=0.1, rollback_threshold=5.0) and said == ""
    tokens, said = _generate(small, large_dir, "--no-profile", capsys=capsys)
    assert tokens == expected() and said == ""
    (small / PROFILE_FILE).write_text("{")
    assert cli.main(["generate", "--small", str(small), "--large", str(large_dir), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a valid pair profile: not JSON" in err


def test_tune_writes_a_profile_that_generate_then_uses(aligned_llama, tmp_path, capsys):
    _, large_dir, out = aligned_llama
    small = tmp_path / "tuned"
    shutil.copytree(out, small, ignore=shutil.ignore_patterns("alignment"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the quick\ndef main\nimport os\nclass A\n")
    assert cli.main(["tune", "--small", str(small), "--large", str(large_dir), "--prompts", str(prompts), *SHORT,
                     "--fallbacks", "0.5,0.9", "--rollbacks", "2,inf", "--max-rouge-loss", "100",
                     "--sweep-out", str(tmp_path / "sweep")]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {small / PROFILE_FILE}" in printed and "resamples of the 4 prompts" in printed
    profile = read_profile(find_profile(small))
    assert ("BiLD is slower than the large model alone" in printed) == (profile.speedup < 1)
    rows = list(csv_rows(tmp_path / "sweep" / "sweep.csv"))
    fastest = max(rows, key=lambda r: float(r["speedup"]))  # every point is within a 100-point loss
    assert (profile.fallback_threshold, profile.rollback_threshold) == (float(fastest["fallback"]),
                                                                        float(fastest["rollback"]))
    assert profile.max_draft == 10 and profile.speedup == pytest.approx(float(fastest["speedup"]))
    assert profile.quality["reference"] == "large model output" and profile.quality["large"] == 100.0
    assert 0 <= profile.quality["stability"] <= profile.quality["near_best"] <= 1
    assert profile.measured_on["num_prompts"] == 4
    assert profile.measured_on["large"] == str(large_dir)
    assert profile.measured_on["small_dtype"] == SMALL_MODEL_DTYPE  # tuned as generate loads it
    _, said = _generate(small, large_dir, capsys=capsys)
    assert "using the pair profile" in said


def csv_rows(path):
    import csv

    with path.open() as handle:
        yield from csv.DictReader(handle)


def test_tune_without_a_point_within_the_loss_writes_no_profile(aligned_llama, tmp_path, capsys):
    small_dir, large_dir, _ = aligned_llama
    small = tmp_path / "small"
    shutil.copytree(small_dir, small)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the quick\ndef main\n")
    assert cli.main(["tune", "--small", str(small), "--large", str(large_dir), "--prompts", str(prompts), *SHORT,
                     "--fallbacks", "0", "--rollbacks", "inf", "--max-rouge-loss", "-1",
                     "--sweep-out", str(tmp_path / "sweep")]) == 2
    assert "no grid point is within -1 ROUGE-L" in capsys.readouterr().err
    assert find_profile(small) is None


def test_agreement_counts_matching_argmaxes_on_the_large_models_tokens(pairs):
    saved, _, _ = pairs
    small, large = (bild_jax.load_model(saved["llama"][role]) for role in ("small", "large"))
    prompts = [[5, 6, 7], [8, 9]]
    data = large_outputs(large, prompts, 8)
    assert agreement(large, large, data) == 1.0
    same = total = 0
    for prompt, output in zip(prompts, data.outputs):
        tokens = [prompt + output.tolist()]  # no EOS in these outputs: every row runs 8 tokens
        predicted = [np.asarray(bild_jax.forward_logits(m, tokens))[0, len(prompt) - 1:-1].argmax(-1)
                     for m in (small, large)]
        same, total = same + int((predicted[0] == predicted[1]).sum()), total + len(output)
    assert data.output_lengths.tolist() == [8, 8]
    assert agreement(small, large, data) == pytest.approx(same / total) and 0 < same < total


def test_choice_spread_over_resampled_prompts():
    from bild_jax.evaluation import SystemRun
    from bild_jax.tune import choice_spread

    outputs = [[1, 2], [3, 4], [5, 6], [7, 8]]
    references = ["1 2", "3 4", "5 6", "7 8"]
    large = SystemRun("large", outputs=outputs, batch_seconds=[[1.0] * 4])
    twice = SystemRun("BiLD", outputs=outputs, batch_seconds=[[0.5] * 4])                 # 2x, no loss
    thrice_wrong = SystemRun("BiLD", outputs=[[9]] * 4, batch_seconds=[[1 / 3] * 4])      # 3x, ROUGE-L 0
    decode = lambda ids: " ".join(map(str, ids))  # noqa: E731
    spread = choice_spread([large, twice, thrice_wrong], references, decode, max_rouge_loss=1.0, picked=0)
    assert spread == {"stability": 1.0, "near_best": 1.0, "speedup": [2.0, 2.0], "rouge_l_loss": [0.0, 0.0]}
    spread = choice_spread([large, twice, thrice_wrong], references, decode, max_rouge_loss=100.0, picked=0)
    assert spread["stability"] == spread["near_best"] == 0.0  # 2x is not within 95% of 3x
