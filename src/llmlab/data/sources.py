"""Text sources: turn what a user points at into a stream of documents (one `str` each).

A source is one of
- a path to a text file (`.txt`, `.md`, ... any file that is not `.jsonl`/`.parquet`): one document per file;
- a `.jsonl` file: one JSON object per line, the document is its `text_field` (default "text");
- a `.parquet` file (needs the optional extra: `pip install llmlab[parquet]`): one document per row of
  the `text_field` column;
- a glob (`data/*.txt`, `corpus/**/*.jsonl`): every matching file, in sorted order;
- a directory: every supported file below it (recursively, hidden entries skipped), in sorted order;
- the name `stdlib` (write `./stdlib` for a path of that name): the built-in corpus, the running
  Python's standard-library `.py` sources (test suites, site-packages and generated files excluded)
  followed by its pydoc topic texts. It is real mixed prose and code of about 11 MB that needs no
  download, which makes it the default corpus for demos and benchmarks.

The order of documents is a pure function of the sources (sorted paths), so a train/val split by document
index is reproducible. All sources are resolved *before* the first document is produced, so a missing or
empty file is reported before anything downstream starts writing output.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from llmlab.errors import DataError

STDLIB = "stdlib"
JSONL_SUFFIXES = (".jsonl",)
PARQUET_SUFFIXES = (".parquet",)
TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst")
# Suffixes picked up when recursing into a directory or expanding a glob over a directory tree.
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES

# Directory names under the stdlib that are test suites, third-party or build artefacts, not library text.
_STDLIB_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
                     "lib-dynload", "turtledemo"}
# Files that are generated data rather than written source (topics.py is added as its texts instead).
_STDLIB_SKIP_FILES = {"topics.py"}
_STDLIB_SKIP_PREFIXES = ("_sysconfigdata", "test_")

_FIX_PATH = "check the path or pass an existing .txt/.jsonl/.parquet file, a directory, a glob, or 'stdlib'"


@dataclass(frozen=True)
class SourceFile:
    """One resolved input file, with how to read it and whether an empty file is an error."""

    path: Path
    kind: str  # "text" | "jsonl" | "parquet"
    explicit: bool  # named directly by the user (empty -> error) rather than found by a glob/directory


def _kind_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    return "text"


def stdlib_root() -> Path:
    """The directory holding the running interpreter's standard library (the real one, not a venv's)."""
    return Path(os.__file__).resolve().parent


def stdlib_files() -> list[Path]:
    """The standard-library `.py` files of the built-in corpus, sorted by path relative to the stdlib root."""
    root = stdlib_root()
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        # config-3.x-... holds build files (Makefile, python.o); the rest are tests or third-party code.
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS and not d.startswith("config-")]
        for name in filenames:
            if (name.endswith(".py") and name not in _STDLIB_SKIP_FILES
                    and not name.startswith(_STDLIB_SKIP_PREFIXES)):
                files.append(Path(dirpath) / name)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def stdlib_topics() -> list[str]:
    """pydoc's help-topic texts (the language reference prose behind `help('if')`), sorted by topic name."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data; the sources alone are still a corpus
        return []
    return [topics[name] for name in sorted(topics)]


def _expand(source: str) -> list[SourceFile]:
    """Resolve one source string to files (not `stdlib`), raising DataError when it names nothing."""
    path = Path(source).expanduser()
    if path.is_dir():
        found = sorted(
            (p for p in path.rglob("*")
             if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES
             and not any(part.startswith(".") for part in p.relative_to(path).parts)),
            key=lambda p: p.relative_to(path).as_posix())
        if not found:
            raise DataError(f"directory {source} contains no {'/'.join(SUPPORTED_SUFFIXES)} files; "
                            f"add some or point at the files themselves")
        return [SourceFile(p, _kind_of(p), explicit=False) for p in found]
    if path.is_file():
        return [SourceFile(path, _kind_of(path), explicit=True)]
    if glob.has_magic(source):
        matches = sorted(Path(m) for m in glob.glob(os.path.expanduser(source), recursive=True))
        files = [m for m in matches if m.is_file()]
        if not files:
            raise DataError(f"glob {source!r} matches no files; {_FIX_PATH}")
        return [SourceFile(p, _kind_of(p), explicit=False) for p in files]
    raise DataError(f"source {source} does not exist; {_FIX_PATH}")


def resolve_sources(sources: list[str] | str) -> list[str | SourceFile]:
    """Expand every source eagerly: `stdlib` stays a name, everything else becomes SourceFiles.

    Raises DataError for a missing path, a glob matching nothing, an empty directory or an explicitly
    named empty file, so callers learn about bad input before producing any output.
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = [os.fspath(sources)]
    if not sources:
        raise DataError("no text sources given; pass files, globs, directories or 'stdlib'")
    resolved: list[str | SourceFile] = []
    for source in sources:
        source = os.fspath(source)
        if source == STDLIB:  # always the built-in corpus; write ./stdlib for a path of that name
            resolved.append(STDLIB)
            continue
        for f in _expand(source):
            if f.kind == "parquet":
                _require_pyarrow(f.path)
            if f.explicit and f.path.stat().st_size == 0:
                raise DataError(f"{f.path} is empty; remove it from the sources or give it some text")
            resolved.append(f)
    return resolved


def _require_pyarrow(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading {path} needs pyarrow, which is not installed; "
                        f"run `pip install llmlab[parquet]` (or `pip install pyarrow`)") from None
    return pq


def _read_text_file(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8-sig")  # -sig: a leading byte-order mark is not text
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not valid UTF-8 (byte {e.start}); convert it, e.g. "
                        f"`iconv -f latin1 -t utf-8 {path} > {path.stem}.utf8{path.suffix}`") from None


def _read_source_file(path: Path) -> str:
    """A Python source file decoded per its coding cookie (PEP 263), as the interpreter would."""
    import tokenize

    with tokenize.open(path) as f:
        return f.read()


def _iter_jsonl(path: Path, text_field: str) -> Iterator[str]:
    with open(path, encoding="utf-8", errors="strict") as f:
        lineno = 0
        while True:
            lineno += 1
            try:
                line = f.readline()
            except UnicodeDecodeError:
                raise DataError(f"{path}:{lineno}: not valid UTF-8; convert the file to UTF-8") from None
            if not line:
                return
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno}); "
                                f"fix or delete that line (each line must be one JSON object)") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object like "
                                f'{{"{text_field}": "..."}}, got {type(record).__name__}; fix that line')
            if text_field not in record:
                keys = ", ".join(sorted(record)[:8]) or "none"
                raise DataError(f"{path}:{lineno}: no field {text_field!r} (keys: {keys}); "
                                f"pass --text-field with the field holding the text")
            text = record[text_field]
            if not isinstance(text, str):
                raise DataError(f"{path}:{lineno}: field {text_field!r} is {type(text).__name__}, "
                                f"not a string; fix that line or choose another --text-field")
            yield text


def _iter_parquet(path: Path, text_field: str) -> Iterator[str]:
    pq = _require_pyarrow(path)
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError for non-parquet bytes
        raise DataError(f"{path} is not a readable parquet file ({e}); re-export it or remove it") from None
    names = pf.schema_arrow.names
    if text_field not in names:
        raise DataError(f"{path}: no column {text_field!r} (columns: {', '.join(names[:8])}); "
                        f"pass --text-field with the column holding the text")
    # Row-group batches keep memory bounded for large files.
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if text is not None:
                if not isinstance(text, str):
                    raise DataError(f"{path}: column {text_field!r} holds {type(text).__name__}, not "
                                    f"strings; choose a string column with --text-field")
                yield text


def _iter_file(f: SourceFile, text_field: str) -> Iterator[str]:
    if f.kind == "jsonl":
        yield from _iter_jsonl(f.path, text_field)
    elif f.kind == "parquet":
        yield from _iter_parquet(f.path, text_field)
    else:
        yield _read_text_file(f.path)


def _iter_stdlib() -> Iterator[str]:
    for path in stdlib_files():
        yield _read_source_file(path)
    yield from stdlib_topics()


def _iter_resolved(resolved: list[str | SourceFile], text_field: str,
                   max_chars: int | None) -> Iterator[str]:
    budget = max_chars
    produced = 0
    for entry in resolved:
        docs = _iter_stdlib() if entry == STDLIB else _iter_file(entry, text_field)
        before = produced
        for text in docs:
            if not text:  # an empty document would only add a separator token
                continue
            if budget is not None:
                if budget <= 0:
                    return
                text = text[:budget]
                budget -= len(text)
            produced += 1
            yield text
        if produced == before and isinstance(entry, SourceFile) and entry.explicit:
            raise DataError(f"{entry.path} holds no text (no non-empty documents); "
                            f"remove it from the sources or check --text-field")
    if produced == 0:
        raise DataError("the corpus is empty: the sources hold no non-empty documents; "
                        "check the paths and --text-field")


def iter_documents(sources: list[str] | str, text_field: str = "text",
                   max_chars: int | None = None) -> Iterator[str]:
    """Yield the documents of `sources` in a deterministic order (see the module docstring).

    `max_chars` caps the total characters produced (the last document is cut short to fit exactly).
    Sources are resolved before this returns, so missing or empty files raise DataError immediately;
    problems inside a file (a bad JSONL line) raise DataError naming file:line when reached.
    """
    if max_chars is not None and max_chars <= 0:
        raise DataError(f"max_chars must be positive, got {max_chars}; omit it to read everything")
    resolved = resolve_sources(sources)
    return _iter_resolved(resolved, text_field, max_chars)


def describe_sources(sources: list[str] | str) -> list[dict]:
    """A JSON-friendly summary of each source: what it resolved to, how many files and bytes."""
    summary = []
    for source in ([sources] if isinstance(sources, str) else sources):
        source = os.fspath(source)
        resolved = resolve_sources([source])
        if resolved == [STDLIB]:
            files = stdlib_files()
            summary.append({"source": STDLIB, "kind": "stdlib", "root": str(stdlib_root()),
                            "files": len(files), "topics": len(stdlib_topics()),
                            "bytes": sum(p.stat().st_size for p in files)})
        else:
            kinds = sorted({f.kind for f in resolved})
            summary.append({"source": source, "kind": "+".join(kinds), "files": len(resolved),
                            "bytes": sum(f.path.stat().st_size for f in resolved)})
    return summary
