"""The code-summarization task of the bundled T5 pair: examples, split, encoding."""

from __future__ import annotations

import sys
import sysconfig
import zlib
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "experiments"))
import pair_data  # noqa: E402
import summarize_data  # noqa: E402

SOURCE = '''
import os


def outer(path, mode="r"):
    """Open the file at path and return its first line.

    More text that is not the summary.
    """
    def inner():
        """Inner helper that has its own docstring."""
        return 1
    return open(path, mode).readline()


class Parser:
    def parse(self, text):
        """Parse the text. Then do more."""
        return text.split()

    def short(self):
        """Return self."""
        return self

    def same_line(self): "Docstring on the def line is kept out of the data."

    def no_docstring(self):
        return 0
'''


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    root = tmp_path_factory.mktemp("lib")
    (root / "pkg").mkdir()
    (root / "pkg" / "mod.py").write_text(SOURCE)
    return summarize_data.function_examples(root / "pkg" / "mod.py", root)


def test_examples_are_functions_with_their_docstring_cut_out(examples):
    by_name = {e["name"]: e for e in examples}
    # Trivial summaries ("Return self.", 2 words), def-line docstrings and undocumented functions are skipped.
    assert [e["name"] for e in examples] == ["outer", "inner", "parse"]
    outer = by_name["outer"]
    assert outer["path"] == "pkg/mod.py"
    assert outer["summary"] == "Open the file at path and return its first line."
    assert "Open the file" not in outer["source"] and "More text" not in outer["source"]
    assert outer["source"].startswith('def outer(path, mode="r"):\n    def inner():')
    assert '"""Inner helper' in outer["source"]  # another function's docstring stays part of the code
    assert by_name["parse"]["source"] == "def parse(self, text):\n    return text.split()\n"  # dedented
    assert by_name["parse"]["summary"] == "Parse the text."


def test_encoding_caps_inputs_ends_targets_with_eos_and_skips_long_summaries():
    class Tokenizer:  # one token per character
        def __call__(self, texts, add_special_tokens):
            return {"input_ids": [[ord(c) for c in t] for t in texts]}

    long_source = {"source": "x" * 300, "summary": "abc"}
    long_summary = {"source": "def f(): pass", "summary": "y" * (summarize_data.MAX_SUMMARY_TOKENS + 1)}
    encoded = summarize_data.encode(Tokenizer(), [long_source, long_summary])
    assert len(encoded) == 1
    assert encoded[0]["input"] == [ord("x")] * summarize_data.MAX_INPUT_TOKENS
    assert encoded[0]["target"] == [ord(c) for c in "abc"] + [pair_data.EOS_ID]


def test_split_is_deterministic_and_keeps_held_out_files_out_of_training():
    train, held_out = summarize_data.split_examples(limit_files=30)
    assert (train, held_out) == summarize_data.split_examples(limit_files=30)
    assert len(train) > 30 and len(held_out) > 30
    held_paths = {e["path"] for e in held_out}
    assert all(zlib.crc32(p.encode()) % pair_data.HOLDOUT_MODULUS == 0 for p in held_paths)
    assert not held_paths & {e["path"] for e in train}
    # The held-out examples are the held-out files' functions: the same files as the decoder pair holds out.
    root = Path(sysconfig.get_paths()["stdlib"])
    assert held_paths <= {str(f.relative_to(root)) for f in pair_data.stdlib_files()[1]}
