"""bild-jax against llama.cpp on the same weights, CPU, batch 1: greedy decoding (f32, bf16) and lossless
speculative decoding (BiLD exact against llama.cpp's draft-model speculative decoding).

Needs the llama.cpp build and the GGUFs of the bundled models (`bash experiments/setup_llamacpp.sh`, see
experiments/llamacpp.py). From the repository root:

    python experiments/vs_llamacpp.py                          # 16 prompts, 3 repeats: writes
                                                               # experiments/results/vs_llamacpp.json and .md
    python experiments/vs_llamacpp.py --num-prompts 4 --repeats 1 --out /tmp/vs.json

Systems, all greedy, batch 1, on the first --num-prompts held-out demo prompts (64 tokens each), up to
--max-new-tokens new tokens, each pair on the same weights:
- llama.cpp greedy f32 (`large-f32.gguf`) vs bild-jax greedy f32 (`greedy_generate(load_model("bundled:large"))`);
- llama.cpp greedy bf16 (`large-bf16.gguf`) vs bild-jax greedy bf16 (`load_model(..., dtype=jnp.bfloat16)`);
- llama.cpp speculative (`llama-speculative-simple`, target large-f32, draft small-aligned-f32, --n-max
  draft tokens, --p-min draft confidence) vs bild-jax BiLD exact (`bild_generate(small_aligned, large,
  BiLDConfig(exact=True, max_draft=n_max, fallback_threshold=p_min))`): both lossless, both f32;
- bild-jax BiLD (not exact, default thresholds, same pair), an extra row against llama.cpp speculative.

Timing: each bild-jax system first makes one call (compilation, reported apart); then, --repeats times, every
prompt is run by every system in turn (so a machine getting slower mid-run slows all systems alike, and
each pair runs back to back). llama.cpp's time is its own prompt eval + generation time (model load
excluded: one process per call; its default warm-up decode runs before its timer starts) and its own token
count; bild-jax's is the wall time of the call up to `jax.block_until_ready`, prefill included, after an
untimed call on the same prompt (its warm-up: the llama.cpp process before it leaves caches, thread pools and
clocks cold). Tokens count up to and including EOS; llama-speculative-simple
overshoots the requested count by up to n_max + 1 tokens, all counted as its own. Per call: seconds per
generated token; per system: median tokens/s and the spread over prompts x repeats; per pair: per prompt, the
median over repeats of the back-to-back ratio (bild-jax tokens/s / llama.cpp tokens/s), then its median and
spread over prompts. Eval-only tokens/s (prompt excluded) is reported for reference: llama.cpp's own, and
bild-jax greedy's from a 1-token call on the same prompt timed after each call ((n - 1) tokens over the
difference). Both sides
use --threads threads: llama.cpp's `-t`; XLA's CPU thread pool takes one thread per core (`nproc`), so
--threads should equal nproc for a like-for-like comparison.

Text checks, per prompt and repeat: llama.cpp greedy f32 (and bf16) text = the text of bild-jax greedy f32
(bf16) tokens; llama.cpp speculative text, first max-new-tokens tokens, = bild-jax greedy f32 text; bild-jax
BiLD exact tokens = bild-jax greedy f32 tokens (the f32 checks must hold; bf16 and lossy BiLD are reported).

Noise: llama.cpp's threads spin at barriers, so other busy processes can slow it many times over. The report
records the load average at the start and the CPU time other processes took while compiling and timing (all
CPU time of the machine, from /proc/stat, less this process's and its llama.cpp children's), and warns when
that exceeds 5% of the cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Callable

import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import harness  # noqa: E402
import llamacpp  # noqa: E402

import bild_jax  # noqa: E402
from bild_jax.demo import DEMO_PROMPTS, load_demo_prompts  # noqa: E402
from bild_jax.evaluation import timed  # noqa: E402

GREEDY_F32 = "bild-jax greedy f32"


@dataclasses.dataclass
class Call:
    """One timed generation of one prompt."""

    seconds: float                    # bild-jax: wall time of the call; llama.cpp: its prompt eval + generation
    new_tokens: int                   # a final EOS included
    text: str                         # llama.cpp: as printed; bild-jax: the tokens decoded
    tokens: list[int] | None = None   # bild-jax only
    eval_tokens_per_s: float | None = None  # generation alone, prompt eval excluded (llama.cpp; bild-jax greedy)
    stats: dict = dataclasses.field(default_factory=dict)  # BiLD counters or llama.cpp's draft acceptance

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds


@dataclasses.dataclass
class System:
    """One way of generating: `generate(prompt ids) -> Call`, and its calls[prompt][repeat]."""

    name: str
    generate: Callable[[list[int]], Call]
    compiles: bool                    # bild-jax: the first call compiles
    compile_s: float | None = None    # bild-jax: the first call, compilation included
    calls: list[list[Call]] = dataclasses.field(default_factory=list)

    def samples(self, key: str = "tokens_per_s") -> list[float]:
        """`key` of every call, over prompts and repeats."""
        return [getattr(call, key) for per_prompt in self.calls for call in per_prompt]


def jax_system(name: str, generate: Callable, max_new_tokens: int, first_token: Callable | None = None) -> System:
    """A bild-jax system from `generate([prompt ids])` returning a greedy or BiLD output. `first_token`, the same
    generation cut to one new token (prompt pass and first token), is timed after each call, for an eval-only
    speed comparable to llama.cpp's: the call's other tokens over the time the call took beyond it."""
    compiled = False

    def call(ids: list[int]) -> Call:
        nonlocal compiled
        if compiled:
            # Untimed first, as llama.cpp runs a warm-up decode of its own (its default) between loading and
            # its timed run: after the other system's process, caches, thread pools and clocks are cold.
            timed(generate, [ids])
        out, seconds = timed(generate, [ids])
        n = int(out.lengths[0])
        eval_tokens_per_s = None
        if first_token is not None:
            _, first_seconds = timed(first_token, [ids])
            if compiled and n > 1:
                eval_tokens_per_s = (n - 1) / max(seconds - first_seconds, 1e-9)
        compiled = True  # the first call compiles, timed as it is
        tokens = np.asarray(out.tokens)[0, :n].tolist()
        stats = {k: int(v[0]) for k, v in dataclasses.asdict(out.stats).items()} if hasattr(out, "stats") else {}
        return Call(seconds, n, llamacpp.reference_text(tokens, max_new_tokens), tokens=tokens, stats=stats,
                    eval_tokens_per_s=eval_tokens_per_s)

    return System(name, call, compiles=True)


def llamacpp_system(name: str, generate: Callable) -> System:
    """A llama.cpp system from `generate(prompt ids)` returning `run_greedy`'s or `run_speculative`'s output."""
    def call(ids: list[int]) -> Call:
        text, timings = generate(ids)
        stats = {k: timings[k] for k in ("n_drafted", "n_accept") if k in timings}
        return Call(timings["seconds"], timings["new_tokens"], text,
                    eval_tokens_per_s=timings["eval_tokens_per_s"], stats=stats)

    return System(name, call, compiles=False)


def build_systems(args) -> tuple[list[System], list[tuple[str, str, str, float | None]], list[tuple]]:
    """(systems, pairs as (label, llama.cpp system, bild-jax system, target ratio or None), text checks as
    (label, system, reference system, n_tokens or None for token equality, required))."""
    n = args.max_new_tokens
    large = bild_jax.load_model("bundled:large")
    large_bf16 = bild_jax.load_model("bundled:large", dtype=jnp.bfloat16)
    aligned = bild_jax.load_model("bundled:small-aligned")
    exact = bild_jax.BiLDConfig(max_new_tokens=n, exact=True, max_draft=args.n_max, fallback_threshold=args.p_min)
    lossy = bild_jax.BiLDConfig(max_new_tokens=n)
    f32, bf16 = llamacpp.gguf("large", "f32"), llamacpp.gguf("large", "bf16")
    draft = llamacpp.gguf("small-aligned", "f32")
    t = args.threads
    systems = [
        llamacpp_system("llama.cpp greedy f32", lambda ids: llamacpp.run_greedy(f32, ids, n, t)),
        jax_system(GREEDY_F32, lambda p: bild_jax.greedy_generate(large, p, n), n,
                   lambda p: bild_jax.greedy_generate(large, p, 1)),
        llamacpp_system("llama.cpp greedy bf16", lambda ids: llamacpp.run_greedy(bf16, ids, n, t)),
        jax_system("bild-jax greedy bf16", lambda p: bild_jax.greedy_generate(large_bf16, p, n), n,
                   lambda p: bild_jax.greedy_generate(large_bf16, p, 1)),
        llamacpp_system("llama.cpp speculative f32", lambda ids: llamacpp.run_speculative(
            f32, draft, ids, n, args.n_max, args.p_min, t)),
        jax_system("bild-jax BiLD exact f32", lambda p: bild_jax.bild_generate(aligned, large, p, exact), n),
        jax_system("bild-jax BiLD f32", lambda p: bild_jax.bild_generate(aligned, large, p, lossy), n),
    ]
    pairs = [
        ("greedy f32", "llama.cpp greedy f32", GREEDY_F32, 1.0),
        ("greedy bf16", "llama.cpp greedy bf16", "bild-jax greedy bf16", 1.0),
        ("lossless speculative: BiLD exact vs llama.cpp speculative", "llama.cpp speculative f32",
         "bild-jax BiLD exact f32", 1.3),
        ("BiLD (lossy) vs llama.cpp speculative (lossless)", "llama.cpp speculative f32", "bild-jax BiLD f32", None),
    ]
    checks = [
        ("llama.cpp greedy f32 text = bild-jax greedy f32 text", "llama.cpp greedy f32", GREEDY_F32, n, True),
        ("llama.cpp greedy bf16 text = bild-jax greedy bf16 text", "llama.cpp greedy bf16", "bild-jax greedy bf16",
         n, False),
        (f"llama.cpp speculative text, first {n} tokens = bild-jax greedy f32 text", "llama.cpp speculative f32",
         GREEDY_F32, n, True),
        ("bild-jax BiLD exact tokens = bild-jax greedy f32 tokens", "bild-jax BiLD exact f32", GREEDY_F32, None, True),
        ("bild-jax BiLD (lossy) tokens = bild-jax greedy f32 tokens", "bild-jax BiLD f32", GREEDY_F32, None, False),
    ]
    return systems, pairs, checks


def measure(systems: list[System], prompts: list[list[int]], repeats: int) -> None:
    """Compiles every bild-jax system (its first call timed apart), then `repeats` passes over the prompts,
    the systems taking turns on each prompt."""
    for system in systems:
        if system.compiles:
            system.compile_s = system.generate(prompts[0]).seconds
            print(f"{system.name}: first call {system.compile_s:.2f} s", file=sys.stderr, flush=True)
    for system in systems:
        system.calls = [[] for _ in prompts]
    for repeat in range(repeats):
        for i, prompt in enumerate(prompts):
            for system in systems:
                system.calls[i].append(system.generate(prompt))
            line = ", ".join(f"{s.name} {s.calls[i][-1].tokens_per_s:.0f}" for s in systems)
            print(f"repeat {repeat + 1}/{repeats} prompt {i + 1}/{len(prompts)} tok/s: {line}", file=sys.stderr,
                  flush=True)


def cpu_seconds() -> tuple[float, float]:
    """(CPU seconds the whole machine has been busy, CPU seconds of this process and its waited-for children)."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    mine = os.times()
    return ((user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK"),
            mine.user + mine.system + mine.children_user + mine.children_system)


def spread(values: list[float]) -> dict:
    """Median, quartiles and range of `values`."""
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    return {"median": float(median), "q1": float(q1), "q3": float(q3), "min": float(min(values)),
            "max": float(max(values)), "n": len(values)}


def agree(call: Call, reference: Call, n_tokens: int | None) -> bool:
    """`call`'s output equals `reference`'s (bild-jax tokens): as tokens, or, for llama.cpp, as text."""
    if n_tokens is None:
        return call.tokens == reference.tokens
    return llamacpp.text_matches(call.text, reference.tokens, n_tokens)


def results(systems: list[System], pairs: list, checks: list) -> dict:
    """Per-system speeds, per-pair ratios and text checks, JSON-ready."""
    by_name = {s.name: s for s in systems}
    out = {"systems": {}, "pairs": {}, "checks": {}}
    for s in systems:
        eval_rates = [v for v in s.samples("eval_tokens_per_s") if v is not None]  # none for 1-token outputs
        out["systems"][s.name] = {
            "tokens_per_s": spread(s.samples()),
            "ms_per_token": spread([1e3 / v for v in s.samples()]),
            "eval_tokens_per_s": spread(eval_rates) if eval_rates else None,
            "new_tokens": spread(s.samples("new_tokens")),
            "compile_s": s.compile_s,
            "per_prompt": [{"seconds": [c.seconds for c in calls], "new_tokens": [c.new_tokens for c in calls],
                            "tokens_per_s": [c.tokens_per_s for c in calls], "stats": calls[0].stats,
                            "text": calls[0].text} for calls in s.calls],
        }
        stats = [c.stats for calls in s.calls for c in calls]
        if stats[0]:
            out["systems"][s.name]["stats_total"] = {k: sum(x[k] for x in stats) for k in stats[0]}
    for label, peer, ours, target in pairs:
        ratios = [float(np.median([a.tokens_per_s / b.tokens_per_s for a, b in zip(mine, theirs)]))
                  for mine, theirs in zip(by_name[ours].calls, by_name[peer].calls)]
        summary = spread(ratios)
        out["pairs"][label] = {"llama.cpp": peer, "bild-jax": ours, "per_prompt_ratio": ratios, **summary,
                               "target": target, "met": None if target is None else summary["median"] >= target}
    for label, name, reference, n_tokens, required in checks:
        equal = [all(agree(c, r, n_tokens) for c, r in zip(calls, ref_calls))
                 for calls, ref_calls in zip(by_name[name].calls, by_name[reference].calls)]
        out["checks"][label] = {"equal_prompts": sum(equal), "prompts": len(equal), "per_prompt": equal,
                                "required": required}
    return out


def _range(s: dict, fmt: str = "{:.0f}") -> str:
    return f"{fmt.format(s['q1'])}-{fmt.format(s['q3'])} ({fmt.format(s['min'])}-{fmt.format(s['max'])})"


def markdown(data: dict) -> str:
    """The report: settings, systems, pairs, text checks, per-prompt speeds."""
    a, r, llama = data["settings"], data["results"], data["llamacpp"]
    share = data["others_cpu_s"] / (data["wall_s"] * data["nproc"])
    busy = share > 0.05
    parts = [
        *harness.report_header("bild-jax vs llama.cpp", data),
        f"llama.cpp: llama-cpp-python {llama['llama_cpp_python']} sdist's vendored llama.cpp "
        f"(`{llama['llama_cpp']}`), {a['threads']} threads; nproc {data['nproc']}.\n",
        f"{'**Warning: o' if busy else 'O'}ther processes used {data['others_cpu_s']:.0f} CPU-seconds during the "
        f"{data['wall_s']:.0f} s of compiling and timed passes ({share:.0%} of {data['nproc']} cores)"
        f"{'; llama.cpp timings are not representative.**' if busy else '.'}\n",
        f"{a['num_prompts']} held-out demo prompts (64 tokens), {a['max_new_tokens']} new tokens, batch 1, greedy; "
        f"speculative: n-max / max_draft {a['n_max']}, p-min / fallback_threshold {a['p_min']}. Each prompt run "
        f"by every system in turn, {a['repeats']} repeats; bild-jax compiled first. llama.cpp: its own prompt "
        "eval + generation time (load and its warm-up decode excluded); bild-jax: the wall time of the call, "
        "prefill included, after an untimed warm-up call on the same prompt. "
        "Spread: interquartile range (min-max).\n",
        "## Systems\n",
        harness.markdown_table(
            ["System", "tokens/s (median)", "tokens/s IQR (min-max)", "ms/token", "eval-only tokens/s",
             "new tokens", "first call s"],
            [[name, f"{s['tokens_per_s']['median']:.1f}", _range(s["tokens_per_s"]),
              f"{s['ms_per_token']['median']:.2f}",
              f"{s['eval_tokens_per_s']['median']:.1f}" if s["eval_tokens_per_s"] else "-",
              f"{s['new_tokens']['median']:.0f}", f"{s['compile_s']:.2f}" if s["compile_s"] is not None else "-"]
             for name, s in r["systems"].items()]),
        "## bild-jax / llama.cpp speed, per prompt\n",
        harness.markdown_table(
            ["Pair", "median ratio", "IQR (min-max)", "target", "met"],
            [[label, f"{p['median']:.2f}x", _range(p, "{:.2f}"), f">= {p['target']}x" if p["target"] else "-",
              {True: "yes", False: "NO", None: "-"}[p["met"]]] for label, p in r["pairs"].items()]),
        "## Outputs\n",
        harness.markdown_table(
            ["Check", "prompts equal", "required"],
            [[label, f"{c['equal_prompts']}/{c['prompts']}", "yes" if c["required"] else "reported"]
             for label, c in r["checks"].items()]),
        "## Tokens/s per prompt (median over repeats)\n",
        harness.markdown_table(
            ["prompt", *r["systems"]],
            [[i, *(f"{np.median(s['per_prompt'][i]['tokens_per_s']):.0f}" for s in r["systems"].values())]
             for i in range(a["num_prompts"])]),
    ]
    return "\n".join(parts)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-prompts", type=int, default=16, help="first N held-out prompts (default %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="(default %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="passes over the prompts (default %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads (default %(default)s)")
    parser.add_argument("--n-max", type=int, default=10,
                        help="most draft tokens per step: llama.cpp --spec-draft-n-max, BiLD max_draft (default 10)")
    parser.add_argument("--p-min", type=float, default=0.6, help="draft confidence to go on drafting: llama.cpp "
                        "--spec-draft-p-min, BiLD fallback_threshold (default %(default)s)")
    parser.add_argument("--out", type=Path, default=harness.RESULTS_DIR / "vs_llamacpp.json",
                        help="JSON result; the Markdown report goes next to it as .md (default %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs the comparison, prints and writes the report; exits 1 when a required output check fails."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("num_prompts", "max_new_tokens", "repeats", "threads", "n_max"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    command = ["python", "experiments/vs_llamacpp.py", *(sys.argv[1:] if argv is None else argv)]
    data = {"command": " ".join(command), "machine": harness.machine_info(), "nproc": len(os.sched_getaffinity(0)),
            "llamacpp": llamacpp.versions(), "settings": vars(args)}
    prompts = [s["prompt"] for s in load_demo_prompts(DEMO_PROMPTS, args.num_prompts)]
    systems, pairs, checks = build_systems(args)
    start, (machine_start, mine_start) = time.perf_counter(), cpu_seconds()
    measure(systems, prompts, args.repeats)
    machine_end, mine_end = cpu_seconds()
    data.update(wall_s=time.perf_counter() - start,
                others_cpu_s=max(machine_end - machine_start - (mine_end - mine_start), 0.0),
                results=results(systems, pairs, checks))
    json_path, md_path = harness.write_results(data, markdown(data), args.out.parent, args.out.stem)
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}", file=sys.stderr)
    failed = [label for label, c in data["results"]["checks"].items()
              if c["required"] and c["equal_prompts"] < c["prompts"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
