"""Prompts for alignment from local files or a `datasets` id: texts, then token windows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from bild_jax.errors import InputError

TEXT_FIELDS = ("text", "prompt", "content", "input", "document")  # tried in order when no field is named


def read_texts(source: str | Path, text_field: str | None = None, split: str = "train") -> list[str]:
    """The non-empty texts of `source`: a `.txt` file (one text per line), a `.jsonl` or `.parquet` file (the
    `text_field` column, default the first of TEXT_FIELDS present), or a `datasets` id (its `split`)."""
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix == ".txt":
            texts = path.read_text(errors="replace").splitlines()
        elif path.suffix == ".jsonl":
            records = []
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as error:
                        raise InputError(f"{path} line {number} is not JSON: {error}") from None
            texts = _column(records, text_field, str(path))
        elif path.suffix == ".parquet":
            import pyarrow.parquet as pq

            texts = _column(pq.read_table(path).to_pylist(), text_field, str(path))
        else:
            raise InputError(f"{path}: unknown data format {path.suffix!r}; use .txt, .jsonl, .parquet or a "
                             f"datasets id")
    elif path.exists() or str(source).startswith((".", "/", "~")):
        raise FileNotFoundError(f"no data file at {source}")
    else:
        texts = _column(_load_dataset(str(source), split), text_field, str(source))
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise InputError(f"{source} holds no text")
    return texts


def _load_dataset(name: str, split: str):
    from datasets import load_dataset

    try:
        return load_dataset(name, split=split)
    except Exception as error:  # offline, unknown id, missing split: datasets raises many types
        raise OSError(f"could not load the dataset {name!r} ({type(error).__name__}: "
                      f"{str(error).splitlines()[0] if str(error) else ''}); without network access pass a local "
                      f".txt, .jsonl or .parquet file") from None


def _column(records, text_field: str | None, where: str) -> list[str]:
    """One string per record: `text_field`, or the first of TEXT_FIELDS the records hold."""
    records = list(records)
    if not records:
        raise InputError(f"{where} holds no records")
    keys = list(records[0]) if isinstance(records[0], dict) else []
    field = text_field or next((f for f in TEXT_FIELDS if f in keys), None)
    if field is None or field not in keys:
        wanted = repr(text_field) if text_field else f"one of {', '.join(TEXT_FIELDS)}"
        raise InputError(f"{where} has no field {wanted}; its fields: {', '.join(map(str, keys)) or 'none'}")
    if not all(isinstance(r.get(field), str) for r in records):
        raise InputError(f"{where}: field {field!r} is not text in every record")
    return [r[field] for r in records]


def prompt_windows(tokenizer, texts: list[str], prompt_tokens: int, count: int, seed: int = 0) -> list[list[int]]:
    """Up to `count` prompts of at most `prompt_tokens` tokens, drawn at random (seeded) from the texts' token
    windows: each text is cut into consecutive windows of `prompt_tokens` tokens (a text shorter than that is
    one prompt as it is; a longer text's partial last window is dropped)."""
    if prompt_tokens < 1 or count < 1:
        raise InputError(f"prompt_tokens and count must be >= 1, got {prompt_tokens} and {count}")
    windows = []
    for ids in tokenizer(texts)["input_ids"]:
        if len(ids) <= prompt_tokens:
            windows.append(ids)
        else:
            windows += [ids[i:i + prompt_tokens] for i in range(0, len(ids) - prompt_tokens + 1, prompt_tokens)]
    windows = [w for w in windows if w]
    picks = np.random.default_rng(seed).permutation(len(windows))[:count]
    return [list(windows[i]) for i in sorted(picks)]
