"""The pair profiles shipped with the bundled small models: `bild-jax tune` on held-out prompts that are not
the demo's (other windows of the held-out files, seed 1), so that the demo does not score the prompts the
thresholds were picked on.

    python experiments/tune_bundled.py              # both small models (~5 min each on 2 idle cores)
    python experiments/tune_bundled.py small        # one

Writes `experiments/results/tune_prompts.json` once, then `bild_jax/bundled/<name>/bild_pair.json` and the
sweeps under `runs/tune-<name>/`.
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

PROMPTS = Path(__file__).parent / "results" / "tune_prompts.json"


def write_tune_prompts(path: Path, count: int = 64, seed: int = 1) -> None:
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
        code = cli.main(["tune", "--small", f"bundled:{name}", "--prompts", str(PROMPTS),
                         "--sweep-out", f"runs/tune-{name}"])
        if code:
            sys.exit(code)


if __name__ == "__main__":
    main()
