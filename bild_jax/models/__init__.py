"""Model families, looked up by HF `model_type`."""

from __future__ import annotations

from bild_jax.errors import InputError
from bild_jax.models import gpt2, llama, t5
from bild_jax.models.family import ModelFamily

_FAMILIES: tuple[ModelFamily, ...] = (llama.FAMILY, gpt2.FAMILY, t5.FAMILY)
FAMILIES: dict[str, ModelFamily] = {t: family for family in _FAMILIES for t in family.model_types}


def family_for(model_type: str) -> ModelFamily:
    """The family of an HF `model_type`; a clear error listing the supported ones otherwise."""
    if model_type not in FAMILIES:
        raise InputError(f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[model_type]
