"""BiLD's accept/reject decisions as pure functions of logits: fallback (small model unsure), and the
verification rules that find the first draft token the large model rejects.

The three verification rules share one signature, `rule(Verification) -> Verdict`, and the decode loop
picks one with `lax.switch` on a traced id (`rule_id`), so that switching rules never recompiles:
- `bild_rule`: BiLD's rollback, a draft whose -log p_large exceeds the rollback threshold;
- `exact_greedy_rule`: every draft that is not the large model's argmax (output == large greedy);
- `speculative_rule`: speculative rejection sampling (output distributed as sampling the large model).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from bild_jax.reductions import argmax, log_normalizer
from bild_jax.rows import take_at
from bild_jax.sampling import ACCEPT, position_keys, uniform

BILD, EXACT_GREEDY, SPECULATIVE = 0, 1, 2  # indices into RULES


def fallback(small_logits: jax.Array, fallback_threshold: jax.Array) -> jax.Array:
    """small_logits [B, V] float32 (processed when sampling) -> falls_back [B] bool.

    The small model falls back to the large one when its confidence, max softmax probability, is below
    the threshold; otherwise it drafts a token (`sampling.sample`: its argmax when greedy).
    """
    peak, lse = log_normalizer(small_logits)
    return jnp.exp(peak - lse) < fallback_threshold


@struct.dataclass
class Verification:
    """What a rule judges: a row's drafts and both models' distributions over them."""

    large_logits: jax.Array        # [B, D + 1, V] float32 processed; index i predicts drafts[:, i], index
                                   # num_drafts the token after the last draft
    drafts: jax.Array              # [B, D] int32; only the first num_drafts[b] are real
    num_drafts: jax.Array          # [B] int32
    draft_logits: jax.Array        # [B, max_draft, V] float32 ring of the processed p_small each draft was
                                   # drawn from, the draft at output position p in slot p % max_draft
    keys: jax.Array                # [B] PRNG keys of the rows (`sampling.row_keys`)
    positions: jax.Array           # [B, D] int32 output positions of the drafts
    rollback_threshold: jax.Array  # [] float32
    sampled: jax.Array             # [] bool temperature > 0


@struct.dataclass
class Verdict:
    rejects: jax.Array      # [B] bool some real draft is rejected
    index: jax.Array        # [B] int32 the first rejected draft (meaningless where rejects is False)
    replacement: jax.Array  # [B, V] float32 logits of the distribution to redraw that token from


def rule_id(exact: bool, sampled: bool) -> np.int32:
    """The index into RULES for these settings, passed to the loop as a traced [] int32."""
    return np.int32((SPECULATIVE if sampled else EXACT_GREEDY) if exact else BILD)


def first_rollback(large_logits: jax.Array, drafts: jax.Array, num_drafts: jax.Array, rollback_threshold: jax.Array,
                   greedy: jax.Array = True) -> tuple[jax.Array, jax.Array]:
    """The first draft token that BiLD's rollback rejects.

    large_logits [B, D, V] float32 (processed when sampling): index i is the large model's prediction for
    drafts[b, i] [B, D] int32; only the first num_drafts[b] [B] int32 drafts are real. Token i is rejected
    when -log p_large(token) > rollback_threshold [] float32, but in greedy decoding (`greedy` [] bool) never
    when it is the large model's argmax, which would replace it by itself. Returns (rolls_back [B] bool,
    index [B] int32 of the first rejected draft).
    """
    _, lse = log_normalizer(large_logits)
    distance = lse - jnp.take_along_axis(large_logits, drafts[..., None], axis=-1)[..., 0]   # [B, D]
    rejected = (distance > rollback_threshold) & ((drafts != argmax(large_logits)) | ~jnp.asarray(greedy))
    return _first(rejected, num_drafts)


def first_disagreement(large_logits: jax.Array, drafts: jax.Array, num_drafts: jax.Array
                       ) -> tuple[jax.Array, jax.Array]:
    """The first draft that is not the large model's argmax: (rejects [B] bool, index [B] int32).
    Shapes as in `first_rollback`."""
    return _first(drafts != argmax(large_logits), num_drafts)


def first_rejection_speculative(large_logits: jax.Array, small_logits: jax.Array, drafts: jax.Array,
                                num_drafts: jax.Array, uniforms: jax.Array
                                ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Speculative rejection sampling (Leviathan et al., 2023; Chen et al., 2023): the first rejected draft
    and the distribution to resample it from.

    large_logits, small_logits [B, D, V] float32: the processed distributions p_large and p_small at each
    draft; drafts [B, D] int32, drafts[b, i] drawn from p_small[b, i]; only the first num_drafts[b] [B]
    int32 are real; uniforms [B, D] float32 in [0, 1). Draft y is accepted with probability
    min(1, p_large(y) / p_small(y)), i.e. when u * p_small(y) < p_large(y). Returns (rejects [B] bool,
    index [B] int32 of the first rejected draft, residual [B, V] float32 logits of
    norm(max(0, p_large - p_small)) there). Resampling the rejected draft from the residual, dropping the
    later ones, and drawing the token after fully accepted drafts from p_large makes every output token
    distributed as under p_large alone.
    """
    p_large, p_small = jax.nn.softmax(large_logits, axis=-1), jax.nn.softmax(small_logits, axis=-1)

    def at_drafts(probs):
        return jnp.take_along_axis(probs, drafts[..., None], axis=-1)[..., 0]

    rejects, index = _first(uniforms * at_drafts(p_small) >= at_drafts(p_large), num_drafts)
    gap = take_at(p_large, index) - take_at(p_small, index)
    # Rounding can leave the residual without positive mass where p_large ~ p_small (where a rejection has
    # probability ~0); p_large itself is the right distribution there.
    residual = jnp.where((gap > 0).any(axis=-1, keepdims=True), jnp.log(jnp.maximum(gap, 0.0)),
                         take_at(large_logits, index))
    return rejects, index, residual


def bild_rule(v: Verification) -> Verdict:
    """BiLD's rollback; the replacement is drawn from the large model's own distribution."""
    rejects, index = first_rollback(v.large_logits[:, :-1], v.drafts, v.num_drafts, v.rollback_threshold,
                                    greedy=~v.sampled)
    return Verdict(rejects, index, take_at(v.large_logits, index))


def exact_greedy_rule(v: Verification) -> Verdict:
    """Exact greedy: keep a draft only when it is the large model's argmax."""
    rejects, index = first_disagreement(v.large_logits[:, :-1], v.drafts, v.num_drafts)
    return Verdict(rejects, index, take_at(v.large_logits, index))


def speculative_rule(v: Verification) -> Verdict:
    """Exact sampling: speculative rejection with the rows' ACCEPT uniforms at the drafts' positions."""
    slots = v.positions % v.draft_logits.shape[1]                                    # [B, D]
    small_logits = jnp.take_along_axis(v.draft_logits, slots[:, :, None], axis=1)   # [B, D, V]
    uniforms = uniform(position_keys(v.keys, v.positions, ACCEPT))                  # [B, D]
    return Verdict(*first_rejection_speculative(v.large_logits[:, :-1], small_logits, v.drafts, v.num_drafts,
                                                uniforms))


RULES = (bild_rule, exact_greedy_rule, speculative_rule)


def _first(rejected: jax.Array, num_drafts: jax.Array) -> tuple[jax.Array, jax.Array]:
    """rejected [B, D] bool -> (any real draft rejected [B] bool, index [B] int32 of the first one)."""
    rejected = rejected & (jnp.arange(rejected.shape[1])[None, :] < num_drafts[:, None])
    return rejected.any(axis=-1), jnp.argmax(rejected, axis=-1).astype(jnp.int32)
