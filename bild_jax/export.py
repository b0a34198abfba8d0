"""Writing a model back to HF format, laid out like the checkpoint it was loaded from."""

from __future__ import annotations

import shutil
from pathlib import Path

import jax.numpy as jnp
from flax import traverse_util

from bild_jax.errors import InputError
from bild_jax.hub import read_config, read_safetensors, resolve_model_dir
from bild_jax.model import Model, param_shapes
from bild_jax.weights import flax_target

# Files of the source directory that describe its weights or its pair, not the model's other settings.
_NOT_COPIED = ("*.safetensors", "model.safetensors.index.json", "bild_pair.json")


def save_like(model: Model, source: str | Path, out_dir: str | Path) -> Path:
    """Writes `model` as an HF-format directory shaped like `source` (the checkpoint it was loaded from, or
    one of the same architecture): the source's config and tokenizer files, and one `model.safetensors` with
    the source's tensor names and dtypes holding `model`'s params. Tensors the loader skips (tied heads,
    buffers) are left out, as transformers rebuilds them. Returns the directory; `load_model` and
    transformers' `from_pretrained` both read it.
    """
    from safetensors.flax import save_file

    source_dir = resolve_model_dir(source)
    out_dir = Path(out_dir)
    if out_dir.resolve() == source_dir.resolve():
        raise InputError(f"will not overwrite the source checkpoint {source_dir}; pick another output directory")
    family = model.family
    config = family.config_class.from_hf(read_config(source_dir))
    if config != model.config:
        raise InputError(f"{source_dir} describes another architecture than the model to save")
    shapes = param_shapes(family, config)
    params = traverse_util.flatten_dict(model.params)
    tensors = {}
    for name, original in read_safetensors(source_dir).items():
        target = flax_target(name, shapes, lambda n: family.hf_param_path(config, n))
        if target is None:
            continue
        value = params[target]
        if target[-1] == "kernel" and family.transpose_linear:
            value = value.T  # HF linear weights are [out, in]
        tensors[name] = jnp.asarray(value, original.dtype)
    out_dir.mkdir(parents=True, exist_ok=True)
    for file in source_dir.iterdir():
        if file.is_file() and not any(file.match(pattern) for pattern in _NOT_COPIED):
            shutil.copy(file, out_dir / file.name)
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    return out_dir
