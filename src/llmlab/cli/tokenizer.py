"""`llmlab tokenizer train | encode | decode | inspect | stats | export`: make and examine tokenizers."""

from __future__ import annotations

import json
import sys
import warnings

from llmlab.cli.options import COUNT

DEFAULT_DIR = "tokenizer"


def register(sub, formatter_class) -> None:
    tok = sub.add_parser("tokenizer", help="train, inspect and export byte-level BPE tokenizers",
                         formatter_class=formatter_class,
                         description="Train a byte-level BPE tokenizer and look at what it does.")
    verbs = tok.add_subparsers(dest="tokenizer_verb", metavar="ACTION")

    p = verbs.add_parser(
        "train", formatter_class=formatter_class, help="learn BPE merges from text sources",
        description="Learn byte-level BPE merges from SOURCES (.txt/.jsonl/.parquet files, globs, "
                    "directories, or 'stdlib' for the built-in corpus) and save the tokenizer to OUT "
                    "(llmlab.json + tokenizer.json).\n\nexample: llmlab tokenizer train stdlib "
                    "--vocab-size 8192 --out tokenizer")
    p.add_argument("sources", nargs="+", metavar="SOURCE", help="files, globs, directories or 'stdlib'")
    p.add_argument("--vocab-size", type=COUNT, default=8192,
                   help="total tokens: 256 bytes + merges + special tokens")
    p.add_argument("--pattern", default="gpt4",
                   help="pre-tokenization regex: 'gpt4' (cl100k), 'gpt2', or a custom regular expression")
    p.add_argument("--out", default=DEFAULT_DIR, metavar="DIR", help="directory to write the tokenizer to")
    p.add_argument("--max-chars", type=COUNT, default=None, help="stop reading after this many characters")
    p.add_argument("--special", action="append", default=None, metavar="TOKEN",
                   help="a special token (repeat for several); replaces the defaults "
                        "<|bos|> <|eos|> <|pad|> <|system|> <|user|> <|assistant|> <|end|>")
    p.add_argument("--no-special", action="store_true", help="no special tokens at all")
    p.add_argument("--text-field", default="text", help="JSONL field / parquet column holding the text")
    p.add_argument("--workers", type=COUNT, default=None, help="chunk-counting processes (unset: all CPUs)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing tokenizer in OUT (written beside it, then swapped in)")
    p.set_defaults(func=_train)

    e = verbs.add_parser("encode", formatter_class=formatter_class, help="print the token ids of a text",
                         description="Print the token ids of TEXT (or of --file) separated by spaces.")
    e.add_argument("text", nargs="?", default=None, help="the text to encode")
    e.add_argument("--file", default=None, help="encode this UTF-8 file instead of TEXT")
    e.add_argument("--allow-special", action="store_true",
                   help="turn special-token text such as <|eos|> into special ids (otherwise it is an error)")
    _tokenizer_option(e)
    e.set_defaults(func=_encode)

    d = verbs.add_parser("decode", formatter_class=formatter_class, help="print the text of token ids",
                         description="Print the text of the token IDS (spaces or commas between them; read "
                                     "from stdin when none are given).")
    d.add_argument("ids", nargs="*", metavar="ID", help="token ids")
    _tokenizer_option(d)
    d.set_defaults(func=_decode)

    i = verbs.add_parser("inspect", formatter_class=formatter_class,
                         help="show the pieces a text splits into",
                         description="Show each token of TEXT with its id and bytes (valid UTF-8 as text, "
                                     "other bytes as <xx>, spaces as \u2423).\n\nexample: llmlab tokenizer "
                                     "inspect \"strawberry \u732b\"")
    i.add_argument("text", help="the text to inspect")
    _tokenizer_option(i)
    i.set_defaults(func=_inspect)

    s = verbs.add_parser("stats", formatter_class=formatter_class, help="bytes per token and tokens per word",
                         description="For each FILE print bytes per token and tokens per "
                                     "(whitespace-separated) word.")
    s.add_argument("files", nargs="+", metavar="FILE", help=".txt/.jsonl/.parquet files (or 'stdlib')")
    s.add_argument("--text-field", default="text", help="JSONL field / parquet column holding the text")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _tokenizer_option(s)
    s.set_defaults(func=_stats)

    x = verbs.add_parser("export", formatter_class=formatter_class,
                         help="write the tokenizer in another format",
                         description="Write the tokenizer for another library. hf: a Hugging Face "
                                     "tokenizer.json (OUT may be a directory).")
    x.add_argument("out", metavar="OUT", help="output file (or directory for tokenizer.json)")
    x.add_argument("--format", choices=["hf"], default="hf", help="output format")
    x.add_argument("--overwrite", action="store_true", help="replace an existing OUT file")
    _tokenizer_option(x)
    x.set_defaults(func=_export)


def _tokenizer_option(p) -> None:
    p.add_argument("--tokenizer", default=DEFAULT_DIR, metavar="DIR",
                   help="tokenizer directory (made by `llmlab tokenizer train`)")


def _load(args):
    from llmlab.tokenizer import Tokenizer

    return Tokenizer.load(args.tokenizer)


def _train(args) -> int:
    import time

    from llmlab.tokenizer.tools import train_from_sources

    specials = [] if args.no_special else args.special
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tok = train_from_sources(args.sources, args.out, vocab_size=args.vocab_size, pattern=args.pattern,
                                 special_tokens=specials, max_chars=args.max_chars,
                                 text_field=args.text_field, workers=args.workers,
                                 progress=not args.no_progress, overwrite=args.overwrite)
    for w in caught:
        print(f"note: {w.message}", file=sys.stderr)
    print(f"{args.out}: {tok.vocab_size} tokens ({len(tok.merges)} merges, "
          f"{len(tok.special_tokens)} special) with the {tok.pattern_name or 'custom'} pattern in "
          f"{time.perf_counter() - start:.1f}s")
    return 0


def _encode(args) -> int:
    from llmlab.errors import TokenizerError

    if (args.text is None) == (args.file is None):
        raise TokenizerError("give either TEXT or --file FILE to encode (exactly one)")
    text = args.text if args.file is None else _read_text(args.file)
    tok = _load(args)
    ids = tok.encode(text, allowed_special="all" if args.allow_special else "none_raise")
    print(" ".join(map(str, ids)))
    return 0


def _read_text(path: str) -> str:
    from llmlab.errors import DataError

    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise DataError(f"{path} does not exist; pass an existing UTF-8 text file to --file") from None
    except IsADirectoryError:
        raise DataError(f"{path} is a directory; pass a UTF-8 text file to --file") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not valid UTF-8 (byte {e.start}); convert it to UTF-8 first") from None


def _decode(args) -> int:
    from llmlab.errors import TokenizerError

    words = args.ids or sys.stdin.read().split()
    try:
        ids = [int(w) for part in words for w in part.replace(",", " ").split()]
    except ValueError:
        raise TokenizerError(f"token ids must be integers, got {' '.join(words)[:60]!r}") from None
    tok = _load(args)
    sys.stdout.write(tok.decode(ids) + "\n")
    return 0


def _inspect(args) -> int:
    from llmlab.tokenizer.tools import inspect_text

    print(inspect_text(_load(args), args.text))
    return 0


def _stats(args) -> int:
    from llmlab.tokenizer.tools import file_stats, format_stats

    rows = file_stats(_load(args), args.files, text_field=args.text_field)
    print(json.dumps(rows, indent=2) if args.json else format_stats(rows))
    return 0


def _export(args) -> int:
    from pathlib import Path

    from llmlab.fsutil import check_output

    out = Path(args.out)
    if out.is_dir() or args.out.endswith(("/", "\\")):
        out = out / "tokenizer.json"
    tok = _load(args)
    check_output(out, inputs=[args.tokenizer], overwrite=args.overwrite, what="OUT")
    tok.to_hf(out)
    print(f"wrote {out}")
    return 0
