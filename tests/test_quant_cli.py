"""`llmlab quantize` and `llmlab eval ppl` through llmlab.cli.main, and calibration data: bad input is one
line on stderr with exit code 2 and leaves nothing behind."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers import assert_one_line_error, run_cli
from llmlab.data.shards import write_shard_dir
from llmlab.errors import ConfigError, DataError
from llmlab.infer import generate
from llmlab.infer.quant import load_model
from llmlab.infer.quant.calib import calibration_tokens
from llmlab.infer.speculative import load_draft
from llmlab.model import ModelConfig, Transformer


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant_cli")
    rng = np.random.default_rng(0)
    # a repetitive stream, so a model trained for a few steps has a perplexity well below uniform
    pattern = rng.integers(0, 256, 50)
    stream = np.concatenate([np.roll(pattern, k % 3) for k in range(120)])
    write_shard_dir(root / "shards", {"train": [stream[:5000]], "val": [stream[5000:]]}, vocab_size=256,
                    eos_id=255)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("gpt2", "tiny"))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.from_numpy(stream[:4097].astype(np.int64))
    for step in range(30):
        i = (step * 128) % 3800
        batch = x[i:i + 65 * 4].view(4, 65)
        loss = model.loss(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save(root / "ckpt")
    return root


def test_quantize_and_eval_ppl(setup, capsys, tmp_path):
    shards, ckpt = setup / "shards", setup / "ckpt"
    out = tmp_path / "int4"
    code, stdout, _ = run_cli(capsys, "quantize", ckpt, "--out", out, "--method", "gptq", "--bits", 4,
                              "--group-size", 32, "--calib", shards, "--calib-samples", 16, "--calib-len", 32)
    assert code == 0
    summary = json.loads(stdout)
    assert summary["method"] == "gptq" and summary["bits"] == 4 and summary["bytes_out"] < summary["bytes_in"]
    assert summary["calibration"] == {"samples": 16, "seq_len": 32}
    assert load_model(out).quantization["method"] == "gptq"

    code, stdout, _ = run_cli(capsys, "eval", "ppl", ckpt, out, "--data", shards, "--json")
    assert code == 0
    rows = [json.loads(line) for line in stdout.splitlines()]
    assert [r["quantization"] is None for r in rows] == [True, False]
    assert rows[0]["tokens"] == rows[1]["tokens"] > 0
    assert 1.0 < rows[0]["ppl"] < 256 and rows[1]["ppl"] < 1.5 * rows[0]["ppl"]
    code, stdout, _ = run_cli(capsys, "eval", "ppl", ckpt, out, "--data", shards)
    assert code == 0 and "gptq int4 g32" in stdout and "full precision" in stdout


def test_quantize_awq_without_clipping(setup, capsys, tmp_path):
    code, stdout, _ = run_cli(capsys, "quantize", setup / "ckpt", "--out", tmp_path / "q", "--method", "awq",
                              "--bits", 4, "--group-size", 32, "--calib", setup / "shards",
                              "--calib-samples", 8, "--calib-len", 32, "--awq-no-clip")
    assert code == 0 and json.loads(stdout)["clip"] is False
    assert load_model(tmp_path / "q").quantization["clip"] is False


def test_every_command_reads_a_quantized_checkpoint(setup, capsys, tmp_path):
    """generate (also as a draft), data generate and eval ppl load through llmlab.infer.quant.load_model;
    export-hf refuses in one line (an HF directory holds plain weights)."""
    q = tmp_path / "q"
    assert run_cli(capsys, "quantize", setup / "ckpt", "--out", q, "--bits", 4, "--group-size", 32)[0] == 0
    target, quantized = Transformer.load(setup / "ckpt"), load_model(q)
    draft = load_draft(target, q)  # a quantized draft for the full-precision target
    assert type(draft.blocks[0].attn.qkv).__name__ == "QuantLinear"
    assert torch.equal(generate(target, [1, 2, 3], 6, temperature=0, draft=draft),
                       generate(target, [1, 2, 3], 6, temperature=0))
    assert torch.equal(generate(quantized, [1, 2, 3], 6, temperature=0, draft="lookup"),
                       generate(quantized, [1, 2, 3], 6, temperature=0))
    code, out, _ = run_cli(capsys, "data", "generate", q, "--shards", setup / "shards", "--out",
                           tmp_path / "gen", "--sequences", 2, "--prompt-tokens", 4, "--length", 12,
                           "--no-progress")
    assert code == 0 and (tmp_path / "gen" / "meta.json").is_file()
    code, _, err = run_cli(capsys, "export-hf", q, tmp_path / "hf")
    assert_one_line_error(code, err, "'quantization' entry", "export the full-precision checkpoint")
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("args,fragments", [
    (["--method", "foo"], ["unknown quantization method 'foo'", "rtn, gptq, awq"]),
    (["--bits", "3"], ["bits=3", "use 8"]),
    (["--bits", "4", "--group-size", "48"],
     ["group_size=48 does not divide the input width 64", "use one of 64, 32"]),
    (["--method", "awq", "--bits", "4", "--group-size", "32", "--calib-samples", "1000", "--calib-len", "32"],
     ["calibration data", "1000 samples x 32 tokens = 32000 were requested", "at most 156 samples"]),
    (["--method", "gptq", "--calib-len", "65"], ["calibration length 65 exceeds the model's block_size 64"]),
    (["--method", "gptq", "--awq-no-clip"], ["--awq-no-clip applies to --method awq, not gptq"]),
])
def test_quantize_bad_input(setup, capsys, tmp_path, args, fragments):
    out = tmp_path / "q"
    code, _, err = run_cli(capsys, "quantize", setup / "ckpt", "--out", out, "--calib", setup / "shards",
                           *args)
    assert_one_line_error(code, err, *fragments)
    assert not out.exists()


def test_quantize_refuses_existing_output_and_missing_checkpoint(setup, capsys, tmp_path):
    code, _, err = run_cli(capsys, "quantize", setup / "ckpt", "--out", setup / "ckpt", "--overwrite")
    assert_one_line_error(code, err, "is the input directory", "not even with --overwrite")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    code, _, err = run_cli(capsys, "quantize", setup / "ckpt", "--out", tmp_path / "taken")
    assert_one_line_error(code, err, "already exists as a non-empty directory", "--overwrite")
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    code, _, err = run_cli(capsys, "quantize", tmp_path / "nope", "--out", tmp_path / "q")
    assert_one_line_error(code, err, "does not exist")
    code, _, err = run_cli(capsys, "eval", "ppl", setup / "ckpt", "--data", tmp_path / "none")
    assert_one_line_error(code, err, "does not exist")


def test_calibration_tokens(setup, tmp_path):
    shards = setup / "shards"
    a = calibration_tokens(shards, 10, 32, seed=3)
    assert a.shape == (10, 32) and a.dtype == torch.int64
    assert torch.equal(a, calibration_tokens(shards, 10, 32, seed=3))
    assert not torch.equal(a, calibration_tokens(shards, 10, 32, seed=4))
    pattern = np.random.default_rng(0).integers(0, 256, 50)
    stream = np.concatenate([np.roll(pattern, k % 3) for k in range(120)])
    train = torch.from_numpy(stream[:5000].astype(np.int64))
    for row in a:  # every window is a slice of the train split at a multiple of its length
        starts = [s for s in range(0, 5000 - 31, 32) if torch.equal(train[s:s + 32], row)]
        assert starts
    np.save(tmp_path / "ids.npy", np.arange(100))
    b = calibration_tokens(tmp_path / "ids.npy", 3, 20, seed=0)
    assert all(int(r[1] - r[0]) == 1 and int(r[0]) % 20 == 0 for r in b)
    with pytest.raises(DataError, match="has 100 tokens but 6 samples x 20 tokens = 120 were requested"):
        calibration_tokens(tmp_path / "ids.npy", 6, 20)
    with pytest.raises(ConfigError, match="needs a tokenizer"):
        calibration_tokens("stdlib", 2, 16)
    with pytest.raises(ConfigError, match="n_samples=0"):
        calibration_tokens(shards, 0, 16)
