"""The `bild-jax` command."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import traceback
from pathlib import Path

# Only light imports here: `main` installs the Ctrl-C handling before JAX is imported (`bild_jax` imports
# its public names on first use).
import bild_jax
from bild_jax.atomic import check_writable, write_text_atomic
from bild_jax.errors import InputError
from bild_jax.interrupt import exit_on_interrupt

SEED_RANGE = (-2 ** 63, 2 ** 63 - 1)  # what jax.random.key takes


class _Parser(argparse.ArgumentParser):
    """argparse with its errors in the command's one-line format (argparse prints usage + error)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_pair_arguments(parser: argparse.ArgumentParser, thresholds: bool = True, max_new_tokens: int = 64,
                        small: str = "bundled:small", from_profile: bool = False, small_dtype: bool = True) -> None:
    """--small, (with `small_dtype`) --small-dtype, --large, --max-new-tokens and (with `thresholds`)
    --fallback, --rollback, --max-draft, whose defaults are the library's, or with `from_profile` None: the
    small model's pair profile decides."""
    defaults = bild_jax.BiLDConfig()
    parser.add_argument("--small", default=small,
                        help="small model: HF-format directory, hub id or bundled:NAME (default %(default)s)")
    if small_dtype:
        parser.add_argument("--small-dtype", choices=("bfloat16", "float32"),
                            help="the small model's dtype: the large model verifies its drafts, so it never changes "
                                 "exact mode's output (default bfloat16: half the bytes a step reads)")
    parser.add_argument("--large", default="bundled:large",
                        help="large model: HF-format directory, hub id or bundled:NAME (default %(default)s)")
    if thresholds:
        default = "the small model's pair profile, else %s" if from_profile else "%s"
        parser.add_argument("--fallback", type=float, default=None if from_profile else defaults.fallback_threshold,
                            help=f"fallback threshold in [0, 1] (default {default % defaults.fallback_threshold})")
        parser.add_argument("--rollback", type=float, default=None if from_profile else defaults.rollback_threshold,
                            help=f"rollback threshold >= 0, or inf (default {default % defaults.rollback_threshold})")
        parser.add_argument("--max-draft", type=int, default=None if from_profile else defaults.max_draft,
                            help="small-model tokens before the large model must verify "
                                 f"(default {default % defaults.max_draft})")
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help="(default %(default)s)")


def _floats(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")
    return values


def _seed(text: str) -> int:
    try:
        seed = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int, got {text!r}") from None
    if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise argparse.ArgumentTypeError(f"a seed must fit in 64 bits (a signed int64), got {seed}")
    return seed


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="bild-jax", description="Big Little Decoder text generation in JAX.")
    parser.add_argument("--version", action="version", version=f"bild-jax {bild_jax.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    generate = commands.add_parser("generate", help="generate text with a small/large pair")
    _add_pair_arguments(generate, from_profile=True)
    generate.add_argument("--no-profile", action="store_true",
                          help="ignore the small model's pair profile (bild_pair.json): library defaults")
    source = generate.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one prompt")
    source.add_argument("--prompts-file", type=Path, help="a text file with one prompt per line (batched)")
    generate.add_argument("--exact", action="store_true", help="lossless: output equals the large model's greedy")
    generate.add_argument("--lookup-tokens", type=int, default=bild_jax.BiLDConfig().lookup_tokens,
                          help="with --exact, greedy: tokens drafted by prompt lookup where the small model is "
                               "unsure, 0 = none (default %(default)s)")
    generate.add_argument("--json", action="store_true", help="print JSON lines with text, tokens and stats")
    generate.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default %(default)s)")
    generate.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens, 0 = all")
    generate.add_argument("--top-p", type=float, default=1.0, help="sample from the top-p nucleus, 1 = all")
    generate.add_argument("--seed", type=_seed, default=0, help="PRNG seed when sampling (default %(default)s)")
    generate.add_argument("--schedule", type=Path,
                          help="batch schedule table (JSON from `bild-jax bench --save-schedule`); default: the "
                               "built-in table for this backend")

    demo = commands.add_parser("demo", help="offline demo on the bundled pair: speed, quality, token sources")
    demo.add_argument("--task", default="continue",
                      help="continue: the decoder-only pair continues held-out code (default); summarize: the T5 "
                           "pair summarizes held-out functions, in the BiLD paper's Table 1 shape")
    demo.add_argument("--num-prompts", type=int,
                      help="held-out inputs to run, at most the bundled ones (default: 64 for continue, 32 for "
                           "summarize)")
    demo.add_argument("--max-new-tokens", type=int, default=48, help="(default %(default)s)")
    demo.add_argument("--json", type=Path, help="also write the table rows to this JSON file")

    sweep = commands.add_parser("sweep", help="fallback x rollback grid: CSV, quality-vs-speedup plot, best point")
    _add_pair_arguments(sweep, thresholds=False, max_new_tokens=48)
    sweep.add_argument("--max-draft", type=int, default=bild_jax.BiLDConfig().max_draft, help="(default %(default)s)")
    sweep.add_argument("--prompts-file", type=Path,
                       help="demo-format JSON (prompt and continuation ids) or text, one prompt per line; "
                            "default: the bundled held-out prompts")
    sweep.add_argument("--num-prompts", type=int, default=32, help="(default %(default)s)")
    sweep.add_argument("--fallbacks", type=_floats, default=[0.3, 0.5, 0.7, 0.9], help="(default 0.3,0.5,0.7,0.9)")
    sweep.add_argument("--rollbacks", type=_floats, default=[1.0, 2.0, 3.0, 5.0], help="(default 1,2,3,5)")
    sweep.add_argument("--out", type=Path, default=Path("sweep"), help="output directory (default %(default)s)")

    align = commands.add_parser("align", help="fine-tune the small model on the large model's outputs (prediction "
                                              "alignment); writes an HF-format directory")
    _add_pair_arguments(align, thresholds=False, small_dtype=False)
    align.add_argument("--data", required=True,
                       help="prompt source: a .txt (one text per line), .jsonl or .parquet file, or a datasets id")
    align.add_argument("--out", type=Path, required=True, help="output directory for the aligned small model")
    align.add_argument("--text-field", help="the text column of .jsonl/.parquet/datasets data (default: the first "
                                            "of text, prompt, content, input, document)")
    align.add_argument("--split", default="train", help="datasets split (default %(default)s)")
    align.add_argument("--num-prompts", type=int, default=4096,
                       help="prompts, the held-out ones included (default %(default)s)")
    align.add_argument("--prompt-tokens", type=int, default=32,
                       help="texts are cut into prompts of this many tokens (default %(default)s)")
    align.add_argument("--eval-prompts", type=int, default=64,
                       help="prompts held out for agreement and speed, before and after (default %(default)s)")
    align.add_argument("--steps", type=int, default=1000, help="(default %(default)s)")
    align.add_argument("--batch-size", type=int, default=16, help="(default %(default)s)")
    align.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default %(default)s)")
    align.add_argument("--temperature", type=float, default=0.0,
                       help="sample the large model's outputs at this temperature; 0 = greedy (default %(default)s)")
    align.add_argument("--seed", type=int, default=0, help="(default %(default)s)")
    align.add_argument("--ignore-eos", action="store_true", help="the large model's outputs run to --max-new-tokens")
    align.add_argument("--work-dir", type=Path,
                       help="large-model outputs and checkpoints; a run resumes there (default OUT/alignment)")
    align.add_argument("--no-timing", action="store_true", help="skip timing BiLD before and after")

    tune = commands.add_parser("tune", help="sweep a pair and write its profile (bild_pair.json): the fastest "
                                            "settings within a quality loss")
    _add_pair_arguments(tune, thresholds=False, max_new_tokens=48)
    tune.add_argument("--prompts", dest="prompts_file", type=Path,
                      help="demo-format JSON (prompt and continuation ids) or text, one prompt per line; "
                           "default: the bundled held-out prompts")
    tune.add_argument("--num-prompts", type=int, default=64, help="(default %(default)s)")
    tune.add_argument("--fallbacks", type=_floats, default=[0.2, 0.3, 0.4, 0.5, 0.6, 0.8],
                      help="(default 0.2,0.3,0.4,0.5,0.6,0.8)")
    tune.add_argument("--rollbacks", type=_floats, default=[2.0, 3.0, 5.0, float("inf")],
                      help="(default 2,3,5,inf)")
    tune.add_argument("--max-drafts", type=_ints, default=[bild_jax.BiLDConfig().max_draft],
                      help="(default %(default)s)")
    tune.add_argument("--max-rouge-loss", type=float, default=1.0,
                      help="allowed ROUGE-L loss against the large model alone, measured against the prompts' "
                           "continuations, or the large model's output without them (default %(default)s)")
    tune.add_argument("--out", type=Path, help="profile file or directory (default: next to the small model)")
    tune.add_argument("--sweep-out", type=Path, default=Path("tune"),
                      help="directory for the sweep's CSV and plot (default %(default)s)")

    bench = commands.add_parser("bench", help="JAX-only benchmark on this machine's backend: step costs, bandwidth "
                                              "utilization, end-to-end speed")
    _add_pair_arguments(bench, max_new_tokens=48, small="bundled:small-aligned")
    bench.add_argument("--shape", help="random-weight Llama models of real sizes instead of --small/--large: "
                                       "llama-1b, llama-3b, llama-8b or tiny")
    bench.add_argument("--dtype", help="the large model's dtype, float32 or bfloat16 (default: float32 for "
                                       "checkpoints, bfloat16 for shapes)")
    bench.add_argument("--num-prompts", type=int, default=16, help="(default %(default)s)")
    bench.add_argument("--batch-sizes", default="", help="also measure throughput at these batch sizes, e.g. 1,4,16")
    bench.add_argument("--prompts-file", type=Path,
                       help="demo-format JSON of prompt ids; default: the bundled held-out prompts for a bundled "
                            "pair, else random ids")
    bench.add_argument("--json", help="write the record as JSON to this file, or '-': print it instead of the tables")
    bench.add_argument("--save-schedule", type=Path,
                       help="write the best schedule at each of --batch-sizes to this file, for `generate --schedule`")
    return parser


def _read_prompts(args) -> list[str]:
    if args.prompt is not None:
        prompts = [args.prompt]
    else:
        if not args.prompts_file.is_file():
            raise InputError(f"no prompts file at {args.prompts_file}")
        try:
            text = args.prompts_file.read_text()
        except UnicodeDecodeError:
            raise InputError(f"{args.prompts_file} is not a UTF-8 text file") from None
        prompts = [line.rstrip("\n") for line in text.splitlines() if line.strip()]
        if not prompts:
            raise InputError(f"{args.prompts_file} holds no prompts")
    if any(not p.strip() for p in prompts):
        raise InputError("empty prompt")
    return prompts


def _shared_tokenizer(args):
    small_tok, large_tok = bild_jax.load_tokenizer(args.small), bild_jax.load_tokenizer(args.large)
    if small_tok.get_vocab() != large_tok.get_vocab():
        raise InputError(f"the tokenizers of {args.small} and {args.large} differ; BiLD needs one shared vocabulary")
    return large_tok


def _load_pair(args):
    """(small, large, tokenizer): the models cut to their shared vocabulary when they only pad it apart; the
    small one in `--small-dtype`, else `hub.SMALL_MODEL_DTYPE`."""
    from bild_jax.hub import SMALL_MODEL_DTYPE

    small = bild_jax.load_model(args.small, args.small_dtype or SMALL_MODEL_DTYPE)
    large = bild_jax.load_model(args.large)
    small_tok, large_tok = bild_jax.load_tokenizer(args.small), bild_jax.load_tokenizer(args.large)
    try:
        shared_small, shared_large = bild_jax.shared_vocabulary(small, large, small_tok, large_tok)
    except ValueError as error:
        raise InputError(f"cannot pair {args.small} with {args.large}: {error}") from None
    if shared_large.vocab_size != large.vocab_size or shared_small.vocab_size != small.vocab_size:
        print(f"note: the vocabularies differ only by padding rows (small {small.vocab_size}, large "
              f"{large.vocab_size}, one tokenizer of {len(large_tok)} tokens): decoding over the shared "
              f"{shared_large.vocab_size}", file=sys.stderr)
    return shared_small, shared_large, large_tok


def _generate_config(args) -> tuple[bild_jax.BiLDConfig, str]:
    """The BiLDConfig of `generate` and where its settings come from (a line for stderr, "" for flags or
    defaults): the flags given, the rest from the small model's pair profile when it has one, else the
    library defaults."""
    from bild_jax.profile import find_profile, read_profile
    from bild_jax.schedule import ScheduleTable

    schedule = None if args.schedule is None else ScheduleTable.load(args.schedule)
    settings = dict(max_new_tokens=args.max_new_tokens, exact=args.exact, temperature=args.temperature,
                    top_k=args.top_k, top_p=args.top_p, lookup_tokens=args.lookup_tokens, schedule=schedule)
    given = {name: value for name, value in [("fallback_threshold", args.fallback),
                                             ("rollback_threshold", args.rollback), ("max_draft", args.max_draft)]
             if value is not None}
    bild_jax.BiLDConfig(**given, **settings)  # a bad flag fails before anything is loaded
    path = None if args.no_profile or len(given) == 3 else find_profile(args.small)
    if path is None:
        return bild_jax.BiLDConfig(**given, **settings), ""
    profile = read_profile(path)
    config = dataclasses.replace(profile.config(**settings), **given)
    overridden = f"; given on the command line: {', '.join(f'{k} {v:g}' for k, v in given.items())}" if given else ""
    return config, f"bild-jax generate: using the pair profile {path} ({profile.describe()}){overridden}"


def run_generate(args) -> None:
    prompts = _read_prompts(args)
    config, settings_source = _generate_config(args)
    small, large, tokenizer = _load_pair(args)
    import jax

    ids = [tokenizer(p)["input_ids"] for p in prompts]
    rng = jax.random.key(args.seed) if config.temperature > 0 else None  # greedy: the program without a key
    out = bild_jax.bild_generate(small, large, ids, config, rng=rng)
    # Said once the output is there, so that an error stays the only line on stderr.
    if settings_source:
        print(settings_source, file=sys.stderr)
    if len(prompts) > 1:  # how the rows shared the large model (batch 1 always runs BiLD)
        print(f"batch of {len(prompts)}: {out.schedule.describe()}", file=sys.stderr)
    for row, prompt in enumerate(prompts):
        n = int(out.lengths[row])
        tokens = [int(t) for t in out.tokens[row, :n]]
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        if args.json:
            stats = {name: int(value[row]) for name, value in vars(out.stats).items()}
            print(json.dumps({"prompt": prompt, "text": text, "tokens": tokens, "stats": stats,
                              "schedule": out.schedule.describe()}))
        else:
            print(f"{prompt}{text}")


def run_demo(args) -> None:
    from bild_jax.demo import TASKS, run_demo as demo, run_summarize_demo

    if args.task not in TASKS:
        raise InputError(f"unknown --task {args.task!r}; choose one of {', '.join(TASKS)}")
    if args.num_prompts is not None and args.num_prompts < 1:
        raise InputError("--num-prompts must be >= 1")
    if args.json:
        check_writable(args.json)
    if args.task == "summarize":
        rows = run_summarize_demo(num_prompts=args.num_prompts or 32, max_new_tokens=args.max_new_tokens)
    else:
        rows = demo(num_prompts=args.num_prompts or 64, max_new_tokens=args.max_new_tokens)
    if args.json:
        write_text_atomic(args.json, json.dumps(rows, indent=1))


def _sweep_prompts(args, tokenizer) -> tuple[list[list[int]], list[str] | None]:
    from bild_jax.demo import DEMO_PROMPTS, load_demo_prompts

    path = args.prompts_file or DEMO_PROMPTS
    if not path.is_file():
        raise InputError(f"no prompts file at {path}")
    if path.suffix == ".json":
        samples = load_demo_prompts(path, args.num_prompts)
        references = [tokenizer.decode(s["continuation"]) for s in samples if "continuation" in s]
        return [s["prompt"] for s in samples], references if len(references) == len(samples) else None
    args.prompt, args.prompts_file = None, path
    return [tokenizer(p)["input_ids"] for p in _read_prompts(args)[:args.num_prompts]], None


def run_sweep(args) -> None:
    from bild_jax.sweep import MAX_ROUGE_LOSS, grid_configs, run_sweep as sweep

    if args.num_prompts < 1:
        raise InputError("--num-prompts must be >= 1")
    grid_configs(args.fallbacks, args.rollbacks, args.max_new_tokens, args.max_draft)  # bad flags fail before loading
    check_writable(args.out, directory=True)
    small, large, tokenizer = _load_pair(args)
    prompts, references = _sweep_prompts(args, tokenizer)
    result = sweep(small, large, prompts, references, tokenizer.decode, args.fallbacks, args.rollbacks,
                   args.max_new_tokens, args.max_draft, args.out)
    base = result["baseline"]
    print(f"large only: ROUGE-L {base['rouge_l']:.1f}, {base['tokens_per_s']:.0f} tokens/s")
    best = result["recommended"]
    if best:
        print(f"recommended: --fallback {best['fallback']} --rollback {best['rollback']}: {best['speedup']:.2f}x, "
              f"ROUGE-L {best['rouge_l']:.1f}")
    else:
        print(f"no grid point is within {MAX_ROUGE_LOSS:g} ROUGE-L of large-only")
    print(f"wrote {result['csv']} and {result['png']}")


def run_align(args) -> None:
    from bild_jax.align import align
    from bild_jax.prompt_sources import prompt_windows, read_texts

    for name in ("num_prompts", "prompt_tokens", "steps", "batch_size", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1")
    check_writable(args.out, directory=True)
    tokenizer = _shared_tokenizer(args)
    texts = read_texts(args.data, args.text_field, args.split)
    prompts = prompt_windows(tokenizer, texts, args.prompt_tokens, args.num_prompts, args.seed)
    print(f"{len(prompts)} prompts of up to {args.prompt_tokens} tokens from {len(texts)} texts of {args.data}")
    align(args.small, args.large, prompts, args.out, eval_prompts=args.eval_prompts, steps=args.steps,
          batch_size=args.batch_size, lr=args.lr, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
          seed=args.seed, eos_token_id=[] if args.ignore_eos else None, work_dir=args.work_dir,
          measure_speed=not args.no_timing)


def _profile_path(args) -> Path:
    """Where `tune` writes the profile: --out, else the small model's own directory (local or bundled)."""
    from bild_jax.hub import BUNDLED_PREFIX, resolve_model_dir
    from bild_jax.profile import PROFILE_FILE

    if args.out is not None:
        return args.out / PROFILE_FILE if args.out.is_dir() or not args.out.suffix else args.out
    if not (args.small.startswith(BUNDLED_PREFIX) or Path(args.small).expanduser().is_dir()):
        raise InputError(f"{args.small} is not a local directory: pass --out for the profile")
    return resolve_model_dir(args.small) / PROFILE_FILE


def run_tune(args) -> None:
    from bild_jax.demo import DEMO_PROMPTS
    from bild_jax.profile import write_profile
    from bild_jax.tune import NEAR_BEST, UNSTABLE, tune

    if args.num_prompts < 2:
        raise InputError("--num-prompts must be >= 2")
    profile_path = _profile_path(args)
    check_writable(profile_path)
    check_writable(args.sweep_out, directory=True)
    small, large, tokenizer = _load_pair(args)
    prompts, references = _sweep_prompts(args, tokenizer)
    result = tune(small, large, prompts, references, tokenizer.decode, fallbacks=args.fallbacks,
                  rollbacks=args.rollbacks, max_drafts=args.max_drafts, max_new_tokens=args.max_new_tokens,
                  sweep_dir=args.sweep_out, max_rouge_loss=args.max_rouge_loss, large_name=args.large,
                  prompts_name=str(args.prompts_file or DEMO_PROMPTS))
    base, profile = result["baseline"], result["profile"]
    print(f"large only: ROUGE-L {base['rouge_l']:.1f}, {base['tokens_per_s']:.0f} tokens/s "
          f"(against {'the continuations' if references else 'its own output'})")
    print(f"wrote {result['csv']} and {result['png']}")
    if profile is None:
        raise InputError(f"no grid point is within {args.max_rouge_loss:g} ROUGE-L of large-only; no profile written")
    quality, spread = profile.quality, result["spread"]
    print(f"recommended: fallback {profile.fallback_threshold:g}, rollback {profile.rollback_threshold:g}, "
          f"max_draft {profile.max_draft}: {profile.speedup:.2f}x (5-95%: {spread['speedup'][0]:.2f}-"
          f"{spread['speedup'][1]:.2f}x), ROUGE-L {quality['bild']:.1f} vs {quality['large']:.1f} (loss 5-95%: "
          f"{spread['rouge_l_loss'][0]:+.1f} to {spread['rouge_l_loss'][1]:+.1f}); over {quality['resamples']} "
          f"resamples of the {len(prompts)} prompts it is within the loss and {NEAR_BEST:.0%} of the fastest such "
          f"point in {spread['near_best']:.0%}, the fastest itself in {spread['stability']:.0%}")
    if spread["near_best"] < UNSTABLE:
        print("the choice is not stable over these prompts: tune on more (--num-prompts, --prompts)")
    if profile.speedup < 1:
        print(f"at its best BiLD is slower than the large model alone on these prompts ({profile.speedup:.2f}x): "
              "the profile holds the best BiLD settings for this pair, but the large model alone is faster; "
              "aligning the small model (bild-jax align) is what can change that")
    print(f"wrote {write_profile(profile, profile_path)}")


def run_bench(args) -> None:
    from rich.console import Console
    from rich.progress import Progress

    from bild_jax.bench import DEFAULT_LARGE, DEFAULT_SMALL, print_report, run_bench as bench
    from bild_jax.hub import SMALL_MODEL_DTYPE

    if args.shape is not None and (args.small, args.large) != (DEFAULT_SMALL, DEFAULT_LARGE):
        raise InputError("--shape makes both models; drop --small/--large")
    if args.save_schedule is not None and (args.shape is not None or not args.batch_sizes.strip()):
        raise InputError("--save-schedule needs --batch-sizes and a real pair (not --shape): random weights "
                         "have no acceptance to schedule")
    try:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    except ValueError:
        raise InputError(f"--batch-sizes expects comma-separated ints, got {args.batch_sizes!r}") from None
    for output in (args.json if args.json != "-" else None, args.save_schedule):
        if output:
            check_writable(output)
    settings = dict(small=args.small, large=args.large, shape=args.shape, dtype=args.dtype,
                    small_dtype=args.small_dtype or SMALL_MODEL_DTYPE, fallback=args.fallback, rollback=args.rollback,
                    max_draft=args.max_draft, num_prompts=args.num_prompts, max_new_tokens=args.max_new_tokens,
                    batch_sizes=batch_sizes, prompts_file=args.prompts_file)
    stderr = Console(stderr=True)
    if stderr.is_terminal:
        with Progress(console=stderr, transient=True) as progress:
            result = bench(**settings, progress=progress)
    else:
        result = bench(**settings)
    if args.save_schedule is not None:
        from bild_jax.schedule import ScheduleTable

        ScheduleTable.from_dict(result["schedule_table"]).save(args.save_schedule)
    if args.json == "-":
        print(json.dumps(result, indent=1))
        return
    print_report(result)
    if args.json:
        write_text_atomic(args.json, json.dumps(result, indent=1))


COMMANDS = {"generate": run_generate, "demo": run_demo, "sweep": run_sweep, "align": run_align, "tune": run_tune,
            "bench": run_bench}


def main(argv: list[str] | None = None) -> int:
    """Runs the command in `argv` and returns its exit code: 0, 2 for bad input (one line on stderr), 1 for
    a bug (its traceback). `argv` None: the process's own command line, and the process is the command,
    so Ctrl-C ends it with one line and exit code 130 (`bild_jax.interrupt`)."""
    if argv is None:
        exit_on_interrupt("bild-jax")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        COMMANDS[args.command](args)
    except (InputError, OSError) as error:  # OSError: a missing, unreadable or unwritable file
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"bild-jax {args.command}: error: {message}", file=sys.stderr)
        return 2
    except Exception as error:
        if isinstance(error, MemoryError) or "RESOURCE_EXHAUSTED" in str(error):
            # The estimate (`bild_jax.memory`) missed by a little: the sizes asked for, not a bug.
            print(f"bild-jax {args.command}: error: out of memory ({type(error).__name__}); lower --max-new-tokens, "
                  f"--max-draft or the number of prompts", file=sys.stderr)
            return 2
        traceback.print_exc()
        print(f"bild-jax {args.command}: internal error: this is a bug in bild-jax {bild_jax.__version__}; please "
              f"report it with the command line and the traceback above", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
