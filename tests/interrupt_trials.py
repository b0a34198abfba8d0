"""Ctrl-C at a chosen moment of a real `bild-jax generate` process: importing, loading, compiling, decoding.

`python tests/interrupt_trials.py --trials 20` runs that many trials per moment and tabulates the outcomes
(exit codes, stderr lines, time from the signal to the exit); `tests/test_interrupt.py` runs one per moment.
The child (`child` below) is `bild-jax generate` with markers on stdout at each stage: the compiled BiLD
program is lowered and compiled ahead of its call, so that compiling and decoding are told apart.
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import random
import signal
import subprocess
import sys
import time

# importing: from the process's first line, so it includes the ~50 ms before `main` installs its handling,
# where Python's own KeyboardInterrupt applies; library: importing JAX and the library, after that.
MOMENTS = ("importing", "library", "loading", "compiling", "decoding")
# A length that makes decoding last a few seconds on a CPU, after ~10 s of compiling.
# --no-profile: the library defaults, so that stderr holds nothing but what an interrupt prints.
GENERATE = ["generate", "--prompt", "def main(argv):", "--max-new-tokens", "300", "--max-draft", "4", "--no-profile"]
# _bild_decode_jit's static arguments
STATIC = ("max_new_tokens", "max_draft", "pad_token_id", "narrow_widths", "lookup_tokens")


def _marker(stage: str) -> None:
    os.write(1, f"@{stage}\n".encode())


def child(argv: list[str]) -> None:
    """Runs `bild-jax *argv` as the process's own command, printing @importing, @library, @loading,
    @compiling and @decoding on stdout as each stage starts. The stages are hooked from inside `cli.build_parser`, which
    `main` calls after installing its Ctrl-C handling, so that the hooks import nothing before it does."""
    _marker("importing")
    from bild_jax import cli

    build_parser = cli.build_parser

    def hooked_build_parser():
        _marker("library")
        parser = build_parser()  # imports JAX and the library
        _hook_stages()
        return parser

    cli.build_parser = hooked_build_parser
    sys.argv = ["bild-jax", *argv]
    sys.exit(cli.main())


def _hook_stages() -> None:
    import bild_jax
    from bild_jax import bild, hub

    load_model, decode = hub.load_model, bild._bild_decode_jit

    def loading(*args, **kwargs):
        _marker("loading")
        return load_model(*args, **kwargs)

    def staged(*args, **kwargs):
        _marker("compiling")
        compiled = decode.lower(*args, **kwargs).compile()
        _marker("decoding")
        return compiled(*args, **{k: v for k, v in kwargs.items() if k not in STATIC})

    hub.load_model = bild_jax.load_model = loading
    bild._bild_decode_jit = staged


def run_trial(moment: str, delay: float, pythonpath: str | None = None, timeout: float = 300) -> dict:
    """Starts a child, sends SIGINT `delay` seconds after it reaches `moment`, and waits `timeout` seconds
    for it to end.

    Returns {"moment", "reached" (False: the child ended first), "returncode" ("hung": killed at the
    timeout), "stderr_lines" (non-empty lines), "stderr", "stages_after" (stage markers printed after the
    signal), "seconds_to_exit" (from the signal)}."""
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    process = subprocess.Popen([sys.executable, __file__, "--child", *GENERATE], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env=env, text=True)
    reached, sent = False, None
    for line in process.stdout:
        if line.strip() == f"@{moment}":
            reached = True
            time.sleep(delay)
            sent = time.monotonic()
            process.send_signal(signal.SIGINT)
            break
    try:
        stdout, stderr = process.communicate(timeout=timeout)
        hung = False
    except subprocess.TimeoutExpired:  # the signal was swallowed, or the process hangs
        process.kill()
        stdout, stderr = process.communicate()
        hung = True
    ended = time.monotonic()
    return {"moment": moment, "reached": reached, "returncode": "hung" if hung else process.returncode,
            "stderr_lines": [line for line in stderr.splitlines() if line.strip()], "stderr": stderr,
            "stages_after": [line.strip() for line in stdout.splitlines() if line.startswith("@")],
            "seconds_to_exit": None if sent is None else ended - sent}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--pythonpath", help="the bild_jax to test (default: the inherited PYTHONPATH)")
    parser.add_argument("--moments", default=",".join(MOMENTS))
    parser.add_argument("--timeout", type=float, default=120, help="seconds after the signal before 'hung'")
    args = parser.parse_args()
    rng = random.Random(0)
    for moment in args.moments.split(","):
        outcomes, waits = collections.Counter(), []
        for _ in range(args.trials):
            trial = run_trial(moment, rng.uniform(0.0, 0.5), args.pythonpath, args.timeout)
            lines = len(trial["stderr_lines"])
            outcomes[(trial["returncode"], "1 line" if lines == 1 else f"{lines} lines")] += 1
            if trial["seconds_to_exit"] is not None and trial["returncode"] != "hung":
                waits.append(trial["seconds_to_exit"])
        waits = sorted(waits) or [math.nan]
        print(f"{moment:10s} {dict(outcomes)}  signal->exit median {waits[len(waits) // 2]:.2f}s max {waits[-1]:.2f}s",
              flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2:])
    else:
        main()
