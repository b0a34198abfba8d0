"""The pair profiles shipped with the bundled small models: `bild-jax tune` on held-out prompts that are not
the demo's (other windows of the held-out files, seed 1), so that the demo does not score the prompts the
thresholds were picked on.

    python experiments/tune_bundled.py              # both small models (~5 min each on 2 idle cores)
    python experiments/tune_bundled.py small        # one

Run from the repository root. Writes `experiments/results/tune_prompts.json` once, then
`bild_jax/bundled/<name>/bild_pair.json` and the sweeps under `runs/tune-<name>/`. 128 prompts rather than
`tune`'s default 64: on 64 prompts the ROUGE-L loss of a point had a 5-95% range of about 3.5 points, wider
than the 1-point guard. Grids: rollback 3, 5, inf (the fast region in 64-prompt sweeps; for the unaligned model
also 2, 2.5 and 4, and fallback 0.45: a rollback of 2 keeps its low fallbacks within the guard) and, for the aligned
model, fallback 0.6 and 0.8 only: with the first aligned model every point at 0.2-0.6 lost more than 1
ROUGE-L point on these prompts; the model aligned a second time loses 0.9 at 0.6 (greedy outputs, so ROUGE-L
does not change between runs; only the timings do).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import pair_data  # noqa: E402
import train_pair  # noqa: E402

from bild_jax import cli  # noqa: E402
from bild_jax.hub import load_tokenizer  # noqa: E402

PROMPTS = Path("experiments/results/tune_prompts.json")  # relative: the profiles record it as given
FALLBACKS = {"small": "0.2,0.3,0.4,0.45,0.5,0.6", "small-aligned": "0.6,0.8"}
ROLLBACKS = {"small": "2,2.5,3,4,5,inf", "small-aligned": "3,5,inf"}


def write_tune_prompts(path: Path, count: int = 128, seed: int = 1) -> None:
    """Held-out (prompt, continuation) windows like the demo's, drawn with another seed."""
    _, held_out = pair_data.stdlib_files()
    samples = pair_data.eval_samples(load_tokenizer("bundled:large"), pair_data.load_texts(held_out),
                                     prompt_tokens=train_pair.DEMO_PROMPT_TOKENS,
                                     continuation_tokens=train_pair.DEMO_CONTINUATION_TOKENS, count=count, seed=seed)
    path.write_text(json.dumps(samples))


def main(argv=None) -> None:
    names = (argv if argv is not None else sys.argv[1:]) or ["small", "small-aligned"]
    if not PROMPTS.is_file():
        write_tune_prompts(PROMPTS)
    for name in names:
        code = cli.main(["tune", "--small", f"bundled:{name}", "--prompts", str(PROMPTS), "--num-prompts", "128",
                         "--fallbacks", FALLBACKS[name], "--rollbacks", ROLLBACKS[name],
                         "--sweep-out", f"runs/tune-{name}"])
        if code:
            sys.exit(code)


if __name__ == "__main__":
    main()
