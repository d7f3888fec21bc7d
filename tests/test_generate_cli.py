"""`llmlab generate`: text in, text out; bad checkpoints and over-long prompts are one line, exit 2."""

from __future__ import annotations

import importlib

import pytest
import torch

from llmlab.cli import main
from llmlab.infer import generate
from llmlab.infer.cpu_linear import route_cpu_linears, route_table
from llmlab.model import ModelConfig, Transformer
from llmlab.tokenizer import Tokenizer


@pytest.fixture
def checkpoint(tmp_path, small_corpus):
    tok = Tokenizer.train(small_corpus, vocab_size=300, progress=False, workers=1)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("gpt2", "tiny", vocab_size=tok.vocab_size))
    with torch.no_grad():
        model.lm_head.weight.mul_(5)  # decisive greedy picks
    model.save(tmp_path / "ckpt")
    tok.save(tmp_path / "ckpt" / "tokenizer")
    return tmp_path / "ckpt", tok, model


def test_generate_prints_prompt_and_continuation(checkpoint, capsys):
    ckpt, tok, model = checkpoint
    args = ["generate", str(ckpt), "--prompt", "The quick", "--temperature", "0", "--max-new-tokens", "8",
            "--ignore-eos"]
    assert main(args) == 0
    out = capsys.readouterr().out
    ids = [tok.eos_id] + tok.encode("The quick")
    expected = generate(model.eval(), ids, 8, temperature=0)[len(ids):].tolist()
    assert out == "The quick" + tok.decode(expected) + "\n"
    assert main(args + ["--stream"]) == 0  # streaming prints the same text
    assert capsys.readouterr().out == out


def test_sampling_with_a_seed_is_reproducible(checkpoint, capsys):
    ckpt, _, _ = checkpoint
    args = ["generate", str(ckpt), "--prompt", "def", "--seed", "3", "--max-new-tokens", "10",
            "--top-p", "0.9"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first


@pytest.mark.parametrize("make_args,match", [
    (lambda ckpt: [str(ckpt), "--prompt", "fox " * 80], "context (block_size) is 64"),
    (lambda ckpt: [str(ckpt), "--prompt", "fox", "--max-new-tokens", "100"], "ask for at most"),
    (lambda ckpt: [str(ckpt.parent / "missing")], "missing does not exist"),
    (lambda ckpt: [str(ckpt), "--tokenizer", str(ckpt / "nope")], "no tokenizer directory"),
])
def test_bad_input_is_one_line_exit_2(checkpoint, capsys, make_args, match):
    ckpt, _, _ = checkpoint
    assert main(["generate", *make_args(ckpt)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing half-printed
    assert match in captured.err and captured.err.count("\n") == 1


@pytest.mark.parametrize("option,value,match", [
    ("--top-p", "2", "in (0, 1]"), ("--top-p", "0", "in (0, 1]"), ("--temperature", "inf", ">= 0"),
    ("--temperature", "nan", ">= 0"), ("--temperature", "-0.5", ">= 0"), ("--max-new-tokens", "0", ">= 1"),
    ("--top-k", "-1", ">= 0"), ("--speculate-k", "0", ">= 1"), ("--seed", "-1", "from 0"),
    ("--draft-confidence", "1.5", "in [0, 1]"), ("--max-new-tokens", "ten", "not a whole number"),
])
def test_numbers_out_of_range_are_refused_when_parsed(checkpoint, capsys, option, value, match):
    """An argparse error: one line naming the option and the range, one line pointing at --help."""
    ckpt, _, _ = checkpoint
    assert main(["generate", str(ckpt), option, value]) == 2
    captured = capsys.readouterr()
    first, hint = captured.err.splitlines()
    assert captured.out == "" and first.startswith(f"llmlab generate: error: argument {option}: ")
    assert match in first and hint == "llmlab: see 'llmlab generate --help'"


def test_missing_weights_file_is_named(checkpoint, capsys):
    ckpt, _, _ = checkpoint
    (ckpt / "model.safetensors").unlink()
    assert main(["generate", str(ckpt), "--prompt", "a"]) == 2
    assert "has no model.safetensors" in capsys.readouterr().err


def test_cpu_routes_are_opt_in_and_change_no_output(checkpoint, capsys, monkeypatch):
    """--cpu-routes measures and routes the target's linears; without it they stay plain; same text."""
    ckpt, _, _ = checkpoint
    generate_module = importlib.import_module("llmlab.infer.generate")  # the package exports the function
    routed = []

    def recording(m):
        routed.append(m)
        return route_cpu_linears(m)

    monkeypatch.setattr(generate_module, "route_cpu_linears", recording)
    args = ["generate", str(ckpt), "--prompt", "def", "--temperature", "0",
            "--max-new-tokens", "6", "--device", "cpu"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert routed == []  # opt-in: plain F.linear by default
    assert main(args + ["--cpu-routes"]) == 0
    assert len(routed) == 1 and route_table(routed[0]).choice  # the target was routed and measured
    assert capsys.readouterr().out == text  # the same text either way
