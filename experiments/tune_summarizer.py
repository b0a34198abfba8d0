"""The operating points shipped with the bundled T5 small models: one sweep per small model on held-out
inputs that are not the demo's (`experiments/results/summarize_tune_samples.json`, written by
`train_summarizer.py bundle`), two profiles from it:

- `bild_pair.json`: the fastest point within QUALITY_LOSS ROUGE-L points of large-only (quality-preserving),
- `bild_pair_fast.json`: the fastest within FAST_LOSS points (the paper's faster operating point).

    python experiments/tune_summarizer.py                  # both small models
    python experiments/tune_summarizer.py t5-small         # one

Run from the repository root. ROUGE-L is measured against the functions' docstrings (first sentence), on text
decoded without the EOS token. Sweeps go to `runs/tune-<name>/`.
"""

from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import train_summarizer  # noqa: E402

from bild_jax.demo import FAST_PROFILE_FILE  # noqa: E402
from bild_jax.hub import SMALL_MODEL_DTYPE, load_model, load_tokenizer, resolve_model_dir  # noqa: E402
from bild_jax.profile import PROFILE_FILE, write_profile  # noqa: E402
from bild_jax.tune import recommend, tune  # noqa: E402

QUALITY_LOSS, FAST_LOSS = 1.0, 2.0
# Grids per small model: the unaligned one is unconfident (it falls back at 71% of its tokens even at 0.1),
# so its grid reaches low fallbacks; the aligned one agrees with the large model on 96% of tokens, so a
# smaller grid. Results of the last run (83 inputs): README, "The paper's setting".
GRIDS = {"t5-small": ([0.1, 0.2, 0.3, 0.4, 0.6], [3.0, 5.0, float("inf")]),
         "t5-small-aligned": ([0.3, 0.5, 0.6, 0.7, 0.8], [2.0, 3.0, 5.0, float("inf")])}
MAX_NEW_TOKENS = 48
LARGE = "bundled:t5-large"


def main(argv=None) -> None:
    names = (argv if argv is not None else sys.argv[1:]) or ["t5-small", "t5-small-aligned"]
    samples = json.loads(train_summarizer.TUNE_SAMPLES.read_text())
    tokenizer = load_tokenizer(LARGE)
    decode = partial(tokenizer.decode, skip_special_tokens=True)
    prompts = [s["prompt"] for s in samples]
    references = [decode(s["continuation"]) for s in samples]
    large = load_model(LARGE)
    for name in names:
        fallbacks, rollbacks = GRIDS[name]
        # In the dtype the demo and the commands load small models in: the profile is for that decoding.
        small = load_model(f"bundled:{name}", SMALL_MODEL_DTYPE)
        result = tune(small, large, prompts, references, decode, fallbacks=fallbacks, rollbacks=rollbacks,
                      max_drafts=[10], max_new_tokens=MAX_NEW_TOKENS, sweep_dir=Path(f"runs/tune-{name}"),
                      max_rouge_loss=QUALITY_LOSS, large_name=LARGE, prompts_name=str(train_summarizer.TUNE_SAMPLES))
        print(f"{name}: large-only ROUGE-L {result['baseline']['rouge_l']:.1f} on {len(prompts)} inputs")
        directory = resolve_model_dir(f"bundled:{name}")
        written = None
        for loss, file in ((QUALITY_LOSS, PROFILE_FILE), (FAST_LOSS, FAST_PROFILE_FILE)):
            profile, spread = recommend(result, decode, loss, large_name=LARGE,
                                        prompts_name=str(train_summarizer.TUNE_SAMPLES), max_new_tokens=MAX_NEW_TOKENS,
                                        small_dtype=SMALL_MODEL_DTYPE)
            (directory / file).unlink(missing_ok=True)  # a profile of an earlier run must not outlive this one
            if profile is None:
                print(f"  no point within {loss:g} ROUGE-L: no {file}")
                continue
            if written is not None and profile.describe() == written.describe():
                print(f"  within {loss:g}: the same point as within {QUALITY_LOSS:g}: no {file}")
                continue
            written = profile
            write_profile(profile, directory / file)
            print(f"  within {loss:g}: {profile.describe()}, ROUGE-L {profile.quality['bild']:.1f} "
                  f"(speedup 5-95% {spread['speedup'][0]:.2f}-{spread['speedup'][1]:.2f}x, near best in "
                  f"{spread['near_best']:.0%} of resamples) -> {directory / file}")


if __name__ == "__main__":
    main()
