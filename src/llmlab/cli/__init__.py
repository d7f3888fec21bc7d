"""The `llmlab` command: argument parsing only.

Each verb lives in a small module of this package that defines `register(subparsers)`; the handler it
installs calls one library function. A user error (LLMLabError) becomes one line on stderr and exit
code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from llmlab import __version__
from llmlab.errors import LLMLabError

# Modules under llmlab.cli, in the order their verbs appear in `llmlab --help`.
VERB_MODULES: list[str] = ["tokenizer", "data", "generate", "train", "hf", "quant", "evals", "speedrun"]


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show every option's default in --help and keep description paragraphs as written."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmlab", formatter_class=_Formatter,
                                     description="Make a language model end to end.")
    parser.add_argument("--version", action="version", version=f"llmlab {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for name in VERB_MODULES:
        importlib.import_module(f"llmlab.cli.{name}").register(sub, _Formatter)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except LLMLabError as e:
        print(f"llmlab: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("llmlab: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
