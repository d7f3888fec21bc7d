"""`llmlab data generate` (llmlab/infer/continuations.py): shards of a model's own continuations.

Checked: every sequence is a window of the source split followed by exactly what `generate` continues it
with; same seed, same bytes; the tokenizer travels along; a draft trained on a teacher's continuations
learns the teacher's rule where the data follow another (the point of the tool); bad input is one line,
exit 2, and leaves no directory behind.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers import (
    AFFINE_PERM,
    AFFINE_VOCAB,
    affine_agreement,
    affine_run_config,
    affine_shards,
    assert_one_line_error,
    run_cli,
)
from llmlab.data.loader import TokenLoader
from llmlab.data.shards import read_meta, read_shard, split_shards, write_shard_dir
from llmlab.infer import generate
from llmlab.infer.continuations import write_continuations
from llmlab.model import ModelConfig, Transformer
from llmlab.tokenizer import Tokenizer
from llmlab.train.pretrain import run_pretrain

V = AFFINE_VOCAB


@pytest.fixture
def model_dir(tmp_path):
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("gpt2", "tiny", vocab_size=V, block_size=64))
    with torch.no_grad():
        model.lm_head.weight.mul_(5)  # decisive greedy picks: no near-ties between batched and single runs
    model.save(tmp_path / "ckpt")
    return tmp_path / "ckpt", model.eval()


def _rows(out, split, length):
    (path,) = split_shards(out, split)
    return np.asarray(read_shard(path), dtype=np.int64).reshape(-1, length)


def _contains_window(stream: np.ndarray, window: np.ndarray) -> bool:
    n = len(window)
    views = np.lib.stride_tricks.sliding_window_view(stream, n)
    return bool((views == window).all(axis=1).any())


def test_sequences_are_source_windows_then_the_models_greedy_continuation(tmp_path, model_dir):
    ckpt, model = model_dir
    shards = affine_shards(tmp_path / "shards")
    meta = write_continuations(ckpt, shards, tmp_path / "out", sequences=6, val_sequences=3, prompt_tokens=5,
                               length=24, batch_size=4, progress=False)
    sources = {split: np.asarray(read_shard(split_shards(shards, split)[0]), dtype=np.int64)
               for split in ("train", "val")}
    for split, count in (("train", 6), ("val", 3)):
        rows = _rows(tmp_path / "out", split, 24)
        assert rows.shape == (count, 24)
        for row in rows:
            assert _contains_window(sources[split], row[:5])  # the prompt is text of the same split
            assert row.tolist() == generate(model, row[:5].tolist(), 19, temperature=0).tolist()
    assert meta["generated"]["sequences"] == {"train": 6, "val": 3}
    assert meta["generated"]["prompt_tokens"] == 5 and meta["generated"]["length"] == 24
    assert read_meta(tmp_path / "out") == meta
    x, y = TokenLoader(tmp_path / "out", "train", block_size=16, batch_size=2).next_batch()  # loads as data
    assert x.shape == (2, 16) and torch.equal(x[:, 1:], y[:, :-1])


def test_same_seed_same_bytes_other_seed_other_prompts(tmp_path, model_dir):
    ckpt, _ = model_dir
    shards = affine_shards(tmp_path / "shards")
    kwargs = dict(sequences=5, val_sequences=1, prompt_tokens=4, length=12, temperature=1.0, progress=False)
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        write_continuations(ckpt, shards, tmp_path / name, seed=seed, **kwargs)
    train = {name: _rows(tmp_path / name, "train", 12) for name in "abc"}
    assert np.array_equal(train["a"], train["b"])
    assert not np.array_equal(train["a"][:, :4], train["c"][:, :4])
    assert ((train["a"] >= 0) & (train["a"] < V)).all()


def test_the_shards_tokenizer_travels_along(tmp_path, small_corpus):
    tok = Tokenizer.train(small_corpus, vocab_size=300, progress=False, workers=1)
    torch.manual_seed(0)
    Transformer(ModelConfig.preset("gpt2", "tiny", vocab_size=tok.vocab_size)).save(tmp_path / "ckpt")
    tok.save(tmp_path / "ckpt" / "tokenizer")
    ids = np.array(tok.encode(" ".join(small_corpus) * 4), dtype=np.int64)
    shards = tmp_path / "shards"
    write_shard_dir(shards, {"train": [ids], "val": [ids[:200]]}, vocab_size=tok.vocab_size,
                    extra={"tokenizer": {"vocab_size": tok.vocab_size, "eos_id": tok.eos_id,
                                         "copy": "tokenizer"}})
    tok.save(shards / "tokenizer")
    write_continuations(tmp_path / "ckpt", shards, tmp_path / "out", sequences=2, prompt_tokens=4, length=16,
                        progress=False)
    meta = read_meta(tmp_path / "out")
    assert meta["tokenizer"]["copy"] == "tokenizer" and meta["tokenizer"]["eos_id"] == tok.eos_id
    assert Tokenizer.load(tmp_path / "out" / "tokenizer").encode("def add") == tok.encode("def add")


def test_a_draft_trained_on_the_continuations_learns_the_models_rule(tmp_path):
    """The data follow x -> f(x); the teacher was trained on relabelled data, so it continues any prompt with
    its own rule pi f pi^-1. A draft trained on its continuations of the same data must agree with it; one
    trained on the data must not (the continuations carry the teacher's behaviour, not the corpus's)."""
    shards = affine_shards(tmp_path / "shards")
    teacher_shards = affine_shards(tmp_path / "teacher_shards", relabel=AFFINE_PERM)
    teacher_cfg = affine_run_config(teacher_shards, tmp_path, "train.run_name=teacher")
    teacher = run_pretrain(teacher_cfg)["checkpoint"]
    write_continuations(teacher, shards, tmp_path / "teacher_text", sequences=192, prompt_tokens=4, length=32,
                        batch_size=32, progress=False)
    imitator_cfg = affine_run_config(tmp_path / "teacher_text", tmp_path, "train.run_name=imitator")
    imitator = run_pretrain(imitator_cfg)["checkpoint"]
    plain = run_pretrain(affine_run_config(shards, tmp_path, "train.run_name=plain"))["checkpoint"]
    assert affine_agreement(imitator, teacher) > 0.9
    assert affine_agreement(plain, teacher) < 0.2


@pytest.mark.parametrize("change, fragments", [
    (lambda c, s, o: [str(c), "--shards", str(s), "--out", str(o), "--length", "65"], ["--length=65", "64"]),
    (lambda c, s, o: [str(c), "--shards", str(s), "--out", str(o), "--prompt-tokens", "12", "--length", "12"],
     ["--prompt-tokens=12", "below --length"]),
    (lambda c, s, o: [str(s), "--shards", str(s), "--out", str(o)], ["not a checkpoint directory"]),
    (lambda c, s, o: [str(c), "--shards", str(s.parent / "other"), "--out", str(o), "--length", "48"],
     ["64-token vocabulary", "has 32"]),
    (lambda c, s, o: [str(c), "--shards", str(s.parent / "short"), "--out", str(o), "--prompt-tokens", "40",
                      "--length", "48"],
     ["no train shard of 40+ tokens"]),
    (lambda c, s, o: [str(c), "--shards", str(s), "--out", str(s)], ["is the input", "--overwrite"]),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, model_dir, capsys, change, fragments):
    ckpt, _ = model_dir
    shards = affine_shards(tmp_path / "shards")
    affine_shards(tmp_path / "other", vocab=32)
    affine_shards(tmp_path / "short", train_tokens=30)
    before = sorted(p.name for p in tmp_path.iterdir())
    argv = change(ckpt, shards, tmp_path / "out")
    code, _, err = run_cli(capsys, "data", "generate", *argv, "--no-progress")
    assert_one_line_error(code, err, *fragments)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no out dir, no temporary left


def test_a_failure_while_writing_leaves_no_directory(tmp_path, model_dir, monkeypatch):
    import llmlab.infer.continuations as continuations

    ckpt, _ = model_dir
    shards = affine_shards(tmp_path / "shards")

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(continuations, "write_shard_dir", broken)
    with pytest.raises(OSError, match="disk full"):
        write_continuations(ckpt, shards, tmp_path / "out", sequences=2, prompt_tokens=4, length=12,
                            progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "shards"]


def test_cli_prints_what_it_wrote(tmp_path, model_dir, capsys):
    ckpt, _ = model_dir
    shards = affine_shards(tmp_path / "shards")
    code, out, _ = run_cli(capsys, "data", "generate", str(ckpt), "--shards", str(shards), "--out",
                           str(tmp_path / "out"), "--sequences", "4", "--prompt-tokens", "4",
                           "--length", "16", "--no-progress")
    assert code == 0
    assert "4 train / 1 val sequences of 16 tokens (64 / 16 tokens)" in out
    made = json.loads((tmp_path / "out" / "meta.json").read_text())["generated"]
    assert made["model"] == str(ckpt) and made["temperature"] == 0.0
