"""Reproduces Table 1 of the BiLD paper (Kim et al., NeurIPS 2023) with bild-jax: quality and wall-clock speedup
of BiLD against the large and small models alone, on IWSLT2017 de-en and WMT14 de-en (sacreBLEU), XSUM
(ROUGE-L), CNN/DailyMail (ROUGE-Lsum) and WikiText-2 continuation (ROUGE-L against the real text, exact match
with the large model).

Commands, from the repository root (models and data come from the Hugging Face Hub):

    # the four paper tasks with the authors' checkpoints, batch 1 as in the paper, two BiLD points:
    python experiments/reproduce.py --tasks iwslt2017 wmt14 xsum cnndm
    # the same with the paper's selection: a fallback x rollback sweep, Table 1 picks the fastest points that
    # match the large model's quality and that lose at most 1 point
    python experiments/reproduce.py --tasks iwslt2017 wmt14 xsum cnndm --sweep
    # WikiText-2 (the paper released no decoder-only pair; GPT-2 / GPT-2 large by default)
    python experiments/reproduce.py --tasks wikitext2
    # any pair, any task: paths or hub ids
    python experiments/reproduce.py --tasks xsum --large DIR --small DIR [--small-aligned DIR]
    # offline, on local data files with the real datasets' columns (what CI runs on tiny fixtures):
    python tests/experiment_fixtures.py /tmp/bild-fixtures       # tiny T5 and Llama pairs + tokenizer
    python experiments/reproduce.py --data-dir tests/fixtures/paper_tasks --tasks iwslt2017 wmt14 xsum cnndm \
        --large /tmp/bild-fixtures/t5/large --small /tmp/bild-fixtures/t5/small \
        --small-aligned /tmp/bild-fixtures/t5/small-aligned --max-new-tokens 8 --name reproduce-fixtures

Results: `experiments/results/<name>.json` (every system's quality, timings and BiLD counters, the machine) and
`<name>.md` (Table 1 and one detail table per task).

Method. Greedy decoding, `--batch-size` prompts per call (1 reproduces the paper). For every batch, all systems
run one after the other (interleaved, so that machine-load drift hits them alike; `bild_jax.evaluation.run_systems`).
On each new batch shape (batch size, prompt bucket) every system first runs once, timed apart; where that call
compiled a program, its time less the steady call on the same batch is reported as `compile_seconds`. Speedup
is the large model's generation time over the system's. Tokenization, decoding to text and scoring are not
timed. fallback_rate and rollback_rate are fallbacks and rollbacks per generated token.

Assumptions (the real run cannot be executed in the sandbox this was written in, which has no network):
- Checkpoint names: the "Authors' Checkpoints" table of the official release, as listed in PAPER_PAIRS below.
  Checkpoints published as `pytorch_model.bin` only are converted once to safetensors with transformers
  (--converted-dir), since bild-jax reads safetensors only.
- The T5/mT5 tokenizers are SentencePiece models: transformers needs `pip install sentencepiece` to load
  them when the hub repository has no tokenizer.json.
- Inputs follow the official scripts: translation without a prefix (run_bild_translation.py passes no
  --source_prefix; the mT5 models were fine-tuned that way), summarization with "summarize: " (T5's prefix);
  sources truncated to 1024 tokens, at most 128 new tokens (the HF example scripts' defaults), validation
  splits (the official script runs --do_eval).
- Tokenizers: google/mt5-small for the mT5 pairs (as the official translation script hard-codes),
  google-t5/t5-small for the T5 pairs; a pair given on the command line uses its large model's tokenizer.
- ROUGE: rouge-score with the Porter stemmer, F1 x 100 averaged over examples; for ROUGE-Lsum sentences are
  split at . ! ? and newlines (the HF scripts use nltk's punkt, which needs a download).
- WikiText-2: test-split paragraphs (no headings) with at least --prompt-tokens + --max-new-tokens tokens;
  the prompt is their first --prompt-tokens tokens, the reference the next --max-new-tokens tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import re
import sys
from pathlib import Path
from typing import Callable

import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import harness  # noqa: E402

import bild_jax  # noqa: E402
from bild_jax import evaluation  # noqa: E402
from bild_jax.hub import read_config, resolve_model_dir  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Pair:
    """A large model, the small model(s) to pair it with, and the tokenizer they share."""

    large: str
    small: str
    small_aligned: str | None = None
    tokenizer: str | None = None  # None: the large model's


# The authors' fine-tuned checkpoints ("Authors' Checkpoints" table of github.com/kssteven418/BigLittleDecoder;
# names as mirrored in third-party reproductions, not checked against the hub from here). The aligned small
# models were fine-tuned on the large model's own outputs (the paper's prediction alignment).
PAPER_PAIRS = {
    "iwslt2017": Pair("kssteven/mT5-large-iwslt2017-de-en", "kssteven/mT5-small-iwslt2017-de-en",
                      "kssteven/mT5-small-iwslt2017-de-en-bild-aligned", "google/mt5-small"),
    "wmt14": Pair("kssteven/mT5-large-wmt2014-de-en", "kssteven/mT5-small-wmt2014-de-en",
                  "kssteven/mT5-small-wmt2014-de-en-bild-aligned", "google/mt5-small"),
    "xsum": Pair("kssteven/T5-large-xsum", "kssteven/T5-small-xsum", "kssteven/T5-small-xsum-bild-aligned",
                 "google-t5/t5-small"),
    "cnndm": Pair("kssteven/T5-large-cnndm", "kssteven/T5-small-cnndm", "kssteven/T5-small-cnndm-bild-aligned",
                  "google-t5/t5-small"),
    # Not from the paper: it released no decoder-only pair. Two sizes of one family sharing a tokenizer.
    "wikitext2": Pair("openai-community/gpt2-large", "openai-community/gpt2"),
}


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    title: str
    dataset: str                 # hub id
    config: str | None
    split: str
    kind: str                    # "translation", "summarization" or "continuation"
    source: str                  # column; "translation" rows hold {"de": ..., "en": ...}
    target: str
    prefix: str
    metric: str                  # the Table 1 metric: "bleu", "rougeL" or "rougeLsum"
    max_new_tokens: int


TASKS = {t.name: t for t in [
    Task("iwslt2017", "IWSLT2017 de-en", "IWSLT/iwslt2017", "iwslt2017-de-en", "validation", "translation",
         "de", "en", "", "bleu", 128),
    Task("wmt14", "WMT14 de-en", "wmt/wmt14", "de-en", "validation", "translation", "de", "en", "", "bleu", 128),
    Task("xsum", "XSUM", "EdinburghNLP/xsum", None, "validation", "summarization", "document", "summary",
         "summarize: ", "rougeL", 128),
    Task("cnndm", "CNN/DailyMail", "abisee/cnn_dailymail", "3.0.0", "validation", "summarization", "article",
         "highlights", "summarize: ", "rougeLsum", 128),
    Task("wikitext2", "WikiText-2", "Salesforce/wikitext", "wikitext-2-raw-v1", "test", "continuation", "text",
         "text", "", "rougeL", 64),
]}
METRIC_NAMES = {"bleu": "BLEU", "rougeL": "ROUGE-L", "rougeLsum": "ROUGE-Lsum"}
DEFAULT_POINTS = [(0.6, 5.0), (0.9, 2.0)]  # two points in the range the official README recommends (RB 2-5)
SWEEP_FALLBACKS = [0.3, 0.5, 0.7, 0.9]
SWEEP_ROLLBACKS = [1.0, 2.0, 3.0, 5.0]
# Table 1 shows, per small model, the fastest point that keeps the large model's quality and the fastest one
# within 1 point of it, as the paper does. "Keeps" allows the rounding of the paper's table.
MATCHED_TOLERANCE = 0.1
DROP_TOLERANCE = 1.0


@dataclasses.dataclass
class Example:
    prompt: list[int]
    reference: str


def load_rows(task: Task, data_dir: Path | None, split: str | None):
    """The task's evaluation rows as a `datasets.Dataset`: the hub split, or `<data_dir>/<task>.{jsonl,json,
    parquet}` holding the same columns."""
    from datasets import load_dataset

    if data_dir is not None:
        files = [data_dir / f"{task.name}.{ext}" for ext in ("jsonl", "json", "parquet")]
        file = next((f for f in files if f.is_file()), None)
        if file is None:
            raise FileNotFoundError(f"no {task.name}.jsonl, .json or .parquet in {data_dir}")
        return load_dataset("parquet" if file.suffix == ".parquet" else "json", data_files=str(file), split="train")
    split = split or task.split
    try:
        return load_dataset(task.dataset, task.config, split=split)
    except Exception as error:  # datasets raises many types (offline, script-based, missing config)
        # Script-based datasets no longer load with datasets >= 4; the hub's viewer keeps a parquet export.
        export = f"hf://datasets/{task.dataset}@~parquet/{task.config or 'default'}/{split}/*.parquet"
        try:
            return load_dataset("parquet", data_files=export, split="train")
        except Exception:  # the first error is the informative one
            raise OSError(f"could not load {task.dataset} ({task.config}, {split}): {error}; export the split to "
                          f"<dir>/{task.name}.jsonl with the same columns and pass --data-dir <dir>") from None


def safetensors_checkpoint(spec: str, converted_dir: Path) -> str:
    """`spec` when it resolves to safetensors weights; for a checkpoint published as pytorch_model.bin only
    (bild-jax reads no pickles), a safetensors copy under `converted_dir`, made once by transformers, whose
    loader unpickles with torch's weights-only mode."""
    model_dir = resolve_model_dir(spec)
    if any(model_dir.glob("*.safetensors")):
        return spec
    target = converted_dir / str(spec).strip("/").replace("/", "--")
    if not (target / "config.json").is_file():
        import transformers

        seq2seq = read_config(model_dir).get("is_encoder_decoder", False)
        auto = transformers.AutoModelForSeq2SeqLM if seq2seq else transformers.AutoModelForCausalLM
        print(f"converting {spec} to safetensors in {target}", file=sys.stderr, flush=True)
        auto.from_pretrained(spec).save_pretrained(target)
    return str(target)


def special_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer puts before a text (a BOS for Llama tokenizers, none for GPT-2 or T5)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    start = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), 0)
    return full[:start]


def build_examples(task: Task, rows, tokenizer, max_examples: int | None, max_source_tokens: int,
                   prompt_tokens: int, max_new_tokens: int) -> list[Example]:
    """Prompt ids and reference texts, in dataset order."""
    examples = []
    if task.kind == "continuation":
        bos = special_prefix(tokenizer)
        for text in rows[task.source]:
            text = text.strip()
            if not text or text.startswith("="):  # blank lines and " = Heading = " lines
                continue
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) >= prompt_tokens + max_new_tokens:
                examples.append(Example(bos + ids[:prompt_tokens],
                                        tokenizer.decode(ids[prompt_tokens:prompt_tokens + max_new_tokens])))
            if max_examples and len(examples) == max_examples:
                break
        return examples
    for row in rows:
        if task.kind == "translation":
            source, reference = row["translation"][task.source], row["translation"][task.target]
        else:
            source, reference = row[task.source], row[task.target]
        if not source.strip():
            continue
        ids = tokenizer(task.prefix + source, truncation=True, max_length=max_source_tokens)["input_ids"]
        examples.append(Example(ids, reference))
        if max_examples and len(examples) == max_examples:
            break
    return examples


def _sentences(text: str) -> str:
    """One sentence per line, the input rougeLsum expects."""
    return "\n".join(s for s in re.split(r"(?<=[.!?])\s+|\n+", text.strip()) if s)


def score(predictions: list[str], references: list[str], metric: str) -> dict[str, float]:
    """sacreBLEU for translation; ROUGE-1/2/L/Lsum F1 x 100 (stemmed, averaged) otherwise."""
    if metric == "bleu":
        import sacrebleu

        return {"bleu": sacrebleu.corpus_bleu(predictions, [references]).score}
    from rouge_score import rouge_scorer

    kinds = ["rouge1", "rouge2", "rougeL", "rougeLsum"]
    scorer = rouge_scorer.RougeScorer(kinds, use_stemmer=True)
    scores = [scorer.score(_sentences(r), _sentences(p)) for p, r in zip(predictions, references)]
    return {k: 100 * float(np.mean([s[k].fmeasure for s in scores])) if scores else 0.0 for k in kinds}


@dataclasses.dataclass(frozen=True, kw_only=True)
class System(evaluation.System):
    """One decoding setup of a task: a `bild_jax.evaluation.System` with the labels of its record."""

    kind: str                       # "large", "small" or "bild"
    program: tuple                  # what fixes the compiled program, besides the batch shape
    variant: str | None = None      # the small model: "unaligned" or "aligned"
    fallback: float | None = None
    rollback: float | None = None


def _greedy(model, max_new_tokens: int) -> Callable:
    return lambda prompts: bild_jax.greedy_generate(model, prompts, max_new_tokens)


def make_systems(models: dict, points: list[tuple[float, float]], max_new_tokens: int, max_draft: int) -> list[System]:
    """Large alone, each small model alone, BiLD with each small model at each point."""
    large = models["large"]
    smalls = {variant: model for variant, model in models.items() if variant != "large"}
    systems = [System(name="large", generate=_greedy(large, max_new_tokens), kind="large",
                      program=("greedy", large.config))]
    systems += [System(name=f"small ({variant})", generate=_greedy(small, max_new_tokens), kind="small",
                       program=("greedy", small.config), variant=variant) for variant, small in smalls.items()]
    for (variant, small), (fallback, rollback) in itertools.product(smalls.items(), points):
        config = bild_jax.BiLDConfig(fallback_threshold=fallback, rollback_threshold=rollback, max_draft=max_draft,
                                     max_new_tokens=max_new_tokens)
        systems.append(System(name=f"BiLD ({variant}) FB={fallback:g} RB={rollback:g}",
                              generate=lambda p, s=small, c=config: bild_jax.bild_generate(s, large, p, c),
                              kind="bild", program=("bild", small.config, large.config, max_draft), variant=variant,
                              fallback=fallback, rollback=rollback))
    return systems


def new_compile_seconds(system: System, run: evaluation.SystemRun, compiled: set) -> float:
    """The compile time of `run`'s first calls whose (program, batch shape) no earlier system compiled in this
    process; `compiled` holds those pairs (they carry over between tasks) and gains the run's."""
    seconds = sum(call.compile_seconds for shape, call in run.first_calls.items()
                  if (system.program, shape) not in compiled)
    compiled.update((system.program, shape) for shape in run.first_calls)
    return seconds


def record(system: System, run: evaluation.SystemRun, large: evaluation.SystemRun, compile_seconds: float,
           task: Task, tokenizer, references: list[str]) -> dict:
    """The JSON record of one system: quality, agreement with the large model, speed, BiLD counters."""
    predictions = [tokenizer.decode(o, skip_special_tokens=True).strip() for o in run.outputs]
    metrics = score(predictions, references, task.metric)
    result = {
        "name": run.name, "kind": system.kind, "variant": system.variant,
        "fallback_threshold": system.fallback, "rollback_threshold": system.rollback,
        "quality": metrics[task.metric], "metrics": metrics,
        "exact_match_with_large": evaluation.exact_match(run, large),
        "seconds": run.seconds, "compile_seconds": compile_seconds,
        "speedup": large.seconds / run.seconds, "tokens": run.num_tokens, "tokens_per_second": run.tokens_per_s,
        "sample": predictions[0] if predictions else "",
    }
    if run.stats:
        rates = evaluation.per_token(run)
        result.update(stats=run.stats, fallback_rate=rates["fallbacks"], rollback_rate=rates["rollbacks"],
                      small_token_share=rates["small_tokens"])
    return result


def pick_points(records: list[dict]) -> dict[str, str | None]:
    """Per small model, the name of the fastest BiLD point that keeps the large model's quality ("matched") and the
    fastest that loses at most 1 point ("1-point drop"), as Table 1 of the paper shows them."""
    large = next(r for r in records if r["kind"] == "large")["quality"]
    picks = {}
    for variant in dict.fromkeys(r["variant"] for r in records if r["kind"] == "bild"):
        points = [r for r in records if r["kind"] == "bild" and r["variant"] == variant]
        for label, tolerance in (("matched", MATCHED_TOLERANCE), ("1-point drop", DROP_TOLERANCE)):
            eligible = [r for r in points if r["quality"] >= large - tolerance]
            best = max(eligible, key=lambda r: r["speedup"]) if eligible else None
            picks[f"BiLD ({variant}), {label}"] = best and best["name"]
    return picks


def run_task(task: Task, pair: Pair, args, compiled: set) -> dict:
    """Loads the pair and the data, runs every system, returns the task's JSON record."""
    max_new_tokens = args.max_new_tokens or task.max_new_tokens
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    paths = {"large": pair.large, "unaligned": pair.small, "aligned": pair.small_aligned}
    paths = {k: v for k, v in paths.items() if v and (k == "large" or k in args.variants)}
    models = {k: bild_jax.load_model(safetensors_checkpoint(v, args.converted_dir), dtype=dtype)
              for k, v in paths.items()}
    wants_encoder_decoder = task.kind != "continuation"
    if models["large"].is_encoder_decoder != wants_encoder_decoder:
        raise ValueError(f"{task.name} needs an {'encoder-decoder' if wants_encoder_decoder else 'decoder-only'} "
                         f"pair; {pair.large} is not one")
    tokenizer = bild_jax.load_tokenizer(pair.tokenizer or pair.large)
    rows = load_rows(task, args.data_dir, args.split)
    examples = build_examples(task, rows, tokenizer, args.max_examples, args.max_source_tokens, args.prompt_tokens,
                              max_new_tokens)
    if not examples:
        raise ValueError(f"{task.name}: no usable examples in {len(rows)} rows")
    points = list(itertools.product(SWEEP_FALLBACKS, SWEEP_ROLLBACKS)) if args.sweep else args.points
    systems = make_systems(models, points, max_new_tokens, args.max_draft)
    print(f"{task.name}: {len(examples)} examples, {len(systems)} systems", file=sys.stderr, flush=True)
    runs = evaluation.run_systems(systems, [e.prompt for e in examples], batch_size=args.batch_size,
                                  batch_shape=evaluation.padded_shape)
    references = [e.reference for e in examples]
    records = [record(s, run, runs[0], new_compile_seconds(s, run, compiled), task, tokenizer, references)
               for s, run in zip(systems, runs)]
    return {
        "title": task.title, "metric": task.metric, "dataset": task.dataset if args.data_dir is None else
        str(args.data_dir / task.name), "split": args.split or task.split, "num_examples": len(examples),
        "batch_size": args.batch_size, "max_new_tokens": max_new_tokens, "max_draft": args.max_draft,
        "pair": {**dataclasses.asdict(pair), "tokenizer": pair.tokenizer or pair.large}, "systems": records,
        "table1": pick_points(records),
    }


def _quality_cells(record: dict | None, with_point: bool = False) -> list[str]:
    if record is None:
        return ["-", "-"]
    point = f" ({record['fallback_threshold']:g}/{record['rollback_threshold']:g})" if with_point else ""
    return [f"{record['quality']:.2f}{point}", f"{record['speedup']:.2f}x"]


def table1(tasks: dict) -> str:
    """Rows: large, small(s), BiLD picks; per task two columns, quality and speedup over the large model.
    BiLD cells name their (fallback/rollback) point."""
    labels = ["large"] + list(dict.fromkeys(r["name"] for t in tasks.values() for r in t["systems"]
                                            if r["kind"] == "small"))
    labels += list(dict.fromkeys(label for t in tasks.values() for label in t["table1"]))
    headers = ["System"]
    for t in tasks.values():
        headers += [f"{t['title']} {METRIC_NAMES[t['metric']]}", "speedup"]
    rows = []
    for label in labels:
        row = [label]
        for t in tasks.values():
            name = t["table1"].get(label, label)
            row += _quality_cells(next((r for r in t["systems"] if r["name"] == name), None),
                                  with_point=label in t["table1"])
        rows.append(row)
    return harness.markdown_table(headers, rows)


def detail_table(task: dict) -> str:
    """Every system of one task."""
    headers = ["System", METRIC_NAMES[task["metric"]], "= large", "speedup", "tokens/s", "fallback rate",
               "rollback rate", "small-model tokens", "compile s"]
    rows = []
    for r in task["systems"]:
        bild = r["kind"] == "bild"
        rows.append([r["name"], f"{r['quality']:.2f}", f"{r['exact_match_with_large']:.0%}", f"{r['speedup']:.2f}x",
                     f"{r['tokens_per_second']:.1f}", f"{r['fallback_rate']:.3f}" if bild else "-",
                     f"{r['rollback_rate']:.3f}" if bild else "-", f"{r['small_token_share']:.0%}" if bild else "-",
                     f"{r['compile_seconds']:.1f}"])
    return harness.markdown_table(headers, rows)


def markdown(results: dict) -> str:
    tasks = results["tasks"]
    s = results["settings"]
    parts = [
        *harness.report_header("BiLD paper tasks with bild-jax", results),
        f"Greedy, batch size {s['batch_size']}, max_draft {s['max_draft']}; speedup = large-model time / "
        f"system time (compilation excluded). Matched: within {MATCHED_TOLERANCE:g} of the large model's "
        f"quality; 1-point drop: within {DROP_TOLERANCE:g}. BiLD cells show (fallback/rollback).\n",
        "## Table 1\n",
        table1(tasks),
    ]
    for task in tasks.values():
        pair = task["pair"]
        aligned = f", aligned `{pair['small_aligned']}`" if pair["small_aligned"] else ""
        parts += [f"## {task['title']} ({task['num_examples']} examples, {task['split']})\n",
                  f"Pair: large `{pair['large']}`, small `{pair['small']}`{aligned}.\n",
                  detail_table(task)]
    return "\n".join(parts)


def _point(text: str) -> tuple[float, float]:
    try:
        fallback, rollback = (float(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected FALLBACK:ROLLBACK such as 0.6:5, got {text!r}") from None
    return fallback, rollback


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=["iwslt2017", "wmt14", "xsum", "cnndm"])
    parser.add_argument("--large", help="large model (path or hub id) for every task, instead of the paper's")
    parser.add_argument("--small", help="small model for every task (required with --large)")
    parser.add_argument("--small-aligned", help="aligned small model for every task (optional with --large)")
    parser.add_argument("--tokenizer", help="tokenizer (path or hub id); default: the pair's")
    parser.add_argument("--variants", nargs="+", choices=["unaligned", "aligned"], default=["unaligned", "aligned"],
                        help="which small models to run (default: both where the pair has them)")
    parser.add_argument("--data-dir", type=Path, help="read <dir>/<task>.jsonl|json|parquet instead of the hub")
    parser.add_argument("--split", help="dataset split (default: validation; test for wikitext2)")
    parser.add_argument("--max-examples", type=int, help="first N usable examples of each task (default: all)")
    parser.add_argument("--batch-size", type=int, default=1, help="(default %(default)s, as in the paper)")
    points = parser.add_mutually_exclusive_group()
    points.add_argument("--points", nargs="+", type=_point, default=DEFAULT_POINTS, metavar="FB:RB",
                        help="BiLD (fallback:rollback) points (default 0.6:5 0.9:2)")
    points.add_argument("--sweep", action="store_true", help=f"the grid {SWEEP_FALLBACKS} x {SWEEP_ROLLBACKS}")
    parser.add_argument("--max-draft", type=int, default=10, help="(default %(default)s, as in the paper)")
    parser.add_argument("--max-new-tokens", type=int, help="default: 128 (64 for wikitext2)")
    parser.add_argument("--max-source-tokens", type=int, default=1024,
                        help="encoder input truncation (default %(default)s)")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="wikitext2 prompt length (default %(default)s)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--converted-dir", type=Path, default=Path.home() / ".cache" / "bild-jax-converted",
                        help="where checkpoints published as pytorch_model.bin only are converted to safetensors "
                             "(default %(default)s)")
    parser.add_argument("--out-dir", type=Path, default=harness.RESULTS_DIR, help="(default experiments/results)")
    parser.add_argument("--name", default="reproduce", help="result file name (default %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.large is None) != (args.small is None) or (args.small_aligned and not args.large):
        parser.error("--large and --small go together (--small-aligned optional with them)")
    for name in ("batch_size", "max_examples", "max_new_tokens", "max_source_tokens", "prompt_tokens", "max_draft"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    custom = Pair(args.large, args.small, args.small_aligned, args.tokenizer) if args.large else None
    command = ["python", "experiments/reproduce.py", *(sys.argv[1:] if argv is None else argv)]
    results = {"command": " ".join(command), "machine": harness.machine_info(), "settings": vars(args), "tasks": {}}
    compiled: set = set()
    for name in args.tasks:
        paper = PAPER_PAIRS[name]
        pair = custom or dataclasses.replace(paper, tokenizer=args.tokenizer or paper.tokenizer)
        try:
            results["tasks"][name] = run_task(TASKS[name], pair, args, compiled)
        except (OSError, ValueError) as error:  # missing data or models, a pair of the wrong kind
            print(f"reproduce.py: {name}: error: {error}", file=sys.stderr)
            return 2
    json_path, md_path = harness.write_results(results, markdown(results), args.out_dir, args.name)
    print(table1(results["tasks"]))
    print(f"wrote {json_path} and {md_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
