"""Loading models and tokenizers from HF-format directories or the Hugging Face Hub."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from bild_jax.errors import InputError
from bild_jax.model import Model, param_shapes
from bild_jax.models import family_for
from bild_jax.weights import convert_hf_tensors

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_PICKLE_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt")
_HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "*.model", "*.tiktoken")
# Weights are stored in these; other dtypes (integers) would convert the weights to nonsense.
PARAM_DTYPES = tuple(jnp.dtype(d) for d in (jnp.float32, jnp.bfloat16, jnp.float16))


# The dtype bild-jax's commands (generate, demo, sweep, tune, bench) load a BiLD small model in; their
# `--small-dtype` changes it. Its tokens are drafts that the large model verifies, so its precision never changes
# exact mode's output, and bfloat16 halves the bytes each small step reads. On CPU those bytes come from memory
# after every large call, whose weights stream through the caches and evict the small model's (bundled pair,
# 64 demo prompts, in one run: BiLD aligned 1.72x -> 1.90x, exact 1.47x -> 1.63x, every output the same).
SMALL_MODEL_DTYPE = "bfloat16"

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
    # `models/smal` is a hub id in form, but a typo in a local path when the folder `models` exists here.
    local_typo = path.parent != Path(".") and path.parent.is_dir()
    if not _HUB_ID.match(name) or name.startswith((".", "/", "~")) or local_typo:
        raise FileNotFoundError(f"no model directory at {name}")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=name, allow_patterns=_HUB_FILES))
    except Exception as error:  # the hub client raises many types: offline, not found, gated, HTTP
        reason = " ".join(str(error).split())[:200]
        raise OSError(f"no model directory at {name}, and could not get {name!r} from the Hugging Face Hub "
                      f"({type(error).__name__}: {reason}); check the path, or the id and the network") from None


def read_config(model_dir: Path) -> dict:
    """The parsed config.json of an HF-format directory."""
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json; is it an HF-format model directory?")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{config_file} is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise InputError(f"{config_file} must hold a JSON object, got a {type(config).__name__}")
    return config


def read_safetensors(model_dir: Path) -> dict[str, np.ndarray]:
    """All tensors of `model.safetensors` or of the shards named in `model.safetensors.index.json`."""
    single, index = model_dir / "model.safetensors", model_dir / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        files = [model_dir / shard for shard in _shard_names(index)]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise FileNotFoundError(f"{index} names shards that are not in {model_dir}: {absent}")
    else:
        pickles = [p.name for pattern in _PICKLE_PATTERNS for p in model_dir.glob(pattern)]
        if pickles:
            raise InputError(
                f"{model_dir} holds only pickle checkpoints ({', '.join(pickles)}). bild-jax reads safetensors only, "
                "because unpickling can run arbitrary code. Convert once with transformers: "
                "AutoModel...from_pretrained(dir).save_pretrained(dir, safe_serialization=True)")
        raise FileNotFoundError(f"{model_dir} has no model.safetensors or model.safetensors.index.json")
    return {name: tensor for f in files for name, tensor in _read_safetensors_file(f).items()}


def _shard_names(index: Path) -> list[str]:
    """The shard file names of a safetensors index, each a relative path inside the index's directory: a
    name like `../x.safetensors` or an absolute path would read files from elsewhere. (Checked by name, not
    by resolving links: the hub's cache links every file into a blob store outside the directory.)"""
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
        raise InputError(f"{index} is not a valid safetensors index ({type(error).__name__}: {error})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise InputError(f"{index} is not a valid safetensors index: its weight_map must map tensor names to "
                         f"shard file names")
    names = sorted(set(weight_map.values()))
    outside = [name for name in names if not name or Path(name).is_absolute() or ".." in Path(name).parts]
    if outside:
        raise InputError(f"{index} names shards outside its directory: {outside[:5]}; bild-jax reads only the "
                         f"checkpoint directory's own files")
    return names


def _read_safetensors_file(file: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError, safe_open

    try:
        # The flax framework reads bfloat16, which the numpy one cannot.
        with safe_open(str(file), framework="flax") as handle:
            return {name: np.asarray(handle.get_tensor(name)) for name in handle.keys()}
    except SafetensorError as error:
        raise InputError(f"{file} is corrupt or truncated ({error})") from None


def read_model_config(model_dir: Path):
    """(family config, ModelFamily) of an HF-format directory; InputError naming config.json and the field."""
    config_file = model_dir / "config.json"
    hf_config = read_config(model_dir)
    model_type = hf_config.get("model_type")
    if not isinstance(model_type, str):
        raise InputError(f"{config_file} has no model_type")
    family = family_for(model_type)
    try:
        return family.config_class.from_hf(hf_config), family
    except InputError as error:
        raise type(error)(f"{config_file}: {error}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as error:  # a field of an unexpected form
        raise InputError(f"{config_file} has a field bild-jax cannot read ({type(error).__name__}: {error})") from None


def load_model(path_or_hub_id: str | Path, dtype=jnp.float32) -> Model:
    """Loads an HF checkpoint of a supported `model_type` (`bild_jax.models.FAMILIES`) as a `Model` with
    params in `dtype`.

    `path_or_hub_id`: an HF-format directory (config.json + model.safetensors or a sharded index) or a hub id.
    """
    dtype = jnp.dtype(dtype)
    if dtype not in PARAM_DTYPES:
        raise InputError(f"dtype must be one of {', '.join(d.name for d in PARAM_DTYPES)}, got {dtype.name}")
    model_dir = resolve_model_dir(path_or_hub_id)
    config, family = read_model_config(model_dir)
    tensors = read_safetensors(model_dir)
    if family.split_hf_tensors is not None:
        tensors = family.split_hf_tensors(config, tensors)
    params = convert_hf_tensors(tensors, param_shapes(family, config), lambda name: family.hf_param_path(config, name),
                                transpose_linear=family.transpose_linear, dtype=dtype)
    return Model(config=config, params=jax.tree_util.tree_map(jnp.asarray, params))


def load_tokenizer(path_or_hub_id: str | Path):
    """The transformers tokenizer saved with a model (AutoTokenizer), never one that needs the checkpoint's
    own code: `trust_remote_code=False`, because that code could do anything on this machine (and on a
    terminal transformers would otherwise ask whether to run it). InputError, in one line, otherwise."""
    from transformers import AutoTokenizer

    model_dir = resolve_model_dir(path_or_hub_id)
    if not any(any(model_dir.glob(pattern)) for pattern in TOKENIZER_FILES):
        raise InputError(f"{model_dir} has no tokenizer files (one of {', '.join(TOKENIZER_FILES)})")
    try:
        return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    except (ValueError, OSError, KeyError, TypeError) as error:
        custom = [f for f in ("tokenizer_config.json", "config.json") if "auto_map" in _json_or_empty(model_dir / f)]
        if custom:
            raise InputError(f"the tokenizer in {model_dir} needs code from the checkpoint (auto_map in "
                             f"{custom[0]}); bild-jax never runs a checkpoint's code, which could do anything on "
                             f"this machine: use a checkpoint with a standard tokenizer (tokenizer.json)") from None
        reason = " ".join(str(error).split())
        raise InputError(f"cannot load the tokenizer in {model_dir} ({type(error).__name__}: {reason})") from None


def _json_or_empty(file: Path) -> dict:
    try:
        value = json.loads(file.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
