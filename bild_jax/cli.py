"""The `bild-jax` command."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import bild_jax


class UsageError(Exception):
    """Bad input from the command line: printed as one line, exit code 2."""


def _add_pair_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = bild_jax.BiLDConfig()
    parser.add_argument("--small", required=True, help="small model: HF-format directory or hub id")
    parser.add_argument("--large", required=True, help="large model: HF-format directory or hub id")
    parser.add_argument("--fallback", type=float, default=defaults.fallback_threshold,
                        help="fallback threshold in [0, 1] (default %(default)s)")
    parser.add_argument("--rollback", type=float, default=defaults.rollback_threshold,
                        help="rollback threshold >= 0, or inf (default %(default)s)")
    parser.add_argument("--max-draft", type=int, default=defaults.max_draft,
                        help="small-model tokens before the large model must verify (default %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="(default %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bild-jax", description="Big Little Decoder text generation in JAX.")
    parser.add_argument("--version", action="version", version=f"bild-jax {bild_jax.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    generate = commands.add_parser("generate", help="generate text with a small/large pair")
    _add_pair_arguments(generate)
    source = generate.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one prompt")
    source.add_argument("--prompts-file", type=Path, help="a text file with one prompt per line (batched)")
    generate.add_argument("--exact", action="store_true", help="lossless: output equals the large model's greedy")
    generate.add_argument("--json", action="store_true", help="print JSON lines with text, tokens and stats")
    return parser


def _read_prompts(args) -> list[str]:
    if args.prompt is not None:
        prompts = [args.prompt]
    else:
        if not args.prompts_file.is_file():
            raise UsageError(f"no prompts file at {args.prompts_file}")
        prompts = [line.rstrip("\n") for line in args.prompts_file.read_text().splitlines() if line.strip()]
        if not prompts:
            raise UsageError(f"{args.prompts_file} holds no prompts")
    if any(not p.strip() for p in prompts):
        raise UsageError("empty prompt")
    return prompts


def _load_pair(args):
    small, large = bild_jax.load_model(args.small), bild_jax.load_model(args.large)
    small_tok, large_tok = bild_jax.load_tokenizer(args.small), bild_jax.load_tokenizer(args.large)
    if small_tok.get_vocab() != large_tok.get_vocab():
        raise UsageError(f"the tokenizers of {args.small} and {args.large} differ; BiLD needs one shared vocabulary")
    return small, large, large_tok


def run_generate(args) -> None:
    prompts = _read_prompts(args)
    small, large, tokenizer = _load_pair(args)
    config = bild_jax.BiLDConfig(fallback_threshold=args.fallback, rollback_threshold=args.rollback,
                                 max_draft=args.max_draft, max_new_tokens=args.max_new_tokens, exact=args.exact)
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    out = bild_jax.bild_generate(small, large, ids, config)
    for row, prompt in enumerate(prompts):
        n = int(out.lengths[row])
        tokens = [int(t) for t in out.tokens[row, :n]]
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        if args.json:
            stats = {name: int(value[row]) for name, value in vars(out.stats).items()}
            print(json.dumps({"prompt": prompt, "text": text, "tokens": tokens, "stats": stats}))
        else:
            print(f"{prompt}{text}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        {"generate": run_generate}[args.command](args)
    except (UsageError, ValueError, OSError, NotImplementedError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"bild-jax {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
