"""bild-jax: Big Little Decoder text generation in JAX/Flax.

The public names are imported on first use (PEP 562), so that `import bild_jax` does not import JAX: the
`bild-jax` command installs its Ctrl-C handling before the imports, which take seconds.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "bild_jax.bild": ("BiLDConfig", "BiLDOutput", "BiLDPolicy", "BiLDStats", "bild_decode", "bild_generate",
                      "make_bild_decode"),
    "bild_jax.checkpoint": ("restore_converted", "save_converted"),
    "bild_jax.errors": ("InputError", "Unsupported"),
    "bild_jax.generate": ("GenerateOutput", "greedy_decode", "greedy_generate", "sample_decode", "sample_generate"),
    "bild_jax.hub": ("load_model", "load_tokenizer"),
    "bild_jax.model": ("Model", "forward_logits"),
    "bild_jax.sampling": ("SamplingParams",),
    "bild_jax.schedule": ("BatchSchedule", "ScheduleTable"),
    "bild_jax.sharding": ("DATA_PARALLEL", "TENSOR_PARALLEL", "ShardingRules", "make_mesh", "param_partition_specs",
                          "shard_params"),
    "bild_jax.vocabulary": ("shared_vocabulary",),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = [
    "BiLDConfig", "BiLDOutput", "BiLDPolicy", "BiLDStats", "GenerateOutput", "InputError", "Model", "Unsupported",
    "bild_decode", "bild_generate", "forward_logits", "greedy_decode", "greedy_generate", "load_model",
    "load_tokenizer", "make_bild_decode", "restore_converted", "sample_decode", "sample_generate", "save_converted",
    "SamplingParams", "DATA_PARALLEL", "TENSOR_PARALLEL", "ShardingRules", "make_mesh", "param_partition_specs",
    "shard_params", "BatchSchedule", "ScheduleTable", "shared_vocabulary", "__version__",
]

if TYPE_CHECKING:  # static analysis sees the eager imports
    from bild_jax.bild import (BiLDConfig, BiLDOutput, BiLDPolicy, BiLDStats, bild_decode, bild_generate,
                               make_bild_decode)
    from bild_jax.checkpoint import restore_converted, save_converted
    from bild_jax.errors import InputError, Unsupported
    from bild_jax.generate import GenerateOutput, greedy_decode, greedy_generate, sample_decode, sample_generate
    from bild_jax.hub import load_model, load_tokenizer
    from bild_jax.model import Model, forward_logits
    from bild_jax.sampling import SamplingParams
    from bild_jax.schedule import BatchSchedule, ScheduleTable
    from bild_jax.sharding import (DATA_PARALLEL, TENSOR_PARALLEL, ShardingRules, make_mesh, param_partition_specs,
                                   shard_params)
    from bild_jax.vocabulary import shared_vocabulary


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'bild_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULE_OF[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
