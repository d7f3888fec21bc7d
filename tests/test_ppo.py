"""PPO on the shared trainer: a tiny policy learns to emit a rewarded token within a few dozen updates, a very
large KL coefficient keeps it near the reference, and the metrics carry TRL's names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from llmlab.align import rl
from llmlab.align.ppo import PolicyAndValue, PolicyValueHead, PPOConfig, PPOObjective, frozen
from llmlab.align.rollout import Rollout, rollout
from llmlab.errors import ConfigError
from llmlab.model import ModelConfig, Transformer
from llmlab.train import OptimConfig, TrainConfig, Trainer
from llmlab.train.trainer import Callback

VOCAB, STOP, TARGET, PAD = 48, 3, 7, 0


def tiny(seed: int, head: str = "lm") -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig.preset("llama", "tiny", vocab_size=VOCAB, block_size=32, d_model=32,
                                          n_layer=2, n_head=2, head=head))


class CountReward(nn.Module):
    """A reward 'model' whose score at each position is how often TARGET occurred so far."""

    def forward(self, idx, output="scores"):
        return (idx == TARGET).float().cumsum(dim=1)


def make_prompts(n: int = 32) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(2, 6, (n,), generator=g).tolist()
    return [torch.randint(10, 40, (k,), generator=g).tolist() for k in lengths]  # never TARGET or STOP


PROMPTS = make_prompts()


def measure(policy, reference) -> tuple[float, float]:
    """(mean reward, mean per-response KL to the reference) over one sampled response per prompt."""
    ro = rollout(policy, PROMPTS, stop_ids=[STOP], pad_id=PAD, max_new_tokens=8, seed=123,
                 reference=reference, reward_model=CountReward())
    kl = (rl.kl_estimate(ro.logprobs, ro.ref_logprobs) * ro.mask).sum(dim=1).mean()
    return float(ro.scores.mean()), float(kl)


class Records(Callback):
    def __init__(self):
        self.records = []

    def on_step_end(self, trainer, record):
        self.records.append(record)


def train_ppo(kl_coef: float, steps: int = 40, accum_steps: int = 1, value: nn.Module | None = None,
              **overrides):
    policy = tiny(0)
    reference = frozen(policy)
    cfg = PPOConfig(rollout_batch_size=16, num_ppo_epochs=2, num_mini_batches=2, response_length=8,
                    kl_coef=kl_coef, **overrides)
    objective = PPOObjective(PROMPTS, reference, CountReward(), cfg, stop_ids=[STOP], pad_id=PAD,
                             accum_steps=accum_steps)
    records = Records()
    optim = OptimConfig(lr=3e-3, warmup_steps=0, max_steps=steps, weight_decay=0.0, min_lr_ratio=1.0)
    train = TrainConfig(progress=False, plot=False, eval_every=0, device="cpu", accum_steps=accum_steps)
    value = value if value is not None else tiny(1, head="scalar")
    Trainer(PolicyAndValue(policy, value), objective, objective.batches, optim, train,
            callbacks=[records]).fit()
    return policy, reference, objective, records.records


@pytest.fixture(scope="module")
def free_run():
    return train_ppo(kl_coef=0.0)


def test_ppo_raises_the_mean_reward(free_run):
    policy, reference, objective, records = free_run
    before, _ = measure(tiny(0), reference)
    after, kl = measure(policy, reference)
    assert after > before + 0.4, (before, after)
    assert objective.rollouts == 40 // (2 * 2)
    first, last = records[0]["objective/scores"], records[-1]["objective/scores"]
    assert last > first


def test_ppo_with_a_value_head_on_the_policy_raises_the_mean_reward():
    head = PolicyValueHead(32)
    policy, reference, objective, _ = train_ppo(kl_coef=0.0, value=head)
    before, _ = measure(tiny(0), reference)
    after, _ = measure(policy, reference)
    assert after > before + 0.4, (before, after)
    # The zero-initialised head has learnt the returns: on the last rollout batch it is closer to them than
    # the all-zero values it started with.
    b = objective.buffer
    ro = Rollout(**{k: b.get(k) for k in Rollout.__dataclass_fields__})
    with torch.no_grad():
        values = head(policy(ro.sequences[:, :-1], output="hidden")).gather(1, ro.columns) * ro.mask
    error = rl.masked_mean((values - b["returns"]) ** 2, ro.mask)
    assert error < 0.8 * rl.masked_mean(b["returns"] ** 2, ro.mask), error


def test_a_very_large_kl_coefficient_keeps_the_policy_near_the_reference(free_run):
    _, free_kl = measure(free_run[0], free_run[1])
    policy, reference, _, _ = train_ppo(kl_coef=5.0)
    _, kl = measure(policy, reference)
    assert kl < 0.1 * free_kl, (kl, free_kl)


def test_metrics_carry_trl_names_and_stay_constant_within_a_rollout(free_run):
    records = free_run[3]
    names = ["objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward",
             "objective/scores", "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg",
             "loss/value_avg", "val/clipfrac_avg", "val/ratio", "val/num_eos_tokens"]
    for name in names:
        assert all(name in r for r in records), name
    assert all(r["time/sample_s"] > 0 and r["time/score_s"] > 0 for r in records)
    # Steps 1-4 update on the first rollout batch: its metrics are logged unchanged at each.
    assert len({round(r["objective/scores"], 9) for r in records[:4]}) == 1
    # The first update starts on-policy: ratio 1, no clipping, no approximate KL.
    assert records[0]["val/ratio"] == pytest.approx(1.0, abs=1e-5)
    assert records[0]["policy/clipfrac_avg"] == 0 and records[0]["policy/approxkl_avg"] < 1e-9
    # beta = 0: no non-score reward, the RLHF reward is the score.
    assert records[0]["objective/non_score_reward"] == 0
    assert records[0]["objective/rlhf_reward"] == pytest.approx(records[0]["objective/scores"])


@pytest.mark.parametrize("value", ["model", "head"])
def test_the_first_update_is_on_policy_at_any_temperature(value):
    # The rollout's log-probs come from the sampler, the update's from a packed forward; both are of the
    # tempered distribution the tokens were drawn from, so the first minibatch's ratio is 1.
    head = PolicyValueHead(32) if value == "head" else None
    records = train_ppo(kl_coef=0.1, steps=1, temperature=0.7, value=head)[3]
    assert records[0]["val/ratio"] == pytest.approx(1.0, abs=1e-5)
    assert records[0]["policy/approxkl_avg"] < 1e-9 and records[0]["policy/clipfrac_avg"] == 0


def test_micro_batches_give_the_same_update_as_whole_minibatches():
    one = train_ppo(kl_coef=0.1, steps=2)[0]
    two = train_ppo(kl_coef=0.1, steps=2, accum_steps=2)[0]
    for (name, a), b in zip(one.named_parameters(), two.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)


def test_adaptive_kl_controller_moves_beta_and_is_saved():
    _, _, objective, records = train_ppo(kl_coef=0.1, steps=8, target_kl=0.01, kl_horizon=100)
    # Rollout 1 is on-policy, KL 0 < target: beta shrinks by the clipped error, 0.2 * 16 / 100.
    assert records[0]["objective/beta"] == pytest.approx(0.1)
    assert records[-1]["objective/beta"] == pytest.approx(0.1 * (1 - 0.2 * 16 / 100))
    # Rollout 2 has moved past the target KL: beta grows by the clipped error.
    assert records[-1]["objective/kl"] > 1.2 * 0.01
    assert objective.kl_ctl.beta == pytest.approx(0.1 * (1 - 0.032) * (1 + 0.032))
    state = objective.state_dict()
    assert state["kl_ctl"]["beta"] == objective.kl_ctl.beta and state["rollouts"] == 2


def test_a_rollout_batch_that_does_not_split_is_a_config_error():
    cfg = PPOConfig(rollout_batch_size=6, num_mini_batches=4)
    with pytest.raises(ConfigError, match="multiple of"):
        PPOObjective(PROMPTS, tiny(0), CountReward(), cfg, stop_ids=[STOP], pad_id=PAD)


# ----- `llmlab ppo` end to end -----
@pytest.fixture(scope="module")
def chat_models(tmp_path_factory):
    """An 'SFT' policy and a reward model sharing a tokenizer with llmlab's chat tokens, and a prompt file."""
    from llmlab.data.tasks import make_split
    from llmlab.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("rl")
    tok = Tokenizer.train(["What is 12 + 45? 57. Sort: b a c -> a b c."], vocab_size=280, progress=False,
                          workers=1)
    for name, head in (("policy", "lm"), ("rm", "scalar")):
        torch.manual_seed(0)
        model = Transformer(ModelConfig.preset("llama", "tiny", vocab_size=tok.vocab_size, block_size=48,
                                               d_model=32, n_layer=2, n_head=2, head=head))
        model.save(root / name)
        tok.save(root / name / "tokenizer")
    examples = make_split("add", "train", 6, seed=0)
    lines = [json.dumps({"prompt": [{"role": "user", "content": ex.prompt}], "task": ex.task})
             for ex in examples]
    (root / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_llmlab_ppo_writes_a_run_whose_checkpoint_is_a_policy(chat_models, tmp_path, capsys):
    from helpers import run_cli

    root = chat_models
    code, out, err = run_cli(capsys, "ppo", "--checkpoint", root / "policy", "--reward-model", root / "rm",
                             "--prompts", root / "prompts.jsonl", f"train.out_dir={tmp_path}",
                             "ppo.rollout_batch_size=4", "ppo.num_ppo_epochs=1", "ppo.num_mini_batches=2",
                             "ppo.response_length=6", "optim.max_steps=4", "train.progress=false",
                             "train.device=cpu")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["step"] == 4 and summary["prompts"] == 6
    ckpt = Path(summary["checkpoint"])
    policy = Transformer.load(ckpt)
    value = Transformer.load(ckpt / "value")
    assert policy.config.head == "lm" and value.config.head == "scalar"
    records = [json.loads(line) for line in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert all("objective/kl" in r and "policy/clipfrac_avg" in r for r in records if "loss" in r)
    assert (tmp_path / "ppo" / "plots" / "rl.png").stat().st_size > 1000


def ppo_config(root, out, *overrides):
    from llmlab.align.ppo import PPORunConfig
    from llmlab.config import load_config

    return load_config(PPORunConfig, None, [
        f"checkpoint={root / 'policy'}", f"reward_model={root / 'rm'}",
        f"data.prompts={root / 'prompts.jsonl'}",
        f"train.out_dir={out}", "ppo.rollout_batch_size=4", "ppo.num_ppo_epochs=2", "ppo.num_mini_batches=2",
        "ppo.response_length=6", "optim.lr=3e-3", "optim.max_steps=6", "train.ckpt_every=3",
        "train.progress=false", "train.plot=false", "train.device=cpu", *overrides])


def stop_and_resume(chat_models, tmp_path, *overrides) -> tuple[dict, dict, dict]:
    """An uninterrupted PPO run and one stopped after its first update (mid rollout batch: the buffer, the
    queue and beta are restored) then resumed, with the same overrides; asserts both end on the same weights
    (policy and value model) and returns (straight, resumed, the value model's final tensors)."""
    from safetensors.torch import load_file

    from llmlab.align.ppo import run_ppo

    straight = run_ppo(ppo_config(chat_models, tmp_path / "a", *overrides))
    stopped = run_ppo(ppo_config(chat_models, tmp_path / "b", *overrides, "train.max_minutes=1e-9"))
    assert stopped["step"] % 4  # inside a rollout batch's 2 epochs x 2 minibatches
    resumed = run_ppo(ppo_config(chat_models, tmp_path / "b", *overrides), resume="auto")
    assert straight["step"] == resumed["step"] == 6
    for part in ("model.safetensors", "value/model.safetensors"):
        a = load_file(Path(straight["checkpoint"]) / part)
        b = load_file(Path(resumed["checkpoint"]) / part)
        assert set(a) == set(b)
        for k in a:
            assert torch.equal(a[k], b[k]), (part, k)
    return straight, resumed, a


def test_a_resumed_ppo_run_equals_the_uninterrupted_one(chat_models, tmp_path):
    straight, resumed, _ = stop_and_resume(chat_models, tmp_path, "ppo.target_kl=0.5")

    def losses(run_dir):
        records = [json.loads(line) for line in open(Path(run_dir) / "metrics.jsonl")]
        return [(r["loss"], r["objective/beta"]) for r in records if "loss" in r]

    assert losses(straight["run_dir"]) == losses(resumed["run_dir"])


def test_a_resumed_ppo_run_with_a_policy_value_head_equals_the_uninterrupted_one(chat_models, tmp_path):
    _, _, value = stop_and_resume(chat_models, tmp_path, "ppo.value_model=policy_head")
    assert set(value) == {"score.weight", "score.bias"} and value["score.weight"].abs().sum() > 0  # trained


def _ddp_rank(rank: int, store: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        policy = tiny(0)
        cfg = PPOConfig(rollout_batch_size=4, num_ppo_epochs=1, num_mini_batches=2, response_length=6,
                        kl_coef=0.1, target_kl=0.01, kl_horizon=100)
        objective = PPOObjective(PROMPTS, frozen(policy), CountReward(), cfg, stop_ids=[STOP], pad_id=PAD,
                                 rank=rank, world_size=2)
        model = nn.parallel.DistributedDataParallel(PolicyAndValue(policy, tiny(1, head="scalar")))
        optim = OptimConfig(lr=3e-3, warmup_steps=0, max_steps=2, weight_decay=0.0, min_lr_ratio=1.0)
        Trainer(model, objective, objective.batches, optim,
                TrainConfig(progress=False, plot=False, eval_every=0, device="cpu")).fit()
        torch.save({"policy": policy.state_dict(), "beta": objective.kl_ctl.beta,
                    "prompts": objective.buffer["sequences"]}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_ranks_roll_out_different_prompts_and_stay_in_step(tmp_path):
    import torch.multiprocessing as mp

    out = tmp_path / "rank"
    mp.spawn(_ddp_rank, args=(str(tmp_path / "store"), str(out)), nprocs=2, join=True)
    a, b = (torch.load(f"{out}.{r}", weights_only=True) for r in (0, 1))
    assert not torch.equal(a["prompts"], b["prompts"])  # each rank rolled out its own prompts
    assert a["beta"] == b["beta"] != 0.1  # averaged statistics: the same adaptive beta on both ranks
    for k in a["policy"]:
        assert torch.equal(a["policy"][k], b["policy"][k]), k
    assert any(not torch.equal(a["policy"][k], v) for k, v in tiny(0).state_dict().items())
