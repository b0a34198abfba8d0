"""llama.cpp as a CPU benchmark peer for bild-jax (not part of CI).

Setup (once, ~10 min on 2 cores): `bash experiments/setup_llamacpp.sh` builds `llama-completion` and
`llama-speculative-simple` from the llama.cpp vendored in the pinned llama-cpp-python sdist, and converts the
bundled models to GGUF. Everything lives under $LLAMACPP_DIR (default /work/llamacpp):
`build/bin/<binary>` and `gguf/{large,small,small-aligned}-{f32,bf16}.gguf`.

    python experiments/llamacpp.py                 # first 16 demo prompts, 48 new tokens, 2 threads
    python experiments/llamacpp.py --prompts 4 --max-new-tokens 32 --threads 1

Prompts go in as the exact bild-jax token ids: they are decoded to text (checked to re-encode to the same
ids), written byte for byte to a file passed with `-bf` (`-f` would drop a trailing newline), with escape
processing off and no BOS (the GGUFs carry `tokenizer.ggml.add_bos_token = false`). Decoding is greedy
(`--sampling-seq k --top-k 1 --temp 0`), and EOS still stops generation as it does in `greedy_generate`.

Timings are llama.cpp's own, parsed from its stderr, whose lines start with a time stamp and a level letter.
`llama-completion` ends with `common_perf_print`:

    0.00.203.499 I common_perf_print: prompt eval time =      17.81 ms /    64 tokens (    0.28 ms per token, ...)
    0.00.203.513 I common_perf_print:        eval time =     142.63 ms /    47 runs   (    3.03 ms per token, ...)

(also `load time`, `sampling time`, `total time` lines). The prompt eval yields the first new token and each
eval run one more, so tokens generated = runs + 1 (a final EOS included, as bild-jax's bench counts).
`llama-speculative-simple` prints its own totals, then its acceptance counts, then the target's perf lines:

    0.00.170.515 I encoded   64 tokens in    0.024 seconds, speed: 2661.012 t/s
    0.00.170.532 I decoded   58 tokens in    0.097 seconds, speed:  597.815 t/s
    0.00.170.533 I n_draft   = 10
    0.00.170.533 I n_predict = 58
    0.00.170.533 I n_drafted = 50
    0.00.170.533 I n_accept  = 44
    0.00.170.534 I accept    = 88.000%

where `encoded` covers the prompt but its last token, and `decoded` the whole drafting/verifying loop.
`llama-speculative-simple` overshoots `-n`: its last draft is uncapped (a remaining budget of 0 reads as "no
limit"), so it generates between max_new_tokens and max_new_tokens + n_max + 1 tokens; `run_speculative`
reports them all, and `main` checks the first max_new_tokens against bild-jax greedy (and reports whether the
rest match too: with tiny f32 logit gaps, e.g. 8e-5 on demo prompt 13's 50th token, accumulation order decides).

Noise: with --threads equal to the core count, llama.cpp's threads spin at barriers, so any other busy process
can slow a run many times over; measure on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

DEFAULT_DIR = "/work/llamacpp"
REPO_ROOT = Path(__file__).resolve().parents[1]
SETUP_SCRIPT = REPO_ROOT / "experiments" / "setup_llamacpp.sh"
DEMO_PROMPTS = REPO_ROOT / "bild_jax" / "bundled" / "demo_prompts.json"
BUNDLED_TOKENIZER = REPO_ROOT / "bild_jax" / "bundled" / "large" / "tokenizer.json"

GREEDY_ARGS = ["--sampling-seq", "k", "--top-k", "1", "--temp", "0", "--no-escape"]

_PERF_RE = {
    "load_ms": re.compile(r"\w+:\s+load time =\s*([\d.]+) ms"),
    "prompt_eval": re.compile(r"\w+:\s+prompt eval time =\s*([\d.]+) ms /\s*(\d+) tokens"),
    "eval": re.compile(r"\w+:\s+eval time =\s*([\d.]+) ms /\s*(\d+) runs"),
    "total_ms": re.compile(r"\w+:\s+total time =\s*([\d.]+) ms"),
}
_SPEC_RE = {
    "encoded": re.compile(r"encoded\s+(\d+) tokens in\s+([\d.]+) seconds"),
    "decoded": re.compile(r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds"),
    "n_drafted": re.compile(r"n_drafted\s*=\s*(\d+)"),
    "n_accept": re.compile(r"n_accept\s*=\s*(\d+)"),
}


def llamacpp_dir() -> Path:
    """The setup directory: $LLAMACPP_DIR, default /work/llamacpp."""
    return Path(os.environ.get("LLAMACPP_DIR", DEFAULT_DIR))


def binary(name: str) -> Path:
    """Path of a built llama.cpp binary (`llama-completion`, `llama-speculative-simple`)."""
    path = llamacpp_dir() / "build" / "bin" / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run experiments/setup_llamacpp.sh build")
    return path


def gguf(model: str, dtype: str = "f32") -> Path:
    """Path of a converted bundled model: `model` in large, small, small-aligned; `dtype` f32 or bf16. A
    conversion older than the bundled weights is refused: llama.cpp would run the previous model."""
    path = llamacpp_dir() / "gguf" / f"{model}-{dtype}.gguf"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run experiments/setup_llamacpp.sh convert")
    weights = REPO_ROOT / "bild_jax" / "bundled" / model / "model.safetensors"
    if weights.is_file() and path.stat().st_mtime < weights.stat().st_mtime:
        raise FileNotFoundError(f"{path} is older than {weights}: run experiments/setup_llamacpp.sh convert")
    return path


def versions() -> dict:
    """What is being measured: the llama-cpp-python sdist pinned in setup_llamacpp.sh (whose vendored
    llama.cpp is built) and the built `llama-completion`'s own `--version` line."""
    pin = re.search(r"^LLAMA_CPP_PYTHON_VERSION=(\S+)", SETUP_SCRIPT.read_text(), re.MULTILINE)
    proc = subprocess.run([str(binary("llama-completion")), "--version"], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True)
    build = next((line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("version:")), None)
    return {"llama_cpp_python": pin.group(1) if pin else None, "llama_cpp": build}


@functools.lru_cache(maxsize=None)
def bundled_tokenizer():
    """The bundled models' tokenizer (all three share one byte-level BPE)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(BUNDLED_TOKENIZER))


def prompt_text(prompt_ids, tokenizer=None) -> str:
    """Decodes `prompt_ids` to the text that tokenizes back to exactly those ids (else ValueError)."""
    tokenizer = tokenizer or bundled_tokenizer()
    ids = [int(i) for i in prompt_ids]
    text = tokenizer.decode(ids)
    if tokenizer.encode(text, add_special_tokens=False) != ids:
        raise ValueError("prompt ids do not round-trip through the tokenizer's text; llama.cpp would see others")
    return text


def _run(cmd: list[str], text: str, stdout_end: bytes = b"\n\n", attempts: int = 5) -> tuple[bytes, str]:
    """Runs a llama.cpp binary with `text` as its binary prompt file; returns (stdout bytes, stderr text).

    llama.cpp logs through a queue that a worker thread drains, and the process can exit before the last
    lines are written (the logger is deliberately never destroyed); a run whose output lacks its final perf
    line or a stdout ending in `stdout_end` is therefore repeated, up to `attempts` runs in all.
    """
    with tempfile.NamedTemporaryFile("wb", suffix=".txt") as prompt_file:
        prompt_file.write(text.encode("utf-8"))
        prompt_file.flush()
        for _ in range(attempts):
            proc = subprocess.run([*cmd, "-bf", prompt_file.name], stdin=subprocess.DEVNULL, capture_output=True)
            stderr = proc.stderr.decode("utf-8", errors="replace")
            if proc.returncode != 0:
                raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}:\n{stderr[-4000:]}")
            if "graphs reused" in stderr and proc.stdout.endswith(stdout_end):
                return proc.stdout, stderr
    raise RuntimeError(f"{cmd[0]}: output cut short in {attempts} runs:\n{stderr[-4000:]}")


def _search(pattern: re.Pattern, stderr: str) -> tuple[str, ...]:
    """The groups of the last match of `pattern` in `stderr` (RuntimeError when it is missing)."""
    matches = pattern.findall(stderr)
    if not matches:
        raise RuntimeError(f"no match for {pattern.pattern!r} in llama.cpp output:\n{stderr[-4000:]}")
    last = matches[-1]
    return last if isinstance(last, tuple) else (last,)


def parse_perf(stderr: str) -> dict:
    """llama.cpp's perf lines (`common_perf_print` / `llama_perf_context_print`) as a dict of ms and counts."""
    prompt_ms, prompt_tokens = _search(_PERF_RE["prompt_eval"], stderr)
    eval_ms, eval_runs = _search(_PERF_RE["eval"], stderr)
    return {
        "load_ms": float(_search(_PERF_RE["load_ms"], stderr)[0]),
        "prompt_eval_ms": float(prompt_ms),
        "prompt_tokens": int(prompt_tokens),
        "eval_ms": float(eval_ms),
        "eval_runs": int(eval_runs),
        "total_ms": float(_search(_PERF_RE["total_ms"], stderr)[0]),
    }


def run_greedy(model_gguf: str | Path, prompt_ids, max_new_tokens: int, threads: int = 2,
               tokenizer=None) -> tuple[str, dict]:
    """Greedy decoding with `llama-completion`: returns (generated text, timings).

    timings: llama.cpp's perf (see `parse_perf`) plus `new_tokens` (eval runs + 1, a final EOS included),
    `eos` (whether generation stopped at EOS), `seconds` = prompt eval + eval seconds (model load excluded),
    `tokens_per_s` = new_tokens / seconds and `eval_tokens_per_s` = eval runs / eval seconds (steady-state
    decoding).
    """
    cmd = [str(binary("llama-completion")), "-m", str(model_gguf), "-n", str(max_new_tokens),
           "-t", str(threads), "-tb", str(threads), *GREEDY_ARGS, "-no-cnv", "--no-display-prompt"]
    stdout, stderr = _run(cmd, prompt_text(prompt_ids, tokenizer))
    # stdout: the generated text, " [end of text]\n" if it stopped at EOS, then "\n\n".
    generated = stdout[:-2]
    eos = generated.endswith(b" [end of text]\n")
    if eos:
        generated = generated[: -len(b" [end of text]\n")]
    timings = parse_perf(stderr)
    if timings["prompt_tokens"] != len(prompt_ids):
        raise RuntimeError(f"llama.cpp saw {timings['prompt_tokens']} prompt tokens, expected {len(prompt_ids)}")
    new_tokens = timings["eval_runs"] + 1
    seconds = (timings["prompt_eval_ms"] + timings["eval_ms"]) / 1e3
    timings.update(
        new_tokens=new_tokens,
        eos=eos,
        seconds=seconds,
        tokens_per_s=new_tokens / seconds,
        eval_tokens_per_s=timings["eval_runs"] / (timings["eval_ms"] / 1e3),
    )
    return generated.decode("utf-8", errors="replace"), timings


def run_speculative(target_gguf: str | Path, draft_gguf: str | Path, prompt_ids, max_new_tokens: int,
                    n_max: int = 10, p_min: float = 0.6, threads: int = 2, tokenizer=None) -> tuple[str, dict]:
    """Greedy speculative decoding with `llama-speculative-simple` (lossless: the target's greedy output).

    Drafts up to `n_max` tokens with the draft model, stopping a draft early where its top probability is
    under `p_min`. Generates at least `max_new_tokens` tokens and up to n_max + 1 more (see the module
    docstring). Returns (generated text, timings): `prompt_s` and `decode_s` (llama.cpp's `encoded` and
    `decoded` times; model load excluded), `seconds` = prompt_s + decode_s, `new_tokens` (all generated, a
    final EOS included), `n_drafted`, `n_accept`, `accept_rate`, `tokens_per_s` = new_tokens / seconds,
    `eval_tokens_per_s` = new_tokens / decode_s, and the target's perf (see `parse_perf`) under `target`.
    """
    cmd = [str(binary("llama-speculative-simple")), "-m", str(target_gguf), "-md", str(draft_gguf),
           "--spec-type", "draft-simple", "-n", str(max_new_tokens), "--spec-draft-n-max", str(n_max),
           "--spec-draft-n-min", "0", "--spec-draft-p-min", str(p_min),
           "-t", str(threads), "-tb", str(threads), "-td", str(threads), "-tbd", str(threads), *GREEDY_ARGS]
    text = prompt_text(prompt_ids, tokenizer)
    # stdout: "\n\n", the prompt's pieces, the generated text, "\n\n" twice.
    head, tail = b"\n\n" + text.encode("utf-8"), b"\n\n\n\n"
    stdout, stderr = _run(cmd, text, stdout_end=tail)
    if not (stdout.startswith(head) and stdout.endswith(tail)):
        raise RuntimeError(f"unexpected llama-speculative-simple output: {stdout[:200]!r}...{stdout[-200:]!r}")
    generated = stdout[len(head):-len(tail)]
    prompt_tokens, prompt_s = _search(_SPEC_RE["encoded"], stderr)
    new_tokens, decode_s = _search(_SPEC_RE["decoded"], stderr)
    if int(prompt_tokens) != len(prompt_ids):
        raise RuntimeError(f"llama.cpp saw {prompt_tokens} prompt tokens, expected {len(prompt_ids)}")
    n_drafted = int(_search(_SPEC_RE["n_drafted"], stderr)[0])
    n_accept = int(_search(_SPEC_RE["n_accept"], stderr)[0])
    seconds = float(prompt_s) + float(decode_s)
    timings = {
        "prompt_s": float(prompt_s),
        "decode_s": float(decode_s),
        "seconds": seconds,
        "new_tokens": int(new_tokens),
        "n_drafted": n_drafted,
        "n_accept": n_accept,
        "accept_rate": n_accept / n_drafted if n_drafted else 0.0,
        "tokens_per_s": int(new_tokens) / seconds,
        "eval_tokens_per_s": int(new_tokens) / float(decode_s),
        "target": parse_perf(stderr),
    }
    return generated.decode("utf-8", errors="replace"), timings


def jax_greedy_ids(prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """bild-jax's greedy continuations of `prompts` by bundled:large (float32), a final EOS included."""
    import bild_jax

    out = bild_jax.greedy_generate(bild_jax.load_model("bundled:large"), prompts, max_new_tokens)
    return [row[:length] for row, length in zip(out.tokens.tolist(), out.lengths.tolist())]


def reference_text(ids: list[int], n_tokens: int) -> str:
    """The text llama.cpp prints for the first `n_tokens` of `ids` (special tokens such as EOS print nothing)."""
    return bundled_tokenizer().decode(ids[:n_tokens], skip_special_tokens=True)


def text_matches(text: str, ids: list[int], n_tokens: int) -> bool:
    """Whether llama.cpp's generated `text` starts with the text of the first `n_tokens` of bild-jax's `ids`
    (a replacement character ending that text, half of a character split across tokens, is not compared)."""
    return text.startswith(reference_text(ids, n_tokens).rstrip("\ufffd"))


def main(argv=None) -> int:
    """Runs llama.cpp greedy (f32, bf16) and speculative decoding on the demo prompts; prints tokens/s.

    Exits 1 when an f32 system's text differs from bild-jax's greedy text (bf16 is only reported).
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=16, help="first N demo prompts (default 16)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-max", type=int, default=10, help="speculative: most draft tokens per step")
    parser.add_argument("--p-min", type=float, default=0.6, help="speculative: draft confidence to go on")
    parser.add_argument("--no-jax", action="store_true", help="skip the comparison with bild-jax greedy")
    args = parser.parse_args(argv)

    prompts = [p["prompt"] for p in json.loads(DEMO_PROMPTS.read_text())[: args.prompts]]
    # Long enough for speculative decoding's extra tokens.
    reference = None if args.no_jax else jax_greedy_ids(prompts, args.max_new_tokens + args.n_max + 1)
    systems = {
        "greedy f32": lambda ids: run_greedy(gguf("large", "f32"), ids, args.max_new_tokens, args.threads),
        "greedy bf16": lambda ids: run_greedy(gguf("large", "bf16"), ids, args.max_new_tokens, args.threads),
        "speculative f32": lambda ids: run_speculative(
            gguf("large", "f32"), gguf("small-aligned", "f32"), ids, args.max_new_tokens,
            args.n_max, args.p_min, args.threads),
    }
    f32_equal = True
    for name, generate in systems.items():
        print(f"\n== llama.cpp {name} ({args.threads} threads, {args.max_new_tokens} new tokens)", flush=True)
        rates, eval_rates, n_equal = [], [], 0
        for i, ids in enumerate(prompts):
            text, timings = generate(ids)
            rates.append(timings["tokens_per_s"])
            eval_rates.append(timings["eval_tokens_per_s"])
            line = (f"prompt {i:2d}: {timings['new_tokens']:3d} tokens, {timings['tokens_per_s']:8.1f} tok/s, "
                    f"eval-only {timings['eval_tokens_per_s']:8.1f} tok/s")
            if "accept_rate" in timings:
                line += f", accepted {timings['n_accept']}/{timings['n_drafted']} drafted"
            if reference is not None:
                # The first max_new_tokens tokens must match; speculative decoding's extra tokens are only
                # reported, as far-out f32 near-ties may break either way.
                equal = text_matches(text, reference[i], args.max_new_tokens)
                n_equal += equal
                line += f", equals bild-jax greedy: {equal}"
                if timings["new_tokens"] > args.max_new_tokens:
                    all_equal = text == reference_text(reference[i], timings["new_tokens"])
                    line += f" (all {timings['new_tokens']}: {all_equal})"
            print(line, flush=True)
        summary = f"median: {statistics.median(rates):.1f} tok/s, eval-only {statistics.median(eval_rates):.1f} tok/s"
        if reference is not None:
            summary += f"; text equals bild-jax greedy on {n_equal}/{len(prompts)} prompts"
            f32_equal &= "f32" not in name or n_equal == len(prompts)
        print(summary, flush=True)
    return 0 if f32_equal else 1


if __name__ == "__main__":
    sys.exit(main())
