"""prepare_shards: the shards hold exactly each split's documents + eos, the split is deterministic and
independent of the worker count, shards end at document boundaries, and a re-run after a crash reuses
the finished shards and ends byte-identical. Uses a byte-level stand-in tokenizer, so it needs nothing
from llmlab.tokenizer (the end-to-end test with the real one lives in test_data_cli.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from llmlab.data import prepare as prep
from llmlab.data.loader import TokenLoader
from llmlab.data.prepare import prepare_shards, split_of
from llmlab.data.shards import read_header, read_shard
from llmlab.errors import DataError


class ByteTokenizer:
    """Stand-in with the Tokenizer API used by prepare: ids = offset + UTF-8 bytes, eos = offset + 256."""

    def __init__(self, offset: int = 0, eos: bool = True):
        self.offset, self.has_eos = offset, eos

    @property
    def vocab_size(self) -> int:
        return self.offset + 257

    @property
    def eos_id(self):
        return self.offset + 256 if self.has_eos else None

    def encode(self, text, **kwargs):
        return [self.offset + b for b in text.encode("utf-8")]

    def encode_batch(self, texts, **kwargs):
        return [self.encode(t) for t in texts]

    def save(self, path):
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "byte.json").write_text(json.dumps({"offset": self.offset, "eos": self.has_eos}))

    @classmethod
    def load(cls, path):
        cfg = json.loads((Path(path) / "byte.json").read_text())
        return cls(cfg["offset"], cfg["eos"])


def _corpus(tmp_path, n=40):
    src = tmp_path / "src"
    src.mkdir(parents=True)
    docs = [f"document {i}: " + "lorem ipsum \u732b " * (i % 7 + 1) for i in range(n)]
    lines = "".join(json.dumps({"text": d}) + "\n" for d in docs)
    (src / "docs.jsonl").write_text(lines, encoding="utf-8")
    return src / "docs.jsonl", docs


def _expected(docs, tok, seed, frac):
    out = {"train": [], "val": []}
    for i, d in enumerate(docs):
        out[split_of(i, seed, frac)] += [*tok.encode(d), tok.eos_id]
    return out


def _stream(out_dir, split):
    meta = json.loads((out_dir / "meta.json").read_text())
    parts = [np.asarray(read_shard(out_dir / s["name"])) for s in meta["splits"][split]["shards"]]
    return np.concatenate(parts).tolist() if parts else []


def _snapshot(out_dir):
    return {p.name: p.read_bytes() for p in sorted(out_dir.glob("*.bin"))}


def test_shards_hold_each_split_with_eos_and_meta(tmp_path):
    path, docs = _corpus(tmp_path)
    tok = ByteTokenizer()
    out = tmp_path / "out"
    meta = prepare_shards([str(path)], tok, out, shard_tokens=10**6, val_fraction=0.2, seed=3, progress=False)
    expected = _expected(docs, tok, 3, 0.2)
    assert 0 < len(expected["val"]) < len(expected["train"])
    assert _stream(out, "train") == expected["train"] and _stream(out, "val") == expected["val"]
    assert meta["dtype"] == "uint16" and meta["documents"] == 40
    assert meta["tokens"] == len(expected["train"]) + len(expected["val"])
    assert meta["tokenizer"]["eos_id"] == 256 and meta["tokenizer"]["vocab_size"] == 257
    assert json.loads((out / "meta.json").read_text()) == meta
    assert ByteTokenizer.load(out / "tokenizer").eos_id == 256  # a copy travels with the shards
    assert not list(out.glob(".*"))  # no temp files


def test_split_is_by_document_hash_and_roughly_the_fraction():
    splits = [split_of(i, 0, 0.1) for i in range(20000)]
    assert splits == [split_of(i, 0, 0.1) for i in range(20000)]
    assert 0.09 < splits.count("val") / 20000 < 0.11
    assert splits != [split_of(i, 1, 0.1) for i in range(20000)]
    assert all(split_of(i, 0, 0.0) == "train" for i in range(1000))


def test_shards_close_at_document_boundaries(tmp_path):
    path, docs = _corpus(tmp_path)
    out = tmp_path / "out"
    meta = prepare_shards([str(path)], ByteTokenizer(), out, shard_tokens=300, val_fraction=0.0,
                          progress=False)
    shards = meta["splits"]["train"]["shards"]
    assert len(shards) > 3
    previous_end = 0
    for k, s in enumerate(shards):
        h = read_header(out / s["name"])
        assert h.doc_start == previous_end and h.num_tokens == s["tokens"]
        if k < len(shards) - 1:  # at least shard_tokens, and less than that plus one document
            longest = max(len(docs[i].encode()) + 1 for i in range(h.doc_start, h.doc_end))
            assert 300 <= h.num_tokens < 300 + longest
        assert np.asarray(read_shard(out / s["name"]))[-1] == 256  # ends with a document's eos
        previous_end = h.doc_end
    assert previous_end == 40


def test_workers_give_identical_shards(tmp_path):
    path, _ = _corpus(tmp_path, n=60)
    a, b = tmp_path / "a", tmp_path / "b"
    for directory, workers in ((a, 1), (b, 2)):
        prepare_shards([str(path)], ByteTokenizer(), directory, shard_tokens=500, val_fraction=0.2,
                       workers=workers, progress=False)
    assert _snapshot(a) == _snapshot(b)
    assert (a / "meta.json").read_text() == (b / "meta.json").read_text()


def test_rerun_after_crash_reuses_finished_shards(tmp_path, monkeypatch):
    path, docs = _corpus(tmp_path)
    ref = tmp_path / "ref"
    prepare_shards([str(path)], ByteTokenizer(), ref, shard_tokens=250, val_fraction=0.2, progress=False)
    out = tmp_path / "out"

    # Crash (as a kill would) while writing the 4th train shard.
    real_write = prep.write_shard
    calls = []

    def crashing_write(p, *a, **k):
        calls.append(p)
        if Path(p).name == "train_00003.bin":
            raise KeyboardInterrupt
        return real_write(p, *a, **k)

    monkeypatch.setattr(prep, "write_shard", crashing_write)
    with pytest.raises(KeyboardInterrupt):
        prepare_shards([str(path)], ByteTokenizer(), out, shard_tokens=250, val_fraction=0.2, progress=False)
    assert not (out / "meta.json").exists() and not list(out.glob(".*"))
    assert {"train_00000.bin", "train_00001.bin", "train_00002.bin"} <= {p.name for p in out.glob("*.bin")}
    monkeypatch.setattr(prep, "write_shard", real_write)

    # The re-run tokenizes only documents after the finished prefix.
    encoded = []
    real_encode = prep._encode_docs

    def counting_encode(tok, texts, **kwargs):
        encoded.extend(texts)
        return real_encode(tok, texts, **kwargs)

    monkeypatch.setattr(prep, "_encode_docs", counting_encode)
    prepare_shards([str(path)], ByteTokenizer(), out, shard_tokens=250, val_fraction=0.2, progress=False)
    resume_doc = read_header(out / "train_00002.bin").doc_end
    skipped_train = [d for i, d in enumerate(docs) if i < resume_doc and split_of(i, 0, 0.2) == "train"]
    assert skipped_train and not set(skipped_train) & set(encoded)
    assert _snapshot(out) == _snapshot(ref)
    assert (out / "meta.json").read_text() == (ref / "meta.json").read_text()


def test_damaged_shard_is_rewritten_on_rerun(tmp_path):
    path, _ = _corpus(tmp_path)
    out = tmp_path / "out"
    prepare_shards([str(path)], ByteTokenizer(), out, shard_tokens=250, val_fraction=0.2, progress=False)
    ref = _snapshot(out)
    (out / "train_00001.bin").write_bytes(ref["train_00001.bin"][:70])  # truncated
    (out / "train_00003.bin").unlink()
    (out / "meta.json").unlink()
    prepare_shards([str(path)], ByteTokenizer(), out, shard_tokens=250, val_fraction=0.2, progress=False)
    assert _snapshot(out) == ref


def test_other_preparation_in_out_dir_needs_overwrite(tmp_path):
    path, docs = _corpus(tmp_path)
    out = tmp_path / "out"
    prepare_shards([str(path)], ByteTokenizer(), out, shard_tokens=250, val_fraction=0.2, progress=False)
    before = _snapshot(out)
    with pytest.raises(DataError, match=r"already holds shards of another preparation.*--overwrite"):
        prepare_shards([str(path)], ByteTokenizer(), out, shard_tokens=250, val_fraction=0.2, seed=1,
                       progress=False)
    assert _snapshot(out) == before
    meta = prepare_shards([str(path)], ByteTokenizer(), out, shard_tokens=10**6, val_fraction=0.2, seed=1,
                          overwrite=True, progress=False)
    assert sorted(p.name for p in out.glob("*.bin")) == ["train_00000.bin", "val_00000.bin"]
    assert _stream(out, "val") == _expected(docs, ByteTokenizer(), 1, 0.2)["val"]
    assert meta["options"]["seed"] == 1


def test_uint32_tokens_for_large_vocab(tmp_path):
    path, docs = _corpus(tmp_path, n=5)
    out = tmp_path / "out"
    tok = ByteTokenizer(offset=70_000)
    meta = prepare_shards([str(path)], tok, out, val_fraction=0.0, progress=False)
    assert meta["dtype"] == "uint32" and read_shard(out / "train_00000.bin").dtype == np.uint32
    assert _stream(out, "train") == _expected(docs, tok, 0, 0.0)["train"]
    x, y = TokenLoader(out, block_size=8, batch_size=2).next_batch()
    assert int(x.min()) >= 70_000


def test_bad_input_leaves_nothing(tmp_path):
    path, _ = _corpus(tmp_path)
    with path.open("a") as f:
        f.write('{"text": "fine"}\n{oops\n')
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"docs\.jsonl:42: invalid JSON"):
        prepare_shards([str(path)], ByteTokenizer(), out, progress=False)
    assert not out.exists()
    path, _ = _corpus(tmp_path / "good")
    with pytest.raises(DataError, match=r"no <\|eos\|> token"):
        prepare_shards([str(path)], ByteTokenizer(eos=False), out, progress=False)
    with pytest.raises(DataError, match=r"tokenizer directory .*nowhere does not exist"):
        prepare_shards([str(path)], tmp_path / "nowhere", out, progress=False)
    with pytest.raises(DataError, match="val_fraction"):
        prepare_shards([str(path)], ByteTokenizer(), out, val_fraction=1.0, progress=False)
    assert not out.exists()


def test_positive_val_fraction_never_leaves_a_split_empty(tmp_path):
    """28 documents at val_fraction 0.1, seed 0: no document hashes below 0.1, so the one with the smallest
    hash goes to val; the reverse (every document in val) sends the largest hash back to train."""
    path, docs = _corpus(tmp_path, n=28)
    assert all(split_of(i, 0, 0.1) == "train" for i in range(28))  # the case the rule exists for
    hashes = [prep._doc_hash(i, 0) for i in range(28)]
    smallest = hashes.index(min(hashes))
    meta = prepare_shards([str(path)], ByteTokenizer(), tmp_path / "a", val_fraction=0.1, progress=False)
    tok = ByteTokenizer()
    assert meta["splits"]["val"]["documents"] == 1
    assert _stream(tmp_path / "a", "val") == [*tok.encode(docs[smallest]), tok.eos_id]
    assert prep.split_overrides(28, 0, 0.1) == {smallest: "val"}
    two, seed = 2, next(s for s in range(100) if all(split_of(i, s, 0.9) == "val" for i in range(2)))
    hashes = [prep._doc_hash(i, seed) for i in range(two)]
    assert prep.split_overrides(two, seed, 0.9) == {hashes.index(max(hashes)): "train"}
    assert prep.split_overrides(1, 0, 0.0) == {}


def test_one_document_with_a_val_fraction_is_refused_at_prepare_time(tmp_path):
    path, _ = _corpus(tmp_path, n=1)
    with pytest.raises(DataError, match=r"needs at least 2 documents .* hold 1; .*--val-fraction 0") as err:
        prepare_shards([str(path)], ByteTokenizer(), tmp_path / "out", val_fraction=0.1, progress=False)
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()
    meta = prepare_shards([str(path)], ByteTokenizer(), tmp_path / "out", val_fraction=0.0, progress=False)
    assert meta["splits"]["val"]["documents"] == 0 and meta["splits"]["train"]["documents"] == 1


def test_resume_rewrites_a_finished_shard_whose_body_is_damaged(tmp_path):
    path, _ = _corpus(tmp_path)
    out = tmp_path / "out"
    prepare_shards([str(path)], ByteTokenizer(), out, shard_tokens=250, val_fraction=0.2, progress=False)
    before = _snapshot(out)
    raw = bytearray((out / "train_00000.bin").read_bytes())
    raw[-2:] = b"\xff\xff"  # id 65535: past the header's largest id
    (out / "train_00000.bin").write_bytes(bytes(raw))
    with pytest.raises(DataError, match="corrupt body"):
        TokenLoader(out, block_size=8, batch_size=2)
    prepare_shards([str(path)], ByteTokenizer(), out, shard_tokens=250, val_fraction=0.2, progress=False)
    assert _snapshot(out) == before
