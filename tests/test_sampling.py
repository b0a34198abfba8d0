"""Sampling: logit processing against numpy, sample_generate and BiLD sampling end to end (reproducibility,
batching, key plumbing, greedy as the temperature -> 0 limit), and the distribution of exact speculative
sampling against the large model's own, with a chi-square test."""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy import stats

import bild_jax
from bild_jax import bild, generate, sampling
from conftest import _perturbed
from bild_jax.bild import BiLDConfig, bild_generate
from bild_jax.schedule import BatchSchedule
from bild_jax.models.llama import LlamaConfig, LlamaForCausalLM

N = 16  # as in test_bild, so that the suite shares compiled programs
# Significance level of the chi-square tests: a correct sampler fails one with this probability. The seeds
# are fixed, so a run is deterministic for a given JAX version and backend; new random bits are a new draw.
SIGNIFICANCE = 1e-3


def _prompts(vocab: int, lengths=(3, 9, 1, 6), seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, size=n).tolist() for n in lengths]


# --- processing -------------------------------------------------------------------------------------------

def _reference_keep(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> tuple[np.ndarray, float]:
    """numpy float64 top-k then top-p masks of one row [V]: (True where a token may be sampled, distance of
    top_p from the nearest cumulative mass, where float32 and float64 sums may disagree)."""
    scaled = logits.astype(np.float64) / temperature
    keep = np.ones(scaled.shape, bool)
    if top_k:
        keep &= scaled >= np.sort(scaled)[::-1][min(top_k, scaled.size) - 1]
    if top_p == 1:
        return keep, np.inf
    probs = np.where(keep, np.exp(scaled - scaled.max()), 0.0)
    probs /= probs.sum()
    order = np.argsort(-scaled, kind="stable")
    mass_before = np.cumsum(probs[order]) - probs[order]
    keep[order[mass_before >= top_p]] = False
    return keep, float(np.abs(mass_before - top_p).min())


_process = jax.jit(sampling.process_logits)


@settings(max_examples=40, deadline=None)
@given(temperature=st.floats(0.05, 5.0), top_k=st.integers(0, 40), top_p=st.floats(0.01, 1.0),
       seed=st.integers(0, 2 ** 16))
def test_top_k_top_p_match_numpy(temperature, top_k, top_p, seed):
    logits = np.random.default_rng(seed).normal(0, 3, size=(5, 32)).astype(np.float32)
    params = sampling.SamplingParams.create(temperature, top_k, top_p)
    out = np.asarray(_process(jnp.asarray(logits), params))
    for row, processed in zip(logits, out):
        keep, margin = _reference_keep(row, temperature, top_k, top_p)
        assume(margin > 1e-5)
        np.testing.assert_array_equal(np.isfinite(processed), keep)
        np.testing.assert_allclose(processed[keep], row[keep] / np.float32(temperature), rtol=1e-6)


def test_greedy_processing_leaves_logits_bit_for_bit():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(3, 32)), jnp.float32)
    out = _process(logits, sampling.SamplingParams(jnp.float32(0.0), jnp.int32(2), jnp.float32(0.1)))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(logits))  # top_k, top_p ignored when greedy


# --- sample_generate --------------------------------------------------------------------------------------

def test_sample_generate_is_reproducible_and_keyed_per_row(bild_pair):
    _, large = bild_pair("llama")
    prompts = _prompts(large.vocab_size)
    key = jax.random.key(1)
    first = bild_jax.sample_generate(large, prompts, N, key, temperature=1.5, eos_token_id=[])
    again = bild_jax.sample_generate(large, prompts, N, key, temperature=1.5, eos_token_id=[])
    other = bild_jax.sample_generate(large, prompts, N, jax.random.key(2), temperature=1.5, eos_token_id=[])
    np.testing.assert_array_equal(np.asarray(first.tokens), np.asarray(again.tokens))
    assert (np.asarray(first.tokens) != np.asarray(other.tokens)).any()
    row_keys = sampling.row_keys(key, len(prompts))
    alone = bild_jax.sample_generate(large, [prompts[2]], N, row_keys[2:3], temperature=1.5, eos_token_id=[])
    np.testing.assert_array_equal(np.asarray(alone.tokens[0]), np.asarray(first.tokens[2]))


def test_greedy_is_the_zero_temperature_limit(bild_pair):
    _, large = bild_pair("llama")
    prompts = _prompts(large.vocab_size)
    greedy = np.asarray(bild_jax.greedy_generate(large, prompts, max_new_tokens=N, eos_token_id=[]).tokens)
    for temperature, top_k in [(0.0, 0), (1e-4, 0), (2.0, 1)]:  # top_k = 1 is greedy at any temperature
        out = bild_jax.sample_generate(large, prompts, N, jax.random.key(3), temperature=temperature, top_k=top_k,
                                       eos_token_id=[])
        np.testing.assert_array_equal(np.asarray(out.tokens), greedy)


def test_sample_generate_compiles_once_for_any_settings(bild_pair):
    _, large = bild_pair("llama")
    prompts = _prompts(large.vocab_size)
    bild_jax.sample_generate(large, prompts, N, jax.random.key(0), eos_token_id=[])
    compiled = generate.sample_decode_jit._cache_size()
    for temperature, top_k, top_p in [(0.5, 7, 1.0), (1.0, 0, 0.3), (0.0, 0, 1.0)]:
        bild_jax.sample_generate(large, prompts, N, jax.random.PRNGKey(4), temperature, top_k, top_p,
                                 eos_token_id=[])
    assert generate.sample_decode_jit._cache_size() == compiled


# --- BiLD sampling ----------------------------------------------------------------------------------------

# BiLD's own loop at every batch size: the built-in table would hand the tests' batches of 4 to the large model
# alone on a CPU, and may change lossy output between batch sizes.
SAMPLED = BiLDConfig(max_new_tokens=N, max_draft=3, fallback_threshold=0.4, rollback_threshold=1.0,
                     eos_token_id=[], temperature=1.5, schedule=BatchSchedule())


def test_bild_sampling_is_reproducible(bild_pair):
    small, large = bild_pair("llama")
    prompts = _prompts(large.vocab_size)
    for config in (SAMPLED, dataclasses.replace(SAMPLED, exact=True)):
        first = bild_generate(small, large, prompts, config, rng=jax.random.key(5))
        again = bild_generate(small, large, prompts, config, rng=jax.random.key(5))
        other = bild_generate(small, large, prompts, config, rng=jax.random.key(6))
        np.testing.assert_array_equal(np.asarray(first.tokens), np.asarray(again.tokens))
        assert (np.asarray(first.tokens) != np.asarray(other.tokens)).any()


@pytest.mark.parametrize("exact", [False, True])
def test_bild_sampling_batched_run_equals_each_row_alone(bild_pair, exact):
    small, large = bild_pair("llama")
    prompts = _prompts(large.vocab_size)
    config = dataclasses.replace(SAMPLED, exact=exact)
    key = jax.random.key(7)
    batched = bild_generate(small, large, prompts, config, rng=key)
    assert int(np.asarray(batched.stats.rollbacks).sum()) > 0, "the test needs rejected drafts to mean something"
    assert int(np.asarray(batched.stats.small_tokens).sum()) > 0
    row_keys = sampling.row_keys(key, len(prompts))
    for row, prompt in enumerate(prompts):
        alone = bild_generate(small, large, [prompt], config, rng=row_keys[row:row + 1])
        np.testing.assert_array_equal(np.asarray(alone.tokens[0]), np.asarray(batched.tokens[row]))
        for name in ("small_tokens", "large_tokens", "rollbacks"):
            assert int(getattr(alone.stats, name)[0]) == int(getattr(batched.stats, name)[row]), name


def test_bild_sampling_that_always_falls_back_is_large_model_sampling(bild_pair):
    """Every token from the large model, drawn with the keys sample_generate uses: the same tokens. (A top-p
    nucleus of one token would make the small model certain, and it would draft.)"""
    small, large = bild_pair("llama")
    prompts = _prompts(large.vocab_size)
    config = dataclasses.replace(SAMPLED, fallback_threshold=1.0, top_k=20)
    out = bild_generate(small, large, prompts, config, rng=jax.random.key(8))
    expected = bild_jax.sample_generate(large, prompts, N, jax.random.key(8), temperature=1.5, top_k=20,
                                        eos_token_id=[])
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(expected.tokens))
    np.testing.assert_array_equal(np.asarray(out.stats.small_tokens), 0)


def test_exact_bild_sampling_tends_to_large_greedy(bild_pair):
    small, large = bild_pair("llama")
    prompts = _prompts(large.vocab_size)
    greedy = bild_jax.greedy_generate(large, prompts, max_new_tokens=N, eos_token_id=[])
    out = bild_generate(small, large, prompts, dataclasses.replace(SAMPLED, exact=True, temperature=1e-4),
                        rng=jax.random.key(9))
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(greedy.tokens))
    assert int(np.asarray(out.stats.small_tokens).sum()) > 0


def test_no_recompilation_between_greedy_and_sampling(bild_pair):
    small, large = bild_pair("llama")
    prompts = _prompts(large.vocab_size)
    bild_generate(small, large, prompts, BiLDConfig(max_new_tokens=N, max_draft=3, eos_token_id=[],
                                                    schedule=BatchSchedule()))
    compiled = bild._bild_decode_jit._cache_size()
    for changes in [dict(temperature=0.7), dict(temperature=1.0, top_k=5, exact=True), dict(top_p=0.5)]:
        config = dataclasses.replace(SAMPLED, **changes)
        bild_generate(small, large, prompts, config, rng=jax.random.PRNGKey(1))
    assert bild._bild_decode_jit._cache_size() == compiled


@pytest.mark.parametrize("changes,message", [
    (dict(temperature=-0.5), "temperature must be a finite number >= 0"),
    (dict(temperature=float("nan")), "temperature must be a finite number >= 0"),
    (dict(temperature=float("inf")), "temperature must be a finite number >= 0"),
    (dict(top_k=-1), "top_k must be an int >= 0"),
    (dict(top_k=2.5), "top_k must be an int >= 0"),
    (dict(top_k=True), "top_k must be an int >= 0"),
    (dict(top_p=0.0), "top_p must be in (0, 1]"),
    (dict(top_p=1.5), "top_p must be in (0, 1]"),
    (dict(top_p=float("nan")), "top_p must be in (0, 1]"),
])
def test_bad_sampling_settings_are_refused(changes, message):
    pattern = message.replace("(", r"\(").replace("]", r"\]")
    with pytest.raises(ValueError, match=pattern):
        BiLDConfig(**changes)
    with pytest.raises(ValueError, match=pattern):
        sampling.SamplingParams.create(**changes)


def test_sampling_without_a_proper_key_is_refused(bild_pair):
    small, large = bild_pair("llama")
    with pytest.raises(ValueError, match="needs a PRNG key"):
        bild_generate(small, large, [[3, 4]], SAMPLED)
    with pytest.raises(ValueError, match="needs a PRNG key"):
        bild_jax.sample_generate(large, [[3, 4]], N, None)
    with pytest.raises(ValueError, match="rng must be a PRNG key"):
        bild_jax.sample_generate(large, [[3, 4]], N, 42)
    with pytest.raises(ValueError, match=r"rng holds keys of shape \(3,\) for a batch of 2"):
        bild_generate(small, large, [[3, 4], [5]], SAMPLED, rng=jax.random.split(jax.random.key(0), 3))


# --- the distribution of exact speculative sampling -------------------------------------------------------

VOCAB = 8
PROMPT = [1, 5, 3]
HORIZON = 3  # tokens 1 and 2 are drafts, the first token always comes from the large model
SAMPLES = 8192


def _vocab8_model(seed: int) -> bild_jax.Model:
    """A random one-layer Llama over 8 tokens, its head scaled so that next-token distributions are neither
    flat nor one-hot."""
    config = LlamaConfig(model_type="llama", vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_layers=1,
                         num_heads=2, num_kv_heads=1, head_dim=8, rms_norm_eps=1e-6, rope_theta=10000.0,
                         rope_scaling=(("rope_type", "default"),), max_positions=64)
    params = LlamaForCausalLM(config).init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))["params"]
    params["lm_head"]["kernel"] = 2.0 * params["lm_head"]["kernel"]
    return bild_jax.Model(config=config, params=params)


def _large_joint(model: bild_jax.Model, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """[V ** HORIZON] exact probabilities of the large model's first HORIZON tokens after PROMPT, under the
    numpy reference processing."""
    sequences = np.array(list(itertools.product(range(VOCAB), repeat=HORIZON - 1)))
    ids = np.concatenate([np.tile(PROMPT, (len(sequences), 1)), sequences], axis=1)
    logits = np.asarray(bild_jax.forward_logits(model, ids))[:, len(PROMPT) - 1:]  # [V^(H-1), H, V]
    probs = np.zeros(logits.shape)
    for index in np.ndindex(logits.shape[:2]):
        row = logits[index].astype(np.float64) / temperature
        row = np.where(_reference_keep(logits[index], temperature, top_k, top_p)[0], np.exp(row - row.max()), 0.0)
        probs[index] = row / row.sum()
    joint = np.zeros(VOCAB ** HORIZON)
    for n, tokens in enumerate(itertools.product(range(VOCAB), repeat=HORIZON)):
        row = np.ravel_multi_index(tokens[:-1], (VOCAB,) * (HORIZON - 1))  # holds tokens[:-1]
        joint[n] = np.prod([probs[row, t, tokens[t]] for t in range(HORIZON)])  # t predicts tokens[t]
    return joint


def _chi_square(tokens: np.ndarray, joint: np.ndarray) -> tuple[float, int, float]:
    """Goodness of fit of sampled sequences [S, HORIZON] to the exact joint; cells expecting fewer than 5
    counts are pooled into one. Returns (statistic, degrees of freedom, p-value)."""
    counts = np.bincount(np.ravel_multi_index(tokens.T, (VOCAB,) * HORIZON), minlength=joint.size)
    expected = joint * len(tokens)
    kept = expected >= 5
    observed, expected = np.append(counts[kept], counts[~kept].sum()), np.append(expected[kept], expected[~kept].sum())
    if expected[-1] == 0:  # top-k / top-p make the pooled cells impossible: any count there fails outright
        if observed[-1]:
            return np.inf, len(observed) - 1, 0.0
        observed, expected = observed[:-1], expected[:-1]
    result = stats.chisquare(observed, expected)
    return float(result.statistic), len(observed) - 1, float(result.pvalue)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.8, 5, 0.9)])
def test_exact_speculative_sampling_keeps_the_large_distribution(temperature, top_k, top_p):
    """SAMPLES independent rows (one per-row key stream each) of one prompt, in one batched call each.
    Exact BiLD sampling and the large model's own sampling both fit its exact joint distribution; BiLD
    keeping the small model's drafts and the small model's own sampling do not, so the test has power."""
    large = _vocab8_model(seed=0)
    small = _perturbed(large, 0.5, seed=1)
    joint = _large_joint(large, temperature, top_k, top_p)
    prompts = [PROMPT] * SAMPLES
    # BiLD's own loop at this batch size (the built-in CPU table would hand 8192 rows to the large model alone).
    config = BiLDConfig(max_new_tokens=HORIZON, max_draft=2, fallback_threshold=0.35, eos_token_id=[], exact=True,
                        temperature=temperature, top_k=top_k, top_p=top_p, schedule=BatchSchedule())
    key = jax.random.key(2024)
    exact = bild_generate(small, large, prompts, config, rng=key)
    for name in ("small_tokens", "fallbacks", "rollbacks"):  # every path is taken many times
        assert int(np.asarray(getattr(exact.stats, name)).sum()) > SAMPLES // 10, name
    drafts_kept = bild_generate(small, large, prompts, dataclasses.replace(
        config, exact=False, fallback_threshold=0.0, rollback_threshold=np.inf), rng=key)

    def alone(model):
        return bild_jax.sample_generate(model, prompts, HORIZON, key, temperature, top_k, top_p, eos_token_id=[]).tokens

    fits = {name: _chi_square(np.asarray(tokens), joint) for name, tokens in [
        ("exact BiLD", exact.tokens), ("large alone", alone(large)), ("BiLD keeping drafts", drafts_kept.tokens),
        ("small alone", alone(small))]}
    print({name: f"chi2={s:.1f} dof={d} p={p:.3g}" for name, (s, d, p) in fits.items()})
    assert fits["exact BiLD"][2] > SIGNIFICANCE, fits
    assert fits["large alone"][2] > SIGNIFICANCE, fits
    assert fits["BiLD keeping drafts"][2] < 1e-6, fits
    assert fits["small alone"][2] < 1e-6, fits
