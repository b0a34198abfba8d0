"""bild-jax: Big Little Decoder text generation in JAX/Flax."""

from bild_jax.generate import GenerateOutput, greedy_decode, greedy_generate
from bild_jax.hub import load_model, load_tokenizer
from bild_jax.model import Model, forward_logits

__version__ = "0.1.0"

__all__ = ["GenerateOutput", "Model", "forward_logits", "greedy_decode", "greedy_generate", "load_model",
           "load_tokenizer", "__version__"]
