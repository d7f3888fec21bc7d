"""Shards are checked where they are read: a body holding ids past the vocabulary, a damaged header, a
truncated file or a broken meta.json is one DataError naming the file and the fix (re-run llmlab data
prepare), never an IndexError later in an embedding lookup. Property-based: random header bytes,
truncations, body ids and meta.json mutations give a correct read or a DataError, nothing else."""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import assert_one_line_error, run_cli
from llmlab.data.loader import TokenLoader
from llmlab.data.shards import HEADER_SIZE, read_meta, read_shard, split_shards, write_shard_dir
from llmlab.errors import DataError

VOCAB = 50
PROPERTY = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _make(directory: Path) -> Path:
    rng = np.random.default_rng(0)
    write_shard_dir(directory, {"train": [rng.integers(0, VOCAB, 300), rng.integers(0, VOCAB, 200)],
                                "val": [rng.integers(0, VOCAB, 100)]}, vocab_size=VOCAB, eos_id=VOCAB - 1)
    return directory


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return _make(tmp_path_factory.mktemp("shards") / "s")


@pytest.fixture
def shards(pristine, tmp_path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "s"))


def _rewrite_header(path: Path, **fields) -> None:
    """Change header fields and recompute the checksum (a file written wrong, not a flipped bit)."""
    raw = bytearray(path.read_bytes())
    offsets = {"version": (8, "<I"), "num_tokens": (16, "<Q"), "doc_start": (24, "<Q"), "doc_end": (32, "<Q"),
               "num_docs": (40, "<Q"), "max_id": (56, "<I")}
    for name, value in fields.items():
        offset, fmt = offsets[name]
        raw[offset:offset + struct.calcsize(fmt)] = struct.pack(fmt, value)
    raw[60:64] = struct.pack("<I", zlib.crc32(bytes(raw[:60])))
    path.write_bytes(bytes(raw))


def _set_token(path: Path, index: int, value: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[HEADER_SIZE + 2 * index:HEADER_SIZE + 2 * index + 2] = struct.pack("<H", value)
    path.write_bytes(bytes(raw))


def _read_everything(directory: Path) -> None:
    """What training and evaluation do on open: meta, each split's shards, every body."""
    meta = read_meta(directory)
    for split in ("train", "val"):
        for path in split_shards(directory, split, meta):
            tokens = read_shard(path)
            assert tokens.size == 0 or int(tokens.max()) < meta["tokenizer"]["vocab_size"]
    TokenLoader(directory, block_size=8, batch_size=2).next_batch()


def test_id_past_the_vocabulary_in_a_body_is_one_line_naming_the_shard(shards, capsys):
    _set_token(shards / "train_00001.bin", 7, 60000)
    with pytest.raises(DataError, match=r"train_00001\.bin has a corrupt body \(largest token id 60000, its "
                                        r"header records \d+\); re-run `llmlab data prepare`"):
        TokenLoader(shards, block_size=8, batch_size=2)
    with pytest.raises(DataError, match="corrupt body"):
        read_shard(shards / "train_00001.bin")
    code, _, err = run_cli(capsys, "data", "info", str(shards))
    assert_one_line_error(code, err, "train_00001.bin", "corrupt body", "llmlab data prepare")


def test_eval_windows_refuse_a_damaged_body(shards):
    from llmlab.evals.perplexity import eval_windows

    _set_token(shards / "val_00000.bin", 3, 65535)
    with pytest.raises(DataError, match=r"val_00000\.bin has a corrupt body"):
        next(eval_windows(shards, "val", block_size=8, batch_size=2))


def test_header_whose_largest_id_is_past_the_vocabulary(shards):
    """Header and body agree, but on an id the vocabulary does not have (shards of another tokenizer
    relabelled into this directory, or a crafted file)."""
    path = shards / "train_00000.bin"
    _set_token(path, 0, 60)
    _rewrite_header(path, max_id=60)
    assert int(read_shard(path).max()) == 60  # self-consistent on its own
    with pytest.raises(DataError, match=r"train_00000\.bin holds token id 60, past the vocabulary of 50"):
        split_shards(shards, "train")
    with pytest.raises(DataError, match="past the vocabulary of 50"):
        read_shard(path, vocab_size=VOCAB)


def test_version_1_shards_are_still_read_with_a_body_scan(shards):
    """Shards written before the largest id was recorded (version 1, 0 at offset 56) are read; their bodies
    are checked against the vocabulary instead of the header."""
    for path in shards.glob("*.bin"):
        _rewrite_header(path, version=1, max_id=0)
    _read_everything(shards)
    _set_token(shards / "val_00000.bin", 5, 61)
    with pytest.raises(DataError, match=r"val_00000\.bin holds token id 61, past the vocabulary of 50"):
        split_shards(shards, "val")


@pytest.mark.parametrize("fields, message", [
    ({"doc_start": 9, "doc_end": 3}, r"documents \[9, 3\) end before they start"),
    ({"doc_start": 0, "doc_end": 2, "num_docs": 5}, r"5 documents in the range \[0, 2\)"),
    ({"max_id": 70000}, "largest id 70000 does not fit uint16"),
    ({"num_tokens": 0, "max_id": 3}, "largest id 3 in an empty shard"),
])
def test_inconsistent_header_fields(shards, fields, message):
    path = shards / "train_00000.bin"
    _rewrite_header(path, **fields)
    with pytest.raises(DataError, match=rf"train_00000\.bin has an inconsistent header \({message}\)"):
        read_shard(path)


def _meta_cases():
    def drop(*keys):
        def change(meta):
            node = meta
            for key in keys[:-1]:
                node = node[key]
            del node[keys[-1]]
        return change

    def put(value, *keys):
        def change(meta):
            node = meta
            for key in keys[:-1]:
                node = node[key]
            node[keys[-1]] = value
        return change

    return [
        (put("two", "version"), "version 'two' is not a positive integer"),
        (put(True, "version"), "version True is not a positive integer"),
        (put(7, "fingerprint"), "fingerprint 7 is not 16 hex digits"),
        (drop("tokenizer"), "no tokenizer object"),
        (put("50", "tokenizer", "vocab_size"), "tokenizer.vocab_size '50' is not a positive integer"),
        (put(0, "tokenizer", "vocab_size"), "tokenizer.vocab_size 0 is not a positive integer"),
        (put(100000, "tokenizer", "vocab_size"), "dtype 'uint16' is not uint32 for 100000 tokens"),
        (put(50, "tokenizer", "eos_id"), "tokenizer.eos_id 50 is not an id below vocab_size 50"),
        (put(["x"], "tokenizer", "fingerprint"), r"tokenizer.fingerprint \['x'\] is not a string"),
        (drop("splits", "val"), "splits.val is missing or not an object"),
        (put(-1, "splits", "train", "documents"), "splits.train.documents -1 is not a count"),
        (put({}, "splits", "train", "shards"), "splits.train.shards is not a list"),
        (put("../x.bin", "splits", "train", "shards", 0, "name"), r"splits.train.shards\[0\] is not .*"),
        (put(1.5, "splits", "val", "shards", 0, "tokens"), r"splits.val.shards\[0\] is not .*"),
        (put(999, "splits", "train", "tokens"), "splits.train.tokens 999 is not the sum of its .*"),
        (put(3.0, "characters"), "characters 3.0 is not a count"),
    ]


@pytest.mark.parametrize("change, message", _meta_cases())
def test_damaged_meta_json_is_one_line(shards, change, message):
    meta = json.loads((shards / "meta.json").read_text())
    change(meta)
    (shards / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=rf"meta\.json is damaged \({message}\); re-run `llmlab data "
                                        rf"prepare`"):
        read_meta(shards)


@pytest.mark.parametrize("text, message", [("{\"format\": \"llmlab-sh", "is not valid JSON"),
                                           ("[1, 2]", "is not an llmlab shard index"),
                                           (b"\xff\xfe{}", "is not valid JSON")])
def test_meta_json_that_is_not_json_or_not_an_index(shards, text, message):
    path = shards / "meta.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(DataError, match=message):
        read_meta(shards)


def test_reading_a_meta_json_that_is_a_directory(shards):
    (shards / "meta.json").unlink()
    (shards / "meta.json").mkdir()
    with pytest.raises(DataError, match=r"cannot read .*meta\.json"):
        read_meta(shards)


# ---- properties: whatever the damage, a correct read or one DataError ----

def _outcome(directory: Path) -> str:
    try:
        _read_everything(directory)
    except DataError as e:
        assert "\n" not in str(e) and "llmlab data prepare" in str(e)
        return "refused"
    return "read"


@PROPERTY
@given(offset=st.integers(0, HEADER_SIZE - 1), data=st.binary(min_size=1, max_size=8))
def test_random_header_bytes(pristine, tmp_path, offset, data):
    directory = Path(shutil.copytree(pristine, tmp_path / "h", dirs_exist_ok=True))
    path = directory / "train_00000.bin"
    raw = bytearray(path.read_bytes())
    data = data[:HEADER_SIZE - offset]
    changed = bytes(raw[offset:offset + len(data)]) != data
    raw[offset:offset + len(data)] = data
    path.write_bytes(bytes(raw))
    assert _outcome(directory) == ("refused" if changed else "read")


@PROPERTY
@given(keep=st.integers(0, HEADER_SIZE + 600 - 1),
       which=st.sampled_from(["train_00000.bin", "val_00000.bin"]))
def test_random_truncation(pristine, tmp_path, keep, which):
    directory = Path(shutil.copytree(pristine, tmp_path / "t", dirs_exist_ok=True))
    path = directory / which
    raw = path.read_bytes()
    path.write_bytes(raw[:min(keep, len(raw) - 1)])
    assert _outcome(directory) == "refused"


@PROPERTY
@given(changes=st.lists(st.tuples(st.integers(0, 199), st.integers(0, 65535)), min_size=1, max_size=5),
       fix_header=st.booleans())
def test_random_body_ids(pristine, tmp_path, changes, fix_header):
    """Any ids in a body, with the header's largest id left alone or made to agree: never an id past the
    vocabulary reaches a batch."""
    directory = Path(shutil.copytree(pristine, tmp_path / "b", dirs_exist_ok=True))
    path = directory / "train_00001.bin"
    for index, value in changes:
        _set_token(path, index, value)
    largest = int(np.frombuffer(path.read_bytes()[HEADER_SIZE:], "<u2").max())
    if fix_header:
        _rewrite_header(path, max_id=largest)
    recorded = struct.unpack("<I", path.read_bytes()[56:60])[0]
    assert _outcome(directory) == ("read" if largest < VOCAB and largest == recorded else "refused")


_SCALARS = (st.none() | st.booleans() | st.integers(-5, 10**6) | st.floats(allow_nan=True)
            | st.text(max_size=5))
_JSON = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=5)


@PROPERTY
@given(path=st.lists(st.sampled_from(["tokenizer", "splits", "train", "val", "shards", 0, "name", "tokens",
                                      "vocab_size", "eos_id", "version", "dtype", "fingerprint"]),
                     min_size=1, max_size=4),
       value=_JSON, delete=st.booleans())
def test_random_meta_json_mutations(pristine, tmp_path, path, value, delete):
    directory = Path(shutil.copytree(pristine, tmp_path / "m", dirs_exist_ok=True))
    meta = json.loads((directory / "meta.json").read_text())
    node = meta
    for key in path[:-1]:
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            return
    try:
        if delete:
            del node[path[-1]]
        else:
            node[path[-1]] = value
    except (KeyError, IndexError, TypeError):
        return
    (directory / "meta.json").write_text(json.dumps(meta))
    _outcome(directory)  # either outcome, as long as nothing but DataError escapes


def test_a_file_where_a_directory_belongs(tmp_path, capsys):
    from llmlab.data.prepare import prepare_shards

    (tmp_path / "f").write_text("x")
    code, _, err = run_cli(capsys, "data", "info", str(tmp_path / "f"))
    assert_one_line_error(code, err, "is a file, not a shard directory")
    (tmp_path / "doc.txt").write_text("some text")
    with pytest.raises(DataError, match="--tokenizer .* is a file, not a tokenizer directory"):
        prepare_shards([str(tmp_path / "doc.txt")], tmp_path / "f", tmp_path / "out", progress=False)


def test_calibration_refuses_a_damaged_body(shards):
    from llmlab.infer.quant.calib import calibration_tokens

    assert calibration_tokens(shards, n_samples=2, seq_len=8).max() < VOCAB
    _set_token(shards / "train_00000.bin", 11, 65000)
    for source in (shards, shards / "train_00000.bin"):  # a prepared directory, or one shard file
        with pytest.raises(DataError, match=r"train_00000\.bin has a corrupt body"):
            calibration_tokens(source, n_samples=2, seq_len=8)
