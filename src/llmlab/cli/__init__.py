"""The `llmlab` command: argument parsing only.

Each verb lives in a small module of this package that defines `register(subparsers)`; the handler it
installs calls one library function. A user error (LLMLabError, a bad argument, a full disk or a denied
write) becomes one line on stderr and exit code 2 (argparse errors add one line pointing at --help);
anything else is a bug and keeps its traceback. KEY=VALUE overrides may stand anywhere among the options.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from llmlab import __version__
from llmlab.errors import LLMLabError

# Modules under llmlab.cli, in the order their verbs appear in `llmlab --help`.
VERB_MODULES: list[str] = ["tokenizer", "data", "generate", "serve", "train", "sft", "align", "rl", "hf",
                            "quant", "evals", "speedrun", "scaling", "experiment"]


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show every option's default in --help and keep description paragraphs as written."""


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line plus a pointer to --help, not a usage dump."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\nllmlab: see '{self.prog} --help'\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="llmlab", formatter_class=_Formatter,
                     description="Make a language model end to end.")
    parser.add_argument("--version", action="version", version=f"llmlab {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for name in VERB_MODULES:
        importlib.import_module(f"llmlab.cli.{name}").register(sub, _Formatter)
    _remember_parsers(parser)
    return parser


def _remember_parsers(parser: argparse.ArgumentParser) -> None:
    """Each parser records itself in the namespace (the innermost wins), so errors found after parsing name
    the verb's usage; a parser with sub-actions but none chosen says which are available."""
    parser.set_defaults(_parser=parser)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            parser.set_defaults(func=_missing_choice(parser, action))
            for child in action.choices.values():
                _remember_parsers(child)


def _missing_choice(parser: argparse.ArgumentParser, action: argparse._SubParsersAction):
    def complain(args) -> int:
        parser.error(f"missing {action.metavar or 'VERB'}; choose one of: {', '.join(action.choices)}")

    return complain


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse ARGV; KEY=VALUE words after an option join the verb's overrides instead of being refused."""
    args, extra = parser.parse_known_args(argv)
    leaf = args._parser
    if extra:
        overrides = [w for w in extra if "=" in w and not w.startswith("-")]
        if overrides and hasattr(args, "overrides"):
            args.overrides = [*args.overrides, *overrides]
            extra = [w for w in extra if w not in overrides]
        if extra:
            hint = " (overrides are KEY=VALUE, e.g. optim.lr=3e-4)" if hasattr(args, "overrides") else ""
            leaf.error(f"unrecognized argument{'s' if len(extra) > 1 else ''}: {' '.join(extra)}{hint}")
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parse(parser, argv)
        return int(args.func(args) or 0)
    except SystemExit as e:  # argparse's --help, --version and usage errors (already printed)
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 2
    except LLMLabError as e:
        return _fail(str(e), e.exit_code)
    except KeyboardInterrupt:
        print("llmlab: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:
        from llmlab.fsutil import write_failure

        failure = write_failure(e, "the output")
        if failure is None:
            raise
        return _fail(str(failure), failure.exit_code)


def _fail(message: str, code: int) -> int:
    print(f"llmlab: error: {' '.join(message.split())}", file=sys.stderr)  # one line, whatever the message
    return code


if __name__ == "__main__":
    sys.exit(main())
