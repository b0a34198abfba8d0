"""Loading models and tokenizers from HF-format directories or the Hugging Face Hub."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from bild_jax.model import Model, param_shapes
from bild_jax.models import family_for
from bild_jax.weights import convert_hf_tensors

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_PICKLE_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt")
_HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]


BUNDLED_PREFIX = "bundled:"
BUNDLED_DIR = Path(__file__).parent / "bundled"


def resolve_model_dir(path_or_hub_id: str | Path) -> Path:
    """A local directory as is; `bundled:NAME` a model shipped in the package (large, small, small-aligned);
    a hub id downloaded (config, safetensors, tokenizer files) and cached."""
    if str(path_or_hub_id).startswith(BUNDLED_PREFIX):
        name = str(path_or_hub_id)[len(BUNDLED_PREFIX):]
        available = sorted(p.name for p in BUNDLED_DIR.iterdir() if (p / "config.json").is_file()) \
            if BUNDLED_DIR.is_dir() else []
        if name not in available:
            raise FileNotFoundError(f"no bundled model {name!r}; bundled: {', '.join(available) or 'none'}")
        return BUNDLED_DIR / name
    path = Path(path_or_hub_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"{path} is a file; pass the model's directory (config.json + *.safetensors)")
        return path
    name = str(path_or_hub_id)
    if not _HUB_ID.match(name) or name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"no model directory at {name}")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=name, allow_patterns=_HUB_FILES))
    except Exception as error:  # the hub client raises many types: offline, not found, gated, HTTP
        raise OSError(f"could not get {name!r} from the Hugging Face Hub ({type(error).__name__}: {error}); "
                      f"check the id and the network, or pass a local model directory") from None


def read_config(model_dir: Path) -> dict:
    """The parsed config.json of an HF-format directory."""
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json; is it an HF-format model directory?")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_file} is not valid JSON: {error}") from None


def read_safetensors(model_dir: Path) -> dict[str, np.ndarray]:
    """All tensors of `model.safetensors` or of the shards named in `model.safetensors.index.json`."""
    single, index = model_dir / "model.safetensors", model_dir / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as error:
            raise ValueError(f"{index} is not a valid safetensors index ({error})") from None
        files = [model_dir / shard for shard in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise FileNotFoundError(f"{index} names shards that are not in {model_dir}: {absent}")
    else:
        pickles = [p.name for pattern in _PICKLE_PATTERNS for p in model_dir.glob(pattern)]
        if pickles:
            raise ValueError(
                f"{model_dir} holds only pickle checkpoints ({', '.join(pickles)}). bild-jax reads safetensors only, "
                "because unpickling can run arbitrary code. Convert once with transformers: "
                "AutoModel...from_pretrained(dir).save_pretrained(dir, safe_serialization=True)")
        raise FileNotFoundError(f"{model_dir} has no model.safetensors or model.safetensors.index.json")
    return {name: tensor for f in files for name, tensor in _read_safetensors_file(f).items()}


def _read_safetensors_file(file: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError, safe_open

    try:
        # The flax framework reads bfloat16, which the numpy one cannot.
        with safe_open(str(file), framework="flax") as handle:
            return {name: np.asarray(handle.get_tensor(name)) for name in handle.keys()}
    except SafetensorError as error:
        raise ValueError(f"{file} is corrupt or truncated ({error})") from None


def load_model(path_or_hub_id: str | Path, dtype=jnp.float32) -> Model:
    """Loads an HF checkpoint of a supported `model_type` (`bild_jax.models.FAMILIES`) as a `Model` with
    params in `dtype`.

    `path_or_hub_id`: an HF-format directory (config.json + model.safetensors or a sharded index) or a hub id.
    """
    model_dir = resolve_model_dir(path_or_hub_id)
    hf_config = read_config(model_dir)
    if "model_type" not in hf_config:
        raise ValueError(f"{model_dir / 'config.json'} has no model_type")
    family = family_for(hf_config["model_type"])
    config = family.config_class.from_hf(hf_config)
    tensors = read_safetensors(model_dir)
    if family.split_hf_tensors is not None:
        tensors = family.split_hf_tensors(config, tensors)
    params = convert_hf_tensors(tensors, param_shapes(family, config), lambda name: family.hf_param_path(config, name),
                                transpose_linear=family.transpose_linear, dtype=jnp.dtype(dtype))
    return Model(config=config, params=jax.tree_util.tree_map(jnp.asarray, params))


def load_tokenizer(path_or_hub_id: str | Path):
    """The transformers tokenizer saved with a model (AutoTokenizer)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(resolve_model_dir(path_or_hub_id)))
