"""The seq2seq task of the bundled T5 pair: code summarization on the Python standard library's own sources.

Input: a function's source with its docstring removed; target: the docstring's first sentence. Every machine
with Python has this offline, with a real reference written by people. Files are split by the bundled
decoder pair's fixed rule (`pair_data.stdlib_files`: CRC32 of the path % 50 == 0 is held out), so that no
held-out file's functions are trained on by either pair.

Texts are tokenized with the bundled pair's tokenizer (byte-level BPE, 4096 tokens, trained on the same
standard library's training files; pad 0, EOS 1): it already covers both code and English prose as written
in those files, so nothing new needs training, and the T5 pair shares its vocabulary with the decoder pair.
"""

from __future__ import annotations

import ast
import re
import sysconfig
import textwrap
from pathlib import Path

import numpy as np

import pair_data

MAX_INPUT_TOKENS = 256    # longer inputs are cut here: the signature and the first lines carry the summary
MAX_SUMMARY_TOKENS = 48   # longer first sentences are skipped (not cut: a cut reference is no sentence)
MIN_SUMMARY_WORDS = 3     # "Return self." and the like are skipped as trivial
_SENTENCE_END = re.compile(r"(?<=[.!?])\s")


def first_sentence(docstring: str) -> str:
    """The docstring's first sentence: its first paragraph, lines joined, cut after the first `.`, `!` or `?`
    that a space follows."""
    paragraph = " ".join(docstring.strip().split("\n\n")[0].split())
    return _SENTENCE_END.split(paragraph, maxsplit=1)[0]


def function_examples(path: Path, root: Path) -> list[dict]:
    """Every function or method in the file whose docstring's first sentence has >= MIN_SUMMARY_WORDS words,
    in source order: {"path": path relative to root, "name", "source": its dedented source without the
    docstring, "summary": the first sentence}. Unparsable files give none."""
    try:
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []  # the standard library ships deliberately broken files (lib2to3 and test data)
    lines = text.splitlines(keepends=True)
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    examples = []
    for node in sorted(functions, key=lambda n: n.lineno):
        docstring = ast.get_docstring(node)
        doc_node = node.body[0]
        # A docstring on the `def` line itself (`def f(): "..."`) cannot be cut out by lines.
        if docstring is None or doc_node.lineno <= node.lineno:
            continue
        summary = first_sentence(docstring)
        if len(summary.split()) < MIN_SUMMARY_WORDS:
            continue
        kept = lines[node.lineno - 1:doc_node.lineno - 1] + lines[doc_node.end_lineno:node.end_lineno]
        examples.append({"path": str(path.relative_to(root)), "name": node.name,
                         "source": textwrap.dedent("".join(kept)), "summary": summary})
    return examples


def split_examples(limit_files: int | None = None) -> tuple[list[dict], list[dict]]:
    """(training examples, held-out examples) of the standard library, from the files that
    `pair_data.stdlib_files` puts in each split (the first `limit_files` training files only, for quick
    checks); deterministic for a given Python installation."""
    root = Path(sysconfig.get_paths()["stdlib"])
    train_files, held_out_files = pair_data.stdlib_files()
    return ([e for f in train_files[:limit_files] for e in function_examples(f, root)],
            [e for f in held_out_files for e in function_examples(f, root)])


def encode(tokenizer, examples: list[dict]) -> list[dict]:
    """Token ids of the examples that fit: {"input": source ids cut to MAX_INPUT_TOKENS, "target": summary ids
    then EOS, at most MAX_SUMMARY_TOKENS + 1}, with the example's other fields kept."""
    sources = tokenizer([e["source"] for e in examples], add_special_tokens=False)["input_ids"]
    summaries = tokenizer([e["summary"] for e in examples], add_special_tokens=False)["input_ids"]
    return [dict(e, input=s[:MAX_INPUT_TOKENS], target=t + [pair_data.EOS_ID])
            for e, s, t in zip(examples, sources, summaries) if len(t) <= MAX_SUMMARY_TOKENS]


def padded(rows: list[list[int]], width: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows right-padded with PAD_ID to [N, width] int32, lengths [N] int32)."""
    array = np.full((len(rows), width), pair_data.PAD_ID, np.int32)
    for i, row in enumerate(rows):
        array[i, :len(row)] = row
    return array, np.array([len(row) for row in rows], np.int32)
