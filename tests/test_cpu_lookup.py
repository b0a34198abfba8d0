"""The native lookup of a bfloat16 table's rows in the CPU decode loop."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bild_jax
from bild_jax import cpu_lookup, generate, native_library
from bild_jax.model import with_panels

pytestmark = pytest.mark.skipif(not native_library.available(), reason="no C++ compiler for the native kernel")


class _Table(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        table = nn.Embed(10, 6)
        return table(tokens).astype(jnp.float32), cpu_lookup.lookup(table, tokens, jnp.float32)


def test_rows_are_the_gather_s_negative_ids_from_the_end_nans_outside():
    tokens = jnp.asarray([[0, 5, 9, 10, -1, 3]])  # 10 is past the table
    params = jax.tree_util.tree_map(lambda p: p.astype(jnp.bfloat16), _Table().init(jax.random.PRNGKey(0), tokens))
    assert "bild_lookup" in jax.jit(_Table().apply).lower(params, tokens).as_text()
    gathered, looked_up = map(np.asarray, jax.jit(_Table().apply)(params, tokens))
    np.testing.assert_array_equal(looked_up, gathered)
    assert np.isnan(looked_up[0, 3]).all() and np.isfinite(looked_up[0, [0, 1, 2, 4, 5]]).all()
    np.testing.assert_array_equal(looked_up[0, 4], looked_up[0, 2])  # -1: the last row


def test_the_decode_loop_makes_no_float32_copy_of_a_bfloat16_table():
    """The bundled small model in bfloat16 (a tied [4096, 160] table): its compiled greedy program holds no
    float32 array of the table's shape, which XLA's gather made and hoisted out of the loop."""
    model = bild_jax.load_model("bundled:small", dtype=jnp.bfloat16)
    prompts = jnp.asarray([[3, 5, 7, 9]], jnp.int32)
    text = generate._greedy_decode_jit.lower(with_panels(model), prompts, jnp.asarray([4], jnp.int32),
                                             generate.eos_array(model, []), max_new_tokens=4,
                                             pad_token_id=0).compile().as_text()
    assert "bild_lookup" in text and "f32[4096,160]" not in text
