"""BiLD decoding: exactness, batching, policies end to end, stats, compilation, bad input."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bild_jax
from bild_jax import bild
from bild_jax.bild import BiLDConfig, bild_generate
from bild_jax.errors import InputError
from bild_jax.schedule import BatchSchedule

N = 16  # max_new_tokens everywhere, so that tests share compiled programs
# The tests' batches of 4 rows name their schedule: under the built-in table (schedule None) a CPU decodes
# them with the large model alone, where every BiLD property would hold trivially.


def _prompts(vocab: int, lengths=(3, 9, 1, 6), seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, size=n).tolist() for n in lengths]


def _check_invariants(out, config: BiLDConfig, pad: int) -> None:
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    stats = {k: np.asarray(v) for k, v in dataclasses.asdict(out.stats).items()}
    assert ((lengths >= 1) & (lengths <= config.max_new_tokens)).all()
    np.testing.assert_array_equal(stats["small_tokens"] + stats["large_tokens"], lengths)
    assert (stats["large_tokens"] >= 1).all()  # the first token always comes from the large model
    assert (stats["rollbacks"] <= stats["large_calls"]).all()
    assert (stats["rolled_back_tokens"] >= stats["rollbacks"]).all()
    for row, n in enumerate(lengths):
        assert (tokens[row, n:] == pad).all()


def _eos_from(greedy_tokens: np.ndarray) -> int:
    """A token the large model really emits early in row 0, to use as EOS."""
    return int(greedy_tokens[0, 4])


@pytest.mark.parametrize("kind,max_draft", [("llama", 1), ("llama", 3), ("llama", 8), ("mixed", 1), ("mixed", 4),
                                            ("t5", 2), ("t5", 5), ("gemma3", 3), ("qwen3-padded", 3),
                                            ("bart", 3)])
def test_exact_mode_equals_large_greedy(bild_pair, kind, max_draft):
    small, large = bild_pair(kind)
    prompts = _prompts(large.vocab_size)
    greedy = bild_jax.greedy_generate(large, prompts, max_new_tokens=N, eos_token_id=[])
    eos = _eos_from(np.asarray(greedy.tokens))
    for eos_ids in ([], eos):
        config = BiLDConfig(max_new_tokens=N, max_draft=max_draft, fallback_threshold=0.3, exact=True,
                            eos_token_id=eos_ids, schedule=BatchSchedule())
        out = bild_generate(small, large, prompts, config)
        expected = bild_jax.greedy_generate(large, prompts, max_new_tokens=N, eos_token_id=eos_ids)
        np.testing.assert_array_equal(np.asarray(out.lengths), np.asarray(expected.lengths))
        np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(expected.tokens))
        _check_invariants(out, config, bild_jax.generate.output_pad_id(large))
        if kind != "mixed" and not eos_ids:  # a perturbed copy agrees often enough for drafts to be kept
            assert int(np.asarray(out.stats.small_tokens).sum()) > 0


def test_default_verify_widths_keep_exact_mode_and_the_env_var_picks_the_program(bild_pair, monkeypatch):
    """The suite compiles widths 1 and max_draft + 1 (conftest); here the library's defaults (1, 2, 4, 6, 8,
    9 for max_draft 8): exact mode is still the large model's greedy output, and the widths are part of the
    compiled program's key, so changing the variable compiles anew instead of reusing the other program."""
    small, large = bild_pair("llama")
    prompts = _prompts(large.vocab_size)
    config = BiLDConfig(max_new_tokens=N, max_draft=8, fallback_threshold=0.3, exact=True, eos_token_id=[],
                        schedule=BatchSchedule())
    expected = bild_jax.greedy_generate(large, prompts, max_new_tokens=N, eos_token_id=[])
    monkeypatch.delenv(bild.VERIFY_WIDTHS_ENV)
    assert bild.narrow_verify_widths() == bild.NARROW_VERIFY_WIDTHS
    before = bild._bild_decode_jit._cache_size()
    out = bild_generate(small, large, prompts, config)
    assert bild._bild_decode_jit._cache_size() == before + 1
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(expected.tokens))
    assert int(np.asarray(out.stats.verify_passes).sum()) > 0 and int(np.asarray(out.stats.small_tokens).sum()) > 0
    monkeypatch.setenv(bild.VERIFY_WIDTHS_ENV, " 4, 2 ")
    assert bild.narrow_verify_widths() == (2, 4)
    monkeypatch.setenv(bild.VERIFY_WIDTHS_ENV, "")
    assert bild.narrow_verify_widths() == ()
    for bad in ("0", "1,x", "-2"):
        monkeypatch.setenv(bild.VERIFY_WIDTHS_ENV, bad)
        with pytest.raises(InputError, match=rf"^BILD_JAX_VERIFY_WIDTHS must be comma-separated integers >= 1 "
                                             rf"\(e.g. 1,4\), got '{bad}'$"):
            bild_generate(small, large, prompts, config)


def test_batched_run_equals_each_row_alone(bild_pair):
    small, large = bild_pair("llama")
    prompts = _prompts(large.vocab_size)
    # One schedule at every batch size: the default table picks by batch size, which may change lossy output.
    config = BiLDConfig(max_new_tokens=N, max_draft=3, fallback_threshold=0.4, rollback_threshold=1.0,
                        eos_token_id=[], schedule=BatchSchedule())
    batched = bild_generate(small, large, prompts, config)
    assert int(np.asarray(batched.stats.rollbacks).sum()) > 0, "the test needs rollbacks to mean something"
    assert int(np.asarray(batched.stats.small_tokens).sum()) > 0
    for row, prompt in enumerate(prompts):
        alone = bild_generate(small, large, [prompt], config)
        np.testing.assert_array_equal(np.asarray(alone.tokens[0]), np.asarray(batched.tokens[row]))
        assert int(alone.lengths[0]) == int(batched.lengths[row])
        for name in ("small_tokens", "large_tokens", "rollbacks"):
            assert int(getattr(alone.stats, name)[0]) == int(getattr(batched.stats, name)[row]), name


def test_fallback_threshold_one_hands_every_token_to_the_large_model(bild_pair):
    small, large = bild_pair("llama")
    prompts = _prompts(large.vocab_size)
    out = bild_generate(small, large, prompts, BiLDConfig(max_new_tokens=N, max_draft=3, fallback_threshold=1.0,
                                                          rollback_threshold=np.inf, eos_token_id=[],
                                                          schedule=BatchSchedule()))
    greedy = bild_jax.greedy_generate(large, prompts, max_new_tokens=N, eos_token_id=[])
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(greedy.tokens))
    np.testing.assert_array_equal(np.asarray(out.stats.small_tokens), 0)
    np.testing.assert_array_equal(np.asarray(out.stats.large_calls), N)


def test_exact_mode_judges_the_draft_a_fallback_would_drop(bild_pair):
    """Always unsure, exact mode still drafts one token per large pass and keeps it where the large model
    agrees: the large model's output, small tokens kept, and never two in a row."""
    small, large = bild_pair("llama")
    prompts = _prompts(large.vocab_size)
    config = BiLDConfig(max_new_tokens=N, max_draft=3, fallback_threshold=1.0, exact=True, eos_token_id=[],
                        schedule=BatchSchedule(), lookup_tokens=0)
    out = bild_generate(small, large, prompts, config)
    greedy = bild_jax.greedy_generate(large, prompts, max_new_tokens=N, eos_token_id=[])
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(greedy.tokens))
    _check_invariants(out, config, bild_jax.generate.output_pad_id(large))
    from_large = np.asarray(out.from_large)[:, :N]
    assert not from_large.all(), "the large model agreed with no unsure draft"
    assert (from_large[:, 1:] | from_large[:, :-1]).all()
    np.testing.assert_array_equal(np.asarray(out.stats.fallbacks), np.asarray(out.stats.small_calls))


def test_exact_mode_drafts_by_prompt_lookup_where_unsure(bild_pair):
    """Always unsure, exact mode with prompt lookup keeps runs of drafted tokens where the large model's
    output repeats itself (the tiny pair's greedy output cycles in two rows), and still equals its greedy
    output; the large passes go down."""
    small, large = bild_pair("llama")
    prompts = _prompts(large.vocab_size)
    greedy = bild_jax.greedy_generate(large, prompts, max_new_tokens=N, eos_token_id=[])
    runs = {}
    for lookup_tokens in (0, 4):
        config = BiLDConfig(max_new_tokens=N, max_draft=8, fallback_threshold=1.0, exact=True, eos_token_id=[],
                            schedule=BatchSchedule(), lookup_tokens=lookup_tokens)
        runs[lookup_tokens] = out = bild_generate(small, large, prompts, config)
        np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(greedy.tokens))
        _check_invariants(out, config, bild_jax.generate.output_pad_id(large))
    drafted = ~np.asarray(runs[4].from_large)[:, :N]
    assert (drafted[:, 1:] & drafted[:, :-1]).any(), "no two drafted tokens in a row: no lookup was kept"
    assert np.asarray(runs[4].stats.verify_passes).sum() < np.asarray(runs[0].stats.verify_passes).sum()


def test_small_model_catches_up_on_accepted_lookup_drafts(bild_pair):
    """A small step feeding the widest block (lookup_tokens accepted drafts and the large model's token)
    leaves the small model where its own greedy decoding would be: its next draft is its greedy token."""
    small, large = bild_pair("llama")
    lookup_tokens = 4
    fed = bild.small_feed_width(lookup_tokens)
    prompts, lengths = bild_jax.generate.prepare_inputs((small,), _prompts(large.vocab_size), N, None, None)[1:]
    expected = np.asarray(bild_jax.greedy_generate(small, _prompts(large.vocab_size), max_new_tokens=fed + 1,
                                                   eos_token_id=[]).tokens)
    config = BiLDConfig(max_new_tokens=N, max_draft=8, fallback_threshold=0.0, eos_token_id=[],
                        schedule=BatchSchedule(), lookup_tokens=lookup_tokens)
    policy = bild.BiLDPolicy.from_config(config, bild_jax.prompts.eos_array(large, []), len(prompts))
    ctx = bild.make_context(bild_jax.model.with_panels(small), bild_jax.model.with_panels(large), prompts, lengths,
                            policy, N, config.max_draft, None, bild.NARROW_VERIFY_WIDTHS, lookup_tokens)
    state = bild.init_state(ctx, prompts, lengths)
    state = state.replace(tokens=state.tokens.at[:, :fed].set(expected[:, :fed]),
                          num_tokens=jnp.full_like(state.num_tokens, fed))
    state = bild.small_step(ctx, state)
    np.testing.assert_array_equal(np.asarray(state.small_seen), fed)
    np.testing.assert_array_equal(np.asarray(state.tokens[:, fed]), expected[:, fed])


@pytest.mark.parametrize("max_draft", [1, 3, 8])
def test_max_draft_bounds_consecutive_small_tokens(bild_pair, max_draft):
    """Never falling back or rolling back, the large model writes exactly every (max_draft + 1)-th token,
    plus one pass to verify the tail when the last token is a draft."""
    small, large = bild_pair("llama")
    prompts = _prompts(large.vocab_size)
    out = bild_generate(small, large, prompts, BiLDConfig(max_new_tokens=N, max_draft=max_draft,
                                                          fallback_threshold=0.0, rollback_threshold=np.inf,
                                                          eos_token_id=[], schedule=BatchSchedule()))
    expected_large = -(-N // (max_draft + 1))
    np.testing.assert_array_equal(np.asarray(out.stats.large_tokens), expected_large)
    tail_pass = (N - 1) % (max_draft + 1) != 0
    np.testing.assert_array_equal(np.asarray(out.stats.large_calls), expected_large + tail_pass)
    np.testing.assert_array_equal(np.asarray(out.stats.fallbacks), 0)
    np.testing.assert_array_equal(np.asarray(out.stats.rollbacks), 0)


def test_small_model_alone_when_large_never_intervenes(bild_pair):
    """fallback 0, rollback inf, max_draft >= N: after the first token, the small model's greedy output."""
    small, large = bild_pair("llama")
    prompts = _prompts(large.vocab_size)
    out = bild_generate(small, large, prompts, BiLDConfig(max_new_tokens=N, max_draft=N, fallback_threshold=0.0,
                                                          rollback_threshold=np.inf, eos_token_id=[],
                                                          schedule=BatchSchedule()))
    first = np.asarray(bild_jax.greedy_generate(large, prompts, max_new_tokens=1, eos_token_id=[]).tokens)
    continued = bild_jax.greedy_generate(small, [p + [int(t)] for p, t in zip(prompts, first[:, 0])],
                                         max_new_tokens=N - 1, eos_token_id=[])
    np.testing.assert_array_equal(np.asarray(out.tokens[:, 1:]), np.asarray(continued.tokens))
    np.testing.assert_array_equal(np.asarray(out.stats.small_tokens), N - 1)


def test_no_recompilation_for_new_thresholds_prompts_or_eos(bild_pair):
    small, large = bild_pair("llama")
    config = BiLDConfig(max_new_tokens=N, max_draft=3, eos_token_id=[], schedule=BatchSchedule())
    bild_generate(small, large, _prompts(large.vocab_size, lengths=(3, 5, 1, 6), seed=1), config)
    compiled = bild._bild_decode_jit._cache_size()
    for seed, changes in enumerate([dict(fallback_threshold=0.2), dict(rollback_threshold=0.5, exact=True),
                                    dict(rollback_threshold=np.inf, verify_tail=False), dict(eos_token_id=[5, 7])]):
        prompts = _prompts(large.vocab_size, lengths=(4, 2, 8, 7), seed=seed + 2)  # same bucket of 8
        bild_generate(small, large, prompts, dataclasses.replace(config, **changes))
    assert bild._bild_decode_jit._cache_size() == compiled


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fallback=st.floats(0.0, 1.0), rollback=st.one_of(st.floats(0.0, 8.0), st.just(float("inf"))),
       max_draft=st.sampled_from([1, 3, 8]), exact=st.booleans(), verify_tail=st.booleans(),
       lengths=st.lists(st.integers(1, 8), min_size=4, max_size=4),
       eos=st.lists(st.integers(0, 96), max_size=3), seed=st.integers(0, 2 ** 16))
def test_random_settings_keep_the_invariants(bild_pair, fallback, rollback, max_draft, exact, verify_tail,
                                             lengths, eos, seed):
    small, large = bild_pair("llama")
    prompts = _prompts(large.vocab_size, lengths=lengths, seed=seed)
    config = BiLDConfig(fallback_threshold=fallback, rollback_threshold=rollback, max_draft=max_draft,
                        max_new_tokens=N, eos_token_id=eos, exact=exact, verify_tail=verify_tail,
                        schedule=BatchSchedule())
    out = bild_generate(small, large, prompts, config)
    _check_invariants(out, config, bild_jax.generate.output_pad_id(large))
    greedy = bild_jax.greedy_generate(large, prompts, max_new_tokens=N, eos_token_id=eos)
    np.testing.assert_array_equal(np.asarray(out.tokens[:, 0]), np.asarray(greedy.tokens[:, 0]))
    if exact:
        np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(greedy.tokens))
    tokens, lengths_out = np.asarray(out.tokens), np.asarray(out.lengths)
    for row, n in enumerate(lengths_out):
        ends_on_eos = int(tokens[row, n - 1]) in eos
        assert ends_on_eos or n == N
        assert not any(int(t) in eos for t in tokens[row, :n - 1])


def test_pure_decode_function_runs_inside_user_jit(bild_pair):
    import jax

    small, large = bild_pair("llama")
    prompts, lengths = bild_jax.prompts.prepare_prompts(_prompts(large.vocab_size), vocab_size=large.vocab_size)
    decode = bild.make_bild_decode(small, large, max_new_tokens=N, max_draft=3)
    config = BiLDConfig(max_new_tokens=N, max_draft=3, exact=True, eos_token_id=[], schedule=BatchSchedule())
    policy = bild.BiLDPolicy.from_config(config, bild_jax.prompts.eos_array(large, []))
    out = jax.jit(decode)(small.params, large.params, jnp.asarray(prompts), jnp.asarray(lengths), policy)
    expected = bild_generate(small, large, _prompts(large.vocab_size), config)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(expected.tokens))


@pytest.mark.parametrize("changes,message", [
    (dict(fallback_threshold=1.5), "fallback_threshold must be in [0, 1]"),
    (dict(fallback_threshold=-0.1), "fallback_threshold must be in [0, 1]"),
    (dict(rollback_threshold=-1.0), "rollback_threshold must be >= 0"),
    (dict(rollback_threshold=float("nan")), "rollback_threshold must be >= 0"),
    (dict(max_draft=0), "max_draft must be an int >= 1"),
    (dict(max_new_tokens=0), "max_new_tokens must be an int >= 1"),
    (dict(lookup_tokens=-1), "lookup_tokens must be an int >= 0"),
    (dict(lookup_tokens=2.0), "lookup_tokens must be an int >= 0"),
])
def test_bad_config_is_refused(changes, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        BiLDConfig(**changes)


def test_bad_pairs_and_prompts_are_refused(bild_pair, saved_model):
    small, large = bild_pair("llama")
    _, t5_large = bild_pair("t5")
    gpt2 = bild_jax.load_model(saved_model("gpt2")[1])
    config = BiLDConfig(max_new_tokens=N)
    with pytest.raises(ValueError, match="vocabularies differ: small has 99 rows, large has 97"):
        bild_generate(gpt2, large, [[3, 4]], config)
    with pytest.raises(ValueError, match="cannot pair a decoder-only small model .* with an encoder-decoder large model"):
        bild_generate(small, t5_large, [[3, 4]], config)
    with pytest.raises(ValueError, match="empty prompt in row"):
        bild_generate(small, large, [[3, 4], []], config)
    with pytest.raises(ValueError, match="exceeds the llama model's 128 positions"):
        bild_generate(small, large, [[3] * 120], config)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        bild_generate(small, large, [[3, 400]], config)
