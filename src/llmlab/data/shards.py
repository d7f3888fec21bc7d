"""Token shard files: a 64-byte header followed by the raw little-endian token ids.

Layout (all integers little-endian):

    offset  size  field
    0       8     magic b"LLMLABTK"
    8       4     format version (2)
    12      4     dtype code: 2 = uint16, 4 = uint32 (the bytes per token)
    16      8     number of tokens
    24      8     first document index covered (global index in the source stream)
    32      8     end document index (exclusive)
    40      8     number of documents in the shard
    48      8     fingerprint of the preparation (tokenizer + sources + options) that wrote it
    56      4     largest token id in the body (0 when empty); version 1 had 0 here (reserved)
    60      4     CRC-32 of bytes 0..59, so a flipped header byte is caught, not read as a wrong count
    64      ...   tokens

uint16 is used whenever every id fits (vocab_size <= 65536), halving disk and page-cache use; uint32
otherwise. The header makes a shard self-describing and checkable: `read_header` refuses a file whose magic,
version, CRC, fields or size do not match, and `read_shard` also checks the body: its largest id must be
the one the header records (one np.max pass over the memory map), and below the vocabulary when one is
given, so a damaged body is refused by name instead of crashing an embedding lookup. Version-1 shards
(no largest id recorded) are still read; their bodies are checked against the vocabulary alone.
`split_shards` checks a prepared directory's shards against its meta.json (names, counts, dtype,
fingerprint, largest id below the vocabulary). Writes go through `llmlab.fsutil.atomic_file`, so a shard
at its final name is always complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmlab.errors import DataError
from llmlab.fsutil import atomic_file, write_text_atomic

MAGIC = b"LLMLABTK"
VERSION = 2
HEADER_SIZE = 64
_HEADER = struct.Struct("<8sIIQQQQQI")  # everything before the CRC: 60 bytes
_DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}
_FIX = "re-run `llmlab data prepare` to rebuild it"
_HEX16 = re.compile(r"[0-9a-f]{16}")


@dataclass(frozen=True)
class ShardHeader:
    """What a shard's header says about it."""

    dtype: np.dtype
    num_tokens: int
    doc_start: int = 0
    doc_end: int = 0
    num_docs: int = 0
    fingerprint: int = 0
    version: int = VERSION
    max_id: int | None = None  # the largest id in the body (None for version-1 shards, which lack it)

    @property
    def nbytes(self) -> int:
        """Expected file size: header plus tokens."""
        return HEADER_SIZE + self.num_tokens * self.dtype.itemsize


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 when every id < 65536 fits, else uint32."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    if vocab_size <= 2**16:
        return _DTYPES[2]
    if vocab_size <= 2**32:
        return _DTYPES[4]
    raise DataError(f"vocab_size {vocab_size} does not fit in uint32 token ids; use a vocabulary below 2**32")


def encode_header(header: ShardHeader) -> bytes:
    body = _HEADER.pack(MAGIC, header.version, header.dtype.itemsize, header.num_tokens, header.doc_start,
                        header.doc_end, header.num_docs, header.fingerprint, header.max_id or 0)
    return body + struct.pack("<I", zlib.crc32(body))


def read_header(path: str | os.PathLike) -> ShardHeader:
    """Parse and validate a shard's header and size; DataError naming the file and the fix if anything is
    off."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER_SIZE)
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        raise DataError(f"shard {path} does not exist; {_FIX}") from None
    if len(raw) < HEADER_SIZE:
        raise DataError(f"shard {path} is truncated ({size} bytes, header needs {HEADER_SIZE}); {_FIX}")
    body, (crc,) = raw[:-4], struct.unpack("<I", raw[-4:])
    magic, version, code, num_tokens, doc_start, doc_end, num_docs, fingerprint, max_id = _HEADER.unpack(body)
    if magic != MAGIC:
        raise DataError(f"{path} is not an llmlab token shard (bad magic {magic!r}); {_FIX}")
    if version > VERSION:
        raise DataError(f"shard {path} has format version {version}, newer than this llmlab reads "
                        f"({VERSION}); upgrade llmlab or {_FIX}")
    if zlib.crc32(body) != crc:
        raise DataError(f"shard {path} has a corrupt header (checksum mismatch); {_FIX}")
    if code not in _DTYPES or version < 1:
        raise DataError(f"shard {path} has an unknown dtype code {code} / version {version}; {_FIX}")
    header = ShardHeader(_DTYPES[code], num_tokens, doc_start, doc_end, num_docs, fingerprint, version,
                         max_id if version >= 2 else None)
    if problem := _field_problem(header):
        raise DataError(f"shard {path} has an inconsistent header ({problem}); {_FIX}")
    if size != header.nbytes:
        raise DataError(f"shard {path} is {size} bytes but its header promises {header.nbytes} "
                        f"({num_tokens} tokens); the file is truncated or corrupt, {_FIX}")
    return header


def _field_problem(header: ShardHeader) -> str | None:
    """What is wrong with a header whose checksum holds (a file written wrong, or crafted), or None."""
    if header.doc_end < header.doc_start:
        return f"documents [{header.doc_start}, {header.doc_end}) end before they start"
    if header.num_docs > header.doc_end - header.doc_start:
        return f"{header.num_docs} documents in the range [{header.doc_start}, {header.doc_end})"
    if header.max_id is not None and header.max_id > np.iinfo(header.dtype).max:
        return f"largest id {header.max_id} does not fit {header.dtype.name}"
    if header.max_id and not header.num_tokens:
        return f"largest id {header.max_id} in an empty shard"
    return None


def write_shard(path: str | os.PathLike, tokens: np.ndarray, vocab_size: int | None = None, *,
                dtype: np.dtype | None = None, doc_start: int = 0, doc_end: int = 0, num_docs: int = 0,
                fingerprint: int = 0) -> ShardHeader:
    """Write `tokens` as a shard at `path` atomically (temp file + rename) and return its header.

    The dtype is `dtype` if given, else chosen from `vocab_size` (uint16 up to 65536 ids), else from the
    largest id present. Ids that do not fit the dtype are a bug upstream and raise ValueError.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
    if dtype is None:
        top = int(tokens.max()) + 1 if tokens.size else 1
        dtype = dtype_for_vocab(vocab_size if vocab_size is not None else top)
    dtype = np.dtype(dtype).newbyteorder("<")
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) > np.iinfo(dtype).max):
        raise ValueError(f"token ids out of range for {dtype.name}: [{tokens.min()}, {tokens.max()}]")
    max_id = int(tokens.max()) if tokens.size else 0
    header = ShardHeader(dtype, int(tokens.size), doc_start, doc_end, num_docs, fingerprint, max_id=max_id)
    with atomic_file(path, "wb") as f:
        f.write(encode_header(header))
        f.write(np.ascontiguousarray(tokens, dtype=dtype).tobytes())
    return header


def read_shard(path: str | os.PathLike, vocab_size: int | None = None) -> np.memmap:
    """Memory-map a shard's tokens (read-only) after validating its header, size and body: the largest id
    must be the header's and, when vocab_size is given, below it. DataError naming the file otherwise."""
    header = read_header(path)
    if header.num_tokens == 0:  # np.memmap cannot map zero bytes
        return np.zeros(0, dtype=header.dtype)
    tokens = np.memmap(path, dtype=header.dtype, mode="r", offset=HEADER_SIZE, shape=(header.num_tokens,))
    if header.max_id is None and vocab_size is None:
        return tokens  # a version-1 shard read without a vocabulary: nothing to check the body against
    largest = int(tokens.max())
    if header.max_id is not None and largest != header.max_id:
        raise DataError(f"shard {path} has a corrupt body (largest token id {largest}, its header records "
                        f"{header.max_id}); {_FIX}")
    if vocab_size is not None and largest >= vocab_size:
        raise DataError(f"shard {path} holds token id {largest}, past the vocabulary of {vocab_size} tokens; "
                        f"the shard is corrupt or from another tokenizer, {_FIX}")
    return tokens


# ---- a prepared shard directory: {split}_NNNNN.bin files plus meta.json (written last) ----

META_NAME = "meta.json"
META_FORMAT = "llmlab-shards"
SPLITS = ("train", "val")


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:05d}.bin"


def read_meta(shard_dir: str | os.PathLike) -> dict:
    """The meta.json of a prepared shard directory, checked (keys, types, counts); DataError naming the
    file and the fix if the directory is not (fully) prepared or the file is damaged."""
    shard_dir = Path(shard_dir)
    if shard_dir.exists() and not shard_dir.is_dir():
        raise DataError(f"{shard_dir} is a file, not a shard directory; pass the directory "
                        f"`llmlab data prepare --out` wrote")
    if not shard_dir.is_dir():
        raise DataError(f"shard directory {shard_dir} does not exist; create it with "
                        f"`llmlab data prepare SOURCES --tokenizer DIR --out {shard_dir}`")
    path = shard_dir / META_NAME
    if not path.exists():
        raise DataError(f"{shard_dir} has no {META_NAME}, so its preparation never finished; "
                        f"re-run `llmlab data prepare ... --out {shard_dir}` (finished shards are reused)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON ({e}); re-run `llmlab data prepare` to rebuild "
                        f"it") from None
    except OSError as e:
        raise DataError(f"cannot read {path} ({e.strerror}); check its permissions or re-run "
                        f"`llmlab data prepare`") from None
    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
        raise DataError(f"{path} is not an llmlab shard index; re-run `llmlab data prepare` to rebuild it")
    version = meta.get("version")
    if _is_count(version) and version > VERSION:
        raise DataError(f"{path} has format version {version}, newer than this llmlab reads "
                        f"({VERSION}); upgrade llmlab or re-run `llmlab data prepare`")
    if problem := _meta_problem(meta):
        raise DataError(f"{path} is damaged ({problem}); re-run `llmlab data prepare` to rebuild it")
    return meta


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _meta_problem(meta: dict) -> str | None:
    """What makes a meta.json unusable (a missing key, a wrong type, counts that disagree), or None."""
    if not _is_count(meta.get("version")) or meta["version"] < 1:
        return f"version {meta.get('version')!r} is not a positive integer"
    if not isinstance(meta.get("fingerprint"), str) or not _HEX16.fullmatch(meta["fingerprint"]):
        return f"fingerprint {meta.get('fingerprint')!r} is not 16 hex digits"
    tok = meta.get("tokenizer")
    if not isinstance(tok, dict):
        return "no tokenizer object"
    vocab = tok.get("vocab_size")
    if not _is_count(vocab) or not 0 < vocab <= 2**32:
        return f"tokenizer.vocab_size {vocab!r} is not a positive integer"
    if meta.get("dtype") != dtype_for_vocab(vocab).name:
        return f"dtype {meta.get('dtype')!r} is not {dtype_for_vocab(vocab).name} for {vocab} tokens"
    eos = tok.get("eos_id")
    if eos is not None and not (_is_count(eos) and eos < vocab):
        return f"tokenizer.eos_id {eos!r} is not an id below vocab_size {vocab}"
    if not isinstance(tok.get("fingerprint", ""), str):
        return f"tokenizer.fingerprint {tok['fingerprint']!r} is not a string"
    for key in ("documents", "characters", "tokens"):
        if key in meta and not _is_count(meta[key]):
            return f"{key} {meta[key]!r} is not a count"
    splits = meta.get("splits")
    if not isinstance(splits, dict):
        return "no splits object"
    return next((p for split in SPLITS if (p := _split_problem(split, splits.get(split)))), None)


def _split_problem(split: str, entry) -> str | None:
    if not isinstance(entry, dict):
        return f"splits.{split} is missing or not an object"
    for key in ("tokens", "documents"):
        if not _is_count(entry.get(key)):
            return f"splits.{split}.{key} {entry.get(key)!r} is not a count"
    shards = entry.get("shards")
    if not isinstance(shards, list):
        return f"splits.{split}.shards is not a list"
    for k, shard in enumerate(shards):
        if (not isinstance(shard, dict) or shard.get("name") != shard_name(split, k)
                or not _is_count(shard.get("tokens"))):
            return (f"splits.{split}.shards[{k}] is not "
                    f'{{"name": "{shard_name(split, k)}", "tokens": N}}')
    if sum(shard["tokens"] for shard in shards) != entry["tokens"]:
        return f"splits.{split}.tokens {entry['tokens']} is not the sum of its shards' tokens"
    return None


def split_shards(shard_dir: str | os.PathLike, split: str, meta: dict | None = None) -> list[Path]:
    """The shard files of `split`, in order, checked against meta.json: token count, dtype, fingerprint, and
    the largest id below the vocabulary (from the header; version-1 shards have their bodies scanned).
    `read_shard` then checks each body against its header."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    shard_dir = Path(shard_dir)
    meta = meta if meta is not None else read_meta(shard_dir)
    vocab = meta["tokenizer"]["vocab_size"]
    paths = []
    for entry in meta["splits"][split]["shards"]:
        path = shard_dir / entry["name"]
        header = read_header(path)
        if (header.num_tokens != entry["tokens"] or f"{header.fingerprint:016x}" != meta["fingerprint"]
                or header.dtype.name != meta["dtype"]):
            raise DataError(f"shard {path} does not match {shard_dir / META_NAME} (tokens "
                            f"{header.num_tokens} vs {entry['tokens']}, {header.dtype.name} vs "
                            f"{meta['dtype']}); "
                            f"re-run `llmlab data prepare` with --overwrite")
        if header.max_id is not None and header.max_id >= vocab:
            raise DataError(f"shard {path} holds token id {header.max_id}, past the vocabulary of {vocab} "
                            f"tokens in {shard_dir / META_NAME}; re-run `llmlab data prepare` with "
                            f"--overwrite")
        if header.max_id is None:
            read_shard(path, vocab)
        paths.append(path)
    return paths


def describe_shards(shard_dir: str | os.PathLike) -> dict:
    """Summary of a prepared directory (every shard's header checked): what `llmlab data info` prints."""
    shard_dir = Path(shard_dir)
    meta = read_meta(shard_dir)
    splits = {}
    for split in SPLITS:
        paths = split_shards(shard_dir, split, meta)
        for path in paths:  # info vouches for the bodies too
            read_shard(path, meta["tokenizer"]["vocab_size"])
        entry = meta["splits"][split]
        splits[split] = {"shards": len(paths), "tokens": entry["tokens"], "documents": entry["documents"],
                         "bytes": sum(p.stat().st_size for p in paths)}
    tokens = sum(s["tokens"] for s in splits.values())
    chars = meta.get("characters", 0)
    return {"dir": str(shard_dir), "fingerprint": meta["fingerprint"], "dtype": meta["dtype"],
            "vocab_size": meta["tokenizer"]["vocab_size"], "eos_id": meta["tokenizer"].get("eos_id"),
            "tokens": tokens, "documents": meta.get("documents"), "characters": chars,
            "chars_per_token": round(chars / tokens, 4) if tokens else None,
            "splits": splits, "options": meta.get("options", {}), "sources": meta.get("sources", [])}


def write_shard_dir(out_dir: str | os.PathLike, splits: dict[str, list[np.ndarray]], vocab_size: int,
                    eos_id: int | None = None, extra: dict | None = None,
                    tokenizer_fingerprint: str | None = None) -> dict:
    """Write already-tokenized arrays as a prepared directory (shards + meta.json) a TokenLoader can read.

    For token streams that do not come from `prepare_shards` (synthetic tasks, external tokenizers):
    `splits` maps "train"/"val" to a list of 1-D arrays, one shard each. tokenizer_fingerprint
    (llmlab.tokenizer.identity.fingerprint of the tokenizer that made the ids, if any) goes into the
    tokenizer block, as prepare_shards records it. meta.json is written last.
    """
    out_dir = Path(out_dir)
    dtype = dtype_for_vocab(vocab_size)
    h = hashlib.blake2b(digest_size=8)
    for split in SPLITS:
        for arr in splits.get(split, []):
            h.update(split.encode() + np.ascontiguousarray(arr, dtype=dtype).tobytes())
    fingerprint = int.from_bytes(h.digest(), "little")
    meta_splits = {}
    for split in SPLITS:
        shards = []
        for k, arr in enumerate(splits.get(split, [])):
            header = write_shard(out_dir / shard_name(split, k), arr, dtype=dtype, fingerprint=fingerprint)
            shards.append({"name": shard_name(split, k), "tokens": header.num_tokens, "documents": 0})
        meta_splits[split] = {"tokens": sum(s["tokens"] for s in shards), "documents": 0, "shards": shards}
    meta = {"format": META_FORMAT, "version": VERSION, "fingerprint": f"{fingerprint:016x}",
            "dtype": dtype.name,
            "documents": 0, "characters": 0, "tokens": sum(s["tokens"] for s in meta_splits.values()),
            "tokenizer": {"vocab_size": vocab_size, "eos_id": eos_id,
                          **({"fingerprint": tokenizer_fingerprint} if tokenizer_fingerprint else {})},
            "options": {}, "sources": [],
            "splits": meta_splits, **(extra or {})}
    write_text_atomic(out_dir / META_NAME, json.dumps(meta, indent=2) + "\n")
    return meta
