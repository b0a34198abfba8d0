"""HF tensor names -> Flax parameter trees, with every mismatch reported by name."""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np
from flax import traverse_util

from bild_jax.errors import InputError

# Where an HF `weight` may land in a Flax tree: a linear layer's kernel (HF stores it [out, in]), an
# embedding table, or a norm's scale.
_WEIGHT_LEAVES = ("kernel", "embedding", "weight", "scale")


def hf_name_to_flax_path(name: str) -> tuple[str, ...]:
    """`layers.3.self_attn.q_proj.weight` -> (`layers_3`, `self_attn`, `q_proj`, `weight`)."""
    parts: list[str] = []
    for part in name.split("."):
        if part.isdigit() and parts:
            parts[-1] = f"{parts[-1]}_{part}"
        else:
            parts.append(part)
    return tuple(parts)


class CheckpointMismatchError(InputError):
    """The checkpoint's tensors do not fit the model its config describes."""


def convert_hf_tensors(tensors: Mapping[str, np.ndarray], expected_shapes: Mapping[tuple, tuple],
                       param_path: Callable[[str], tuple[str, ...] | None], transpose_linear: bool = True,
                       dtype=np.float32) -> dict:
    """Builds a nested Flax params dict from HF-named tensors.

    `expected_shapes` maps every Flax path to its shape; `param_path(hf_name)` gives the Flax path of a
    tensor (leaf `weight` resolved here to kernel/embedding/weight/scale), or None for tensors to skip.
    Raises CheckpointMismatchError naming missing tensors, unexpected tensors and wrong shapes.
    """
    flat: dict[tuple, np.ndarray] = {}
    unexpected, wrong_shapes = [], []
    for name in sorted(tensors):
        if param_path(name) is None:
            continue
        target = flax_target(name, expected_shapes, param_path)
        if target is None:
            unexpected.append(name)
            continue
        value = np.asarray(tensors[name])
        if target[-1] == "kernel" and transpose_linear:
            value = value.T
        if value.shape != tuple(expected_shapes[target]):
            wrong_shapes.append(f"{name}: checkpoint {tuple(np.asarray(tensors[name]).shape)}, "
                                f"model expects {_hf_shape(expected_shapes[target], target, transpose_linear)}")
            continue
        flat[target] = value.astype(dtype)
    missing = sorted("/".join(path) for path in expected_shapes if path not in flat)
    problems = []
    if missing:
        problems.append(f"missing tensors for parameters {missing}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected}")
    if wrong_shapes:
        problems.append("wrong shapes: " + "; ".join(wrong_shapes))
    if problems:
        raise CheckpointMismatchError("checkpoint does not match its config: " + " | ".join(problems))
    return traverse_util.unflatten_dict(flat)


def flax_target(name: str, expected_shapes: Mapping[tuple, tuple],
                param_path: Callable[[str], tuple[str, ...] | None]) -> tuple[str, ...] | None:
    """The Flax parameter path an HF tensor loads into, its `weight` leaf resolved against `expected_shapes`;
    None when the tensor carries nothing or fits no parameter."""
    path = param_path(name)
    if path is None:
        return None
    leaves = _WEIGHT_LEAVES if path[-1] == "weight" else (path[-1],)
    return next((path[:-1] + (leaf,) for leaf in leaves if path[:-1] + (leaf,) in expected_shapes), None)


def _hf_shape(shape, path, transpose_linear) -> tuple:
    return tuple(reversed(shape)) if path[-1] == "kernel" and transpose_linear else tuple(shape)
