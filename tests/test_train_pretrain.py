"""Pretraining end to end: Transformer + TokenLoader + Trainer via run_pretrain and `llmlab pretrain`.

Shards are synthetic and learnable: runs of 16 tokens following x[t+1] = (5 x[t] + 3) mod 64 from a
random start, so a tiny model can drive the loss far below the uniform ln(64) = 4.16 nats in seconds.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys

import pytest
import torch
from safetensors.torch import load_file

from helpers import assert_one_line_error, run_cli
from llmlab.config import load_config
from llmlab.data.shards import write_shard_dir
from llmlab.data.synthetic import affine_stream
from llmlab.errors import ConfigError
from llmlab.model import ModelConfig, Transformer
from llmlab.train import param_groups
from llmlab.train.metrics import read_metrics
from llmlab.train.pretrain import PretrainConfig, run_pretrain

V = 64




@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "shards"
    tok = out / "tokenizer"
    tok.mkdir(parents=True)
    (tok / "llmlab.json").write_text('{"fake": true}')
    write_shard_dir(out, {"train": [affine_stream(12000, V, 0), affine_stream(8000, V, 1)],
                          "val": [affine_stream(2000, V, 2)]},
                    vocab_size=V, extra={"tokenizer": {"vocab_size": V, "eos_id": None, "copy": "tokenizer"}})
    return out


def _cfg(shards, tmp_path, *overrides):
    base = [f"data.shards={shards}", f"train.out_dir={tmp_path / 'runs'}", "train.progress=false",
            "train.plot=false", "train.peak_flops=1e11"]
    return load_config(PretrainConfig, "configs/tiny.toml", base + list(overrides))


# ------------------------------------------------------------------ learning and the run directory

def test_pretrain_learns_and_writes_a_complete_run(shards, tmp_path):
    cfg = _cfg(shards, tmp_path, "optim.max_steps=60", "optim.lr=1e-2", "train.eval_every=30",
               "train.plot=true")
    summary = run_pretrain(cfg)
    run = tmp_path / "runs" / "tiny"
    records = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert records[0]["loss"] == pytest.approx(math.log(V), abs=0.15)  # starts near uniform
    assert summary["val_loss"] < 1.6 and records[-1]["loss"] < 1.6     # the map is learned
    assert summary["tokens"] == 60 * 4 * 32
    assert summary["params"] == Transformer(dataclasses.replace(cfg.model, vocab_size=V)).num_params()

    # the resolved config (vocab from the shards, block size from the model) round-trips
    saved = load_config(PretrainConfig, run / "config.toml")
    assert saved.model.vocab_size == V and saved.data.block_size == 32 and saved.optim.max_steps == 60
    assert json.loads((run / "summary.json").read_text())["step"] == 60
    assert (run / "plots" / "loss.png").is_file() and (run / "plots" / "training.png").is_file()

    # a checkpoint is self-contained: the model loads on its own and the tokenizer came along
    ckpt = run / "ckpt-000060"
    assert (ckpt / "tokenizer" / "llmlab.json").read_text() == '{"fake": true}'
    model = Transformer.load(ckpt)
    x = torch.from_numpy(affine_stream(33, V, 7))[None]
    loss = torch.nn.functional.cross_entropy(model(x[:, :-1])[0], x[0, 1:])
    assert loss.item() < 1.6
    assert sorted(p.name for p in run.glob("ckpt-*")) == ["ckpt-000050", "ckpt-000060"]  # keep_last = 2


def test_resume_gives_bitwise_identical_weights_with_dropout(shards, tmp_path):
    common = ["optim.max_steps=12", "train.ckpt_every=6", "train.keep_last=0", "model.dropout=0.1",
              "train.tokens_per_step=256"]  # accum 2 of batch 4 x block 32
    run_pretrain(_cfg(shards, tmp_path, "train.run_name=full", *common))
    full = tmp_path / "runs" / "full"
    # continue from the step-6 checkpoint (as if the process died right after writing it) in a new run
    run_pretrain(_cfg(shards, tmp_path, "train.run_name=resumed", *common), resume=str(full / "ckpt-000006"))
    a = load_file(full / "ckpt-000012" / "model.safetensors")
    b = load_file(tmp_path / "runs" / "resumed" / "ckpt-000012" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa = torch.load(full / "ckpt-000012" / "train_state.pt", weights_only=True)
    sb = torch.load(tmp_path / "runs" / "resumed" / "ckpt-000012" / "train_state.pt", weights_only=True)
    assert sa["batches"] == sb["batches"] and sa["tokens"] == sb["tokens"] == 12 * 256
    for pa, pb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values(), strict=True):
        assert all(torch.equal(pa[k], pb[k]) for k in pa)


def test_cli_resume_auto_continues_the_run(shards, tmp_path, capsys):
    args = ["pretrain", "--config", "configs/tiny.toml", f"data.shards={shards}",
            f"train.out_dir={tmp_path / 'runs'}", "train.progress=false", "train.plot=false",
            "optim.max_steps=8", "train.ckpt_every=4"]
    code, out, _ = run_cli(capsys, *args)
    assert code == 0 and json.loads(out)["step"] == 8
    code, out, _ = run_cli(capsys, *args[:-2], "optim.max_steps=10", "train.ckpt_every=4", "--resume", "auto")
    assert code == 0 and json.loads(out)["step"] == 10
    steps = [r["step"] for r in read_metrics(tmp_path / "runs" / "tiny" / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, 11))
    resumed = [r for r in read_metrics(tmp_path / "runs" / "tiny" / "metrics.jsonl") if r["step"] == 9][0]
    assert resumed["events"][0] == {"type": "resume", "path": "ckpt-000008"}


def test_weight_decay_on_transformer_matrices_only():
    for flavour in ("gpt2", "llama"):
        model = Transformer(ModelConfig.preset(flavour, "tiny"))
        decay, no_decay = param_groups(model, 0.1)
        names = {id(p): n for n, p in model.named_parameters()}
        decayed = {names[id(p)] for p in decay["params"]}
        kept = {names[id(p)] for p in no_decay["params"]}
        assert all(n.endswith(".bias") or "norm" in n for n in kept) and kept
        assert all(n.endswith(".weight") and "norm" not in n for n in decayed)
        assert "tok_emb.weight" in decayed and ("lm_head.weight" in decayed) == (flavour == "llama")
        assert len(decayed) + len(kept) == len(list(model.parameters()))


def test_vocab_size_defaults_from_shards_and_mismatch_is_an_error(shards, tmp_path):
    with pytest.raises(ConfigError, match=r"model.vocab_size=100 does not match .* \(64 tokens"):
        run_pretrain(_cfg(shards, tmp_path, "model.vocab_size=100"))
    assert not (tmp_path / "runs").exists()  # nothing written on a config error


# ------------------------------------------------------------------ bad input: one line, exit 2

def test_bad_input_is_one_line(shards, tmp_path, capsys, monkeypatch):
    base = ["pretrain", "--config", "configs/tiny.toml", f"train.out_dir={tmp_path / 'runs'}",
            "train.progress=false", "train.plot=false"]
    code, _, err = run_cli(capsys, *base, f"data.shards={tmp_path / 'nope'}")
    assert_one_line_error(code, err, "nope", "does not exist", "llmlab data prepare")

    code, _, err = run_cli(capsys, *base, f"data.shards={shards}", "optim.lrr=1")
    assert_one_line_error(code, err, "optim.lrr", "did you mean 'lr'")

    code, _, err = run_cli(capsys, *base, f"data.shards={shards}", "train.tokens_per_step=100")
    assert_one_line_error(code, err, "tokens_per_step=100", "use train.tokens_per_step=128")

    small = tmp_path / "small"
    write_shard_dir(small, {"train": [affine_stream(5000, V, 0)], "val": [affine_stream(20, V, 1)]},
                    vocab_size=V)
    code, _, err = run_cli(capsys, *base, f"data.shards={small}")
    assert_one_line_error(code, err, "block_size 32", "val split", "has 20")

    with monkeypatch.context() as m:
        m.setitem(sys.modules, "tensorboard", None)  # not installed
        code, _, err = run_cli(capsys, *base, f"data.shards={shards}", "train.tensorboard=true")
    assert_one_line_error(code, err, "train.tensorboard=true", "pip install tensorboard")
    assert not (tmp_path / "runs").exists()

    # a finished run to resume from
    code, _, err = run_cli(capsys, *base, f"data.shards={shards}", "optim.max_steps=2", "train.ckpt_every=1")
    assert code == 0, err
    ckpt = tmp_path / "runs" / "tiny" / "ckpt-000002"
    code, _, err = run_cli(capsys, *base, f"data.shards={shards}", "optim.max_steps=4", "model.n_layer=3",
                        "--resume", str(ckpt))
    assert_one_line_error(code, err, "model.n_layer=2", "asks for 3")

    code, _, err = run_cli(capsys, *base, f"data.shards={shards}")  # same run name without --resume
    assert_one_line_error(code, err, "already holds a run", "--resume auto")

    (ckpt / "model.safetensors").unlink()
    code, _, err = run_cli(capsys, *base, f"data.shards={shards}", "optim.max_steps=4", "--resume", str(ckpt))
    assert_one_line_error(code, err, "ckpt-000002", "missing model.safetensors")

    code, _, err = run_cli(capsys, "plot", str(tmp_path))
    assert_one_line_error(code, err, "no metrics.jsonl")


def test_plot_cli(shards, tmp_path, capsys):
    run_pretrain(_cfg(shards, tmp_path, "optim.max_steps=3"))
    code, out, err = run_cli(capsys, "plot", str(tmp_path / "runs" / "tiny"))
    assert code == 0, err
    assert [line.rsplit("/", 1)[-1] for line in out.split()] == ["loss.png", "training.png"]


@pytest.mark.parametrize("name", ["tiny", "cpu-demo", "gpt2-124M"])
def test_presets_load_and_resolve(name):
    from llmlab.train.pretrain import resolve_config

    cfg = resolve_config(load_config(PretrainConfig, f"configs/{name}.toml"),
                         {"tokenizer": {"vocab_size": 8192}})
    assert cfg.model.vocab_size == 8192 and cfg.data.block_size <= cfg.model.block_size
    Transformer(cfg.model) if name != "gpt2-124M" else cfg.model.validate()


def test_lm_loss_same_through_a_wrapper():
    from torch import nn

    from llmlab.train.pretrain import lm_loss

    class Compiled(nn.Module):  # shaped like torch.compile's wrapper: the module sits in _orig_mod
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner
            self.calls = 0

        def forward(self, *args, **kwargs):
            self.calls += 1
            return self._orig_mod(*args, **kwargs)

    model = Transformer(ModelConfig.preset("llama", "tiny"))
    x = torch.randint(256, (2, 16))
    y = torch.randint(256, (2, 16))
    wrapper = Compiled(model)
    bare, wrapped = lm_loss(model, (x, y))[0], lm_loss(wrapper, (x, y))[0]
    torch.testing.assert_close(bare, wrapped, rtol=1e-5, atol=1e-5)
    assert wrapper.calls == 1  # the loss went through the wrapper's forward (DDP/FSDP hooks live there)
    logits = model(x)
    plain = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
    torch.testing.assert_close(bare, plain, rtol=1e-5, atol=1e-5)


def test_grad_accumulation_matches_bigger_batch_on_the_transformer(shards, tmp_path):
    def run(name, steps, *extra):
        run_pretrain(_cfg(shards, tmp_path, f"train.run_name={name}", f"optim.max_steps={steps}",
                          "optim.lr=1e-2", "train.ckpt_every=0", *extra))
        run_dir = tmp_path / "runs" / name
        weights = load_file(run_dir / f"ckpt-{steps:06d}" / "model.safetensors")
        return weights, read_metrics(run_dir / "metrics.jsonl")

    accum = ("data.batch_size=2", "train.tokens_per_step=128")  # 2 micro-batches of 2 x 32 tokens
    (a, _), (b, _) = run("accum1", 1, *accum), run("big1", 1, "data.batch_size=4")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    # Over more steps compare the losses: Adam turns float noise in gradients that are zero in exact
    # arithmetic (attention's key bias; softmax ignores a constant shift) into lr-sized weight changes,
    # but those weights do not affect the loss.
    (_, ra), (_, rb) = run("accum5", 5, *accum), run("big5", 5, "data.batch_size=4")
    assert [r["loss"] for r in ra] == pytest.approx([r["loss"] for r in rb], abs=1e-6)
