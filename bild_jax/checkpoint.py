"""Fast reload of converted models: orbax-checkpoint for the params, JSON for the family config."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import orbax.checkpoint as ocp
from flax import traverse_util

from bild_jax.errors import InputError
from bild_jax.model import Model, param_shapes
from bild_jax.models import family_for

_CONFIG_FILE = "bild_config.json"
_PARAMS_DIR = "params"


def save_converted(model: Model, directory: str | Path) -> Path:
    """Writes `model` (params in their dtype, plus its config) to a new directory; returns its path."""
    directory = Path(directory).absolute()
    if directory.exists() and any(directory.iterdir()):
        raise FileExistsError(f"{directory} exists and is not empty")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / _CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(model.config), indent=1))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory / _PARAMS_DIR, model.params)
    checkpointer.wait_until_finished()
    return directory


def restore_converted(directory: str | Path) -> Model:
    """Reads a model written by `save_converted`, checking its params against its config."""
    directory = Path(directory).absolute()
    config_file = directory / _CONFIG_FILE
    if not config_file.is_file() or not (directory / _PARAMS_DIR).is_dir():
        raise FileNotFoundError(f"{directory} is not a bild-jax converted checkpoint "
                                f"(expected {_CONFIG_FILE} and {_PARAMS_DIR}/)")
    try:
        fields = json.loads(config_file.read_text())
        family = family_for(fields["model_type"])
        config = family.config_class(**{k: _as_tuples(v) for k, v in fields.items()})
    except InputError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as error:  # damaged or edited JSON
        raise InputError(f"{config_file} is damaged ({type(error).__name__}: {error})") from None
    try:
        params = ocp.StandardCheckpointer().restore(directory / _PARAMS_DIR)
    except Exception as error:  # orbax and TensorStore raise several types for damaged checkpoints
        raise InputError(f"cannot read params from {directory / _PARAMS_DIR}, the checkpoint is damaged: "
                         f"{_first_line(error)}") from None
    _check_shapes(params, param_shapes(family, config), directory)
    return Model(config=config, params=params)


def _first_line(error: Exception, limit: int = 300) -> str:
    # TensorStore appends its whole spec (~60 lines of JSON) to the one line that says what failed.
    text = str(error).split(" See full TensorStore details")[0].strip()
    line = text.splitlines()[0] if text else type(error).__name__
    return line if len(line) <= limit else line[:limit] + "..."


def _as_tuples(value):
    # JSON turns the config's tuples into lists; frozen configs must stay hashable.
    return tuple(_as_tuples(v) for v in value) if isinstance(value, list) else value


def _check_shapes(params, expected: dict, directory: Path) -> None:
    got = {path: leaf.shape for path, leaf in traverse_util.flatten_dict(params).items()}
    if got != expected:
        wrong = sorted("/".join(p) for p in set(got) ^ set(expected) | {p for p in got if got[p] != expected.get(p)})
        raise InputError(f"params in {directory} do not match its config: {wrong[:10]}")
