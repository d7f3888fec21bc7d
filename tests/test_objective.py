"""Objectives on the one Trainer: token-weighted accumulation over micro-batches and ranks, LR multipliers per
parameter group, the best checkpoint by the objective's metric, prepare_step and objective state.

The gradient test uses masked SFT-like rows that keep very different numbers of target tokens (1 to 11): a
loop that averaged per-micro-batch means would weigh a row's tokens by how it was split; the Trainer divides
the summed loss by the summed weight, so 1 micro-batch, 4, or 2 ranks x 2 give one gradient.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from llmlab.model import ModelConfig, Transformer
from llmlab.train import Callback, OptimConfig, TrainConfig, Trainer, lr_at
from llmlab.train.objective import LossOutput, NextToken, Objective, as_objective
from llmlab.train.optim import build_optimizer

V, T, ROWS = 64, 12, 4
KEPT = [1, 11, 3, 7]  # target tokens kept per row


def sft_rows() -> tuple[torch.Tensor, torch.Tensor]:
    """ROWS rows of inputs and targets; row i keeps only its last KEPT[i] targets (the "assistant" part)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(V, (ROWS, T), generator=g)
    y = torch.randint(V, (ROWS, T), generator=g)
    for i, kept in enumerate(KEPT):
        y[i, :T - kept] = -100
    return x, y


class Rows:
    """Batch source over rows [lo, hi) of sft_rows(), `per` rows per micro-batch."""

    def __init__(self, per: int, lo: int = 0, hi: int = ROWS):
        self.x, self.y = (t[lo:hi] for t in sft_rows())
        self.per, self.step = per, 0

    def next_batch(self):
        a = self.step * self.per
        self.step += 1
        return self.x[a:a + self.per], self.y[a:a + self.per]

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, state):
        self.step = state["step"]


class GradGrab(Callback):
    """Keeps the gradient the optimizer is about to apply (after the division by the step's weight)."""

    def before_optimizer_step(self, trainer, stats):
        self.grads = [p.grad.detach().clone() for p in trainer.module.parameters()]
        self.loss = stats.loss


def tiny_model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=V, n_layer=2, n_head=2, d_model=32, block_size=T))


def step_gradient(model, rows: Rows, accum: int) -> GradGrab:
    grab = GradGrab()
    train = TrainConfig(accum_steps=accum, eval_every=0, ckpt_every=0, progress=False, plot=False,
                        peak_flops=1e12)
    Trainer(model, NextToken(), rows, OptimConfig(max_steps=1, warmup_steps=0, grad_clip=0.0), train,
            callbacks=[grab]).fit()
    return grab


def assert_same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    flat_a, flat_b = torch.cat([g.flatten() for g in a]), torch.cat([g.flatten() for g in b])
    assert ((flat_a - flat_b).norm() / flat_a.norm()).item() < 1e-6


def expected_gradient() -> tuple[list[torch.Tensor], float]:
    """The gradient of the mean cross-entropy over every kept token of all rows, computed directly."""
    model = tiny_model()
    x, y = sft_rows()
    loss = nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-100)
    loss.backward()
    return [p.grad for p in model.parameters()], loss.item()


def test_one_or_four_micro_batches_give_the_direct_gradient():
    want, want_loss = expected_gradient()
    whole = step_gradient(tiny_model(), Rows(per=4), accum=1)
    split = step_gradient(tiny_model(), Rows(per=1), accum=4)
    assert_same(whole.grads, want)
    assert_same(split.grads, want)
    assert whole.loss == pytest.approx(want_loss, rel=1e-6)
    assert split.loss == pytest.approx(want_loss, rel=1e-6)


def _rank_main(rank: int, store: str, accum: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        model = nn.parallel.DistributedDataParallel(tiny_model())
        half = ROWS // 2
        grab = step_gradient(model, Rows(per=half // accum, lo=rank * half, hi=(rank + 1) * half), accum)
        if rank == 0:
            torch.save({"grads": grab.grads, "loss": grab.loss}, out)
        # Neither rank may tear gloo down while the other still has work in flight: an early destroy
        # aborted the other process now and then ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("accum", [1, 2])
def test_two_ranks_give_the_single_process_gradient(tmp_path, accum):
    out = tmp_path / "grads.pt"
    mp.spawn(_rank_main, args=(str(tmp_path / "store"), accum, str(out)), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)
    want, want_loss = expected_gradient()
    assert_same(got["grads"], want)
    assert got["loss"] == pytest.approx(want_loss, rel=1e-6)


class Scaled(Objective):
    """Next-token loss with the LM head at 10x the LR; counts prepare_step calls and keeps them as state."""

    def __init__(self, evals=()):
        self.prepared, self.evals = 0, list(evals)

    def loss(self, model, batch):
        return NextToken().loss(model, batch)

    def prepare_step(self, trainer):
        self.prepared += 1

    def param_groups(self, module):
        return [{"params": [module.lm_head.weight], "lr_mult": 10.0}]

    def evaluate(self, model):
        return {"accuracy": self.evals.pop(0)} if self.evals else {}

    def state_dict(self):
        return {"prepared": self.prepared}

    def load_state_dict(self, state):
        self.prepared = state["prepared"]


class HigherIsBetter(Scaled):
    best_metric, higher_is_better = "accuracy", True


def test_lr_mult_groups_and_objective_state(tmp_path):
    model = Transformer(ModelConfig(vocab_size=V, n_layer=1, n_head=2, d_model=32, block_size=T,
                                    tie_embeddings=False))
    objective = Scaled()
    train = TrainConfig(eval_every=0, ckpt_every=0, progress=False, plot=False, peak_flops=1e12)
    t = Trainer(model, objective, Rows(per=1), OptimConfig(lr=1e-3, max_steps=3, warmup_steps=0), train,
                run_dir=tmp_path)
    head = [g for g in t.optimizer.param_groups if any(p is model.lm_head.weight for p in g["params"])]
    assert len(head) == 1 and head[0]["lr_mult"] == 10.0 and len(head[0]["params"]) == 1
    n_params = sum(len(g["params"]) for g in t.optimizer.param_groups)
    assert n_params == len(list(model.parameters()))  # every parameter once
    t.fit()
    assert objective.prepared == 3
    last_lr = lr_at(2, 1e-3, 0, 3)  # the schedule's LR at the last step taken
    assert head[0]["lr"] == pytest.approx(10 * last_lr)
    others = [g for g in t.optimizer.param_groups if g["lr_mult"] == 1.0]
    assert all(g["lr"] == pytest.approx(last_lr) for g in others)
    fresh = Scaled()
    resumed = Trainer(model, fresh, Rows(per=1), OptimConfig(lr=1e-3, max_steps=3, warmup_steps=0), train)
    resumed.restore(tmp_path / "ckpt-000003")
    assert fresh.prepared == 3  # objective state came back from train_state.pt


def test_a_step_with_nothing_kept_is_skipped():
    class NothingKept(Rows):
        def next_batch(self):
            x, y = super().next_batch()
            return x, torch.full_like(y, -100)

    model = tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    events = []

    class Log(Callback):
        def on_step_end(self, trainer, record):
            events.extend(record["events"])

    train = TrainConfig(eval_every=0, ckpt_every=0, progress=False, plot=False, peak_flops=1e12)
    Trainer(model, NextToken(), NothingKept(per=2), OptimConfig(max_steps=1, warmup_steps=0), train,
            callbacks=[Log()]).fit()
    assert events == [{"type": "skip", "reason": "weight 0: nothing to learn from in this step"}]
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_param_groups_refuse_a_parameter_twice():
    model = tiny_model()
    w = model.blocks[0].attn.qkv.weight
    with pytest.raises(ValueError, match="repeats"):
        build_optimizer(model, OptimConfig(), [{"params": [w]}, {"params": [w], "lr_mult": 2.0}])


def test_best_checkpoint_by_a_higher_is_better_metric(tmp_path):
    objective = HigherIsBetter(evals=[0.2, 0.9, 0.5])
    train = TrainConfig(eval_every=1, ckpt_every=1, keep_last=1, progress=False, plot=False, peak_flops=1e12)
    Trainer(tiny_model(), objective, Rows(per=1), OptimConfig(max_steps=3, warmup_steps=0), train,
            run_dir=tmp_path).fit()
    best = json.loads((tmp_path / "best.json").read_text())
    assert best == {"step": 2, "path": "ckpt-000002", "metric": "accuracy", "accuracy": 0.9,
                    "higher_is_better": True}
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-000002", "ckpt-000003"]


def test_weighted_metrics_and_plain_loss_functions():
    class Counting(Objective):
        def loss(self, model, batch):
            x, y = batch
            kept = (y != -100).sum()
            out = NextToken().loss(model, batch)
            return LossOutput(out.loss_sum, kept, {"kept_share": kept.float(), "n_tokens": x.numel()})

    grab = GradGrab()
    records = []

    class Log(Callback):
        def on_step_end(self, trainer, record):
            records.append(record)

    train = TrainConfig(accum_steps=4, eval_every=0, ckpt_every=0, progress=False, plot=False,
                        peak_flops=1e12)
    t = Trainer(tiny_model(), Counting(), Rows(per=1), OptimConfig(max_steps=1, warmup_steps=0), train,
                callbacks=[grab, Log()])
    t.fit()
    # kept_share sums to 22 kept tokens over weight 22: logged as 1; n_tokens is summed (4 rows x 12)
    assert records[0]["kept_share"] == pytest.approx(1.0) and t.tokens == ROWS * T
    with pytest.raises(TypeError, match="eval_fn"):
        as_objective(NextToken(), eval_fn=lambda m: {})
    plain = as_objective(lambda model, batch: (torch.ones(()), {"acc": 0.5}))
    assert plain.loss(None, (torch.zeros(2, 3),)).metrics == {"acc": 0.5, "n_tokens": 6}
