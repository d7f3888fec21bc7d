"""Atomic file-system writes, and the one rule for every output llmlab writes.

Everything llmlab writes that another stage reads (tokenizers, shards, checkpoints, reports) goes through
these helpers: write into a temporary sibling, fsync, then rename into place. A crash at any moment leaves
either the old content or the new, never half of one.

The output rule (`check_output`), applied by every verb before its long work starts:
  - an output equal to an input, inside one, or containing one is always refused (replacing it would
    delete what is being read), paths compared after resolving symlinks;
  - an existing non-empty output is refused unless the user asked to overwrite it (or it is the verb's own
    resumable output), and overwriting writes beside it and swaps, so the old output survives a crash;
  - the output must be creatable: its nearest existing ancestor a directory we can write in.
A full disk or a permission error while writing becomes an OutputError naming the path, and the temporary
file or directory is removed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from llmlab.errors import LLMLabError, OutputError

_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
_DENIED = {errno.EACCES, errno.EPERM, errno.EROFS}
_NOT_DIR = {errno.ENOTDIR}
# Writers that report a failed write without an OSError: safetensors ("... (os error 27)"), torch.save to a
# path ("unexpected pos 704 vs 598"), numpy's tofile ("100000 requested and 2500 written").
_OS_ERROR_TEXT = re.compile(r"os error (\d+)")
_SHORT_WRITE_TEXT = re.compile(r"unexpected pos \d+ vs \d+|requested and \d+ written|file write failed")


def write_failure(exc: BaseException, path: str | os.PathLike) -> OutputError | None:
    """The one-line OutputError for a write to PATH that failed on a full disk, the file-size limit or missing
    permission (found on EXC, its message or the exceptions it was raised from); None for anything else."""
    seen = exc
    while seen is not None:
        code = getattr(seen, "errno", None) if isinstance(seen, OSError) else None
        match = _OS_ERROR_TEXT.search(str(seen)) if code is None else None
        code = int(match.group(1)) if match else code
        where = (seen.filename if isinstance(seen, OSError) else None) or path
        if code in _FULL:
            return OutputError(f"cannot write {where}: {os.strerror(code)} (disk full or over the file-size "
                               "limit); free space or write to another disk")
        if code in _DENIED:
            what = f"cannot write {path}" if str(where) == str(path) else f"{where} (while writing {path})"
            return OutputError(f"{what}: {os.strerror(code)}; fix the permissions or choose a directory you "
                               "can write to")
        if code in _NOT_DIR:
            return OutputError(f"cannot write {where}: a path component is a regular file, not a directory; "
                               "choose a path in a directory")
        if code is None and _SHORT_WRITE_TEXT.search(str(seen)):
            return OutputError(f"cannot write {path}: the write stopped short (disk full or over the "
                               "file-size limit?); free space or write to another disk")
        seen = seen.__cause__ or seen.__context__
    return None


@contextlib.contextmanager
def _converting_write_failures(path: Path) -> Iterator[None]:
    try:
        yield
    except LLMLabError:
        raise
    except Exception as e:
        err = write_failure(e, path)
        if err is None:
            raise
        raise err from e


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory entry so a rename inside it survives power loss (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb") -> Iterator:
    """Open a temporary file beside `path`; on success fsync and rename it to `path`, on error delete it."""
    path = Path(path)
    with _converting_write_failures(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, mode) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            fsync_dir(path.parent)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path, "w") as f:
        f.write(text)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_file(path, "wb") as f:
        f.write(data)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; on success rename it to `path` (replacing an old one, or an
    empty directory even without `overwrite`).

    Files written inside should be complete when the block ends; they are fsynced before the rename.
    """
    path = Path(path)
    with _converting_write_failures(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        try:
            yield tmp
            for child in tmp.rglob("*"):
                if child.is_file():
                    with open(child, "rb") as f:
                        os.fsync(f.fileno())
            _swap_into_place(tmp, path, overwrite)
            fsync_dir(path.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def swap_in(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Move the finished directory TMP (a sibling of PATH) to PATH, replacing what is there."""
    with _converting_write_failures(Path(path)):
        _swap_into_place(Path(tmp), Path(path), overwrite=True)
        fsync_dir(Path(path).parent)


def _swap_into_place(tmp: Path, path: Path, overwrite: bool) -> None:
    if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
        path.rmdir()
    if not os.path.lexists(path):
        os.replace(tmp, path)
        return
    if not overwrite:
        raise OutputError(f"{path} appeared while it was being written; remove it or pass --overwrite")
    # Move the old output aside first so there is never a moment with neither present.
    old = path.with_name(f".{path.name}.old")
    remove_path(old)
    os.replace(path, old)
    os.replace(tmp, path)
    remove_path(old)


def remove_path(path: str | os.PathLike) -> None:
    """Delete a file, link or directory tree if it exists."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


# ---- the output rule ----

def _resolve(path: str | os.PathLike) -> Path:
    return Path(os.path.abspath(path)).resolve()


def _is_within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def _nonempty(path: Path) -> bool:
    if path.is_dir() and not path.is_symlink():
        return any(path.iterdir())
    return os.path.lexists(path)


def check_output(path: str | os.PathLike, *, inputs: Iterable[str | os.PathLike | None] = (),
                 overwrite: bool = False, reusable: Callable[[Path], bool] | None = None,
                 into: bool = False, kept: bool = False, what: str = "output",
                 fix: str = "pass --overwrite to replace it") -> Path:
    """Apply the output rule (module docstring) to PATH before any long work; return PATH.

    `inputs`: the paths the command reads (None and "" entries are skipped). `reusable(PATH)` is true where an
    existing PATH is this command's own output to resume (not someone's files). `into`: files are written
    inside PATH, so an existing PATH must be a directory. `kept`: PATH itself is never replaced or removed,
    only written into (a run directory), so it may contain an input (a speedrun's run holds its shards).
    `fix` says how to overwrite (the option's name differs between verbs).
    """
    path = Path(path)
    target = _resolve(path)
    for given in inputs:
        if given is None or os.fspath(given) == "":
            continue
        source = _resolve(given)
        if target == source:
            kind = "directory" if source.is_dir() else "file"
            raise OutputError(f"{what} {path} is the input {kind} {given}; write to a new path (an input is "
                              "never replaced, not even with --overwrite)")
        if _is_within(source, target) and not kept:
            raise OutputError(f"{what} {path} contains the input {given}; writing it would delete the input, "
                              "so choose a path outside it")
        if _is_within(target, source):
            raise OutputError(f"{what} {path} lies inside the input {given}; choose a path outside it")
    if not kept and _is_within(_resolve(os.getcwd()), target):
        raise OutputError(f"{what} {path} is or contains the current directory; writing it would replace the "
                          "directory you are in, so name a new directory inside it")
    check_writable(path, what)
    if into and os.path.lexists(path) and not path.is_dir():
        raise OutputError(f"{what} {path} is a regular file, not a directory; choose a directory path")
    if _nonempty(path) and not overwrite and not (reusable is not None and reusable(path)):
        kind = "directory" if path.is_dir() else "file"
        raise OutputError(f"{what} {path} already exists as a non-empty {kind}; choose a new path or {fix}")
    return path


def check_writable(path: str | os.PathLike, what: str = "output") -> None:
    """PATH can be written: the nearest existing ancestor of its parent (where its temporary sibling goes) is
    a directory we may write in, and so is PATH itself where it is an existing directory."""
    path = Path(path)
    full = Path(os.path.abspath(path))
    ancestor = full.parent
    while not os.path.lexists(ancestor):
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"{what} {path} lies under {ancestor}, which is a regular file, not a directory; "
                          "choose a path in a directory")
    _probe(ancestor, path, what)
    if full.is_dir():
        _probe(full, path, what)


def _probe(directory: Path, path: Path, what: str) -> None:
    """Create and delete a file in DIRECTORY: the only test of write access that root, read-only mounts and
    pseudo file systems all answer truthfully."""
    try:
        fd, name = tempfile.mkstemp(prefix=".llmlab-probe.", dir=directory)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise OutputError(f"cannot write {what} {path}: {directory} does not accept new files "
                          f"({e.strerror}); choose a directory you can write to") from None
