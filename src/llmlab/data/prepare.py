"""`llmlab data prepare`: tokenize text sources into train/val token shards, in parallel and resumably.

How it works
1. Resolve the sources and read every document once without tokenizing (cheap next to BPE): this checks
   the whole input (missing files, bad JSONL lines) before any output exists, and gives the progress bar
   its total.
2. Split by document: document i goes to val when a hash of (seed, i) falls below val_fraction. With a
   positive val_fraction neither split may end up empty: if no document hashes into val, the one with the
   smallest hash goes there (and if none stays in train, the one with the largest hash goes back), and a
   single document is refused. The split depends only on (seed, i, number of documents), never on timing
   or the number of workers.
3. Tokenize in a pool of worker processes, each loading the tokenizer from its directory once; batches of
   documents go out in order and come back in order (bounded in flight, so memory stays flat). Every
   document is followed by the tokenizer's eos token.
4. Each split's tokens are cut into shards {split}_00000.bin, ... of at least `shard_tokens` tokens:
   a shard closes at the first document boundary after `shard_tokens` tokens, so no document straddles
   two shards and each shard's header records the half-open range [doc_start, doc_end) of document indices
   it covers, plus a fingerprint of the whole preparation (tokenizer files, sources with sizes and
   mtimes, options).
5. A copy of the tokenizer goes to out_dir/tokenizer/, then meta.json is written, atomically and last:
   a directory with meta.json is complete. Its tokenizer block records the vocabulary size, eos id and
   the tokenizer's fingerprint (llmlab.tokenizer.identity), which checkpoints are compared against.

Resuming. A shard is *finished* when its file exists under its final name (writes are atomic, so it is
whole), its header and size validate (`read_header`), its fingerprint equals this preparation's, and it
continues the chain of the split's earlier finished shards (its doc_start is the previous doc_end). The
finished shards of each split form a prefix; a re-run keeps that prefix, skips tokenizing the documents
it covers, and rewrites everything after it. Because shards end at document boundaries and documents are
addressed by index, the result is byte-identical to an uninterrupted run. Shards from a *different*
preparation are never mixed in: that is an error unless `overwrite=True`.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import itertools
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from llmlab.data.shards import (
    META_FORMAT,
    META_NAME,
    SPLITS,
    VERSION,
    ShardHeader,
    dtype_for_vocab,
    read_header,
    read_shard,
    shard_name,
    write_shard,
)
from llmlab.data.sources import STDLIB, SourceFile, _iter_resolved, describe_sources, resolve_sources
from llmlab.errors import DataError, LLMLabError
from llmlab.fsutil import atomic_dir, check_output, swap_in, write_text_atomic
from llmlab.tokenizer.core import Tokenizer
from llmlab.tokenizer.identity import fingerprint as tokenizer_fingerprint

DEFAULT_SHARD_TOKENS = 2**24  # 32 MiB of uint16 per shard: few files, yet a shard rewrite is cheap
DEFAULT_VAL_FRACTION = 0.01
_BATCH_CHARS = 1 << 18  # documents are sent to workers in batches of about this many characters
_SMALL_INPUT_CHARS = 1 << 20  # with workers=None, inputs below this are tokenized in-process
SPLIT_RULE = 2  # the document -> split rule's version (2: neither split empty), part of the fingerprint


# ---- deterministic split and fingerprint ----

def _doc_hash(doc_index: int, seed: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{doc_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def split_of(doc_index: int, seed: int, val_fraction: float) -> str:
    """'val' for a fraction `val_fraction` of documents chosen by a hash of (seed, doc_index), else
    'train'."""
    return "val" if _doc_hash(doc_index, seed) < val_fraction * 2**64 else "train"


def split_overrides(num_docs: int, seed: int, val_fraction: float) -> dict[int, str]:
    """Documents whose split differs from `split_of` so that, with val_fraction > 0, neither split is empty:
    the smallest hash goes to val when none falls below the threshold, the largest to train when all do."""
    if val_fraction == 0:
        return {}
    if num_docs < 2:
        raise DataError(f"--val-fraction {val_fraction} needs at least 2 documents (one for train, one for "
                        f"val) but the sources hold {num_docs}; give more documents or pass --val-fraction 0")
    lowest = highest = (_doc_hash(0, seed), 0)
    for i in range(1, num_docs):
        h = (_doc_hash(i, seed), i)
        lowest, highest = min(lowest, h), max(highest, h)
    threshold = val_fraction * 2**64
    overrides = {}
    if lowest[0] >= threshold:
        overrides[lowest[1]] = "val"
    if highest[0] < threshold:
        overrides[highest[1]] = "train"
    return overrides


def _source_identity(entry: str | SourceFile) -> list:
    """What must not change for finished shards to be reused: paths with sizes and mtimes, or the stdlib."""
    if entry == STDLIB:
        return [STDLIB, sys.version]
    stat = entry.path.stat()
    return [str(entry.path.resolve()), stat.st_size, stat.st_mtime_ns]


def _dir_digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f.relative_to(path).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def _fingerprint(tokenizer_digest: str, resolved: list, options: dict) -> int:
    blob = json.dumps({"version": VERSION, "split_rule": SPLIT_RULE, "tokenizer": tokenizer_digest,
                       "options": options,
                       "sources": [_source_identity(e) for e in resolved]}, sort_keys=True)
    return int.from_bytes(hashlib.blake2b(blob.encode(), digest_size=8).digest(), "little")


# ---- tokenization (in workers or in-process) ----

_WORKER_TOKENIZER = None


def _load_tokenizer_class(module: str, qualname: str, path: str):
    cls = importlib.import_module(module)
    for part in qualname.split("."):
        cls = getattr(cls, part)
    return cls.load(path)


def _init_worker(module: str, qualname: str, path: str) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = _load_tokenizer_class(module, qualname, path)


def _encode_docs(tok, texts: list[str], num_threads: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of each text followed by eos, concatenated, plus each document's length (eos included).

    Text that merely looks like a special token ("<|eos|>" inside a document) is encoded as ordinary text:
    a document must not be able to inject control tokens.
    """
    ids = tok.encode_batch(texts, allowed_special="none", num_threads=num_threads)
    eos = tok.eos_id
    lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable([*x, eos] for x in ids), dtype=np.uint32,
                       count=int(lengths.sum()))
    return flat, lengths


def _worker_encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return _encode_docs(_WORKER_TOKENIZER, texts, num_threads=1)  # the processes are the parallelism


# ---- per-split shard writing ----

class _SplitWriter:
    """Buffers one split's documents and writes a shard at the first document boundary past shard_tokens."""

    def __init__(self, out_dir: Path, split: str, finished: list[ShardHeader], shard_tokens: int,
                 dtype: np.dtype, fingerprint: int):
        self.out_dir, self.split, self.shard_tokens = out_dir, split, shard_tokens
        self.dtype, self.fingerprint = dtype, fingerprint
        self.headers = list(finished)
        self.resume_doc = finished[-1].doc_end if finished else 0
        self.written: list[Path] = []  # shards written by this run (removed again on a user error)
        self._reset(self.resume_doc)

    def _reset(self, doc_start: int) -> None:
        self.pieces: list[np.ndarray] = []
        self.buffered, self.docs, self.doc_start = 0, 0, doc_start

    def add(self, doc_index: int, tokens: np.ndarray) -> None:
        self.pieces.append(tokens)
        self.buffered += len(tokens)
        self.docs += 1
        if self.buffered >= self.shard_tokens:
            self.flush(doc_end=doc_index + 1)

    def flush(self, doc_end: int) -> None:
        if not self.docs:
            return
        path = self.out_dir / shard_name(self.split, len(self.headers))
        header = write_shard(path, np.concatenate(self.pieces), dtype=self.dtype, doc_start=self.doc_start,
                             doc_end=doc_end, num_docs=self.docs, fingerprint=self.fingerprint)
        self.headers.append(header)
        self.written.append(path)
        self._reset(doc_end)


def _finished_prefix(out_dir: Path, split: str, fingerprint: int) -> list[ShardHeader]:
    """Headers of the split's finished shards (see module docstring), in order."""
    headers: list[ShardHeader] = []
    while (path := out_dir / shard_name(split, len(headers))).exists():
        try:
            header = read_header(path)
            read_shard(path)  # the body against the header's largest id
        except DataError:
            break  # a damaged shard is rewritten, with everything after it
        expected_start = headers[-1].doc_end if headers else 0
        if header.fingerprint != fingerprint or header.doc_start != expected_start:
            break
        headers.append(header)
    return headers


def _existing_shards(out_dir: Path) -> list[Path]:
    return sorted(p for split in SPLITS for p in out_dir.glob(f"{split}_[0-9][0-9][0-9][0-9][0-9].bin"))


def _foreign_output(out_dir: Path, fingerprint: int) -> str | None:
    """Why out_dir holds output of a different preparation, or None when everything there is ours."""
    meta = out_dir / META_NAME
    if meta.exists():
        try:
            if json.loads(meta.read_text(encoding="utf-8")).get("fingerprint") != f"{fingerprint:016x}":
                return f"{meta} describes a different preparation"
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            return f"{meta} is unreadable"
    for path in _existing_shards(out_dir):
        try:
            if read_header(path).fingerprint != fingerprint:
                return f"{path.name} was written by a different preparation"
        except DataError:
            continue  # damaged: will be rewritten
    return None


def _holds_only_shards(out_dir: Path) -> bool:
    """Whether out_dir holds nothing but what a preparation writes (resumed or checked by fingerprint)."""
    if not out_dir.is_dir():
        return False
    ours = {META_NAME, "tokenizer"} | {p.name for p in _existing_shards(out_dir)}
    return all(p.name in ours or p.name.endswith(".tmp") for p in out_dir.iterdir())


def _other_files(out_dir: Path) -> str | None:
    return None if _holds_only_shards(out_dir) else "it holds other files too"


def _remove_stale(out_dir: Path, split: str, keep: int) -> None:
    for path in out_dir.glob(f"{split}_[0-9][0-9][0-9][0-9][0-9].bin"):
        if int(path.stem.split("_")[1]) >= keep:
            path.unlink()
    # Left by a killed run (atomic_file cleans up otherwise).
    for tmp in out_dir.glob(f".{split}_*.bin.*.tmp"):
        tmp.unlink()


# ---- the tokenizer argument ----

def _resolve_tokenizer(tokenizer, stack: contextlib.ExitStack):
    """(tokenizer object, directory it loads from, description) for a directory path or a Tokenizer object."""
    if isinstance(tokenizer, (str, os.PathLike)):
        path = Path(tokenizer)
        if path.exists() and not path.is_dir():
            raise DataError(f"--tokenizer {path} is a file, not a tokenizer directory; pass the directory "
                            f"`llmlab tokenizer train` wrote")
        if not path.is_dir():
            raise DataError(f"tokenizer directory {path} does not exist; train one with "
                            f"`llmlab tokenizer train SOURCES --out {path}` or pass --tokenizer DIR")
        return Tokenizer.load(path), path, str(path)
    path = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="llmlab-tok-")))
    tokenizer.save(path)
    return tokenizer, path, f"<{type(tokenizer).__name__} object>"


def _iter_tokenized(docs: Iterator[tuple[int, str, str]], tok, tok_dir: Path,
                    workers: int) -> Iterator[tuple[list[tuple[int, str]], np.ndarray, np.ndarray, int]]:
    """Yield (index/split list, flat tokens, lengths, chars) per batch of documents, in input order."""
    def batches():
        batch, chars = [], 0
        for item in docs:
            batch.append(item)
            chars += len(item[2])
            if chars >= _BATCH_CHARS:
                yield batch, chars
                batch, chars = [], 0
        if batch:
            yield batch, chars

    if workers <= 1:
        for batch, chars in batches():
            flat, lengths = _encode_docs(tok, [text for _, _, text in batch])
            yield [(i, s) for i, s, _ in batch], flat, lengths, chars
        return
    cls = type(tok)
    ctx = multiprocessing.get_context("spawn")  # fork is unsafe once torch/tiktoken threads exist
    with ctx.Pool(workers, initializer=_init_worker,
                  initargs=(cls.__module__, cls.__qualname__, str(tok_dir))) as pool:
        pending: deque = deque()
        for batch, chars in batches():
            pending.append(([(i, s) for i, s, _ in batch], chars,
                            pool.apply_async(_worker_encode, ([text for _, _, text in batch],))))
            if len(pending) >= 4 * workers:  # bounded in flight: memory does not grow with the corpus
                index, c, result = pending.popleft()
                yield index, *result.get(), c
        while pending:
            index, c, result = pending.popleft()
            yield index, *result.get(), c


# ---- the entry point ----

def prepare_shards(sources: list[str] | str, tokenizer, out_dir: str | os.PathLike, *,
                   shard_tokens: int = DEFAULT_SHARD_TOKENS, val_fraction: float = DEFAULT_VAL_FRACTION,
                   seed: int = 0, text_field: str = "text", max_chars: int | None = None,
                   workers: int | None = None, overwrite: bool = False, progress: bool = True) -> dict:
    """Tokenize `sources` into shards in `out_dir` (see module docstring); returns the meta.json dict.

    `tokenizer` is a tokenizer directory or a Tokenizer object. `workers=None` uses every CPU for large
    inputs and the calling process for inputs under 1 MB; an explicit count is always honoured.
    """
    if shard_tokens < 1:
        raise DataError(f"shard_tokens must be >= 1, got {shard_tokens}")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}; e.g. 0.01 keeps 1% for "
                        f"validation")
    if workers is not None and workers < 1:
        raise DataError(f"workers must be >= 1, got {workers}")
    out_dir = Path(out_dir)
    with contextlib.ExitStack() as stack:
        resolved = resolve_sources(sources)
        # Shards never go into, or around, what they are made from; a directory of other files is not ours.
        check_output(out_dir, inputs=[f.path for f in resolved if isinstance(f, SourceFile)]
                     + [tokenizer if isinstance(tokenizer, (str, os.PathLike)) else None],
                     overwrite=overwrite, reusable=_holds_only_shards, into=True, what="--out")
        if max_chars is not None and max_chars <= 0:
            raise DataError(f"max_chars must be positive, got {max_chars}; omit it to read everything")
        tok, tok_dir, tok_desc = _resolve_tokenizer(tokenizer, stack)
        if tok.eos_id is None:
            raise DataError(f"tokenizer {tok_desc} has no <|eos|> token to separate documents; "
                            f"train it with the default special tokens")
        num_docs = num_chars = 0
        for text in _iter_resolved(resolved, text_field, max_chars):  # validates all input before writing
            num_docs += 1
            num_chars += len(text)
        overrides = split_overrides(num_docs, seed, val_fraction)
        options = {"shard_tokens": shard_tokens, "val_fraction": val_fraction, "seed": seed,
                   "text_field": text_field, "max_chars": max_chars}
        tok_digest = _dir_digest(tok_dir)
        fingerprint = _fingerprint(tok_digest, resolved, options)
        final_dir = None
        if out_dir.exists() and (why := _foreign_output(out_dir, fingerprint) or _other_files(out_dir)):
            if not overwrite:
                raise DataError(f"{out_dir} already holds shards of another preparation ({why}); pass "
                                f"--overwrite to replace them or choose another --out")
            # Made beside the old output and swapped in at the end: a crash leaves the old one whole.
            final_dir, out_dir = out_dir, Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp",
                                                                 dir=out_dir.parent))
        created = final_dir is not None or not out_dir.exists()
        out_dir.mkdir(parents=True, exist_ok=True)
        dtype = dtype_for_vocab(tok.vocab_size)
        writers = {s: _SplitWriter(out_dir, s, _finished_prefix(out_dir, s, fingerprint), shard_tokens,
                                   dtype, fingerprint) for s in SPLITS}
        if workers is None:
            workers = 1 if num_chars < _SMALL_INPUT_CHARS else (os.cpu_count() or 1)
        try:
            _tokenize_into(writers, resolved, text_field, max_chars, tok, tok_dir, workers, seed,
                           val_fraction, overrides, num_chars, progress)
            for split, writer in writers.items():
                writer.flush(doc_end=num_docs)
                _remove_stale(out_dir, split, keep=len(writer.headers))
            meta = _meta(writers, tok, tok_desc, tok_digest, fingerprint, dtype, resolved, sources, options,
                         num_docs, num_chars)
            with atomic_dir(out_dir / "tokenizer") as tmp:
                tok.save(tmp)
            write_text_atomic(out_dir / META_NAME, json.dumps(meta, indent=2) + "\n")
            if final_dir is not None:
                swap_in(out_dir, final_dir)
        except LLMLabError:
            # A user error leaves nothing half-made: drop what this run wrote (earlier runs' shards stay).
            for writer in writers.values():
                for path in writer.written:
                    path.unlink(missing_ok=True)
            if created:
                shutil.rmtree(out_dir, ignore_errors=True)
            raise
    return meta


def _tokenize_into(writers, resolved, text_field, max_chars, tok, tok_dir, workers, seed, val_fraction,
                   overrides, num_chars, progress) -> None:
    bar = tqdm(total=num_chars, unit="char", unit_scale=True, desc="tokenizing", disable=not progress,
               dynamic_ncols=True)

    def todo() -> Iterator[tuple[int, str, str]]:
        for i, text in enumerate(_iter_resolved(resolved, text_field, max_chars)):
            split = overrides.get(i) or split_of(i, seed, val_fraction)
            if i < writers[split].resume_doc:
                bar.update(len(text))  # covered by a finished shard
                continue
            yield i, split, text

    tokens = 0
    with bar:
        for index, flat, lengths, chars in _iter_tokenized(todo(), tok, tok_dir, workers):
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            for (i, split), a, b in zip(index, offsets[:-1], offsets[1:], strict=True):
                writers[split].add(i, flat[a:b])
            tokens += int(offsets[-1])
            bar.update(chars)
            bar.set_postfix(tokens=f"{tokens:,}", refresh=False)


def _meta(writers, tok, tok_desc, tok_digest, fingerprint, dtype, resolved, sources, options,
          num_docs, num_chars) -> dict:
    splits = {}
    for split, writer in writers.items():
        shards = [{"name": shard_name(split, k), "tokens": h.num_tokens, "documents": h.num_docs,
                   "doc_start": h.doc_start, "doc_end": h.doc_end} for k, h in enumerate(writer.headers)]
        splits[split] = {"tokens": sum(s["tokens"] for s in shards),
                         "documents": sum(s["documents"] for s in shards), "shards": shards}
    return {
        "format": META_FORMAT, "version": VERSION, "fingerprint": f"{fingerprint:016x}",
        "dtype": dtype.name, "documents": num_docs, "characters": num_chars,
        "tokens": sum(s["tokens"] for s in splits.values()),
        "tokenizer": {"vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "source": tok_desc,
                      "digest": tok_digest, "copy": "tokenizer",
                      **({"fingerprint": tokenizer_fingerprint(tok)} if isinstance(tok, Tokenizer) else {})},
        "options": options,
        "sources": describe_sources([os.fspath(s) for s in
                                     ([sources] if isinstance(sources, str) else sources)]),
        "splits": splits,
    }
