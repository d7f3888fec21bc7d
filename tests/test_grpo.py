"""GRPO on the shared trainer: a tiny policy learns a countable reward within a few dozen updates (group and
leave-one-out baselines); rewards from the task graders and from a reward model land where they should."""

from __future__ import annotations

import json

import pytest
import torch

from llmlab.align.grpo import GRPOConfig, GRPOObjective, grader_reward, model_reward
from llmlab.align.ppo import frozen
from llmlab.align.rollout import Rollout, rollout
from llmlab.data.tasks import make_split
from llmlab.errors import ConfigError
from llmlab.model import ModelConfig, Transformer
from llmlab.tokenizer import Tokenizer
from llmlab.train import OptimConfig, TrainConfig, Trainer
from llmlab.train.trainer import Callback

VOCAB, STOP, TARGET, PAD = 48, 3, 7, 0


def tiny(seed: int, vocab: int = VOCAB, head: str = "lm") -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig.preset("llama", "tiny", vocab_size=vocab, block_size=32, d_model=32,
                                          n_layer=2, n_head=2, head=head))


def count_reward(indices, ro: Rollout) -> torch.Tensor:
    return ((ro.responses == TARGET).float() * ro.mask).sum(dim=1)


def make_prompts(n: int = 32) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(2, 6, (n,), generator=g).tolist()
    return [torch.randint(10, 40, (k,), generator=g).tolist() for k in lengths]


PROMPTS = make_prompts()


class Records(Callback):
    def __init__(self):
        self.records = []

    def on_step_end(self, trainer, record):
        self.records.append(record)


def mean_reward(policy) -> float:
    ro = rollout(policy, PROMPTS, stop_ids=[STOP], pad_id=PAD, max_new_tokens=8, seed=123)
    return float(count_reward(None, ro).mean())


def train_grpo(steps: int = 40, **overrides):
    policy = tiny(0)
    cfg = GRPOConfig(prompts_per_rollout=4, num_generations=4, num_iterations=2, num_mini_batches=2,
                     max_completion_length=8, **overrides)
    objective = GRPOObjective(PROMPTS, frozen(policy), count_reward, cfg, stop_ids=[STOP], pad_id=PAD)
    records = Records()
    optim = OptimConfig(lr=3e-3, warmup_steps=0, max_steps=steps, weight_decay=0.0, min_lr_ratio=1.0)
    Trainer(policy, objective, objective.batches, optim,
            TrainConfig(progress=False, plot=False, eval_every=0, device="cpu"), callbacks=[records]).fit()
    return policy, objective, records.records


@pytest.mark.parametrize("baseline", ["group", "loo"])
def test_grpo_raises_the_mean_reward(baseline):
    policy, objective, records = train_grpo(baseline=baseline)
    before, after = mean_reward(tiny(0)), mean_reward(policy)
    assert after > before + 0.25, (before, after)
    assert objective.rollouts == 10
    for name in ["objective/scores", "objective/kl", "objective/entropy", "policy/approxkl_avg",
                 "policy/clipfrac_avg", "loss/policy_avg", "val/ratio", "val/num_eos_tokens"]:
        assert name in records[-1], name
    assert records[0]["val/ratio"] == pytest.approx(1.0, abs=1e-5)


def test_the_first_update_is_on_policy_at_a_sampling_temperature():
    records = train_grpo(steps=1, temperature=0.7)[2]
    assert records[0]["val/ratio"] == pytest.approx(1.0, abs=1e-5)
    assert records[0]["policy/approxkl_avg"] < 1e-9


def test_advantages_are_relative_to_each_prompts_own_group():
    policy = tiny(0)
    cfg = GRPOConfig(prompts_per_rollout=4, num_generations=4, max_completion_length=8)
    rewards = torch.tensor([1.0, 0, 0, 1, 2, 2, 2, 2, 0, 0, 0, 3, 1, 1, 0, 0])
    objective = GRPOObjective(PROMPTS, frozen(policy), lambda idx, ro: rewards, cfg, stop_ids=[STOP],
                              pad_id=PAD)
    objective.collect(policy)
    adv = objective.buffer["advantages"]
    assert adv[4:8].abs().max() == 0  # a group with equal rewards teaches nothing
    a = 0.5 / (torch.tensor([1.0, 0, 0, 1]).std() + 1e-4)
    torch.testing.assert_close(adv[:4], torch.stack([a, -a, -a, a]))
    prompts = objective.buffer["sequences"]
    lengths = objective.buffer["prompt_lengths"]
    for g in range(4):  # the G rows of a group answer the same prompt
        rows = [prompts[g * 4 + k, : int(lengths[g * 4 + k])].tolist() for k in range(4)]
        assert all(r == rows[0] for r in rows)


def test_grader_reward_scores_correct_answers_up_to_the_end_of_turn():
    tok = Tokenizer.train(["0123456789 What is ?"], vocab_size=263, progress=False, workers=1)
    examples = make_split("add", "test", 2, seed=0)
    end = tok.chat_template.end_of_turn_id
    answers = [tok.encode(examples[0].answer) + [end], tok.encode("9")]
    width = max(map(len, answers))
    responses = torch.tensor([a + [PAD] * (width - len(a)) for a in answers])
    mask = torch.tensor([[1.0] * len(a) + [0.0] * (width - len(a)) for a in answers])
    ro = Rollout(sequences=responses, prompt_lengths=torch.ones(2, dtype=torch.long), responses=responses,
                 mask=mask, ended=torch.tensor([True, False]), logprobs=torch.zeros(2, width))
    assert grader_reward(tok, examples)([0, 1], ro).tolist() == [1.0, 0.0]


def test_model_reward_reads_the_last_real_token_with_the_eos_penalty():
    rm = tiny(2, head="scalar").eval()
    ro = rollout(tiny(0), PROMPTS[:4], stop_ids=[STOP], pad_id=PAD, max_new_tokens=5, seed=1)
    got = model_reward(rm, missing_eos_penalty=1.5)([0, 1, 2, 3], ro)
    for b in range(4):
        n = int(ro.prompt_lengths[b] + ro.lengths[b])
        with torch.no_grad():
            alone = float(rm(ro.sequences[b: b + 1, :n])[0, -1])
        assert float(got[b]) == pytest.approx(alone - 1.5 * (not bool(ro.ended[b])), abs=1e-5)


def test_config_errors_are_one_line():
    with pytest.raises(ConfigError, match="multiple of"):
        cfg = GRPOConfig(prompts_per_rollout=3, num_generations=3, num_mini_batches=2)
        GRPOObjective(PROMPTS, tiny(0), count_reward, cfg, stop_ids=[STOP], pad_id=PAD)
    with pytest.raises(ConfigError, match="num_generations >= 2"):
        GRPOObjective(PROMPTS, tiny(0), count_reward, GRPOConfig(num_generations=1, baseline="loo"),
                      stop_ids=[STOP], pad_id=PAD)


def test_llmlab_grpo_with_the_graders_writes_a_run(tmp_path, capsys):
    from helpers import run_cli

    tok = Tokenizer.train(["What is 12 + 45? 57."], vocab_size=268, progress=False, workers=1)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("llama", "tiny", vocab_size=tok.vocab_size, block_size=48,
                                           d_model=32, n_layer=2, n_head=2))
    model.save(tmp_path / "policy")
    tok.save(tmp_path / "policy" / "tokenizer")
    lines = [json.dumps({"prompt": [{"role": "user", "content": ex.prompt}], "task": ex.task})
             for ex in make_split("add", "train", 4, seed=0)]
    (tmp_path / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    code, out, err = run_cli(capsys, "grpo", "--checkpoint", tmp_path / "policy", "--prompts",
                             tmp_path / "prompts.jsonl", f"train.out_dir={tmp_path}",
                             "grpo.prompts_per_rollout=2",
                             "grpo.num_generations=2", "grpo.max_completion_length=6", "optim.max_steps=2",
                             "train.progress=false", "train.plot=false", "train.device=cpu",
                             f"data.eval_prompts={tmp_path / 'prompts.jsonl'}", "train.eval_every=1")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["step"] == 2 and summary["prompts"] == 4
    best = json.loads((tmp_path / "grpo" / "best.json").read_text())
    assert best["metric"] == "val_accuracy" and 0 <= best["val_accuracy"] <= 1
    assert Transformer.load(summary["checkpoint"]).config.head == "lm"
    records = [json.loads(line) for line in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert all("objective/scores" in r for r in records if "loss" in r)


def test_task_eval_reports_accuracy_length_and_endings_in_batches():
    from llmlab.align.rollout import TaskEval

    tok = Tokenizer.train(["What is 12 + 45? 57."], vocab_size=268, progress=False, workers=1)
    examples = make_split("add", "test", 3, seed=0)
    prompts = [tok.apply_chat_template(ex.prompt_messages(), add_generation_prompt=True)[0]
               for ex in examples]
    policy = tiny(0, vocab=tok.vocab_size)
    template = tok.chat_template
    evaluator = TaskEval(tok, examples, prompts, stop_ids=template.stop_ids, pad_id=template.pad_id,
                         max_new_tokens=4, batch_size=2)
    result = evaluator(policy)
    assert set(result) == {"val_accuracy", "val_length", "val_ended"}
    assert result["val_accuracy"] == 0.0  # an untrained model does not add
    assert 1 <= result["val_length"] <= 4


def test_ranks_roll_out_different_prompts_with_different_seeds():
    policy = tiny(0)
    cfg = GRPOConfig(prompts_per_rollout=2, num_generations=2, max_completion_length=4)
    rows = []
    for rank in (0, 1):
        objective = GRPOObjective(PROMPTS, frozen(policy), count_reward, cfg, stop_ids=[STOP], pad_id=PAD,
                                  rank=rank, world_size=2)
        objective.collect(policy)
        rows.append(objective.buffer["sequences"].tolist())
    assert rows[0] != rows[1]
    single = GRPOObjective(PROMPTS, frozen(policy), count_reward, cfg, stop_ids=[STOP], pad_id=PAD)
    single.collect(policy)
    assert single.buffer["sequences"].tolist() == rows[0]  # rank 0 of 2 starts as a single process does


def test_a_resumed_grpo_run_equals_the_uninterrupted_one(tmp_path):
    from safetensors.torch import load_file

    from llmlab.align.grpo import GRPORunConfig, run_grpo
    from llmlab.config import load_config

    tok = Tokenizer.train(["What is 12 + 45? 57."], vocab_size=268, progress=False, workers=1)
    torch.manual_seed(0)
    Transformer(ModelConfig.preset("llama", "tiny", vocab_size=tok.vocab_size, block_size=48, d_model=32,
                                   n_layer=2, n_head=2)).save(tmp_path / "policy")
    tok.save(tmp_path / "policy" / "tokenizer")
    examples = make_split("add", "train", 4, seed=0)
    lines = [json.dumps({"prompt": ex.prompt, "task": ex.task}) for ex in examples]
    (tmp_path / "prompts.jsonl").write_text("\n".join(lines) + "\n")

    def config(out, *extra):
        return load_config(GRPORunConfig, None, [
            f"checkpoint={tmp_path / 'policy'}", f"data.prompts={tmp_path / 'prompts.jsonl'}",
            f"train.out_dir={out}", "grpo.prompts_per_rollout=2", "grpo.num_generations=2",
            "grpo.num_iterations=2", "grpo.max_completion_length=5", "optim.lr=3e-3", "optim.max_steps=4",
            "train.ckpt_every=2", "train.progress=false", "train.plot=false", "train.device=cpu", *extra])

    straight = run_grpo(config(tmp_path / "a"))
    stopped = run_grpo(config(tmp_path / "b", "train.max_minutes=1e-9"))
    assert stopped["step"] == 1  # inside the first rollout batch's two passes
    resumed = run_grpo(config(tmp_path / "b"), resume="auto")
    a = load_file(f"{straight['checkpoint']}/model.safetensors")
    b = load_file(f"{resumed['checkpoint']}/model.safetensors")
    assert resumed["step"] == 4 and all(torch.equal(a[k], b[k]) for k in a)
