"""Loss-spike guard: detection rules on hand-made sequences, and end to end with injected faults.

End to end: a tiny GPT-2 learns synthetic LCG runs (x[t+1] = 5 x[t] + 3 mod 64). A FaultInjector poisons
6 consecutive batches late in the run (every target = token 0). With the guard the run skips, then rolls
back, skips the bad data and ends within 2% of the clean run's val loss; without it the model is hurt.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from llmlab.data.loader import TokenLoader
from llmlab.data.shards import write_shard_dir
from llmlab.data.synthetic import affine_stream
from llmlab.errors import ConfigError
from llmlab.model import ModelConfig, Transformer
from llmlab.train import OptimConfig, Rollback, Skip, StepStats, TrainConfig, Trainer
from llmlab.train.faults import CorruptBatches, GradScaleFault
from llmlab.train.launch import seed_everything
from llmlab.train.metrics import read_metrics
from llmlab.train.pretrain import lm_loss, make_eval
from llmlab.train.spike import RollingStats, SpikeConfig, SpikeGuard, outlier_reason
from llmlab.train.trainer import TrainingDiverged

V = 64




@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("spikedata") / "shards"
    write_shard_dir(out, {"train": [affine_stream(30000, V, 0)], "val": [affine_stream(3000, V, 2)]},
                    vocab_size=V, extra={"tokenizer": {"vocab_size": V, "eos_id": None}})
    return out


# ------------------------------------------------------------------ detection rules

def _stats(step, loss, grad=1.0, rng=(0, 1)):
    return StepStats(step=step, loss=loss, grad_norm=grad, lr=1e-3, tokens=10, metrics={}, batch_range=rng)


class _FakeTrainer:
    def __init__(self):
        self.skipped, self._events, self.checkpointer, self.batches, self.step = [], [], None, None, 0


def _fed(cfg, values):
    guard, trainer = SpikeGuard(cfg), _FakeTrainer()
    for i, v in enumerate(values):
        assert guard.before_optimizer_step(trainer, _stats(i, v, rng=(i, i + 1))) is None
    return guard, trainer


def test_rolling_stats_match_numpy():
    r = RollingStats(4)
    for v in [1.0, 5.0, 2.0, 8.0, 3.0, 4.0]:
        r.add(v)
    mean, std = r.mean_std()
    assert mean == pytest.approx(np.mean([2, 8, 3, 4])) and std == pytest.approx(np.std([2, 8, 3, 4]))


def test_rules_need_both_z_and_ratio():
    r = RollingStats(10)
    for v in [2.0, 2.1, 1.9, 2.0, 2.1, 1.9, 2.0, 2.0]:
        r.add(v)  # mean 2.0, std ~0.0707
    # 2.6 is 8.5 sigma above but only 1.3x the mean: not a spike at ratio 1.5
    assert outlier_reason(2.6, r, z=6, ratio=1.5, name="loss", armed=True) is None
    # 3.5 is 1.75x and 21 sigma: a spike
    assert "sigma" in outlier_reason(3.5, r, z=6, ratio=1.5, name="loss", armed=True)
    # 3.5 with a huge z threshold is not
    assert outlier_reason(3.5, r, z=50, ratio=1.5, name="loss", armed=True) is None
    # not armed: only non-finite values count
    assert outlier_reason(100.0, r, z=6, ratio=1.5, name="loss", armed=False) is None
    assert outlier_reason(math.nan, r, z=6, ratio=1.5, name="loss", armed=False) == "loss is nan"
    assert outlier_reason(math.inf, r, z=6, ratio=1.5, name="grad", armed=False) == "grad is inf"


def test_warmup_then_single_skip_then_sustained_rollback_target():
    cfg = SpikeConfig(window=10, warmup=5, min_samples=5, sustain=3, rollback_steps=4, skip_batches=2)
    noise = [2.0, 2.1, 1.95, 2.05, 2.0, 1.9, 2.1, 2.0]
    guard, trainer = _fed(cfg, noise)
    # a lone outlier is skipped and its data recorded as skipped
    action = guard.before_optimizer_step(trainer, _stats(8, 9.0, rng=(8, 9)))
    assert isinstance(action, Skip) and trainer.skipped == [(8, 9)]
    assert trainer._events[-1]["type"] == "spike" and trainer._events[-1]["consecutive"] == 1
    # the outlier did not enter the window; a normal step resets the streak
    assert 9.0 not in guard.losses.values
    assert guard.before_optimizer_step(trainer, _stats(9, 2.0, rng=(9, 10))) is None
    assert guard.streak == []


def test_grad_norm_spike_and_nonfinite_before_arming():
    cfg = SpikeConfig(window=10, warmup=100, min_samples=5)
    guard, trainer = _fed(cfg, [2.0] * 6)
    # not armed yet (warmup=100): a big grad norm passes, a NaN loss does not
    assert guard.before_optimizer_step(trainer, _stats(6, 2.0, grad=50.0)) is None
    assert isinstance(guard.before_optimizer_step(trainer, _stats(7, math.nan)), Skip)
    cfg = SpikeConfig(window=10, warmup=0, min_samples=5, grad_ratio=5)
    guard, trainer = _fed(cfg, [2.0] * 6)
    action = guard.before_optimizer_step(trainer, _stats(6, 2.0, grad=50.0))
    assert isinstance(action, Skip) and "grad norm" in action.reason


def test_config_validation_names_key():
    with pytest.raises(ConfigError, match="spike.min_samples"):
        SpikeGuard(SpikeConfig(window=5, min_samples=10))
    with pytest.raises(ConfigError, match="spike.loss_ratio"):
        SpikeGuard(SpikeConfig(loss_ratio=0.5))


# ------------------------------------------------------------------ end to end

MODEL = dict(n_layer=2, n_head=2, d_model=32, block_size=32, position="learned", norm="layernorm",
             mlp="gelu", bias=True, tie_embeddings=True, dropout=0.0)
GUARD = SpikeConfig(window=30, warmup=20, min_samples=10, sustain=3, rollback_steps=10, skip_batches=4,
                    max_rollbacks=2)


def _run(shards, run_dir, guard: SpikeConfig | None, poison=(), grad_fault=(), grad_clip=1.0, steps=200):
    seed_everything(0)
    model = Transformer(ModelConfig(vocab_size=V, **MODEL))
    loader = TokenLoader(shards, "train", 32, 8, seed=0)
    val = TokenLoader(shards, "val", 32, 8, seed=0)
    batches = CorruptBatches(loader, poison) if poison else loader
    callbacks, loss_fn = [], lm_loss
    if grad_fault:
        fault = GradScaleFault(grad_fault, factor=1e4)
        callbacks.append(fault)
        loss_fn = fault.wrap(lm_loss)
    if guard is not None:
        callbacks.append(SpikeGuard(guard))
    optim = OptimConfig(lr=2e-3, warmup_steps=10, max_steps=steps, grad_clip=grad_clip)
    train = TrainConfig(eval_every=0, eval_batches=8, ckpt_every=10, keep_last=2, device="cpu", seed=0,
                        progress=False, plot=False, peak_flops=1e11)
    trainer = Trainer(model, loss_fn, batches, optim, train, run_dir=run_dir, eval_fn=make_eval(val, 8),
                      callbacks=callbacks)
    summary = trainer.fit()
    return summary, trainer


def _events(run_dir, kind):
    return [e for r in read_metrics(run_dir / "metrics.jsonl") for e in r.get("events") or []
            if e["type"] == kind]


def test_poisoned_batches_rolled_back_and_skipped(shards, tmp_path):
    poison = range(185, 197)  # a bad stretch of data at loader positions 185..196, late in a 200-step run
    clean, _ = _run(shards, tmp_path / "clean", GUARD)
    guarded, trainer = _run(shards, tmp_path / "guarded", GUARD, poison=poison)
    hurt, _ = _run(shards, tmp_path / "hurt", None, poison=poison)
    print("val loss clean/guarded/unguarded:", clean["val_loss"], guarded["val_loss"], hurt["val_loss"])

    run = tmp_path / "guarded"
    assert [e["consecutive"] for e in _events(run, "spike")] == [1, 2, 3, 1, 2, 3]
    assert len(_events(run, "skip")) == 4  # the first two steps of each streak
    rb = [(e["from_step"], e["to_step"], e["skip"]) for e in _events(run, "rollback")]
    # 1st: spike from step 186 -> newest checkpoint <= 185 - 10 is 170; skip its data through the spike + 4.
    # The bad stretch is longer than that skip, so the replay meets more poison (positions 192..194)
    # and the 2nd rollback goes further back (<= 170 - 10 -> 160) and skips through 194 + 4.
    assert rb == [(187, 170, [170, 188 + 4]), (172, 160, [160, 195 + 4])]
    assert [160, 199] in trainer.batches.state_dict()["skips"]
    assert trainer.batches.served == [185, 186, 187, 192, 193, 194]
    assert guarded["step"] == clean["step"] == 200
    assert abs(guarded["val_loss"] - clean["val_loss"]) <= 0.02 * clean["val_loss"]
    assert hurt["val_loss"] > 1.03 * clean["val_loss"]


def test_grad_blowup_skipped(shards, tmp_path):
    clean, _ = _run(shards, tmp_path / "clean", GUARD, grad_clip=0.0, steps=80)
    guarded, _ = _run(shards, tmp_path / "guarded", GUARD, grad_fault=[60], grad_clip=0.0, steps=80)
    hurt, _ = _run(shards, tmp_path / "hurt", None, grad_fault=[60], grad_clip=0.0, steps=80)
    print("val loss clean/guarded/unguarded:", clean["val_loss"], guarded["val_loss"], hurt["val_loss"])
    spikes = _events(tmp_path / "guarded", "spike")
    assert len(spikes) == 1 and "grad norm" in spikes[0]["reason"] and spikes[0]["step"] == 61
    assert abs(guarded["val_loss"] - clean["val_loss"]) <= 0.02 * clean["val_loss"]
    assert hurt["val_loss"] > 1.02 * clean["val_loss"]


def test_bounded_retries_then_clear_stop(shards, tmp_path):
    # poison everything after position 40: every rollback lands on more poison
    cfg = SpikeConfig(window=20, warmup=10, min_samples=10, sustain=2, rollback_steps=5, skip_batches=0,
                      max_rollbacks=2)
    with pytest.raises(TrainingDiverged, match="max_rollbacks=2"):
        _run(shards, tmp_path / "r", cfg, poison=range(40, 10_000), steps=100)
    assert len(_events(tmp_path / "r", "rollback")) == 2


def test_rollback_pins_needed_checkpoint():
    class Ckpt:
        def __init__(self, steps):
            self.steps, self.pinned = steps, set()

        def all(self):
            return [(s, None) for s in self.steps]

    t = _FakeTrainer()
    t.checkpointer, t.step = Ckpt([10, 20, 30, 40, 50]), 50
    SpikeGuard(SpikeConfig(rollback_steps=25, warmup=10)).on_checkpoint(t, None)
    assert t.checkpointer.pinned == {20, 30, 40, 50}
    assert isinstance(Rollback(to_step=1), Rollback)
