"""Artefacts that must agree: a checkpoint records its tokenizer's fingerprint, and generate (--tokenizer),
eval ppl and data generate refuse a tokenizer or shards made with another one, in one line; older
checkpoints without the record fall back to their tokenizer copy, then to the vocabulary size."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from helpers import assert_one_line_error, run_cli
from llmlab.data.shards import write_shard_dir
from llmlab.errors import TokenizerError
from llmlab.model import ModelConfig, Transformer
from llmlab.tokenizer import Tokenizer
from llmlab.tokenizer.identity import (
    TOKENIZER_ID_FILE,
    TokenizerId,
    checkpoint_tokenizer,
    fingerprint,
    require_same_tokenizer,
    write_tokenizer_id,
)
from llmlab.train.checkpoint import Checkpointer


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """Two tokenizers of the same size trained on different text, and a smaller one."""
    root = tmp_path_factory.mktemp("toks")
    texts = {"a": ["the quick brown fox jumps over the lazy dog " * 20],
             "b": ["lorem ipsum dolor sit amet consectetur adipiscing " * 20],
             "small": ["the quick brown fox " * 20]}
    sizes = {"a": 280, "b": 280, "small": 270}
    out = {}
    for name, text in texts.items():
        tok = Tokenizer.train(text, vocab_size=sizes[name], progress=False, workers=1)
        tok.save(root / name)
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def checkpoint(tokenizers, tmp_path_factory):
    """A checkpoint trained (here: initialised) with tokenizer a, carrying its copy and its fingerprint."""
    path = tmp_path_factory.mktemp("ckpt") / "ckpt"
    tok = Tokenizer.load(tokenizers["a"])
    torch.manual_seed(0)
    Transformer(ModelConfig.preset("gpt2", "tiny", vocab_size=tok.vocab_size, block_size=32)).save(path)
    shutil.copytree(tokenizers["a"], path / "tokenizer")
    write_tokenizer_id(path, fingerprint(tok))
    return path


def _shards(out, tok_dir, record=True, copy=False):
    tok = Tokenizer.load(tok_dir)
    ids = np.array(tok.encode("the quick brown fox jumps over the lazy dog " * 30), dtype=np.int64)
    block = {"vocab_size": tok.vocab_size, "eos_id": None}
    if copy:
        shutil.copytree(tok_dir, out / "tokenizer")
        block["copy"] = "tokenizer"
    if record:
        block["fingerprint"] = fingerprint(tok)
    out.mkdir(parents=True, exist_ok=True)
    write_shard_dir(out, {"train": [ids], "val": [ids]}, vocab_size=tok.vocab_size,
                    extra={"tokenizer": block})
    return out


def test_generate_refuses_another_tokenizer(checkpoint, tokenizers, capsys):
    for other in ("b", "small"):
        code, _, err = run_cli(capsys, "generate", checkpoint, "--prompt", "the", "--tokenizer",
                               tokenizers[other], "--device", "cpu", "--max-new-tokens", "2")
        assert_one_line_error(code, err, str(tokenizers[other]), "different tokenizer", "--tokenizer")
    code, out, err = run_cli(capsys, "generate", checkpoint, "--prompt", "the", "--tokenizer",
                             tokenizers["a"], "--device", "cpu", "--max-new-tokens", "2")
    assert code == 0, err


def test_a_tampered_tokenizer_copy_is_refused(checkpoint, tokenizers, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoint, ckpt)
    shutil.rmtree(ckpt / "tokenizer")
    shutil.copytree(tokenizers["b"], ckpt / "tokenizer")
    code, _, err = run_cli(capsys, "generate", ckpt, "--prompt", "the", "--device", "cpu",
                           "--max-new-tokens", "2")
    assert_one_line_error(code, err, "different tokenizer")


def test_eval_ppl_refuses_shards_of_another_tokenizer(checkpoint, tokenizers, tmp_path, capsys):
    good = _shards(tmp_path / "good", tokenizers["a"])
    code, out, err = run_cli(capsys, "eval", "ppl", checkpoint, "--data", good, "--json")
    assert code == 0, err
    for name, kind in (("b", dict(record=True)), ("b_copy", dict(record=False, copy=True))):
        bad = _shards(tmp_path / name, tokenizers["b"], **kind)
        code, _, err = run_cli(capsys, "eval", "ppl", checkpoint, "--data", bad)
        assert_one_line_error(code, err, str(bad), "different tokenizer",
                              "shards made with the model's tokenizer")


def test_data_generate_refuses_shards_of_another_tokenizer(checkpoint, tokenizers, tmp_path, capsys):
    bad = _shards(tmp_path / "b", tokenizers["b"])
    code, _, err = run_cli(capsys, "data", "generate", checkpoint, "--shards", bad, "--out", tmp_path / "out",
                           "--sequences", "2", "--length", "16", "--prompt-tokens", "4", "--no-progress")
    assert_one_line_error(code, err, "different tokenizer")
    assert not (tmp_path / "out").exists()


def test_fallbacks_for_files_without_a_fingerprint(checkpoint, tokenizers, tmp_path):
    legacy = tmp_path / "legacy"
    shutil.copytree(checkpoint, legacy)
    (legacy / TOKENIZER_ID_FILE).unlink()
    model = checkpoint_tokenizer(legacy, 280)
    assert model.fingerprint is None and model.directory == legacy / "tokenizer"
    b = Tokenizer.load(tokenizers["b"])
    with pytest.raises(TokenizerError, match="different tokenizer"):  # fingerprint computed from the copy
        require_same_tokenizer(model, TokenizerId("the shards s", 280, fingerprint(b)), "fix")
    bare = TokenizerId("the model m", 300)  # no record, no copy: only the sizes can be compared
    require_same_tokenizer(bare, TokenizerId("the shards s", 300), "fix")
    require_same_tokenizer(bare, TokenizerId("the shards s", 270), "fix")  # a padded model vocabulary
    with pytest.raises(TokenizerError, match="301-token vocabulary but the model m has 300; fix"):
        require_same_tokenizer(bare, TokenizerId("the shards s", 301), "fix")


def test_checkpointer_records_the_fingerprint(tmp_path, tokenizers):
    tok = Tokenizer.load(tokenizers["a"])
    model = Transformer(ModelConfig.preset("gpt2", "tiny", vocab_size=tok.vocab_size))
    ckpt = Checkpointer(tmp_path, tokenizer_dir=tokenizers["a"], tokenizer_fingerprint=fingerprint(tok)).save(
        1, model, {"step": 1, "tokens": 0, "batches": {}, "rng": {}, "optimizer": {}})
    assert json.loads((ckpt / TOKENIZER_ID_FILE).read_text()) == {"fingerprint": fingerprint(tok)}
    assert checkpoint_tokenizer(ckpt, tok.vocab_size).resolved_fingerprint() == fingerprint(tok)
    (ckpt / TOKENIZER_ID_FILE).write_text('{"fingerprint": 3}')
    with pytest.raises(Exception, match="not 16 hex digits"):
        checkpoint_tokenizer(ckpt, tok.vocab_size)


def test_pretraining_checks_its_tokenizer_and_records_it(tokenizers, tmp_path, capsys):
    a, b = _shards(tmp_path / "a", tokenizers["a"], copy=True), _shards(tmp_path / "b", tokenizers["b"])
    args = ["pretrain", "--config", "tiny", f"train.out_dir={tmp_path / 'runs'}", "train.run_name=r",
            "train.progress=false", "train.plot=false", "train.peak_flops=1e11", "train.eval_every=0",
            "model.block_size=16", "data.batch_size=2", "optim.max_steps=1"]
    code, _, err = run_cli(capsys, *args, f"data.shards={a}", f"data.tokenizer={tokenizers['b']}")
    assert_one_line_error(code, err, "different tokenizer", "data.tokenizer")
    assert run_cli(capsys, *args, f"data.shards={a}")[0] == 0
    ckpt = tmp_path / "runs" / "r" / "ckpt-000001"
    assert checkpoint_tokenizer(ckpt, 280).fingerprint == fingerprint(Tokenizer.load(tokenizers["a"]))
    code, _, err = run_cli(capsys, *args[:-1], "optim.max_steps=2", f"data.shards={b}", "--resume", "auto")
    assert_one_line_error(code, err, str(b), "different tokenizer", "resume on shards made with the run's")


def test_a_teacher_of_another_tokenizer_is_refused(checkpoint, tokenizers):
    from llmlab.train.distill import DistillConfig, load_teacher

    b = Tokenizer.load(tokenizers["b"])
    data = TokenizerId("the training data d", b.vocab_size, fingerprint(b), tokenizers["b"])
    with pytest.raises(TokenizerError, match=f"the model {checkpoint} uses a different tokenizer"):
        load_teacher(DistillConfig(teacher=str(checkpoint)), b.vocab_size, 16, data, torch.device("cpu"))
    a = Tokenizer.load(tokenizers["a"])
    same = TokenizerId("the training data d", a.vocab_size, fingerprint(a))
    load_teacher(DistillConfig(teacher=str(checkpoint)), a.vocab_size, 16, same, torch.device("cpu"))


@pytest.mark.parametrize("verb", ["quantize", "export-hf"])
def test_quantize_and_export_refuse_another_tokenizer(verb, checkpoint, tokenizers, tmp_path, capsys):
    """The tokenizer copied into a quantized checkpoint or a HF directory must be the model's own."""
    extra = ["--method", "rtn", "--bits", "8", "--out"] if verb == "quantize" else []
    for other in (tokenizers["b"], tokenizers["small"]):
        out = tmp_path / f"out-{other.name}"
        code, _, err = run_cli(capsys, verb, checkpoint, *extra, out, "--tokenizer", other)
        assert_one_line_error(code, err, str(other), "tokenizer")
        assert not out.exists()
    code, _, err = run_cli(capsys, verb, checkpoint, *extra, tmp_path / "ok", "--tokenizer", tokenizers["a"])
    assert code == 0, err
