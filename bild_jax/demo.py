"""`bild-jax demo`: large-only, small-only and BiLD on held-out inputs, one table, one coloured sample.

Two tasks, each with its bundled pair: `continue` (the default: the decoder-only Llama pair continues held-out
standard-library code) and `summarize` (the T5 pair writes the first docstring sentence of held-out
standard-library functions, the BiLD paper's encoder-decoder setting, in its Table 1's shape: the large
model's quality, then BiLD unaligned and aligned, each at a quality-preserving and a faster operating point).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from rich.text import Text

from bild_jax.bild import BiLDConfig, bild_generate
from bild_jax.errors import InputError
from bild_jax.evaluation import padded_shape, run_systems, summarize
from bild_jax.generate import greedy_generate
from bild_jax.hub import BUNDLED_DIR, SMALL_MODEL_DTYPE, load_model, load_tokenizer, resolve_model_dir
from bild_jax.profile import find_profile, read_profile

DEMO_PROMPTS = BUNDLED_DIR / "demo_prompts.json"
SUMMARIZE_SAMPLES = BUNDLED_DIR / "summarize_samples.json"  # {"prompt": function ids, "continuation": summary ids}
# Next to a small model, beside its quality-preserving `bild_pair.json`: the faster operating point, a profile
# tuned with a larger allowed ROUGE-L loss (experiments/tune_summarizer.py).
FAST_PROFILE_FILE = "bild_pair_fast.json"
TASKS = ("continue", "summarize")
_SAMPLE_FORM = '{"prompt": [token ids], "continuation": [token ids] (optional)}'
COLUMNS = [("system", "system", "{}"), ("tokens_per_s", "tokens/s", "{:.0f}"), ("speedup", "speedup", "{:.2f}x"),
           ("exact_match", "= large", "{:.0%}"), ("rouge_l", "ROUGE-L", "{:.1f}"),
           ("fallback_rate", "fallback/tok", "{:.2f}"), ("rollback_rate", "rollback/tok", "{:.2f}"),
           ("large_calls_per_token", "large calls/tok", "{:.2f}")]
# 120 columns wide: the settings go below the table.
SUMMARIZE_COLUMNS = COLUMNS[:5] + [("rouge_l_change", "vs large", "{:+.1f}")] + COLUMNS[5:7]


def load_demo_prompts(path: Path, count: int, with_continuation: bool = False) -> list[dict]:
    """The first `count` (>= 1) held-out samples: {"prompt": [ids], "continuation": [ids]}, the continuation
    optional unless `with_continuation`; InputError naming the first sample that is not of that form."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise InputError(f"the number of prompts must be an int >= 1, got {count!r}")
    try:
        samples = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(samples, list):
        raise InputError(f"{path} must hold a JSON list of {_SAMPLE_FORM}, got a {type(samples).__name__}")
    if not samples:
        raise InputError(f"{path} holds no prompts")
    samples = samples[:count]
    for i, sample in enumerate(samples):
        good = isinstance(sample, dict) and _is_ids(sample.get("prompt")) and (
            _is_ids(sample["continuation"]) if "continuation" in sample else not with_continuation)
        if not good:
            form = _SAMPLE_FORM.replace(" (optional)", "") if with_continuation else _SAMPLE_FORM
            raise InputError(f"sample {i} of {path} is not of the form {form}: {str(sample)[:80]}")
    return samples


def _is_ids(value) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def run_demo(small: str = "bundled:small", aligned: str | None = "bundled:small-aligned",
             large: str = "bundled:large", prompts_file: Path = DEMO_PROMPTS, num_prompts: int = 64,
             max_new_tokens: int = 48, console: Console | None = None) -> list[dict]:
    """Runs every system at batch 1 on the held-out prompts, prints the table and a coloured sample, and
    returns the table rows."""
    console = console or Console(width=max(Console().width, 120))  # the table needs ~110 columns
    samples = load_demo_prompts(prompts_file, num_prompts, with_continuation=True)
    exact = BiLDConfig(max_new_tokens=max_new_tokens, exact=True)  # settings checked before the models load
    tokenizer = load_tokenizer(large)
    models = {"large": load_model(large), "small": load_model(small, SMALL_MODEL_DTYPE)}
    if aligned:
        models["aligned"] = load_model(aligned, SMALL_MODEL_DTYPE)
    prompts = [s["prompt"] for s in samples]
    references = [tokenizer.decode(s["continuation"]) for s in samples]
    configs = {"small": _profile_config(small, max_new_tokens)}
    best_small = models.get("aligned", models["small"])
    systems = [
        ("large", lambda p: greedy_generate(models["large"], p, max_new_tokens)),
        ("small", lambda p: greedy_generate(models["small"], p, max_new_tokens)),
        ("BiLD", lambda p: bild_generate(models["small"], models["large"], p, configs["small"])),
    ]
    if aligned:
        configs["aligned"] = _profile_config(aligned, max_new_tokens)
        systems.append(("BiLD aligned", lambda p: bild_generate(models["aligned"], models["large"], p,
                                                                configs["aligned"])))
    systems.append(("BiLD exact", lambda p: bild_generate(best_small, models["large"], p, exact)))
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("compiling", total=len(systems) * (len(samples) + 1))

        calls = itertools.count(1)

        def advance(_name: str) -> None:
            progress.advance(task)
            if next(calls) == len(systems):  # every system has compiled
                progress.update(task, description=f"{len(systems)} systems taking turns on {len(samples)} prompts")

        runs = run_systems(systems, prompts, on_call=advance)
    rows = [summarize(run, runs[0], references, tokenizer.decode) for run in runs]
    console.print(_table(rows, f"{len(samples)} held-out prompts, {max_new_tokens} new tokens"))
    for system, key, model_name in [("BiLD", "small", small), ("BiLD aligned", "aligned", aligned)][:len(configs)]:
        source = "its pair profile" if find_profile(model_name) else "library defaults: no pair profile"
        console.print(f"{system}: {_settings(configs[key])} ({source})")
    console.print(f"BiLD exact: {_settings(exact)} (library defaults); small models in {SMALL_MODEL_DTYPE}, the "
                  "large one in float32")
    console.print(_rouge_l_changes(rows, "the prompts' real continuations"))
    sample_run = runs[-2] if aligned else runs[2]
    console.print(_coloured_sample(tokenizer, prompts[0], sample_run))
    return rows


def run_summarize_demo(small: str = "bundled:t5-small", aligned: str = "bundled:t5-small-aligned",
                       large: str = "bundled:t5-large", samples_file: Path = SUMMARIZE_SAMPLES, num_prompts: int = 32,
                       max_new_tokens: int = 48, console: Console | None = None) -> list[dict]:
    """The paper's Table 1 on held-out code summarization, batch 1, greedy: large-only and small-only, BiLD
    with the unaligned and the aligned small model at each one's operating points (its `bild_pair.json`, and
    its `bild_pair_fast.json` when it has one), and exact mode. Prints the table, the settings and a coloured
    sample; returns the rows (`evaluation.summarize`), each with its "settings" added."""
    console = console or Console(width=max(Console().width, 120))
    samples = load_demo_prompts(samples_file, num_prompts, with_continuation=True)
    exact = BiLDConfig(max_new_tokens=max_new_tokens, exact=True)
    tokenizer = load_tokenizer(large)
    models = {"large": load_model(large), "small": load_model(small, SMALL_MODEL_DTYPE),
              "aligned": load_model(aligned, SMALL_MODEL_DTYPE)}

    def decode(ids):  # the EOS that ends a summary is no word of it
        return tokenizer.decode(ids, skip_special_tokens=True)

    settings = {"large": "greedy", "small": "greedy", "BiLD exact": _settings(exact) + ", exact"}
    systems = [("large", lambda p: greedy_generate(models["large"], p, max_new_tokens)),
               ("small", lambda p: greedy_generate(models["small"], p, max_new_tokens))]
    for key, label in (("small", "BiLD unaligned"), ("aligned", "BiLD aligned")):
        source = small if key == "small" else aligned
        for point, config in _operating_points(source, max_new_tokens):
            name = f"{label}, {point}"
            settings[name] = _settings(config)
            systems.append((name, lambda p, s=models[key], c=config: bild_generate(s, models["large"], p, c)))
    systems.append(("BiLD exact", lambda p: bild_generate(models["aligned"], models["large"], p, exact)))
    prompts = [s["prompt"] for s in samples]
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"{len(systems)} systems on {len(samples)} inputs", total=None)
        # Inputs fall in several power-of-two buckets: each system compiles once per bucket, timed apart.
        runs = run_systems(systems, prompts, on_call=lambda _: progress.advance(task), batch_shape=padded_shape)
    references = [decode(s["continuation"]) for s in samples]
    rows = [summarize(run, runs[0], references, decode) for run in runs]
    for row in rows:
        row["settings"] = settings[row["system"]]
    console.print(_table(rows, f"{len(samples)} held-out functions summarized (T5 pair, small models in "
                               f"{SMALL_MODEL_DTYPE}), {max_new_tokens} new tokens at most", SUMMARIZE_COLUMNS))
    for row in rows[2:]:
        console.print(f"{row['system']}: {row['settings']}")
    console.print(_rouge_l_changes(rows, "the functions' docstrings (first sentence)"))
    console.print(_coloured_sample(tokenizer, prompts[0], runs[-2]))
    return rows


def _operating_points(small: str, max_new_tokens: int) -> list[tuple[str, BiLDConfig]]:
    """("quality", the pair profile's settings or the library defaults), then ("fast", the fast profile's
    settings) when the small model has one."""
    points = [("quality", _profile_config(small, max_new_tokens))]
    fast = resolve_model_dir(small) / FAST_PROFILE_FILE
    if fast.is_file():
        points.append(("fast", read_profile(fast).config(max_new_tokens=max_new_tokens)))
    return points


def _profile_config(small: str, max_new_tokens: int) -> BiLDConfig:
    """The settings of the small model's pair profile (`bild_pair.json`), else the library defaults."""
    profile = find_profile(small)
    return (BiLDConfig.from_profile(profile, max_new_tokens=max_new_tokens) if profile
            else BiLDConfig(max_new_tokens=max_new_tokens))


def _settings(config: BiLDConfig) -> str:
    return (f"fallback {config.fallback_threshold:g}, rollback {config.rollback_threshold:g}, "
            f"max_draft {config.max_draft}")


def _rouge_l_changes(rows: list[dict], against: str) -> str:
    """Lines for below a table: large-only's ROUGE-L (`rows[0]`), then the BiLD rows' (`rows[2:-1]`: not the
    small model's, nor exact mode's, the large model's output) changes from it, each with its paired bootstrap
    interval (`evaluation.paired_change_interval`), which says how much of a change the prompts can resolve."""
    return (f"ROUGE-L against {against}: large-only {rows[0]['rouge_l']:.1f}\n"
            "BiLD's change from it (5th-95th percentiles of a paired bootstrap over the prompts):\n" + "\n".join(
                f"  {row['system']}: {row['rouge_l_change']:+.1f} ({row['rouge_l_change_low']:+.1f} to "
                f"{row['rouge_l_change_high']:+.1f})" for row in rows[2:-1]))


def _table(rows: list[dict], what: str, columns=COLUMNS) -> Table:
    table = Table(title=f"bild-jax demo: {what}, batch 1, greedy")
    for _, header, _ in columns:
        table.add_column(header, justify="left" if header in ("system", "settings") else "right")
    for row in rows:
        table.add_row(*[fmt.format(row[key]) if key in row else "-" for key, _, fmt in columns])
    return table


def _coloured_sample(tokenizer, prompt: list[int], run) -> Text:
    text = Text(f"\n{run.name} sample ", style="bold")
    text.append("small model ", style="green")
    text.append("large model\n", style="bold red")
    text.append(tokenizer.decode(prompt), style="dim")
    for token, by_large in zip(run.outputs[0], run.from_large[0]):
        text.append(tokenizer.decode([token]), style="bold red" if by_large else "green")
    return text
