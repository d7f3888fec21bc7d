"""`llmlab data prepare | info` through llmlab.cli.main: bad input is one line on stderr with exit code 2
and leaves no output behind; info reports the numbers in the shards."""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import assert_one_line_error, run_cli
from llmlab.data.shards import describe_shards, write_shard_dir
from llmlab.tokenizer import Tokenizer


@pytest.fixture
def shard_dir(tmp_path):
    out = tmp_path / "shards"
    write_shard_dir(out, {"train": [np.arange(1000) % 300, np.arange(500) % 300], "val": [np.arange(200)]},
                    vocab_size=300, eos_id=299)
    return out


def test_prepare_missing_source(tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "data", "prepare", str(tmp_path / "missing.txt"), "--tokenizer",
                        str(tmp_path / "tok"), "--out", str(out))
    assert_one_line_error(code, err, "missing.txt does not exist", "check the path")
    assert not out.exists()


def test_prepare_empty_file(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "data", "prepare", str(tmp_path / "empty.txt"), "--tokenizer",
                        str(tmp_path / "tok"), "--out", str(out))
    assert_one_line_error(code, err, "empty.txt is empty")
    assert not out.exists()


def test_prepare_empty_corpus(tmp_path, capsys):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.jsonl").write_text('{"text": ""}\n')
    Tokenizer.train(["a few words"], vocab_size=270, progress=False).save(tmp_path / "tok")
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "data", "prepare", str(tmp_path / "corpus"), "--tokenizer",
                        str(tmp_path / "tok"), "--out", str(out))
    assert_one_line_error(code, err, "corpus is empty")
    assert not out.exists()


def test_prepare_missing_tokenizer(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("some text")
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "data", "prepare", str(tmp_path / "a.txt"), "--tokenizer",
                        str(tmp_path / "tok"), "--out", str(out))
    assert_one_line_error(code, err, "tokenizer directory", "llmlab tokenizer train")
    assert not out.exists()


def test_info_table_and_json(shard_dir, capsys):
    code, out, _ = run_cli(capsys, "data", "info", str(shard_dir))
    assert code == 0
    assert "vocab 300" in out and "uint16" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    assert rows["train"][1:3] == ["2", "1,500"] and rows["val"][1:3] == ["1", "200"]
    assert rows["total"][1:3] == ["3", "1,700"]
    code, out, _ = run_cli(capsys, "data", "info", str(shard_dir), "--json")
    info = json.loads(out)
    assert info == json.loads(json.dumps(describe_shards(shard_dir)))
    assert info["splits"]["train"]["tokens"] == 1500 and info["tokens"] == 1700
    assert info["splits"]["train"]["bytes"] == 64 * 2 + 1500 * 2


@pytest.mark.parametrize("damage, fragment", [
    (lambda raw: b"XXXXXXXX" + raw[8:], "is not an llmlab token shard"),
    (lambda raw: raw[:16] + b"\xff" + raw[17:], "corrupt header"),
    (lambda raw: raw[:30], "is truncated"),
    (lambda raw: raw[:-2], "but its header promises"),
])
def test_info_on_damaged_shard(shard_dir, capsys, damage, fragment):
    path = shard_dir / "train_00001.bin"
    path.write_bytes(damage(path.read_bytes()))
    code, out, err = run_cli(capsys, "data", "info", str(shard_dir))
    assert_one_line_error(code, err, "train_00001.bin", fragment, "llmlab data prepare")
    assert out == ""


def test_info_on_unprepared_dir(tmp_path, capsys):
    (tmp_path / "half").mkdir()
    code, _, err = run_cli(capsys, "data", "info", str(tmp_path / "half"))
    assert_one_line_error(code, err, "no meta.json", "re-run `llmlab data prepare")
    code, _, err = run_cli(capsys, "data", "info", str(tmp_path / "absent"))
    assert_one_line_error(code, err, "does not exist")


def test_data_without_action_names_the_actions(capsys):
    code, out, err = run_cli(capsys, "data")
    assert code == 2 and out == ""
    assert err.splitlines() == [
        "llmlab data: error: missing ACTION; choose one of: prepare, generate, tasks, preferences, info",
        "llmlab: see 'llmlab data --help'"]


def test_prepare_end_to_end_with_the_real_tokenizer(tmp_path, capsys):
    from llmlab.data.loader import TokenLoader
    from llmlab.data.prepare import split_of
    from llmlab.data.shards import read_meta, read_shard
    from llmlab.tokenizer import Tokenizer
    from llmlab.tokenizer.identity import fingerprint

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    docs = [
        "The quick brown fox jumps over the lazy dog. " * 20,
        "def add(a, b):\n    return a + b\n" * 15,
        "A document that mentions <|eos|> and <|bos|> as plain text must not inject them.",
        "Caf\u00e9 cr\u00e8me, na\u00efve fa\u00e7ade, \u732b\u306f\u53ef\u611b\u3044 \U0001f600 " * 10,
    ] + [f"note {i}: numbers {i * 37} and words like tokenizer, shard, loader.\n" * 5 for i in range(12)]
    for i, d in enumerate(docs):
        (corpus / f"{i:02d}.txt").write_text(d, encoding="utf-8")
    tok = Tokenizer.train(docs, vocab_size=400, progress=False)
    tok.save(tmp_path / "tok")
    out = tmp_path / "shards"
    code, stdout, err = run_cli(capsys, "data", "prepare", str(corpus), "--tokenizer", str(tmp_path / "tok"),
                             "--out", str(out), "--val-fraction", "0.25", "--workers", "2", "--no-progress")
    assert code == 0, err
    assert "tokens (uint16) from 16 documents" in stdout
    meta = read_meta(out)
    expected = {"train": [], "val": []}
    for i, d in enumerate(docs):
        expected[split_of(i, 0, 0.25)] += [*tok.encode(d, allowed_special="none"), tok.eos_id]
    for split in ("train", "val"):
        got = np.concatenate([read_shard(out / s["name"]) for s in meta["splits"][split]["shards"]]).tolist()
        assert got == expected[split]
    # eos appears exactly once per document: literal "<|eos|>" text was encoded as ordinary text.
    total_eos = sum(expected[s].count(tok.eos_id) for s in expected)
    assert total_eos == len(docs) and meta["tokenizer"]["eos_id"] == tok.eos_id
    assert Tokenizer.load(out / "tokenizer").encode("fox") == tok.encode("fox")
    assert meta["tokenizer"]["fingerprint"] == fingerprint(tok)  # what eval/pretrain compare checkpoints with
    x, y = TokenLoader(out, block_size=32, batch_size=4).next_batch()
    assert x.shape == (4, 32) and int(x.max()) < tok.vocab_size
    code, stdout, _ = run_cli(capsys, "data", "info", str(out))
    assert code == 0 and f"{meta['tokens']:,}" in stdout
