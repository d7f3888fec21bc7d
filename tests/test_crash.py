"""Crash safety: a real `llmlab pretrain` process killed with SIGKILL at random moments (seeded), including
inside a checkpoint write, always resumes with --resume auto, and on CPU its final weights equal an
uninterrupted run's bit for bit. SIGTERM makes it checkpoint and exit 0.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from llmlab.data.shards import write_shard_dir
from llmlab.data.synthetic import affine_stream
from llmlab.errors import DataError
from llmlab.train.metrics import read_metrics

V = 64
STEPS = 40



@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("crashdata") / "shards"
    write_shard_dir(out, {"train": [affine_stream(8000, V, 0)], "val": [affine_stream(1000, V, 2)]},
                    vocab_size=V, extra={"tokenizer": {"vocab_size": V, "eos_id": None}})
    return out


# `llmlab pretrain` whose checkpoint writes sleep SLEEP seconds before and after the weights, so a kill can
# land inside one: the fault lives here, in the test, not in the library.
_SLOW_CHECKPOINTS = """
import sys, time
from llmlab.cli import main
from llmlab.train.checkpoint import Checkpointer

delay = float(sys.argv.pop(1))
if delay > 0:
    write_model = Checkpointer.write_model

    def slow_write_model(model, directory):
        time.sleep(delay)
        write_model(model, directory)
        time.sleep(delay)

    Checkpointer.write_model = staticmethod(slow_write_model)
sys.exit(main(sys.argv[1:]))
"""


def _cmd(shards, out, name, sleep=0.0):
    return [sys.executable, "-c", _SLOW_CHECKPOINTS, str(sleep), "pretrain", "--config", "configs/tiny.toml",
            f"data.shards={shards}", f"train.out_dir={out}", f"train.run_name={name}", "train.progress=false",
            "train.plot=false", "train.threads=1", f"optim.max_steps={STEPS}", "train.ckpt_every=4",
            "train.keep_last=2", "train.eval_every=10", "train.peak_flops=1e11", "--resume", "auto"]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _final_weights(run):
    return load_file(str(run / f"ckpt-{STEPS:06d}" / "model.safetensors"))


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("crashruns")
    subprocess.run(_cmd(shards, out, "ref"), env=_env(), check=True, capture_output=True, timeout=300)
    return out, _final_weights(out / "ref")


def _newest_checkpoint(run) -> int:
    steps = [int(p.name.split("-")[1]) for p in run.glob("ckpt-*") if (p / "train_state.pt").is_file()]
    return max(steps, default=0)


def _logged_step(run) -> int:
    """The newest step in the run's metrics.jsonl (0 when there is none yet)."""
    try:
        return max((r.get("step", 0) for r in read_metrics(run / "metrics.jsonl")), default=0)
    except (OSError, ValueError, DataError):  # not written yet
        return 0


def _wait_for(predicate, proc, timeout=120.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def test_sigkill_at_random_moments_and_mid_checkpoint_resumes_exactly(shards, reference):
    out, ref = reference
    run = out / "crashy"
    rng = random.Random(1234)
    kills = 0
    # trial 0: kill while a checkpoint is being written (its temp dir exists; _SLOW_CHECKPOINTS slows it)
    proc = subprocess.Popen(_cmd(shards, out, "crashy", sleep=0.5), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    in_write = _wait_for(lambda: any(run.glob(".ckpt-*.tmp")), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert in_write, "the checkpoint write was never caught in progress"
    kills += 1
    # trials 1..4: kill at a random step past the resume point plus a random few milliseconds, so the kill
    # lands mid-step, mid-eval or mid-checkpoint however fast the machine is (wall-clock delays are not).
    for _ in range(4):
        target = rng.randint(min(_newest_checkpoint(run) + 1, STEPS - 1), STEPS - 1)
        proc = subprocess.Popen(_cmd(shards, out, "crashy", sleep=rng.choice([0.0, 0.05])), env=_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for(lambda target=target: _logged_step(run) >= target, proc)
        time.sleep(rng.uniform(0.0, 0.05))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    # incomplete checkpoints never count as resumable
    for ckpt in run.glob("ckpt-*"):
        assert (ckpt / "train_state.pt").is_file() and (ckpt / "model.safetensors").is_file()
    subprocess.run(_cmd(shards, out, "crashy"), env=_env(), check=True, capture_output=True, timeout=300)
    assert kills >= 3
    got = _final_weights(run)
    assert got.keys() == ref.keys()
    for name in ref:
        assert torch.equal(got[name], ref[name]), name
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS  # resumes truncated the log: no duplicates


def test_sigterm_checkpoints_and_exits_zero(shards, tmp_path):
    run = tmp_path / "term"
    proc = subprocess.Popen(_cmd(shards, tmp_path, "term"), env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    assert _wait_for(lambda: metrics.is_file() and metrics.stat().st_size > 0, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    records = read_metrics(run / "metrics.jsonl")
    last = max(r["step"] for r in records)
    assert last < STEPS  # it stopped early ...
    assert (run / f"ckpt-{last:06d}" / "train_state.pt").is_file()  # ... with a checkpoint of where it was
    events = [e["type"] for r in records for e in r.get("events") or []]
    assert "signal" in events
