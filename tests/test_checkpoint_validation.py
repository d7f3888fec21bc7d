"""Checkpoints and metrics files are validated where they are read: a truncated or corrupt model.safetensors,
config.json or train_state.pt gives one CheckpointError naming the file (resume, Transformer.load), never a
traceback, and train_state.pt is never unpickled beyond weights_only. Property-based: random truncations and
byte flips of each file either load or raise one CheckpointError. A torn last metrics line is tolerated."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import assert_one_line_error, run_cli
from llmlab.data.shards import write_shard_dir
from llmlab.data.synthetic import affine_stream
from llmlab.errors import CheckpointError, DataError
from llmlab.model import ModelConfig, Transformer
from llmlab.train.metrics import read_metrics
from llmlab.train.optim import OptimConfig
from llmlab.train.trainer import TrainConfig, Trainer

V = 32


class Batches:
    """The smallest resumable batch source: fixed random windows, position in state_dict."""

    def __init__(self):
        self.step = 0

    def next_batch(self):
        g = torch.Generator().manual_seed(self.step)
        self.step += 1
        data = torch.randint(0, V, (2, 9), generator=g)
        return data[:, :-1], data[:, 1:]

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, state):
        self.step = int(state["step"])


def _loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten()), {}


def _trainer(run_dir, steps=2):
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("gpt2", "tiny", vocab_size=V, d_model=16, n_layer=1, n_head=2,
                                           block_size=8))
    return Trainer(model, _loss, Batches(), OptimConfig(max_steps=steps, warmup_steps=0),
                   TrainConfig(progress=False, plot=False, peak_flops=1e12, ckpt_every=1, keep_last=0),
                   run_dir=run_dir)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    _trainer(run).fit()
    return run / "ckpt-000002"


def _copy(checkpoint, tmp_path):
    target = tmp_path / "run" / checkpoint.name
    shutil.copytree(checkpoint.parent, tmp_path / "run", dirs_exist_ok=True)
    return target


def _restore_and_load(path):
    """What resume and generate/eval/quantize/export do with a checkpoint: restore a trainer, load it."""
    _trainer(path.parent / "elsewhere").restore(path)
    Transformer.load(path)


@pytest.mark.parametrize("name, content, fragment", [
    ("model.safetensors", lambda b: b[: len(b) // 2], "not a readable safetensors file"),
    ("model.safetensors", lambda b: b"", "not a readable safetensors file"),
    ("config.json", lambda b: b[:10], "not valid JSON"),
    ("config.json", lambda b: b"[1, 2]", "not an object"),
    ("config.json", lambda b: b.replace(b'"n_layer": 1', b'"n_layer": "1"'), 'n_layer="1" needs an integer'),
    ("config.json", lambda b: b.replace(b'"norm_eps": 1e-05', b'"norm_eps": NaN'), "finite"),
    ("train_state.pt", lambda b: b[: len(b) // 2], "truncated or corrupt"),
    ("train_state.pt", lambda b: b"not a zip", "truncated or corrupt"),
])
def test_corrupt_checkpoint_file_is_one_checkpoint_error(checkpoint, tmp_path, name, content, fragment):
    path = _copy(checkpoint, tmp_path)
    (path / name).write_bytes(content((path / name).read_bytes()))
    with pytest.raises(CheckpointError) as e:
        _restore_and_load(path)
    assert fragment in str(e.value) and name in str(e.value) and "\n" not in str(e.value)
    if name != "config.json":  # the fix names the previous checkpoint of the run
        assert "ckpt-000001" in str(e.value)


def test_train_state_of_the_wrong_shape_is_refused(checkpoint, tmp_path):
    path = _copy(checkpoint, tmp_path)
    state = torch.load(path / "train_state.pt", weights_only=True)
    for broken, fragment in [([1, 2], "a list"), ({**state, "version": 99}, "version 99"),
                             ({**state, "step": "3"}, "'step'"),
                             ({**state, "rng": {"torch": 1}}, "cannot be restored")]:
        torch.save(broken, path / "train_state.pt")
        with pytest.raises(CheckpointError, match=fragment):
            _trainer(tmp_path / "other").restore(path)


def test_resume_from_a_truncated_checkpoint_is_one_line(capsys, tmp_path):
    shards = tmp_path / "shards"
    write_shard_dir(shards, {"train": [affine_stream(2000, 64, 0)], "val": [affine_stream(500, 64, 1)]},
                    vocab_size=64, extra={"tokenizer": {"vocab_size": 64, "eos_id": None}})
    args = ["pretrain", "--config", "tiny", f"data.shards={shards}", f"train.out_dir={tmp_path}",
            "train.run_name=r", "train.progress=false", "train.plot=false", "optim.max_steps=2",
            "train.ckpt_every=1", "train.eval_every=0", "train.peak_flops=1e11", "--resume", "auto"]
    assert run_cli(capsys, *args)[0] == 0
    weights = tmp_path / "r" / "ckpt-000002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    code, _, err = run_cli(capsys, *args[:-4], "optim.max_steps=3", "--resume", "auto")
    assert_one_line_error(code, err, str(weights), "truncated or corrupt")
    code, _, err = run_cli(capsys, "generate", weights.parent, "--prompt", "hi", "--device", "cpu")
    assert_one_line_error(code, err, str(weights))


# ---------------------------------------------------------------- property-based

@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(name=st.sampled_from(["config.json", "model.safetensors", "train_state.pt"]),
       cut=st.one_of(st.none(), st.floats(0, 1)),
       flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 7)), max_size=3),
       early=st.booleans())
def test_truncated_or_flipped_files_load_or_raise_one_checkpoint_error(checkpoint, tmp_path_factory, name,
                                                                       cut, flips, early):
    path = _copy(checkpoint, tmp_path_factory.mktemp("fuzz"))
    data = bytearray((path / name).read_bytes())
    if cut is not None:
        data = data[: int(cut * len(data))]
    for where, bit in flips:
        if data:
            # `early` aims at the headers (JSON header, zip and pickle structure), where flips do most harm
            i = int(where * min(len(data), 600)) if early else int(where * len(data))
            data[i] ^= 1 << bit
    (path / name).write_bytes(bytes(data))
    try:
        _restore_and_load(path)
    except CheckpointError as e:
        assert "\n" not in str(e)


# ---------------------------------------------------------------- metrics.jsonl

def test_metrics_torn_last_line_is_tolerated_and_other_bad_lines_are_one_error(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    good = [json.dumps({"step": s, "loss": 1.0 / s, "lr": 1e-3, "grad_norm": 1.0}) for s in (1, 2)]
    path.write_text("\n".join(good) + '\n{"step": 3, "lo')
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    assert run_cli(capsys, "plot", tmp_path)[0] == 0
    bad_lines = ("garbage", "[1, 2]", '{"step": "x"}', '{"step": 3, "loss": "low"}',
                 '{"step": 3, "events": 1}')
    for bad in bad_lines:
        path.write_text(good[0] + "\n" + bad + "\n" + good[1] + "\n")
        with pytest.raises(DataError, match="line 2 is not a metrics record"):
            read_metrics(path)
        code, _, err = run_cli(capsys, "plot", tmp_path)
        assert_one_line_error(code, err, "metrics.jsonl line 2")
    path.write_bytes(b"\xff\xfe\x00garbage\n")
    code, _, err = run_cli(capsys, "plot", tmp_path)
    assert_one_line_error(code, err, "metrics.jsonl")
