"""The generic Trainer: schedule, weight-decay groups, accumulation, clipping, resume, checkpoints, metrics.

These use a small model and batch source defined here, so they exercise the loop exactly as a new objective
would plug into it (a loss function and a batch source); tests/test_train_pretrain.py covers the
Transformer + TokenLoader wiring.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llmlab.errors import CheckpointError
from llmlab.train import (
    Callback,
    Checkpointer,
    OptimConfig,
    Rollback,
    Skip,
    TrainConfig,
    Trainer,
    lr_at,
    param_groups,
)
from llmlab.train.checkpoint import read_train_state, resolve_resume
from llmlab.train.metrics import read_metrics
from llmlab.train.plot import plot_run, superseded

V, T = 32, 8



class Toy(nn.Module):
    """Embedding -> pre-norm residual MLP with dropout -> head, enough to learn a next-token map."""

    def __init__(self, dropout: float = 0.0, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(V, 16)
        self.norm = nn.LayerNorm(16)
        self.mix = nn.Linear(16, 16)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(16, V, bias=False)

    def forward(self, idx):
        h = self.emb(idx)
        h = h + self.drop(torch.relu(self.mix(self.norm(h))))
        return self.head(h)


class Sequences:
    """Sequence j follows x[t+1] = (5 x[t] + 3) mod V from a start drawn from (seed, j); batches are
    consecutive sequences, so micro-batches 2+2 cover exactly what one batch of 4 covers."""

    def __init__(self, batch_size: int, seed: int = 0):
        self.batch_size, self.seed, self.step, self.skips = batch_size, seed, 0, []

    def _sequence(self, j: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + j)
        x = [int(torch.randint(V, (1,), generator=g))]
        for _ in range(T):
            x.append((5 * x[-1] + 3) % V)
        return torch.tensor(x)

    def next_batch(self):
        while any(a <= self.step < b for a, b in self.skips):
            self.step = next(b for a, b in self.skips if a <= self.step < b)
        first = self.step * self.batch_size
        data = torch.stack([self._sequence(j) for j in range(first, first + self.batch_size)])
        self.step += 1
        return data[:, :-1], data[:, 1:]

    def skip(self, a: int, b: int) -> None:
        self.skips = sorted({*self.skips, (a, b)})

    def state_dict(self):
        return {"step": self.step, "skips": [list(s) for s in self.skips]}

    def load_state_dict(self, state):
        self.step, self.skips = state["step"], [tuple(s) for s in state["skips"]]


def lm_loss(model, batch):
    x, y = batch
    logits = model(x)
    acc = (logits.argmax(-1) == y).float().mean()
    return F.cross_entropy(logits.reshape(-1, V), y.reshape(-1)), {"acc": acc}


def make_trainer(tmp_path=None, *, micro=4, accum=1, steps=6, dropout=0.0, seed=0, callbacks=(), eval_fn=None,
                 **train_kw):
    optim = OptimConfig(lr=1e-2, warmup_steps=2, max_steps=steps, weight_decay=0.1, grad_clip=1.0)
    kw = dict(accum_steps=accum, eval_every=0, ckpt_every=0, progress=False, plot=False, peak_flops=1e12)
    train = TrainConfig(**{**kw, **train_kw})
    model = Toy(dropout, seed)
    flops = 6 * sum(p.numel() for p in model.parameters())  # 6N per token (Kaplan et al. 2020)
    return Trainer(model, lm_loss, Sequences(micro), optim, train, run_dir=tmp_path,
                   callbacks=callbacks, eval_fn=eval_fn, flops_per_token=flops)


class StopAt(Callback):
    """Ask the loop to stop (checkpoint and return) after step n, like a SIGTERM handler would."""

    def __init__(self, n):
        self.n = n

    def on_step_end(self, trainer, record):
        if trainer.step == self.n:
            trainer.should_stop = True


def params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------ schedule and optimizer

def test_lr_schedule_values():
    # lr=1e-3, warmup 10, 110 steps, floor 1e-4: hand-computed values
    def at(s):
        return lr_at(s, 1e-3, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)

    assert at(0) == pytest.approx(1e-4)           # (0+1)/10 of the peak
    assert at(4) == pytest.approx(5e-4)
    assert at(9) == pytest.approx(1e-3)           # warmup ends at the peak
    assert at(10) == pytest.approx(1e-3)          # cosine starts at the peak
    assert at(35) == pytest.approx(1e-4 + 9e-4 * 0.5 * (1 + math.cos(math.pi / 4)))  # 8.6819805e-4
    assert at(35) == pytest.approx(8.6819805e-4)
    assert at(60) == pytest.approx(5.5e-4)        # halfway: midpoint of peak and floor
    assert at(110) == pytest.approx(1e-4)         # the floor at max_steps ...
    assert at(500) == pytest.approx(1e-4)         # ... and after it
    assert lr_at(0, 3e-4, warmup_steps=0, max_steps=10, min_lr_ratio=0.0) == pytest.approx(3e-4)
    assert lr_at(10, 3e-4, warmup_steps=0, max_steps=10, min_lr_ratio=0.0) == 0.0


def test_weight_decay_groups_and_effect():
    model = Toy()
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in decay["params"]} == {"emb.weight", "mix.weight", "head.weight"}
    assert {names[id(p)] for p in no_decay["params"]} == {"norm.weight", "norm.bias", "mix.bias"}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0

    # With zero gradients, AdamW's update is pure decoupled decay: p <- p * (1 - lr * wd) on matrices only.
    model.head.weight = model.emb.weight  # tied: must appear once
    assert sum(len(g["params"]) for g in param_groups(model, 0.1)) == len(list(model.parameters())) == 5
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=0.5, foreach=True)
    before = params(model)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for name, p in model.named_parameters():
        factor = (1 - 0.5 * 0.1) if p.dim() >= 2 else 1.0
        torch.testing.assert_close(p.detach(), before[name] * factor, rtol=0, atol=1e-7)


# ------------------------------------------------------------------ the loop

def test_grad_accumulation_matches_bigger_batch():
    a = make_trainer(micro=2, accum=2, steps=4)
    b = make_trainer(micro=4, accum=1, steps=4)
    sa, sb = a.fit(), b.fit()
    assert sa["tokens"] == sb["tokens"] == 4 * 4 * T
    for (name, pa), pb in zip(a.model.named_parameters(), b.model.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-6, msg=name)


def test_resume_is_bitwise_identical_with_dropout(tmp_path):
    full = make_trainer(tmp_path / "full", dropout=0.2, steps=7, accum=2, micro=2, ckpt_every=3)
    full.fit()

    part = make_trainer(tmp_path / "part", dropout=0.2, steps=7, accum=2, micro=2, ckpt_every=3,
                        callbacks=[StopAt(4)])
    part.fit()
    assert part.step == 4 and (tmp_path / "part" / "ckpt-000004").is_dir()
    torch.manual_seed(999)  # the resumed process's RNG must come from the checkpoint, not from here
    resumed = make_trainer(tmp_path / "part", dropout=0.2, steps=7, accum=2, micro=2, ckpt_every=3, seed=5)
    resumed.resume(resolve_resume("auto", tmp_path / "part"))
    assert resumed.step == 4
    resumed.fit()

    pairs = zip(full.model.state_dict().items(), resumed.model.state_dict().values(), strict=True)
    for (name, p), q in pairs:
        assert torch.equal(p, q), name
    full_losses = [r["loss"] for r in read_metrics(tmp_path / "full" / "metrics.jsonl") if "loss" in r]
    part_losses = [r["loss"] for r in read_metrics(tmp_path / "part" / "metrics.jsonl") if "loss" in r]
    assert full_losses == part_losses  # metrics after the stop point were truncated and re-logged


def test_checkpoint_round_trip(tmp_path):
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    run = tmp_path / "run"
    t = make_trainer(run, steps=5, ckpt_every=1, keep_last=2, dropout=0.1)
    t.checkpointer.tokenizer_dir = tok
    t.fit()
    ckpts = sorted(p.name for p in run.iterdir() if p.name.startswith("ckpt-"))
    assert ckpts == ["ckpt-000004", "ckpt-000005"]  # keep_last=2
    assert not list(run.glob(".ckpt-*"))            # no temp dirs left behind
    last = run / "ckpt-000005"
    assert {p.name for p in last.iterdir()} == {"config.json", "model.safetensors", "train_state.pt",
                                                "tokenizer"}
    assert (last / "tokenizer" / "tokenizer.json").read_text() == "{}"

    state = torch.load(last / "train_state.pt", weights_only=True)
    assert state["step"] == 5 and state["tokens"] == 5 * 4 * T and state["batches"]["step"] == 5
    assert "tokenizer/tokenizer.json" in state["files"]

    fresh = make_trainer(run, steps=5, seed=3, dropout=0.1)
    fresh.restore(last)
    for (name, p), q in zip(t.model.state_dict().items(), fresh.model.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    for (ka, va), (kb, vb) in zip(t.optimizer.state.items(), fresh.optimizer.state.items(), strict=True):
        assert ka.shape == kb.shape and all(torch.equal(va[k], vb[k]) for k in va)
    assert fresh.batches.step == 5 and fresh.step == 5

    # incomplete or mismatched checkpoints are one clear error each
    (last / "train_state.pt").unlink()
    with pytest.raises(CheckpointError, match="missing train_state.pt"):
        read_train_state(last)
    assert Checkpointer(run).latest() == run / "ckpt-000004"  # auto-resume skips the incomplete one
    (run / "ckpt-000004" / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="missing tokenizer/tokenizer.json"):
        read_train_state(run / "ckpt-000004")


def test_checkpoint_that_does_not_fit_the_model(tmp_path):
    t = make_trainer(tmp_path, steps=1)
    t.fit()
    other = make_trainer(tmp_path / "other", steps=1)
    other.model.mix = nn.Linear(16, 8)  # a different shape
    with pytest.raises(CheckpointError, match=r"tensor .mix.weight. has shape \(16, 16\)"):
        other.restore(tmp_path / "ckpt-000001")


def test_metrics_records(tmp_path):
    t = make_trainer(tmp_path, steps=4, micro=2, accum=2, ckpt_every=2, eval_every=2,
                     eval_fn=lambda m: {"val_loss": 1.5})
    summary = t.fit()
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        assert {"step", "tokens", "loss", "lr", "grad_norm", "clipped", "tokens_per_s", "mfu", "events",
                "acc"} <= set(r)
        assert r["tokens"] == r["step"] * 2 * 2 * T
        assert r["lr"] == pytest.approx(lr_at(r["step"] - 1, 1e-2, 2, 4, 0.1))
        assert r["clipped"] == (r["grad_norm"] > 1.0)
        assert r["tokens_per_s"] > 0
        assert r["mfu"] == pytest.approx(t.flops_per_token * r["tokens_per_s"] / 1e12)
    types = [[e["type"] for e in r["events"]] for r in records]
    assert types == [[], ["eval", "checkpoint"], [], ["eval", "checkpoint"]]
    assert records[1]["val_loss"] == 1.5 and summary["val_loss"] == 1.5
    line = (tmp_path / "metrics.jsonl").read_text().splitlines()[0]
    assert json.loads(line)["step"] == 1  # strict JSON, one object per line


def test_cpu_peak_is_the_fastest_product_of_its_timing_window(monkeypatch):
    """A busy moment at the start (slow products) must not set the peak: the GEMM repeats for min_seconds
    and at least min_reps times, and the fastest product counts; max_reps bounds it. A fake clock that only
    the fake products advance makes this exact."""
    from llmlab.train import metrics

    clock = [0.0]
    durations = iter([0.5] + [0.04] * 3 + [0.01] * 200)  # warm-up, a busy start, then an idle core
    products = []

    def fake_mm(a, b):
        seconds = next(durations)
        clock[0] += seconds
        products.append(seconds)

    monkeypatch.setattr(metrics.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(metrics.torch, "mm", fake_mm)
    monkeypatch.setattr(metrics, "_measured", {})
    cpu = torch.device("cpu")
    peak = metrics.measure_matmul_flops(cpu, torch.float32, n=8, min_seconds=0.1)
    assert peak == pytest.approx(2 * 8**3 / 0.01)
    assert products == [0.5, 0.04, 0.04, 0.04, 0.01]  # 0.13 s and 4 products after the warm-up
    monkeypatch.setattr(metrics, "_measured", {})
    products.clear()
    metrics.measure_matmul_flops(cpu, torch.float32, n=8, min_seconds=100.0, max_reps=6)
    assert len(products) == 1 + 6


def test_loss_decreases_on_a_learnable_sequence(tmp_path):
    t = make_trainer(tmp_path, steps=60, micro=8)
    t.optim_cfg.lr = 3e-2
    t.fit()
    records = read_metrics(tmp_path / "metrics.jsonl")
    first, last = records[0]["loss"], records[-1]["loss"]
    assert first > 3.0 and last < 0.5 * first
    assert records[-1]["acc"] > 0.6


# ------------------------------------------------------------------ hooks for the spike guard

class Scripted(Callback):
    """Returns the given action at given step indices (0-based), records what it saw."""

    name = "scripted"

    def __init__(self, actions):
        self.actions, self.seen = actions, []

    def before_optimizer_step(self, trainer, stats):
        self.seen.append((stats.step, stats.batch_range))
        return self.actions.pop(stats.step, None)


def test_skip_leaves_weights_untouched():
    cb = Scripted({2: Skip("test")})
    t = make_trainer(steps=4, callbacks=[cb])
    snaps = []
    cb.on_step_end = lambda trainer, record: snaps.append((params(trainer.model), record["events"]))
    t.fit()
    for k in snaps[1][0]:
        assert torch.equal(snaps[1][0][k], snaps[2][0][k]), k  # step 3 (index 2) applied no update
    assert snaps[2][1] == [{"type": "skip", "reason": "test"}]
    assert not torch.equal(snaps[2][0]["mix.weight"], snaps[3][0]["mix.weight"])
    assert [r for _, r in cb.seen] == [(0, 1), (1, 2), (2, 3), (3, 4)]


def test_nonfinite_step_is_skipped():
    calls = {"n": 0}

    def sometimes_nan(model, batch):
        calls["n"] += 1
        loss, metrics = lm_loss(model, batch)
        return (loss * float("nan") if calls["n"] == 2 else loss), metrics

    t = make_trainer(steps=3)
    t.objective.loss_fn = sometimes_nan
    t.fit()
    assert calls["n"] == 3 and t.step == 3
    assert all(torch.isfinite(p).all() for p in t.model.parameters())


def test_rollback_restores_and_skips_data(tmp_path):
    cb = Scripted({4: Rollback(to_step=2, skip=(2, 5), reason="spike")})
    t = make_trainer(tmp_path, steps=6, ckpt_every=2, keep_last=5, callbacks=[cb])
    t.fit()
    assert t.step == 6
    # after going back to step 2 the batch source jumped over positions 2..4
    assert [s for s, _ in cb.seen] == [0, 1, 2, 3, 4, 2, 3, 4, 5]
    # (the first range after the jump starts at the old position: it spans the skipped positions too)
    assert [r for _, r in cb.seen][5:] == [(2, 6), (6, 7), (7, 8), (8, 9)]
    assert t.batches.skips == [(2, 5)] and t.skipped == [(2, 5)]
    records = read_metrics(tmp_path / "metrics.jsonl")
    rb = [e for r in records for e in r["events"] if e["type"] == "rollback"]
    assert rb == [{"type": "rollback", "from_step": 4, "to_step": 2, "skip": [2, 5], "reason": "spike"}]
    assert superseded(records)[:4] == [False, False, True, True]  # steps 3, 4 were undone
    # a resume from the final checkpoint keeps the skip list
    assert read_train_state(tmp_path / "ckpt-000006")["skipped"] == [[2, 5]]


def test_plot_writes_pngs(tmp_path):
    t = make_trainer(tmp_path, steps=3, eval_every=1, eval_fn=lambda m: {"val_loss": 2.0})
    t.fit()
    paths = plot_run(tmp_path)
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def test_time_limit_ends_the_run_with_eval_and_checkpoint(tmp_path):
    t = make_trainer(tmp_path, steps=50, max_minutes=1e-9, eval_fn=lambda m: {"val_loss": 1.0})
    summary = t.fit()
    assert summary["step"] == 1 and summary["val_loss"] == 1.0 and (tmp_path / "ckpt-000001").is_dir()
    last = read_metrics(tmp_path / "metrics.jsonl")[-1]
    assert [e["type"] for e in last["events"]] == ["time_limit", "eval", "checkpoint"]


def test_checkpoint_uses_a_models_own_save(tmp_path):
    from safetensors.torch import save_model

    class SavingToy(Toy):
        def save(self, path):  # replaces `path` whole, like Transformer.save
            path.mkdir(parents=True, exist_ok=False)
            save_model(self, str(path / "model.safetensors"))
            (path / "config.json").write_text('{"kind": "toy"}')

    model = SavingToy()
    t = Trainer(model, lm_loss, Sequences(2), OptimConfig(max_steps=1, warmup_steps=0),
                TrainConfig(progress=False, plot=False, peak_flops=1.0), run_dir=tmp_path)
    t.fit()
    ckpt = tmp_path / "ckpt-000001"
    assert sorted(p.name for p in ckpt.iterdir()) == ["config.json", "model.safetensors", "train_state.pt"]
    assert (ckpt / "config.json").read_text() == '{"kind": "toy"}'
    other = Trainer(SavingToy(seed=1), lm_loss, Sequences(2), OptimConfig(max_steps=1),
                    TrainConfig(progress=False, plot=False), run_dir=tmp_path)
    other.restore(ckpt)
    for (name, p), q in zip(model.state_dict().items(), other.model.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


# ------------------------------------------------------------------ best checkpoint, barriers, TensorBoard

def scripted_eval(values):
    """eval_fn returning the given val losses in order (one per evaluation)."""
    it = iter(values)
    return lambda model: {"val_loss": next(it)}


def test_best_checkpoint_survives_pruning_and_resume(tmp_path):
    # val loss is lowest at step 2; keep_last=1 would otherwise delete ckpt-2 at step 3
    kw = dict(steps=6, ckpt_every=1, eval_every=1, keep_last=1)
    t = make_trainer(tmp_path, callbacks=[StopAt(4)], eval_fn=scripted_eval([3.0, 1.0, 2.0, 2.5]), **kw)
    t.fit()
    ckpts = sorted(p.name for p in tmp_path.glob("ckpt-*"))
    assert ckpts == ["ckpt-000002", "ckpt-000004"]
    best = json.loads((tmp_path / "best.json").read_text())
    assert best == {"step": 2, "path": "ckpt-000002", "metric": "val_loss", "val_loss": 1.0,
                    "higher_is_better": False}
    assert resolve_resume("best", tmp_path) == tmp_path / "ckpt-000002"
    ckpt_events = [e for r in read_metrics(tmp_path / "metrics.jsonl") for e in r["events"]
                   if e["type"] == "checkpoint"]
    assert [e.get("best", False) for e in ckpt_events] == [True, True, False, False]
    best = make_trainer(tmp_path, **kw)
    best.restore(resolve_resume("best", tmp_path))
    assert best.step == 2 and best.last_eval == {"val_loss": 1.0}

    # a new process resuming the run still protects ckpt-2 until a better one appears, which replaces it
    resumed = make_trainer(tmp_path, eval_fn=scripted_eval([1.5, 0.5]), **kw)
    resumed.resume(resolve_resume("auto", tmp_path))
    assert resumed.step == 4
    resumed.fit()
    assert resumed.step == 6
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-000006"]
    assert json.loads((tmp_path / "best.json").read_text())["step"] == 6


def test_best_record_rules(tmp_path):
    off = make_trainer(tmp_path / "off", steps=3, ckpt_every=1, eval_every=1, keep_last=1, keep_best=False,
                       eval_fn=scripted_eval([1.0, 2.0, 3.0]))
    off.fit()
    assert sorted(p.name for p in (tmp_path / "off").glob("ckpt-*")) == ["ckpt-000003"]
    assert not (tmp_path / "off" / "best.json").exists()
    with pytest.raises(CheckpointError, match="--resume auto"):
        resolve_resume("best", tmp_path / "off")

    t = make_trainer(tmp_path / "on", steps=1)
    ck = t.checkpointer
    ck.save(1, t.model, t.state_dict())
    assert not ck.update_best(1, None) and ck.best() is None          # not evaluated at this step
    assert not ck.update_best(1, float("nan")) and ck.best() is None  # a diverged eval never wins
    assert ck.update_best(1, 2.0) and ck.best()["step"] == 1
    ck.save(2, t.model, t.state_dict())
    assert not ck.update_best(2, 2.0) and ck.best()["step"] == 1  # a tie keeps the earlier one
    # ckpt-1 written again (e.g. after a rollback): its old val loss no longer describes it
    ck.save(1, t.model, t.state_dict())
    assert ck.best() is None


def test_ranks_wait_for_checkpoint_writes(tmp_path, monkeypatch):
    """Trainer.save ends with a barrier (after the checkpoint is complete on disk) and a rollback starts
    with one, so under DDP no rank picks or reads a checkpoint rank 0 is still writing."""
    import llmlab.train.trainer as trainer_mod

    log = []
    monkeypatch.setattr(trainer_mod, "barrier",
                        lambda: log.append(("barrier", sorted(p.name for p in tmp_path.glob("ckpt-*")))))
    cb = Scripted({3: Rollback(to_step=2, skip=(2, 3), reason="test")})
    t = make_trainer(tmp_path, steps=4, ckpt_every=2, keep_last=5, callbacks=[cb])
    restore = t.restore
    t.restore = lambda path: (log.append(("restore", path.name)), restore(path))[1]
    t.fit()
    assert log == [("barrier", ["ckpt-000002"]),                                  # save at step 2
                   ("barrier", ["ckpt-000002"]), ("restore", "ckpt-000002"),      # rollback at step 4
                   ("barrier", ["ckpt-000002", "ckpt-000004"])]                   # final save


def test_tensorboard_missing_is_a_config_error(tmp_path, monkeypatch):
    import sys

    from llmlab.errors import ConfigError

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard -> ImportError
    with pytest.raises(ConfigError, match="pip install tensorboard") as e:
        make_trainer(tmp_path / "run", steps=1, tensorboard=True)
    assert "\n" not in str(e.value) and not (tmp_path / "run").exists()


def test_tensorboard_scalars_match_metrics(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    t = make_trainer(tmp_path, steps=4, eval_every=2, tensorboard=True, eval_fn=scripted_eval([2.0, 1.5]))
    t.fit()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    records = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu"):
        events = acc.Scalars(f"train/{key}")
        assert [e.step for e in events] == [1, 2, 3, 4]
        assert [e.value for e in events] == pytest.approx([r[key] for r in records], rel=1e-6)
    assert [(e.step, e.value) for e in acc.Scalars("train/val_loss")] == [(2, 2.0), (4, 1.5)]


def test_ranks_agree_on_stopping(tmp_path, monkeypatch):
    """Under DDP a stop seen by any rank (SIGTERM, time cap) must stop every rank at the same step."""
    import torch.distributed as dist

    t = make_trainer(tmp_path, steps=50)
    t.world_size = 2  # pretend another rank exists whose flags are (time_up=False, should_stop=True)

    def all_reduce(values, op):
        assert op == dist.ReduceOp.MAX
        values.copy_(torch.maximum(values, torch.tensor([0, 1])))

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    monkeypatch.setattr(t, "_sum_over_ranks", lambda v: v)
    assert t._agree(False, False) == (False, True)
    assert t._agree(True, False) == (True, True)
    t.fit()
    assert t.step == 1  # the other rank's stop ended this rank's run after its first step, with a checkpoint
    assert (tmp_path / "ckpt-000001").is_dir()
