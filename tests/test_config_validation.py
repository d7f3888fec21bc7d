"""Every config value is checked when the config is resolved: types, finite numbers, ranges, list lengths,
sections that must be tables; each failure is one ConfigError naming the key, before a run directory exists.
Property-based: any key=value overrides resolve to a config torch accepts, or raise one ConfigError."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import assert_one_line_error, run_cli
from llmlab.config import check_config, load_config
from llmlab.data.shards import write_shard_dir
from llmlab.data.synthetic import affine_stream
from llmlab.errors import ConfigError
from llmlab.train.optim import OptimConfig, build_optimizer
from llmlab.train.pretrain import PretrainConfig, resolve_config
from llmlab.train.schedule import lr_at
from llmlab.train.spike import SpikeConfig, SpikeGuard
from llmlab.train.trainer import TrainConfig

META = {"tokenizer": {"vocab_size": 64}}


@pytest.mark.parametrize("override, fragments", [
    ("optim.lr=inf", ["optim.lr=inf", "not a finite number"]),
    ("optim.lr=nan", ["optim.lr=nan", "not a finite number"]),
    ("optim.lr=-1e-3", ["optim.lr=-0.001", "must be > 0", "default 0.0006"]),
    ("optim.lr=0", ["optim.lr=0", "> 0"]),
    ("optim.eps=-1", ["optim.eps=-1", "> 0"]),
    ("optim.betas=[0.9]", ["optim.betas=[0.9]", "needs 2 values"]),
    ("optim.betas=[0.9, 1.0]", ["optim.betas=1", "in [0, 1)"]),
    ("optim.betas=0.9", ["optim.betas=0.9", "needs a list"]),
    ("optim.weight_decay=-0.1", ["optim.weight_decay", ">= 0"]),
    ("optim.min_lr_ratio=2", ["optim.min_lr_ratio=2", "in [0, 1]"]),
    ("optim.max_steps=0", ["optim.max_steps=0", "> 0"]),
    ("optim.max_steps=1e3", ["optim.max_steps=1000", "needs an integer"]),
    ("train.eval_batches=0", ["train.eval_batches=0"]),
    ("train.seed=-1", ["train.seed=-1", ">= 0"]),
    ("train.max_minutes=inf", ["train.max_minutes=inf", "finite"]),
    ("train.dtype=fp16", ["train.dtype", "one of"]),
    ("train.run_name=''", ["train.run_name", "non-empty"]),
    ("train.run_name=2024", ["train.run_name=2024", "quote it"]),
    ("train.progress=1", ["train.progress=1", "true or false"]),
    ("data.batch_size=0", ["data.batch_size=0"]),
    ("data.seed=-5", ["data.seed=-5"]),
    ("spike.loss_ratio=0.5", ["spike.loss_ratio=0.5", ">= 1"]),
    ("spike.window=5", ["spike.min_samples=20 exceeds spike.window=5"]),
    ("parallel.strategy=zero", ["parallel.strategy", "one of"]),
    ("distill.weight=1.5", ["distill.weight=1.5", "[0, 1]"]),
    ("distill.temperature=inf", ["distill.temperature=inf"]),
    ("model.rope_theta=inf", ["model.rope_theta=inf", "finite"]),
    ("optim=3", ["optim is a section", "optim.KEY=VALUE"]),
    ("lr=1e-3", ["unknown config key 'lr'", "optim.lr"]),
])
def test_bad_override_is_one_config_error(override, fragments):
    with pytest.raises(ConfigError) as e:
        load_config(PretrainConfig, overrides=[override])
    message = str(e.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


@pytest.mark.parametrize("text, fragments", [
    ("optim = 3\n", ["optim is a section", "[optim]"]),
    ('[optim]\nlr = "fast"\n', ["optim.lr", "needs a number"]),
    ("[optim]\nbetas = [0.9, 0.95, 0.99]\n", ["optim.betas", "needs 2 values, got 3"]),
    ("[train]\nseed = {a = 1}\n", ["train.seed", "needs an integer"]),
    ("[optim]\nlr = inf\n", ["optim.lr=inf", "finite"]),
])
def test_bad_toml_is_one_config_error(tmp_path, text, fragments):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(PretrainConfig, path)
    for fragment in fragments:
        assert fragment in str(e.value), (fragment, str(e.value))


def test_unreadable_toml_is_a_config_error(tmp_path):
    path = tmp_path / "c.toml"
    path.write_bytes(b"\xff\xfe[optim]\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(PretrainConfig, path)


def test_configs_built_in_code_are_checked_too():
    with pytest.raises(ConfigError, match="optim.lr=inf"):
        check_config(OptimConfig(lr=math.inf), "optim.")
    with pytest.raises(ConfigError, match=r"optim.betas=\[0.9\] needs 2 values"):
        check_config(dataclasses.replace(PretrainConfig(), optim=OptimConfig(betas=(0.9,))))
    with pytest.raises(ConfigError, match="spike.min_samples"):
        SpikeGuard(SpikeConfig(window=5, min_samples=10))
    assert check_config(OptimConfig(lr=1)).lr == 1.0 and isinstance(check_config(OptimConfig(lr=1)).lr, float)


def test_cli_refuses_bad_values_before_making_a_run_directory(capsys, tmp_path):
    shards = tmp_path / "shards"
    write_shard_dir(shards, {"train": [affine_stream(2000, 64, 0)], "val": [affine_stream(500, 64, 1)]},
                    vocab_size=64, extra={"tokenizer": {"vocab_size": 64, "eos_id": None}})
    base = ["pretrain", "--config", "tiny", f"data.shards={shards}", f"train.out_dir={tmp_path / 'runs'}",
            "train.run_name=r", "train.progress=false", "train.plot=false"]
    for bad in ("optim.lr=inf", "optim.eps=-1", "optim.betas=[0.9]", "optim.lr=nan", "model.n_head=3"):
        code, _, err = run_cli(capsys, *base, bad)
        assert_one_line_error(code, err, bad.split("=")[0].split(".")[-1])
        assert not (tmp_path / "runs").exists(), bad


# ---------------------------------------------------------------- property-based

def _leaf_keys(cls, prefix=""):
    keys = []
    for f in dataclasses.fields(cls):
        value = getattr(cls(), f.name)
        if dataclasses.is_dataclass(value):
            keys += _leaf_keys(type(value), f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


KEYS = _leaf_keys(PretrainConfig) + ["optim", "model", "nope", "optim.nope", "optim.lr.x"]
NUMBERS = st.one_of(st.integers(-3, 3), st.integers(-(2**63), 2**63 - 1),
                    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.5, 1e-8, 0.9, 1e30]))
LITERALS = st.one_of(
    NUMBERS.map(lambda v: repr(v) if not isinstance(v, float) or math.isfinite(v) else str(v)),
    st.sampled_from(["true", "false", "null", "''", '"auto"', "fsdp", "bf16", "{a = 1}", "[]", "[0.9]",
                     "[0.9, 0.95]", "[0.9, 0.95, 0.99]", "[1, 2]", "1e400", "-inf", "+nan"]),
    st.lists(NUMBERS, max_size=3).map(lambda vs: "[" + ", ".join(repr(v) for v in vs) + "]"),
    st.text(max_size=8),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(KEYS), LITERALS), min_size=1, max_size=3))
def test_random_overrides_resolve_to_a_usable_config_or_one_config_error(pairs):
    overrides = [f"{k}={v}" for k, v in pairs]
    try:
        cfg = resolve_config(load_config(PretrainConfig, overrides=overrides), META)
    except ConfigError as e:
        assert "\n" not in str(e)
        return
    # Whatever resolved is accepted by what consumes it: torch's AdamW, the schedule, the spike guard.
    o = cfg.optim
    build_optimizer(torch.nn.Linear(2, 2), o)
    for step in (0, o.warmup_steps, o.max_steps // 2, o.max_steps):
        lr = lr_at(step, o.lr, o.warmup_steps, o.max_steps, o.min_lr_ratio)
        assert math.isfinite(lr) and lr >= 0
    SpikeGuard(cfg.spike)
    assert isinstance(check_config(cfg.train, "train."), TrainConfig)
    assert cfg.model.vocab_size == 64 and cfg.data.block_size <= cfg.model.block_size
