"""What the `llmlab tokenizer` commands do: train from sources, inspect a text, measure files.

Each function is one CLI verb's work, kept here so it can be used (and tested) from Python too.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from llmlab.data.sources import SourceFile, iter_documents, resolve_sources
from llmlab.fsutil import check_output
from llmlab.tokenizer.core import Tokenizer
from llmlab.tokenizer.formats import check_output_dir


def train_from_sources(sources: Sequence[str], out: str | os.PathLike, *, vocab_size: int = 8192,
                       pattern: str = "gpt4", special_tokens: Sequence[str] | None = None,
                       max_chars: int | None = None, text_field: str = "text", workers: int | None = None,
                       progress: bool = True, overwrite: bool = False) -> Tokenizer:
    """Train on the documents of `sources` (files, globs, directories, "stdlib") and save to `out`.

    Everything is checked before any output exists (an existing non-empty `out` only with `overwrite`, see
    llmlab.fsutil.check_output); the directory appears complete or not at all.
    """
    inputs = [f.path for f in resolve_sources(list(sources)) if isinstance(f, SourceFile)]
    check_output(out, inputs=inputs, overwrite=overwrite, what="--out")
    check_output_dir(Path(out))
    docs = iter_documents(list(sources), text_field=text_field, max_chars=max_chars)
    tok = Tokenizer.train(docs, vocab_size=vocab_size, pattern=pattern, special_tokens=special_tokens,
                          max_chars=max_chars, progress=progress, workers=workers)
    tok.save(out)
    return tok


def piece_label(data: bytes) -> str:
    """A token's bytes, readable: UTF-8 text as text (spaces as ␣, control characters escaped) and bytes
    that are not a whole UTF-8 character as <xx>, so the pieces of "猫" read <e7><8c><ab>."""
    out = []
    for c in data.decode("utf-8", "surrogateescape"):
        if "\udc80" <= c <= "\udcff":  # an undecodable byte, smuggled through as a lone surrogate
            out.append(f"<{ord(c) - 0xDC00:02x}>")
        elif c == " ":
            out.append("\u2423")
        else:
            out.append(c if c.isprintable() else repr(c)[1:-1])
    return "".join(out)


def inspect_text(tok: Tokenizer, text: str, allowed_special="none") -> str:
    """One line per token (position, id, piece) and a summary line; "猫" split over bytes shows <e7><8c>."""
    ids = tok.encode(text, allowed_special=allowed_special)
    width = len(str(max(ids, default=0)))
    lines = [f"{i:>4}  {t:>{width}}  {piece_label(tok.token_bytes(t))}" for i, t in enumerate(ids)]
    n_bytes = len(text.encode("utf-8", "surrogatepass"))
    lines.append(f"{len(ids)} tokens for {len(text)} characters / {n_bytes} bytes"
                 + (f" ({n_bytes / len(ids):.2f} bytes per token)" if ids else ""))
    return "\n".join(lines)


def file_stats(tok: Tokenizer, files: Sequence[str], text_field: str = "text") -> list[dict]:
    """Per file: documents, characters, bytes, whitespace-separated words, tokens, bytes/token and
    tokens/word."""
    rows = []
    for f in files:
        docs = list(iter_documents([f], text_field=text_field))
        n_tokens = sum(len(ids) for ids in tok.encode_batch(docs, allowed_special="none"))
        n_bytes = sum(len(d.encode("utf-8", "surrogatepass")) for d in docs)
        n_words = sum(len(d.split()) for d in docs)
        rows.append({"file": f, "documents": len(docs), "chars": sum(map(len, docs)), "bytes": n_bytes,
                     "words": n_words, "tokens": n_tokens,
                     "bytes_per_token": n_bytes / n_tokens if n_tokens else 0.0,
                     "tokens_per_word": n_tokens / n_words if n_words else 0.0})
    return rows


def format_stats(rows: list[dict]) -> str:
    head = f"{'bytes/token':>11}  {'tokens/word':>11}  {'tokens':>10}  {'bytes':>11}  file"
    body = [f"{r['bytes_per_token']:>11.3f}  {r['tokens_per_word']:>11.3f}  {r['tokens']:>10}  "
            f"{r['bytes']:>11}  "
            f"{r['file']}" for r in rows]
    return "\n".join([head, *body])
