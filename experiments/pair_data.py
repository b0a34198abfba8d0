"""The corpus of the bundled pair: the Python standard library's own `.py` sources.

Every machine with Python has it offline. Files are split by a fixed rule: a file is held out for evaluation
when the CRC32 of its path relative to the stdlib directory is divisible by 50 (about 2% of the files).
"""

from __future__ import annotations

import sysconfig
import zlib
from pathlib import Path

import numpy as np

HOLDOUT_MODULUS = 50
SPECIAL_TOKENS = ["<pad>", "<|endoftext|>"]  # ids 0 and 1
PAD_ID, EOS_ID = 0, 1


def stdlib_files() -> tuple[list[Path], list[Path]]:
    """(train files, held-out evaluation files) of this interpreter's standard library, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(f for f in root.rglob("*.py") if "site-packages" not in f.parts and f.is_file())
    held_out = [f for f in files if zlib.crc32(str(f.relative_to(root)).encode()) % HOLDOUT_MODULUS == 0]
    held = set(held_out)
    return [f for f in files if f not in held], held_out


def load_texts(files: list[Path]) -> list[str]:
    """The files' texts, read through `datasets` (one document per file, undecodable bytes replaced)."""
    from datasets import load_dataset

    dataset = load_dataset("text", data_files=[str(f) for f in files], sample_by="document", split="train",
                           encoding_errors="replace")
    return [text for text in dataset["text"] if text.strip()]


def train_tokenizer(texts: list[str], vocab_size: int, directory: Path):
    """Trains a byte-level BPE on `texts` and saves it as an HF tokenizer in `directory`."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                            show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, pad_token=SPECIAL_TOKENS[PAD_ID],
                                        eos_token=SPECIAL_TOKENS[EOS_ID], bos_token=SPECIAL_TOKENS[EOS_ID])
    tokenizer.save_pretrained(directory)
    return tokenizer


def token_stream(tokenizer, texts: list[str]) -> np.ndarray:
    """All texts tokenized and joined, each followed by EOS: [n_tokens] int32."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return np.concatenate([np.asarray(row + [EOS_ID], np.int32) for row in ids])


def eval_samples(tokenizer, texts: list[str], prompt_tokens: int, continuation_tokens: int, count: int,
                 seed: int = 0) -> list[dict]:
    """`count` (prompt, continuation) token windows cut at random line starts of held-out texts."""
    rng = np.random.default_rng(seed)
    samples = []
    while len(samples) < count:
        text = texts[rng.integers(len(texts))]
        starts = [i + 1 for i, ch in enumerate(text) if ch == "\n"]
        if not starts:
            continue
        ids = tokenizer(text[starts[rng.integers(len(starts))]:], add_special_tokens=False)["input_ids"]
        if len(ids) < prompt_tokens + continuation_tokens:
            continue
        samples.append({"prompt": ids[:prompt_tokens],
                        "continuation": ids[prompt_tokens:prompt_tokens + continuation_tokens]})
    return samples
