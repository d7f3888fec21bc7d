"""Preference losses (llmlab.align.losses): hand-computed values, and parity with TRL's own loss code.

The TRL parity tests call RewardTrainer.compute_loss and DPOTrainer._compute_loss unbound, on a stand-in
`self` holding only the attributes those methods read and a stand-in model returning fixed outputs, so the
numbers come from TRL's code, not from a copy of its formulas.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from llmlab.align.losses import bradley_terry_loss, dpo_loss, dpo_metrics, reward_metrics
from llmlab.errors import ConfigError

LOG_SIGMOID_1 = -math.log1p(math.exp(-1.0))   # log sigmoid(1)  = -0.31326...
LOG_SIGMOID_M1 = -math.log1p(math.exp(1.0))   # log sigmoid(-1) = -1.31326...

# One pair with policy log-ratios +1 (chosen) and -1 (rejected): h = 2.
PC, PR, RC, RR = (torch.tensor([x]) for x in (-1.0, -3.0, -2.0, -2.0))


def test_bradley_terry_by_hand():
    rc, rr = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    torch.testing.assert_close(bradley_terry_loss(rc, rr), torch.tensor([-LOG_SIGMOID_1, -LOG_SIGMOID_M1]))
    # margin 0.5 on r_c - r_r = 1.5 leaves sigmoid(1)
    got = bradley_terry_loss(torch.tensor([2.0]), torch.tensor([0.5]), margin=torch.tensor([0.5]))
    torch.testing.assert_close(got, torch.tensor([-LOG_SIGMOID_1]))
    # centering adds 0.01 * (2 + 0.5)^2 = 0.0625
    got = bradley_terry_loss(torch.tensor([2.0]), torch.tensor([0.5]), margin=0.5, center_coefficient=0.01)
    torch.testing.assert_close(got, torch.tensor([-LOG_SIGMOID_1 + 0.0625]))


def test_reward_metrics_by_hand():
    m = reward_metrics(torch.tensor([2.0, 0.0, 1.0]), torch.tensor([1.0, 1.0, 1.0]))
    assert m["accuracy"].tolist() == [1.0, 0.0, 0.0]  # a tie is not a win
    assert m["margin"].tolist() == [1.0, -1.0, 0.0]


def test_dpo_sigmoid_by_hand():
    # beta 0.5, h = 2: -log sigmoid(1)
    torch.testing.assert_close(dpo_loss(PC, PR, RC, RR, beta=0.5), torch.tensor([-LOG_SIGMOID_1]))
    # conservative DPO, eps 0.1: 0.9 * 0.31326 + 0.1 * 1.31326
    got = dpo_loss(PC, PR, RC, RR, beta=0.5, label_smoothing=0.1)
    torch.testing.assert_close(got, torch.tensor([-0.9 * LOG_SIGMOID_1 - 0.1 * LOG_SIGMOID_M1]))
    # equal log-ratios: log 2 whatever beta and eps
    torch.testing.assert_close(dpo_loss(PC, PC, RC, RC, beta=3.0, label_smoothing=0.2),
                               torch.tensor([math.log(2)]))


def test_dpo_ipo_by_hand():
    # beta (tau) 0.5: (2 - 1)^2 = 1
    torch.testing.assert_close(dpo_loss(PC, PR, RC, RR, beta=0.5, loss_type="ipo"), torch.tensor([1.0]))
    # per-token: 1/2 - (-1/4) = 0.75 -> (0.75 - 1)^2 = 0.0625
    got = dpo_loss(PC, PR, RC, RR, beta=0.5, loss_type="ipo", chosen_lengths=torch.tensor([2]),
                   rejected_lengths=torch.tensor([4]))
    torch.testing.assert_close(got, torch.tensor([0.0625]))


def test_dpo_metrics_by_hand():
    m = dpo_metrics(PC, PR, RC, RR, beta=0.5)
    assert {k: v.tolist() for k, v in m.items()} == {
        "rewards/chosen": [0.5], "rewards/rejected": [-0.5], "rewards/accuracies": [1.0],
        "rewards/margins": [1.0], "logps/chosen": [-1.0], "logps/rejected": [-3.0]}


def test_unknown_dpo_loss_is_a_config_error():
    with pytest.raises(ConfigError, match="dpo.loss_type='hinge'"):
        dpo_loss(PC, PR, RC, RR, loss_type="hinge")


# ---------------------------------------------------------------- parity with TRL

def _accelerator():
    same = lambda x: x  # noqa: E731  one process: gathering is the identity
    return SimpleNamespace(device=torch.device("cpu"), gather=same, gather_for_metrics=same)


def _trl_reward_loss(rc, rr, margin=None, center=None) -> float:
    from trl import RewardTrainer

    model = SimpleNamespace(training=True)
    logits = torch.cat([rc, rr]).unsqueeze(-1)
    fake = SimpleNamespace(model=model, accelerator=_accelerator(), _total_train_tokens=0, _tp_size=1,
                           _metrics=defaultdict(lambda: defaultdict(list)),
                           args=SimpleNamespace(center_rewards_coefficient=center))
    call = lambda **kw: SimpleNamespace(logits=logits)  # noqa: E731
    inputs = {"input_ids": torch.zeros(2 * len(rc), 3, dtype=torch.long),
              "attention_mask": torch.ones(2 * len(rc), 3, dtype=torch.long)}
    if margin is not None:
        inputs["margin"] = margin
    return float(RewardTrainer.compute_loss(fake, call, inputs))


def test_bradley_terry_matches_trl():
    g = torch.Generator().manual_seed(0)
    rc, rr, margin = (torch.randn(6, generator=g) for _ in range(3))
    assert bradley_terry_loss(rc, rr).mean().item() == pytest.approx(_trl_reward_loss(rc, rr), abs=1e-6)
    ours = bradley_terry_loss(rc, rr, margin=margin, center_coefficient=0.01).mean().item()
    assert ours == pytest.approx(_trl_reward_loss(rc, rr, margin, 0.01), abs=1e-6)


class _FixedLogps:
    """Stands in for the model DPOTrainer calls: returns fixed per-token log-probs (0 outside completions)."""

    training = True

    def __init__(self, per_token: torch.Tensor):
        self.per_token = per_token

    def __call__(self, **kwargs):
        shape = self.per_token.shape
        return SimpleNamespace(log_probs=self.per_token, entropy=torch.zeros(shape),
                               mean_logits=torch.zeros(shape), is_top1=torch.zeros(shape, dtype=torch.bool))


def _pairs(n: int = 5, width: int = 8, seed: int = 0):
    """Per-token log-probs [2n, width] for n pairs (chosen rows first, as TRL batches them), completion masks
    of ragged lengths, and the reference's summed log-probs."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, width, (2 * n,), generator=g)
    # [2n, width + 1], the completion right-aligned
    mask = (torch.arange(width + 1)[None, :] > width - lengths[:, None]).long()
    per_token = -torch.rand(2 * n, width, generator=g) * 3 * mask[:, 1:]
    ref = -torch.rand(2 * n, generator=g) * 3 * lengths
    return per_token, mask, ref


def _trl_dpo_loss(per_token, mask, ref, loss_type: str, beta: float, label_smoothing: float = 0.0) -> float:
    from trl import DPOTrainer

    n = len(ref) // 2
    model = _FixedLogps(per_token)
    fake = SimpleNamespace(model=model, accelerator=_accelerator(), aux_loss_enabled=False, ld_alpha=None,
                           precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type],
                           loss_weights=[1.0], beta=beta, label_smoothing=label_smoothing,
                           use_weighting=False, _metrics=defaultdict(lambda: defaultdict(list)),
                           _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros_like(mask), "attention_mask": torch.ones_like(mask),
              "completion_mask": mask, "ref_chosen_logps": ref[:n], "ref_rejected_logps": ref[n:]}
    loss = DPOTrainer._compute_loss(fake, model, inputs, return_outputs=False)
    _trl_dpo_loss.metrics = {k: v[0] for k, v in fake._metrics["train"].items()}
    return float(loss)


def _ours(per_token, mask, ref, **kw) -> tuple[torch.Tensor, dict]:
    n = len(ref) // 2
    logps, lengths = per_token.sum(1), mask.sum(1)
    args = (logps[:n], logps[n:], ref[:n], ref[n:])
    loss = dpo_loss(*args, chosen_lengths=lengths[:n], rejected_lengths=lengths[n:], **kw)
    return loss, dpo_metrics(*args, beta=kw["beta"])


@pytest.mark.parametrize("loss_type,beta", [("sigmoid", 0.1), ("sigmoid", 0.5), ("ipo", 0.1), ("ipo", 0.5)])
def test_dpo_matches_trl(loss_type, beta):
    per_token, mask, ref = _pairs()
    loss, metrics = _ours(per_token, mask, ref, beta=beta, loss_type=loss_type)
    assert loss.mean().item() == pytest.approx(_trl_dpo_loss(per_token, mask, ref, loss_type, beta), abs=1e-6)
    trl_metrics = _trl_dpo_loss.metrics
    for name, values in metrics.items():
        assert values.mean().item() == pytest.approx(trl_metrics[name], abs=1e-5), name


def test_conservative_dpo_matches_trl():
    """TRL 1.16's sigmoid loss has no label smoothing; its "aot" loss sorts the batch's log-ratios and then
    applies exactly the conservative-DPO formula, so on one pair at a time (nothing to sort) it is cDPO."""
    per_token, mask, ref = _pairs(n=4)
    ours, _ = _ours(per_token, mask, ref, beta=0.2, label_smoothing=0.15)
    for i in range(4):
        rows = [i, 4 + i]
        theirs = _trl_dpo_loss(per_token[rows], mask[rows], ref[rows], "aot", 0.2, label_smoothing=0.15)
        assert ours[i].item() == pytest.approx(theirs, abs=1e-6)
