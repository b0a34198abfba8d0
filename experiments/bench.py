"""Benchmarks bild-jax against HF transformers (PyTorch) on the same weights: large-model greedy decoding,
BiLD against HF assisted generation (lossy and exact), and bild-jax throughput at several batch sizes.

Commands, from the repository root:

    python experiments/bench.py                  # the bundled pair and its held-out prompts: writes
                                                 # experiments/results/bench.json and bench.md
    python experiments/bench.py --device-info    # print the machine description (JSON) and exit
    python experiments/bench.py --small DIR --large DIR [--prompts-file FILE] --name bench-mypair
    python experiments/bench.py --dtype bfloat16 --name bench-bf16     # both sides in bfloat16

Systems, all greedy, all given the same prompt ids:
- bild-jax greedy: `greedy_generate(large)`; HF greedy: `large.generate(do_sample=False)`.
- bild-jax BiLD: `bild_generate(small, large)` at --fallback/--rollback/--max-draft; bild-jax BiLD exact: the
  same with `exact=True` (lossless). HF assisted: `large.generate(assistant_model=small)` with the assistant's
  `num_assistant_tokens` = --max-draft, `num_assistant_tokens_schedule="constant"` and
  `assistant_confidence_threshold` = --fallback (HF reads these from the assistant's generation config).
  HF assisted generation is lossless (it keeps a draft only when it is the large model's argmax), so the exact
  mode is the like-for-like comparison; it also stops drafting after, not before, the first unconfident
  token, and with scikit-learn installed it tunes the threshold during each call (the JSON records whether
  scikit-learn is installed).
- Batch sizes: bild-jax greedy, BiLD and HF greedy at each --batch-sizes; HF assisted generation supports
  batch 1 only.

Timing (`bild_jax.evaluation.run_systems`): every system first makes one call (compiling; reported apart as
`first_call_s`, with `compile_s` = first call - the steady call on the same prompts), then --repeats passes
over the prompts, the systems taking turns batch by batch; the medians over passes are reported. Prompts are
cut to their last --prompt-tokens tokens, so that all have one length and HF needs no padding. Tokens/s counts
the tokens generated up to and including EOS. No GPU roofline here: on a GPU machine both sides run on it (JAX
picks it up; `--torch-device cuda`), and `--device-info` shows what was found.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Callable

import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import harness  # noqa: E402

import bild_jax  # noqa: E402
from bild_jax.evaluation import Rows, System, SystemRun, exact_match, run_systems  # noqa: E402
from bild_jax.hub import resolve_model_dir  # noqa: E402


def cut_at_eos(rows, eos_ids: set[int]) -> list[list[int]]:
    """Each row up to and including its first EOS."""
    out = []
    for row in rows:
        row = [int(t) for t in row]
        end = next((i + 1 for i, t in enumerate(row) if t in eos_ids), len(row))
        out.append(row[:end])
    return out


class Pair:
    """The same checkpoints loaded by bild-jax and by transformers, with generate functions for both."""

    def __init__(self, small: str, large: str, dtype: str, torch_device: str):
        import torch
        import transformers

        transformers.logging.set_verbosity_error()  # generation-flag notices, once per call
        self.torch, self.device = torch, torch.device(torch_device)
        jax_dtype, torch_dtype = {"float32": (jnp.float32, torch.float32),
                                  "bfloat16": (jnp.bfloat16, torch.bfloat16)}[dtype]
        self.dirs = {"small": resolve_model_dir(small), "large": resolve_model_dir(large)}
        self.jax = {k: bild_jax.load_model(d, dtype=jax_dtype) for k, d in self.dirs.items()}
        encoder_decoder = self.jax["large"].is_encoder_decoder
        auto = transformers.AutoModelForSeq2SeqLM if encoder_decoder else transformers.AutoModelForCausalLM
        self.hf = {k: auto.from_pretrained(d, dtype=torch_dtype).eval().to(self.device) for k, d in self.dirs.items()}
        self.encoder_decoder = encoder_decoder
        config = self.jax["large"].config
        self.eos_ids = [int(e) for e in np.atleast_1d(config.eos_token_id)] if config.eos_token_id is not None else []
        self.pad_id = int(config.pad_token_id) if config.pad_token_id is not None else (self.eos_ids or [0])[0]

    def jax_greedy(self, max_new_tokens: int) -> Callable:
        large = self.jax["large"]
        return lambda batch: bild_jax.greedy_generate(large, batch, max_new_tokens)

    def jax_bild(self, config: bild_jax.BiLDConfig) -> Callable:
        small, large = self.jax["small"], self.jax["large"]
        return lambda batch: bild_jax.bild_generate(small, large, batch, config)

    def hf_generate(self, max_new_tokens: int, assisted: "bild_jax.BiLDConfig | None" = None) -> Callable:
        """HF greedy, or assisted generation with the small model drafting at the BiLD config's settings."""
        kwargs = dict(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=self.eos_ids or None,
                      pad_token_id=self.pad_id)
        if assisted is not None:
            draft = self.hf["small"].generation_config
            draft.num_assistant_tokens = assisted.max_draft
            draft.num_assistant_tokens_schedule = "constant"
            draft.assistant_confidence_threshold = assisted.fallback_threshold
            kwargs["assistant_model"] = self.hf["small"]
        large, torch = self.hf["large"], self.torch

        def generate(batch):
            ids = torch.tensor(batch, dtype=torch.long, device=self.device)
            with torch.inference_mode():
                out = large.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
            if self.device.type == "cuda":  # the timing waits for the device, as it does for JAX
                torch.cuda.synchronize()
            # Decoder-only outputs repeat the prompt; encoder-decoder ones start with the decoder start token.
            return out[:, 1:] if self.encoder_decoder else out[:, ids.shape[1]:]

        return generate

    def hf_rows(self, out) -> Rows:
        """`Rows` of an HF generate function's [B, N] token tensor: each row cut after its first EOS."""
        return Rows(cut_at_eos(out.cpu().numpy(), set(self.eos_ids)))


def load_prompts(args, pair: Pair) -> tuple[list[list[int]], str]:
    """(--num-prompts prompts of exactly --prompt-tokens ids, where they came from): the last ids of each prompt
    of the file (the bundled held-out prompts by default with the bundled pair), or random ids."""
    source = args.prompts_file
    if source is None and not args.random_prompts and args.large.startswith("bundled:"):
        from bild_jax.demo import DEMO_PROMPTS

        source = DEMO_PROMPTS
    if source is None:
        rng = np.random.default_rng(args.seed)
        allowed = np.setdiff1d(np.arange(pair.jax["large"].vocab_size), pair.eos_ids + [pair.pad_id])
        return rng.choice(allowed, size=(args.num_prompts, args.prompt_tokens)).tolist(), "random ids"
    if source.suffix == ".json":  # the demo format: [{"prompt": [ids], ...}]
        prompts = [sample["prompt"] for sample in json.loads(source.read_text())]
    else:  # text, one prompt per line
        tokenizer = bild_jax.load_tokenizer(pair.dirs["large"])
        prompts = [tokenizer(line)["input_ids"] for line in source.read_text().splitlines() if line.strip()]
    prompts = [p[-args.prompt_tokens:] for p in prompts if len(p) >= args.prompt_tokens][:args.num_prompts]
    if len(prompts) < args.num_prompts:
        raise SystemExit(f"{source} has {len(prompts)} prompts of >= {args.prompt_tokens} tokens; "
                         f"--num-prompts is {args.num_prompts}")
    return prompts, str(source)


def record(run: SystemRun, batch_size: int, num_prompts: int) -> dict:
    """The JSON record of one system at one batch size: tokens, median pass seconds, speed, first call."""
    calls = num_prompts // batch_size
    return {"name": run.name, "batch_size": batch_size, "tokens": run.num_tokens, "median_s": run.seconds,
            "passes_s": run.pass_seconds, "tokens_per_s": run.tokens_per_s, "s_per_call": run.seconds / calls,
            "first_call_s": run.first_call_seconds, "compile_s": run.compile_seconds}


def run(args) -> dict:
    pair = Pair(args.small, args.large, args.dtype, args.torch_device)
    lossy = bild_jax.BiLDConfig(fallback_threshold=args.fallback, rollback_threshold=args.rollback,
                                max_draft=args.max_draft, max_new_tokens=args.max_new_tokens)
    exact = dataclasses.replace(lossy, exact=True)
    prompts, source = load_prompts(args, pair)
    by_batch = {}
    for batch_size in args.batch_sizes:
        systems = [System("bild-jax greedy", pair.jax_greedy(args.max_new_tokens)),
                   System("HF greedy", pair.hf_generate(args.max_new_tokens), pair.hf_rows),
                   System("bild-jax BiLD", pair.jax_bild(lossy))]
        if batch_size == 1:
            systems += [System("bild-jax BiLD exact", pair.jax_bild(exact)),
                        System("HF assisted", pair.hf_generate(args.max_new_tokens, lossy), pair.hf_rows)]
        used = prompts[:len(prompts) // batch_size * batch_size]
        print(f"batch {batch_size}: {', '.join(s.name for s in systems)} on {len(used)} prompts", file=sys.stderr,
              flush=True)
        runs = run_systems(systems, used, batch_size=batch_size, repeats=args.repeats)
        by_batch[batch_size] = ({run.name: run for run in runs}, len(used))

    results = {"prompts": source, "batches": {}, "comparisons": {}}
    for batch_size, (runs, num_prompts) in by_batch.items():
        records = {name: record(run, batch_size, num_prompts) for name, run in runs.items()}
        results["batches"][batch_size] = {
            "systems": records,
            "bild_speedup": records["bild-jax greedy"]["median_s"] / records["bild-jax BiLD"]["median_s"],
            "greedy_vs_hf_tokens_per_s": records["bild-jax greedy"]["tokens_per_s"]
            / records["HF greedy"]["tokens_per_s"],
        }
    if 1 in by_batch:
        s = by_batch[1][0]
        results["comparisons"] = {
            "greedy_tokens_per_s_ratio": results["batches"][1]["greedy_vs_hf_tokens_per_s"],
            "greedy_identical_to_hf": exact_match(s["bild-jax greedy"], s["HF greedy"]),
            "bild_vs_assisted_speed": s["HF assisted"].seconds / s["bild-jax BiLD"].seconds,
            "bild_agrees_with_assisted": exact_match(s["bild-jax BiLD"], s["HF assisted"]),
            "bild_agrees_with_large": exact_match(s["bild-jax BiLD"], s["bild-jax greedy"]),
            "exact_vs_assisted_speed": s["HF assisted"].seconds / s["bild-jax BiLD exact"].seconds,
            "exact_identical_to_assisted": exact_match(s["bild-jax BiLD exact"], s["HF assisted"]),
            "assisted_identical_to_hf_greedy": exact_match(s["HF assisted"], s["HF greedy"]),
        }
        c = results["comparisons"]
        results["targets"] = {"greedy >= 2x HF greedy tokens/s": c["greedy_tokens_per_s_ratio"] >= 2.0,
                              "BiLD >= 2x faster than HF assisted": c["bild_vs_assisted_speed"] >= 2.0,
                              "exact mode identical to HF assisted": c["exact_identical_to_assisted"] == 1.0}
    return results


def markdown(data: dict) -> str:
    s = data["settings"]
    parts = [
        *harness.report_header("bild-jax vs HF transformers", data),
        f"Pair: small `{s['small']}`, large `{s['large']}` ({s['dtype']}, same weights on both sides). "
        f"{s['num_prompts']} prompts of {s['prompt_tokens']} tokens ({data['results']['prompts']}), up to "
        f"{s['max_new_tokens']} new tokens, greedy. BiLD: fallback {s['fallback']}, rollback {s['rollback']}, "
        f"max_draft {s['max_draft']}; HF assisted: assistant_confidence_threshold {s['fallback']}, "
        f"num_assistant_tokens {s['max_draft']} (constant). Medians of {s['repeats']} interleaved passes; "
        "compilation excluded and reported below.\n",
    ]
    batches = data["results"]["batches"]
    if 1 in batches:
        c = data["results"]["comparisons"]
        sy = batches[1]["systems"]
        parts += ["## Large model alone, batch 1\n", harness.markdown_table(
            ["System", "tokens/s", "s per prompt", "vs HF greedy", "outputs = HF greedy"],
            [["HF greedy", f"{sy['HF greedy']['tokens_per_s']:.1f}", f"{sy['HF greedy']['s_per_call']:.3f}", "1.00x",
              "-"],
             ["bild-jax greedy", f"{sy['bild-jax greedy']['tokens_per_s']:.1f}",
              f"{sy['bild-jax greedy']['s_per_call']:.3f}", f"{c['greedy_tokens_per_s_ratio']:.2f}x",
              f"{c['greedy_identical_to_hf']:.0%}"]])]
        assisted = sy["HF assisted"]["median_s"]
        parts += ["## BiLD vs HF assisted generation, batch 1\n", harness.markdown_table(
            ["System", "tokens/s", "s per prompt", "speed vs HF assisted", "outputs = HF assisted",
             "outputs = large greedy"],
            [["HF assisted", f"{sy['HF assisted']['tokens_per_s']:.1f}", f"{sy['HF assisted']['s_per_call']:.3f}",
              "1.00x", "-", f"{c['assisted_identical_to_hf_greedy']:.0%} (HF)"],
             ["bild-jax BiLD", f"{sy['bild-jax BiLD']['tokens_per_s']:.1f}",
              f"{sy['bild-jax BiLD']['s_per_call']:.3f}", f"{assisted / sy['bild-jax BiLD']['median_s']:.2f}x",
              f"{c['bild_agrees_with_assisted']:.0%}", f"{c['bild_agrees_with_large']:.0%}"],
             ["bild-jax BiLD exact", f"{sy['bild-jax BiLD exact']['tokens_per_s']:.1f}",
              f"{sy['bild-jax BiLD exact']['s_per_call']:.3f}", f"{c['exact_vs_assisted_speed']:.2f}x",
              f"{c['exact_identical_to_assisted']:.0%}", "-"]])]
    rows = []
    for batch_size, b in batches.items():
        sy = b["systems"]
        hf_assisted = (f"{sy['HF assisted']['tokens_per_s']:.1f}" if "HF assisted" in sy
                       else "n/a (HF assisted generation supports batch 1 only)")
        rows.append([batch_size, f"{sy['bild-jax greedy']['tokens_per_s']:.1f}",
                     f"{sy['bild-jax BiLD']['tokens_per_s']:.1f}", f"{b['bild_speedup']:.2f}x",
                     f"{sy['HF greedy']['tokens_per_s']:.1f}", f"{b['greedy_vs_hf_tokens_per_s']:.2f}x", hf_assisted])
    parts += ["## Throughput by batch size (tokens/s)\n", harness.markdown_table(
        ["batch", "bild-jax greedy", "bild-jax BiLD", "BiLD speedup", "HF greedy", "bild-jax / HF greedy",
         "HF assisted"], rows)]
    rows = [[name, batch_size, f"{r['first_call_s']:.2f}", f"{r['s_per_call']:.3f}", f"{r['compile_s']:.2f}"]
            for batch_size, b in batches.items() for name, r in b["systems"].items()]
    parts += ["## First call (compilation) and steady state\n", harness.markdown_table(
        ["System", "batch", "first call s", "steady s per call", "compile s"], rows)]
    if "targets" in data["results"]:
        parts += ["## Targets\n", "\n".join(f"- {name}: {'met' if met else 'NOT met'}"
                                            for name, met in data["results"]["targets"].items()) + "\n"]
    return "\n".join(parts)


def build_parser() -> argparse.ArgumentParser:
    defaults = bild_jax.BiLDConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device-info", action="store_true", help="print the machine description and exit")
    parser.add_argument("--small", default="bundled:small", help="path, hub id or bundled:NAME (default %(default)s)")
    parser.add_argument("--large", default="bundled:large", help="path, hub id or bundled:NAME (default %(default)s)")
    parser.add_argument("--prompts-file", type=Path, help="demo-format JSON ([{'prompt': [ids]}]) or text, one "
                        "prompt per line; default: the bundled held-out prompts with a bundled pair, else random ids")
    parser.add_argument("--random-prompts", action="store_true", help="random token ids even for the bundled pair")
    parser.add_argument("--num-prompts", type=int, default=16, help="(default %(default)s)")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="(default %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="(default %(default)s)")
    parser.add_argument("--fallback", type=float, default=defaults.fallback_threshold, help="(default %(default)s)")
    parser.add_argument("--rollback", type=float, default=defaults.rollback_threshold, help="(default %(default)s)")
    parser.add_argument("--max-draft", type=int, default=defaults.max_draft, help="(default %(default)s)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16], help="(default 1 4 16)")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per system (default %(default)s)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--torch-device", default="cpu", help="cpu or cuda (default %(default)s)")
    parser.add_argument("--torch-threads", type=int, help="torch CPU threads (default: torch's, one per core); "
                        "on a busy machine 1 avoids OpenMP threads spinning against other processes")
    parser.add_argument("--seed", type=int, default=0, help="for random prompts (default %(default)s)")
    parser.add_argument("--out-dir", type=Path, default=harness.RESULTS_DIR, help="(default experiments/results)")
    parser.add_argument("--name", default="bench", help="result file name (default %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    machine = harness.machine_info()
    if args.device_info:
        print(json.dumps(machine, indent=1))
        return 0
    for name in ("num_prompts", "prompt_tokens", "max_new_tokens", "max_draft", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if min(args.batch_sizes) < 1 or max(args.batch_sizes) > args.num_prompts:
        parser.error("--batch-sizes must lie in [1, --num-prompts]")
    command = ["python", "experiments/bench.py", *(sys.argv[1:] if argv is None else argv)]
    data = {"command": " ".join(command), "machine": machine, "settings": vars(args), "results": run(args)}
    json_path, md_path = harness.write_results(data, markdown(data), args.out_dir, args.name)
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
