"""Model families, looked up by HF `model_type`.

The registry: one line per family module, each of which defines `FAMILY` (a `ModelFamily`).
"""

from __future__ import annotations

import importlib

from bild_jax.errors import InputError
from bild_jax.models.family import ModelFamily

_FAMILY_MODULES = (
    "llama",
    "gpt2",
    "t5",
    "bart",
)

_FAMILIES: tuple[ModelFamily, ...] = tuple(importlib.import_module(f"bild_jax.models.{name}").FAMILY
                                           for name in _FAMILY_MODULES)
FAMILIES: dict[str, ModelFamily] = {t: family for family in _FAMILIES for t in family.model_types}
assert len(FAMILIES) == sum(len(family.model_types) for family in _FAMILIES), "a model_type in two families"


def family_for(model_type: str) -> ModelFamily:
    """The family of an HF `model_type`; a clear error listing the supported ones otherwise."""
    if model_type not in FAMILIES:
        raise InputError(f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[model_type]
