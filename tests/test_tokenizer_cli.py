"""`llmlab tokenizer ...`: each verb works end to end, and bad input is one line on stderr, exit code 2,
and no output directory left behind."""

from __future__ import annotations

import json

import pytest

from llmlab.cli import main
from llmlab.tokenizer import Tokenizer

TEXT = ("The quick brown fox jumps over the lazy dog. strawberry embedding xylophone.\n"
        "def f(x):\n    return x * 2  # double\n\u732b\u306f\u53ef\u611b\u3044\n") * 20


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    (tmp_path / "docs.jsonl").write_text(json.dumps({"text": TEXT[:300]}) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def trained(tmp_path, corpus, capsys):
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", str(corpus), "--vocab-size", "320", "--out", str(out),
                 "--no-progress"]) == 0
    capsys.readouterr()
    return out


def test_train_writes_a_loadable_tokenizer(tmp_path, corpus, capsys):
    out = tmp_path / "tok"
    code = main(["tokenizer", "train", str(corpus), str(tmp_path / "docs.jsonl"), "--vocab-size", "300",
                 "--pattern", "gpt2", "--special", "<s>", "--special", "</s>", "--out", str(out),
                 "--no-progress"])
    assert code == 0
    assert f"{out}: 300 tokens (42 merges, 2 special) with the gpt2 pattern" in capsys.readouterr().out
    tok = Tokenizer.load(out)
    assert tok.special_tokens == {"<s>": 298, "</s>": 299} and tok.pattern_name == "gpt2"
    assert tok.eos_id == 299  # "</s>" is a recognised spelling of the end-of-sequence token


def test_encode_decode_inspect_stats_export(tmp_path, trained, corpus, capsys):
    tok = Tokenizer.load(trained)
    assert main(["tokenizer", "encode", "strawberry \u732b", "--tokenizer", str(trained)]) == 0
    ids = [int(x) for x in capsys.readouterr().out.split()]
    assert ids == tok.encode("strawberry \u732b")

    assert main(["tokenizer", "decode", *map(str, ids), "--tokenizer", str(trained)]) == 0
    assert capsys.readouterr().out == "strawberry \u732b\n"

    assert main(["tokenizer", "encode", "--file", str(corpus), "--tokenizer", str(trained)]) == 0
    assert [int(x) for x in capsys.readouterr().out.split()] == tok.encode(TEXT)

    assert main(["tokenizer", "encode", "a<|eos|>", "--allow-special", "--tokenizer", str(trained)]) == 0
    assert capsys.readouterr().out.split()[-1] == str(tok.eos_id)

    assert main(["tokenizer", "inspect", "\u732b strawberry", "--tokenizer", str(trained)]) == 0
    shown = capsys.readouterr().out
    assert "<e7>" in shown and "\u2423" in shown  # a byte piece of 猫, and the visible space
    assert f"{len(tok.encode(chr(0x732b) + ' strawberry'))} tokens for 12 characters / 14 bytes" in shown

    assert main(["tokenizer", "stats", str(corpus), "--json", "--tokenizer", str(trained)]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    n_tokens = len(tok.encode(TEXT))
    assert row["tokens"] == n_tokens and row["bytes"] == len(TEXT.encode())
    assert row["bytes_per_token"] == pytest.approx(len(TEXT.encode()) / n_tokens)
    assert row["tokens_per_word"] == pytest.approx(n_tokens / len(TEXT.split()))
    assert main(["tokenizer", "stats", str(corpus), "--tokenizer", str(trained)]) == 0
    assert "bytes/token" in capsys.readouterr().out

    assert main(["tokenizer", "export", str(tmp_path / "hf") + "/", "--tokenizer", str(trained)]) == 0
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json"))
    assert hf.encode(TEXT, add_special_tokens=False).ids == tok.encode(TEXT)


def _fails(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("llmlab: error: ") and message in err, err


def test_bad_input_is_one_line_exit_2_and_leaves_nothing(tmp_path, corpus, trained, capsys):
    out = tmp_path / "new"
    (tmp_path / "empty.txt").write_text("")
    train = ["tokenizer", "train", "--out", str(out), "--no-progress"]
    _fails(capsys, [*train, str(tmp_path / "missing.txt")], "missing.txt does not exist")
    _fails(capsys, [*train, str(tmp_path / "empty.txt")], "empty.txt is empty")
    _fails(capsys, [*train, str(corpus), "--vocab-size", "260"], "pass vocab_size >= 263")
    _fails(capsys, [*train, str(corpus), "--pattern", "gtp4"], "unknown pattern name 'gtp4'")
    (tmp_path / "blank.jsonl").write_text('{"text": ""}\n')
    _fails(capsys, [*train, str(tmp_path / "blank.jsonl")], "holds no text")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".new")]

    meta_path = trained / "llmlab.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "format_version": 7}))
    _fails(capsys, ["tokenizer", "encode", "hi", "--tokenizer", str(trained)], "upgrade llmlab")
    _fails(capsys, ["tokenizer", "inspect", "hi", "--tokenizer", str(tmp_path / "nope")], "does not exist")
    _fails(capsys, ["tokenizer", "decode", "1", "x", "--tokenizer", str(trained)], "must be integers")
    _fails(capsys, ["tokenizer", "encode", "--file", str(tmp_path / "nofile.txt"), "--tokenizer",
                    str(trained)], "nofile.txt does not exist")
