"""Shard files: exact header layout, uint16/uint32 choice, and a DataError (never garbage) for corrupt,
truncated or mismatched files."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest

from llmlab.data import shards
from llmlab.data.shards import (
    HEADER_SIZE,
    MAGIC,
    dtype_for_vocab,
    read_header,
    read_shard,
    write_shard,
)
from llmlab.errors import DataError


def test_roundtrip_uint16_and_header_bytes(tmp_path):
    tokens = np.array([0, 1, 65535, 42, 7], dtype=np.int64)
    path = tmp_path / "s.bin"
    write_shard(path, tokens, vocab_size=65536, doc_start=3, doc_end=9, num_docs=2, fingerprint=0xABCDEF)
    raw = path.read_bytes()
    assert len(raw) == HEADER_SIZE + 5 * 2
    # The documented layout, checked field by field.
    magic, version, code, n, d0, d1, nd, fp, max_id = struct.unpack("<8sIIQQQQQI", raw[:60])
    assert (magic, version, code, n, d0, d1, nd, fp, max_id) == (MAGIC, 2, 2, 5, 3, 9, 2, 0xABCDEF, 65535)
    assert struct.unpack("<I", raw[60:64])[0] == zlib.crc32(raw[:60])
    assert raw[64:] == tokens.astype("<u2").tobytes()
    mm = read_shard(path)
    assert isinstance(mm, np.memmap) and mm.dtype == np.dtype("<u2")
    np.testing.assert_array_equal(mm, tokens)
    h = read_header(path)
    fields = (h.num_tokens, h.doc_start, h.doc_end, h.num_docs, h.fingerprint, h.max_id)
    assert fields == (5, 3, 9, 2, 0xABCDEF, 65535)


def test_uint32_when_vocab_exceeds_65536(tmp_path):
    assert dtype_for_vocab(65536) == np.uint16 and dtype_for_vocab(65537) == np.uint32
    tokens = np.array([70000, 0, 2**32 - 1], dtype=np.int64)
    path = tmp_path / "big.bin"
    write_shard(path, tokens, vocab_size=100_000)
    assert path.stat().st_size == HEADER_SIZE + 3 * 4
    out = read_shard(path)
    assert out.dtype == np.dtype("<u4")
    np.testing.assert_array_equal(out, tokens)
    with pytest.raises(ValueError, match="out of range"):
        write_shard(tmp_path / "bad.bin", np.array([70000]), vocab_size=1000)
    assert not (tmp_path / "bad.bin").exists()


def _corrupt(path, offset, data):
    raw = bytearray(path.read_bytes())
    raw[offset:offset + len(data)] = data
    path.write_bytes(bytes(raw))


@pytest.fixture
def shard(tmp_path):
    path = tmp_path / "train_00000.bin"
    write_shard(path, np.arange(100) % 50, vocab_size=50)
    return path


@pytest.mark.parametrize("case, pattern", [
    ("magic", r"train_00000\.bin is not an llmlab token shard.*llmlab data prepare"),
    ("count", r"train_00000\.bin has a corrupt header \(checksum mismatch\).*llmlab data prepare"),
    ("version", r"train_00000\.bin has format version 9, newer"),
    ("truncated_header", r"train_00000\.bin is truncated \(10 bytes, header needs 64\)"),
    ("truncated_tokens", r"train_00000\.bin is 164 bytes but its header promises 264"),
    ("extra_bytes", r"is 266 bytes but its header promises 264"),
    ("empty", r"is truncated \(0 bytes"),
])
def test_corrupt_or_truncated_shard_names_file_and_fix(shard, case, pattern):
    raw = shard.read_bytes()
    if case == "magic":
        _corrupt(shard, 0, b"NOTASHRD")
    elif case == "count":
        _corrupt(shard, 16, struct.pack("<Q", 99))
    elif case == "version":
        body = bytearray(raw[:60])
        body[8:12] = struct.pack("<I", 9)
        shard.write_bytes(bytes(body) + struct.pack("<I", zlib.crc32(bytes(body))) + raw[64:])
    elif case == "truncated_header":
        shard.write_bytes(raw[:10])
    elif case == "truncated_tokens":
        shard.write_bytes(raw[:164])
    elif case == "extra_bytes":
        shard.write_bytes(raw + b"\0\0")
    elif case == "empty":
        shard.write_bytes(b"")
    with pytest.raises(DataError, match=pattern):
        read_shard(shard)


def test_missing_shard(tmp_path):
    with pytest.raises(DataError, match=r"nope\.bin does not exist.*llmlab data prepare"):
        read_shard(tmp_path / "nope.bin")


def test_write_is_atomic_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "s.bin"
    write_shard(path, np.arange(10), vocab_size=10)
    before = path.read_bytes()

    def boom(header):
        raise OSError("disk full")

    # Fails inside the atomic write, after the temporary file was created.
    monkeypatch.setattr(shards, "encode_header", boom)
    with pytest.raises(OSError, match="disk full"):
        write_shard(path, np.arange(20), vocab_size=20)
    assert path.read_bytes() == before  # the old shard is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.bin"]  # and no temp file is left
