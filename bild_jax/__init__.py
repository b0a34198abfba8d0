"""bild-jax: Big Little Decoder text generation in JAX/Flax."""

from bild_jax.bild import BiLDConfig, BiLDOutput, BiLDPolicy, BiLDStats, bild_decode, bild_generate, make_bild_decode
from bild_jax.checkpoint import restore_converted, save_converted
from bild_jax.generate import GenerateOutput, greedy_decode, greedy_generate, sample_decode, sample_generate
from bild_jax.hub import load_model, load_tokenizer
from bild_jax.model import Model, forward_logits
from bild_jax.sampling import SamplingParams
from bild_jax.sharding import (DATA_PARALLEL, TENSOR_PARALLEL, ShardingRules, make_mesh, param_partition_specs,
                               shard_params)
from bild_jax.vocabulary import shared_vocabulary

__version__ = "0.1.0"

__all__ = [
    "BiLDConfig", "BiLDOutput", "BiLDPolicy", "BiLDStats", "GenerateOutput", "Model", "bild_decode",
    "bild_generate", "forward_logits", "greedy_decode", "greedy_generate", "load_model", "load_tokenizer",
    "make_bild_decode", "restore_converted", "sample_decode", "sample_generate", "save_converted",
    "SamplingParams", "DATA_PARALLEL", "TENSOR_PARALLEL", "ShardingRules", "make_mesh", "param_partition_specs",
    "shard_params", "shared_vocabulary", "__version__",
]
