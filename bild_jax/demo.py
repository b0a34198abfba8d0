"""`bild-jax demo`: large-only, small-only and BiLD on held-out prompts, one table, one coloured sample."""

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
from bild_jax.evaluation import run_systems, summarize
from bild_jax.generate import greedy_generate
from bild_jax.hub import BUNDLED_DIR, load_model, load_tokenizer
from bild_jax.profile import find_profile

DEMO_PROMPTS = BUNDLED_DIR / "demo_prompts.json"
_SAMPLE_FORM = '{"prompt": [token ids], "continuation": [token ids] (optional)}'
COLUMNS = [("system", "system", "{}"), ("tokens_per_s", "tokens/s", "{:.0f}"), ("speedup", "speedup", "{:.2f}x"),
           ("exact_match", "= large", "{:.0%}"), ("rouge_l", "ROUGE-L", "{:.1f}"),
           ("fallback_rate", "fallback/tok", "{:.2f}"), ("rollback_rate", "rollback/tok", "{:.2f}"),
           ("large_calls_per_token", "large calls/tok", "{:.2f}")]


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
    models = {"large": load_model(large), "small": load_model(small)}
    if aligned:
        models["aligned"] = load_model(aligned)
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
    console.print(_table(rows, len(samples), max_new_tokens))
    for system, key, model_name in [("BiLD", "small", small), ("BiLD aligned", "aligned", aligned)][:len(configs)]:
        source = "its pair profile" if find_profile(model_name) else "library defaults: no pair profile"
        console.print(f"{system}: {_settings(configs[key])} ({source})")
    console.print(f"BiLD exact: {_settings(exact)} (library defaults)")
    sample_run = runs[-2] if aligned else runs[2]
    console.print(_coloured_sample(tokenizer, prompts[0], sample_run))
    return rows


def _profile_config(small: str, max_new_tokens: int) -> BiLDConfig:
    """The settings of the small model's pair profile (`bild_pair.json`), else the library defaults."""
    profile = find_profile(small)
    return (BiLDConfig.from_profile(profile, max_new_tokens=max_new_tokens) if profile
            else BiLDConfig(max_new_tokens=max_new_tokens))


def _settings(config: BiLDConfig) -> str:
    return (f"fallback {config.fallback_threshold:g}, rollback {config.rollback_threshold:g}, "
            f"max_draft {config.max_draft}")


def _table(rows: list[dict], num_prompts: int, max_new_tokens: int) -> Table:
    table = Table(title=f"bild-jax demo: {num_prompts} held-out prompts, {max_new_tokens} new tokens, batch 1, greedy")
    for _, header, _ in COLUMNS:
        table.add_column(header, justify="left" if header == "system" else "right")
    for row in rows:
        table.add_row(*[fmt.format(row[key]) if key in row else "-" for key, _, fmt in COLUMNS])
    return table


def _coloured_sample(tokenizer, prompt: list[int], run) -> Text:
    text = Text(f"\n{run.name} sample ", style="bold")
    text.append("small model ", style="green")
    text.append("large model\n", style="bold red")
    text.append(tokenizer.decode(prompt), style="dim")
    for token, by_large in zip(run.outputs[0], run.from_large[0]):
        text.append(tokenizer.decode([token]), style="bold red" if by_large else "green")
    return text
