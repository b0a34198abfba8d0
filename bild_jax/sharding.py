"""Multi-device decoding with `jax.sharding`: meshes, logical-axis rules, sharded params, caches and inputs.

Parameters are split over attention heads and MLP hidden units on a "model" mesh axis (tensor parallel),
prompt rows over a "data" axis (data parallel); each model's KV caches follow both (rows on the data axis,
heads on the model axis). The decoding programs are the single-device ones: XLA's SPMD partitioner
(GSPMD) inserts the collectives, so a sharded run computes the same function as an unsharded one.

A dimension that the mesh axis does not divide (e.g. 6 heads over a model axis of 4) is replicated over
that axis with a warning, or raises a ValueError with `strict=True`. See docs/SHARDING.md.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from bild_jax.errors import InputError
from bild_jax.model import Model


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Which mesh axis each logical axis is split over; None (or an axis the mesh lacks) replicates it.

    Logical axes: `batch` (prompt rows, and cache rows), `heads` (query heads: q and output projections),
    `kv_heads` (key/value projections and cache heads), `mlp` (MLP hidden units). Embeddings, norms, the
    LM head and GPT-2's fused qkv projection are always replicated.
    """

    batch: str | None = "data"
    heads: str | None = "model"
    kv_heads: str | None = "model"
    mlp: str | None = "model"


TENSOR_PARALLEL = ShardingRules()
# Whole model on every device, only the rows split: e.g. for a small model next to a sharded large one.
DATA_PARALLEL = ShardingRules(heads=None, kv_heads=None, mlp=None)

_NOUNS = {"batch": "prompt rows", "heads": "attention heads", "kv_heads": "key/value heads",
          "mlp": "MLP hidden units"}


def make_mesh(spec: Mesh | Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A device mesh from a spec such as {"data": 2, "model": 4} over `devices` (default: all of them);
    a Mesh is returned with its axes made Auto (GSPMD), the mode the decoding programs are written for.

    The spec's sizes must multiply to the number of devices.
    """
    if isinstance(spec, Mesh):
        if all(t == AxisType.Auto for t in spec.axis_types):
            return spec
        return Mesh(spec.devices, spec.axis_names, axis_types=(AxisType.Auto,) * len(spec.axis_names))
    if not isinstance(spec, Mapping) or not spec:
        raise TypeError(f"mesh must be a jax.sharding.Mesh or a dict of axis sizes like {{'data': 2, 'model': 4}}, "
                        f"got {spec!r}")
    bad = {name: size for name, size in spec.items()
           if not isinstance(name, str) or isinstance(size, bool) or not isinstance(size, int) or size < 1}
    if bad:
        raise InputError(f"mesh axes need str names and int sizes >= 1, got {bad}")
    devices = list(jax.devices() if devices is None else devices)
    needed = math.prod(spec.values())
    if needed != len(devices):
        raise InputError(f"mesh {dict(spec)} needs {needed} devices but {len(devices)} are given "
                         f"({devices[0].platform}); the axis sizes must multiply to the device count")
    return jax.make_mesh(tuple(spec.values()), tuple(spec), axis_types=(AxisType.Auto,) * len(spec),
                         devices=devices)


def _axis_size(mesh: Mesh, axis: str | None) -> int:
    return mesh.shape.get(axis, 1) if axis is not None else 1


def _split_axis(mesh: Mesh, axis: str | None, count: int, what: str, strict: bool) -> str | None:
    """`axis` when it splits `count` items evenly, None (replicate) when it is size 1, absent or does not
    divide them; then with a warning, or a ValueError when strict."""
    size = _axis_size(mesh, axis)
    if size == 1:
        return None
    if count % size == 0:
        return axis
    message = f"mesh axis {axis!r} of size {size} does not divide the {count} {what}"
    if strict:
        raise InputError(f"{message}; use a mesh whose {axis!r} axis divides {count}, or strict=False to "
                         "replicate them over that axis")
    warnings.warn(f"{message}: they are replicated over {axis!r} instead")
    return None


def _resolved_axes(model: Model, mesh: Mesh, rules: ShardingRules, strict: bool) -> dict[str, str | None]:
    """Logical axis -> mesh axis it is split over (None: replicated) for this model's dimensions."""
    return {logical: _split_axis(mesh, getattr(rules, logical), count,
                                 f"{_NOUNS[logical]} of the {model.config.model_type} model", strict)
            for logical, count in model.family.axis_sizes(model.config).items()}


def _param_specs(model: Model, resolved: dict[str, str | None]):
    param_axes = model.family.param_axes

    def spec(path, leaf) -> PartitionSpec:
        name = "/".join(str(getattr(key, "key", key)) for key in path)
        for pattern, axes in param_axes:
            if re.search(pattern, name):
                assert len(axes) == leaf.ndim, (name, axes, leaf.shape)
                return PartitionSpec(*(resolved[a] if a else None for a in axes))
        return PartitionSpec()

    return jax.tree_util.tree_map_with_path(spec, model.params)


def param_partition_specs(model: Model, mesh: Mesh | Mapping[str, int], rules: ShardingRules = TENSOR_PARALLEL,
                          strict: bool = False):
    """The PartitionSpec of each of the model's params (the params' tree) under `rules`; see `shard_params`."""
    mesh = make_mesh(mesh)
    return _param_specs(model, _resolved_axes(model, mesh, rules, strict))


@dataclasses.dataclass(frozen=True)
class ModelSharding:
    """A sharded model's mesh and cache layout: rows over `batch_axis`, heads over `heads_axis` (None:
    replicated). Hashable: it is static in the jitted programs."""

    mesh: Mesh
    batch_axis: str | None
    heads_axis: str | None
    strict: bool = False

    def constrain_cache(self, cache, logical_axes):
        """The cache laid out on the mesh: `logical_axes` (the family's `cache_axes(cache)`) names the logical
        axis of each leaf's dimensions; `batch` goes over `batch_axis` when it divides the leaf's rows,
        `kv_heads` over `heads_axis`."""
        batch_size = _axis_size(self.mesh, self.batch_axis)
        mesh_axes = {"batch": self.batch_axis, "kv_heads": self.heads_axis}

        def constrain(axes: PartitionSpec, leaf):
            dims = [mesh_axes[axis] if axis is not None else None for axis in axes]
            if "batch" in axes and leaf.shape[axes.index("batch")] % batch_size:
                dims[axes.index("batch")] = None
            return jax.lax.with_sharding_constraint(leaf, NamedSharding(self.mesh, PartitionSpec(*dims)))

        return jax.tree_util.tree_map(constrain, logical_axes, cache, is_leaf=lambda x: isinstance(x, PartitionSpec))


def shard_params(model: Model, mesh: Mesh | Mapping[str, int], rules: ShardingRules = TENSOR_PARALLEL,
                 strict: bool = False) -> Model:
    """The model with its params placed on `mesh` (a Mesh or {"data": 2, "model": 4}) by `rules`, and its
    caches laid out to match. Dimensions the mesh does not divide are replicated with a warning, or raise a
    ValueError when `strict`. Pass the result to `greedy_generate` / `bild_generate` (no `mesh` needed)."""
    mesh = make_mesh(mesh)
    resolved = _resolved_axes(model, mesh, rules, strict)
    shardings = jax.tree_util.tree_map(lambda spec: NamedSharding(mesh, spec), _param_specs(model, resolved),
                                       is_leaf=lambda x: isinstance(x, PartitionSpec))
    batch_axis = rules.batch if _axis_size(mesh, rules.batch) > 1 else None
    return model.replace(params=jax.device_put(model.params, shardings),
                         sharding=ModelSharding(mesh, batch_axis, resolved["kv_heads"], strict))


def distribute(mesh: Mesh | Mapping[str, int] | None, models: Sequence[Model],
               batch: Sequence) -> tuple[tuple[Model, ...], tuple[np.ndarray | jax.Array, ...]]:
    """What `greedy_generate` / `bild_generate` run on: (models, batch arrays [B, ...]) placed on a mesh.

    mesh None and no model sharded: unchanged, the arrays left on the host (the jitted call puts them on
    the default device as it starts, which costs less than an eager transfer). Otherwise models keep their
    own sharding (made with `shard_params`, which must be on this mesh) or get `TENSOR_PARALLEL`, and the
    arrays are split by rows over the first model's batch axis (replicated, with a warning, when it does
    not divide B).
    """
    meshes = {model.sharding.mesh for model in models if model.sharding is not None}
    if mesh is None:
        if not meshes:
            return tuple(models), tuple(np.asarray(x) for x in batch)
        if len(meshes) > 1:
            raise InputError("the models are sharded over different meshes; shard them over one")
        mesh = meshes.pop()
    mesh = make_mesh(mesh)
    if meshes - {mesh}:
        raise InputError("a model is already sharded over another mesh than the one given; pass mesh=None "
                         "to use the model's, or shard it again with shard_params")
    models = tuple(model if model.sharding is not None else shard_params(model, mesh) for model in models)
    layout = models[0].sharding
    rows = len(batch[0])
    axis = _split_axis(mesh, layout.batch_axis, rows, "prompt rows", layout.strict)
    return models, tuple(jax.device_put(np.asarray(x), NamedSharding(mesh, PartitionSpec(axis))) for x in batch)
