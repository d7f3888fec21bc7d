"""llmlab.align.rl: GAE, whitening, PPO's clipped losses, KL estimators, rewards, group baselines and the
KL controller, each against numbers worked out by hand (or a closed form)."""

from __future__ import annotations

import math

import pytest
import torch

from llmlab.align import rl


def test_gae_matches_a_hand_worked_example():
    # Row 0: three real tokens; row 1: two real tokens and one pad (its value 9.0 must not leak in).
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, 2.0, 5.0]])
    values = torch.tensor([[0.5, 0.2, 0.4], [1.0, 0.3, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = rl.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # Row 0: delta2 = 1 - 0.4 = 0.6; delta1 = 0.9*0.4 - 0.2 = 0.16; A1 = 0.16 + 0.72*0.6 = 0.592;
    #        delta0 = 0.9*0.2 - 0.5 = -0.32; A0 = -0.32 + 0.72*0.592 = 0.10624.
    # Row 1: the episode ends after column 1: A1 = 2 - 0.3 = 1.7; A0 = 0.5 + 0.9*0.3 - 1 + 0.72*1.7 = 0.994.
    torch.testing.assert_close(adv, torch.tensor([[0.10624, 0.592, 0.6], [0.994, 1.7, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.60624, 0.792, 1.0], [1.994, 2.0, 0.0]]))


def test_gae_with_gamma_lambda_one_is_the_return_to_go_minus_value():
    rewards = torch.tensor([[1.0, -2.0, 3.0, 0.5]])
    values = torch.tensor([[0.3, 0.1, -0.4, 0.2]])
    adv, ret = rl.gae(rewards, values, torch.ones(1, 4), gamma=1.0, lam=1.0)
    to_go = torch.tensor([[2.5, 1.5, 3.5, 0.5]])
    torch.testing.assert_close(ret, to_go)
    torch.testing.assert_close(adv, to_go - values)


def test_whiten_is_zero_mean_unit_variance_on_real_tokens_and_zero_on_pads():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, -50.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    w = rl.whiten(x, mask)
    real = w[mask.bool()]
    assert abs(float(real.mean())) < 1e-6
    assert abs(float(real.var()) - 1.0) < 1e-5  # unbiased, as masked_var
    assert w[1, 1] == 0 and w[1, 2] == 0
    kept_mean = rl.whiten(x, mask, shift_mean=False)[mask.bool()].mean()  # scaled, the mean put back
    assert abs(float(kept_mean) - 2.5) < 1e-5


def test_clipped_surrogate_on_crafted_ratios():
    old = torch.zeros(1, 4)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1, 0.7]]))
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    terms = rl.policy_loss_terms(new, old, adv, clip_eps=0.2)
    # ratio 1.5, A=+1: the clipped -1.2 wins (no gain past 1.2); 0.5, A=+1: unclipped -0.5 (pessimistic);
    # 1.1, A=-1: inside the range, 1.1; 0.7, A=-1: clipped 0.8 wins.
    torch.testing.assert_close(terms["loss"], torch.tensor([[-1.2, -0.5, 1.1, 0.8]]))
    assert terms["clipped"].tolist() == [[1.0, 0.0, 0.0, 1.0]]
    torch.testing.assert_close(terms["ratio"], torch.tensor([[1.5, 0.5, 1.1, 0.7]]))
    torch.testing.assert_close(terms["approxkl"], 0.5 * new ** 2)
    # One advantage per sequence broadcasts over its tokens (GRPO).
    seq = rl.policy_loss_terms(new, old, torch.tensor([1.0]), clip_eps=0.2)
    torch.testing.assert_close(seq["loss"], torch.tensor([[-1.2, -0.5, -1.1, -0.7]]))


def test_clipped_surrogate_gradient_is_cut_where_clipped():
    new = torch.log(torch.tensor([[1.5, 0.9]])).requires_grad_()
    terms = rl.policy_loss_terms(new, torch.zeros(1, 2), torch.tensor([[1.0, 1.0]]), clip_eps=0.2)
    terms["loss"].sum().backward()
    assert new.grad[0, 0] == 0 and new.grad[0, 1] < 0


def test_value_clipping_on_crafted_values():
    old = torch.ones(3)
    values = torch.tensor([1.5, 0.9, 1.5])
    returns = torch.tensor([2.0, 0.0, 1.0])
    terms = rl.value_loss_terms(values, old, returns, clip_range=0.2)
    # Clipped values 1.2, 0.9, 1.2: errors (0.25 vs 0.64) -> 0.32 clipped; (0.81, 0.81) -> 0.405;
    # (0.25 vs 0.04) -> 0.125 unclipped.
    torch.testing.assert_close(terms["loss"], torch.tensor([0.32, 0.405, 0.125]))
    assert terms["clipped"].tolist() == [1.0, 0.0, 0.0]


@pytest.mark.parametrize("kind", ["k1", "k3"])
def test_kl_estimators_average_to_the_closed_form_kl(kind):
    q = torch.tensor([0.5, 0.3, 0.15, 0.05])  # the policy (tokens are sampled from it)
    p = torch.tensor([0.2, 0.3, 0.3, 0.2])    # the reference
    exact = float((q * (q / p).log()).sum())
    x = torch.multinomial(q, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    est = rl.kl_estimate(q.log()[x], p.log()[x], kind)
    assert abs(float(est.mean()) - exact) < 0.01, (kind, float(est.mean()), exact)
    if kind == "k3":
        assert bool((est >= 0).all())
    else:
        assert bool((est < 0).any())  # k1 is unbiased but negative on some tokens


def test_kl_estimator_unknown_kind():
    with pytest.raises(ValueError, match="k2"):
        rl.kl_estimate(torch.zeros(1), torch.zeros(1), "k2")


def test_score_lands_on_the_last_real_token_of_ragged_responses():
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    kl = torch.full((3, 4), 0.5)
    rewards, non_score = rl.per_token_rewards(kl, torch.tensor([1.0, 2.0, 3.0]), mask, beta=0.1)
    expected_kl = -0.05 * mask
    torch.testing.assert_close(non_score, expected_kl.float())
    expected = expected_kl.float().clone()
    expected[0, 1] += 1.0
    expected[1, 3] += 2.0
    expected[2, 0] += 3.0
    torch.testing.assert_close(rewards, expected)
    with pytest.raises(ValueError, match="no tokens"):
        rl.per_token_rewards(kl[:1], torch.ones(1), torch.zeros(1, 4), beta=0.1)


def test_group_relative_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv = rl.group_advantages(rewards, group_size=4)
    std = math.sqrt(1 / 3)  # unbiased std of (1, 0, 0, 1)
    a = 0.5 / (std + 1e-4)
    torch.testing.assert_close(adv, torch.tensor([a, -a, -a, a, 0.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(rl.group_advantages(rewards, 4, scale=False),
                               torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))
    with pytest.raises(ValueError, match="groups of 3"):
        rl.group_advantages(rewards, 3)


def test_leave_one_out_baseline_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 1.0])
    adv = rl.leave_one_out_advantages(rewards, group_size=3)
    # Group (1, 0, 0): 1 - 0 = 1, 0 - 0.5, 0 - 0.5;  group (1, 3, 1): 1 - 2, 3 - 1, 1 - 2.
    torch.testing.assert_close(adv, torch.tensor([1.0, -0.5, -0.5, -1.0, 2.0, -1.0]))
    with pytest.raises(ValueError, match="group_size >= 2"):
        rl.leave_one_out_advantages(rewards, 1)


def test_adaptive_kl_controller_update_by_hand():
    ctl = rl.AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    ctl.update(9.0, n_steps=64)     # error clipped to +0.2
    assert ctl.beta == pytest.approx(0.1 * (1 + 0.2 * 64 / 10_000))
    before = ctl.beta
    ctl.update(5.0, n_steps=64)     # error -1/6
    assert ctl.beta == pytest.approx(before * (1 - (1 / 6) * 64 / 10_000))
    state = ctl.state_dict()
    other = rl.AdaptiveKLController(0.5, target=6.0, horizon=10_000)
    other.load_state_dict(state)
    assert other.beta == ctl.beta
    fixed = rl.FixedKLController(0.3)
    fixed.update(100.0, 64)
    assert fixed.beta == 0.3
