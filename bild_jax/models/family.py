"""What the rest of bild-jax needs to know about one model family."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """One model family: its HF `model_type`s, config class, Flax module and weight-name mapping.

    `config_class` is a frozen dataclass with `from_hf(hf_config_dict)`. `init_cache(config, batch, capacity,
    dtype)` makes an empty decoder cache. `hf_param_path(config, hf_name)` gives the Flax path of an HF tensor
    (None to skip it). Encoder-decoder families also give
    `encode_into_cache(module, params, input_ids, attention_mask, cache)`, which runs the encoder once and
    stores what cross-attention needs in the cache.
    """

    model_types: tuple[str, ...]
    config_class: type
    module: type
    init_cache: Callable[..., Any]
    hf_param_path: Callable[[Any, str], tuple[str, ...] | None]
    transpose_linear: bool = True
    encode_into_cache: Callable[..., Any] | None = None

    @property
    def is_encoder_decoder(self) -> bool:
        return self.encode_into_cache is not None
