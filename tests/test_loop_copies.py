"""The compiled decode loops do no work per step that a timing would only show as slowness: they update
their caches in place (no copy of a cache-sized buffer inside a `while` body: a copy there costs every
layer's keys and values on every iteration; the compiled BiLD loop held 94 such copy instructions before the
passes became read-only), and the rotary embeddings read a table instead of evaluating cosines and sines
for every element of every head. Nothing else in the suite would notice either."""

from __future__ import annotations

import re

from bild_jax.bild import BiLDConfig, BiLDPolicy, _bild_decode_jit
from bild_jax.generate import _greedy_decode_jit
from bild_jax.prompts import decoder_capacity, eos_array, prepare_prompts


def _while_body_copies(hlo: str, shapes: set[str]) -> list[str]:
    """Copy instructions of `shapes` (HLO shape strings such as 'f32[2,2,24,8]') in every while body."""
    computations, current = {}, None
    for line in hlo.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if header:
            current = computations.setdefault(header.group(1), [])
        elif current is not None:
            current.append(line)
    bodies = set(re.findall(r"body=%?([\w.\-]+)", hlo))
    assert bodies, "no while loop in the compiled program"
    copies = []
    for body in bodies:
        for line in computations[body]:
            match = re.search(r"= (\w+\[[\d,]*\])\{[\d,]*\} copy\(", line)
            if match and match.group(1) in shapes:
                copies.append(line.strip())
    return copies


def _cache_shapes(model, prompt_width: int, new_positions: int) -> set[str]:
    cache = model.family.init_cache(model.config, 1, decoder_capacity(model, prompt_width, new_positions))
    self_attn = getattr(cache, "self_attn", cache)
    return {f"f32[{','.join(map(str, x.shape))}]" for x in self_attn.keys}


def test_greedy_and_bild_loops_copy_no_cache(bild_pair):
    # One family is enough: where the caches are read and written is the loops' doing, not the family's.
    small, large = bild_pair("llama")
    prompts, lengths = prepare_prompts([[3, 4, 5, 6, 7]], vocab_size=large.vocab_size)
    n, max_draft = 8, 3
    width = prompts.shape[1]
    greedy = _greedy_decode_jit.lower(large, prompts, lengths, eos_array(large, None), max_new_tokens=n,
                                      pad_token_id=0).compile().as_text()
    assert _while_body_copies(greedy, _cache_shapes(large, width, n)) == []
    policy = BiLDPolicy.from_config(BiLDConfig(max_new_tokens=n, max_draft=max_draft), eos_array(large, None))
    bild = _bild_decode_jit.lower(small, large, prompts, lengths, policy, max_new_tokens=n, max_draft=max_draft,
                                  pad_token_id=0).compile().as_text()
    shapes = _cache_shapes(large, width, n + max_draft + 1) | _cache_shapes(small, width, n + 2)
    assert _while_body_copies(bild, shapes) == []


def test_rotary_embeddings_evaluate_no_cosines(bild_pair):
    _, large = bild_pair("llama")
    prompts, lengths = prepare_prompts([[3, 4, 5, 6, 7]], vocab_size=large.vocab_size)
    greedy = _greedy_decode_jit.lower(large, prompts, lengths, eos_array(large, None), max_new_tokens=4,
                                      pad_token_id=0).compile().as_text()
    assert not re.findall(r" (?:cosine|sine)\(", greedy)
