"""TRL's PPOTrainer (trl 1.12, trl.experimental.ppo), timed as bench_rl.py times llmlab's PPO.

bench_rl.py runs this file in its own process, with benchmarks/.peers/trl-1.12 first on PYTHONPATH: trl 1.16,
which the GRPO arm uses, has no PPOTrainer, and two versions of one package cannot share a process. It reads
the run's settings from the JSON file named by its one argument (see bench_rl.run_trl_ppo), trains, and prints
one JSON object on stdout: bench_rl.figures() of the timed rollouts, plus what TRL actually did (optimizer
steps, its version). TRL's own log lines go to stderr.

    PYTHONPATH=benchmarks/.peers/trl-1.12 python benchmarks/_trl_ppo_peer.py SETTINGS.json

Timing, by wrapping the functions ppo_trainer.train() looks up at call time: `sample` is batch_generation
(HF generate, which also keeps the logits TRL reads the policy's log-probs from); `rollout` runs from the
start of batch_generation to the first update pass (the first `forward` of the policy-and-value wrapper), so
it holds the reference and value forwards, the reward model and the GAE; the rest of a rollout's CPU time is
its update.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def load_models(s: dict):
    """Policy, reward model and value model (a second copy of the reward model), fp32, from the HF exports."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    def reward_copy():
        return AutoModelForSequenceClassification.from_pretrained(s["reward_model"], num_labels=1)

    return AutoModelForCausalLM.from_pretrained(s["policy"]), reward_copy(), reward_copy()


def ppo_config(s: dict):
    """PPOConfig for bench_rl's settings. TRL's rollout batch is per_device_train_batch_size *
    gradient_accumulation_steps episodes, split into num_mini_batches minibatches, each cut into micro-batches
    of per_device_train_batch_size rows, and accelerate steps the optimizer every gradient_accumulation_steps
    micro-batches. With per_device_train_batch_size = the rollout batch and no accumulation, a micro-batch is
    a whole minibatch and each minibatch is one optimizer step, as in llmlab's run (accumulating instead would
    let one step span several minibatches)."""
    from trl.experimental.ppo import PPOConfig

    return PPOConfig(
        output_dir=s["out"], per_device_train_batch_size=s["episodes"], gradient_accumulation_steps=1,
        num_mini_batches=s["minibatches"],
        num_ppo_epochs=s["epochs"], total_episodes=s["episodes"] * s["rollouts"],
        local_rollout_forward_batch_size=s["episodes"], response_length=s["response_length"],
        stop_token="eos", temperature=1.0, kl_coef=s["beta"], kl_estimator="k1", cliprange=s["cliprange"],
        cliprange_value=s["cliprange"], vf_coef=s["vf_coef"], gamma=1.0, lam=s["lam"], whiten_rewards=False,
        missing_eos_penalty=None, num_sample_generations=0, learning_rate=s["lr"],
        lr_scheduler_type="constant", warmup_steps=0, adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.0,
        max_grad_norm=1.0, optim="adamw_torch", bf16=False, gradient_checkpointing=False, logging_steps=1,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, dataloader_num_workers=0,
        seed=s["seed"])


def timed(trainer_module, clock, tokens: list[int], pad_id: int) -> None:
    """Wrap batch_generation (sample), the first update forward (end of the rollout) and truncate_response
    (response tokens) in trainer_module; see the module docstring."""
    from transformers import PreTrainedModel

    started: list[float] = []
    sample = clock.wrap("sample", trainer_module.batch_generation)

    def batch_generation(*args, **kwargs):
        started.append(time.process_time())
        return sample(*args, **kwargs)

    forward = trainer_module.forward

    def timed_forward(model, *args, **kwargs):
        if started and not isinstance(model, PreTrainedModel):  # the policy-and-value wrapper: an update
            clock.cpu["rollout"] = clock.cpu.get("rollout", 0.0) + time.process_time() - started.pop()
        return forward(model, *args, **kwargs)

    truncate = trainer_module.truncate_response

    def counted_truncate(stop_id, pad, responses):
        out = truncate(stop_id, pad, responses)
        tokens.append(int(trainer_module.first_true_indices(out == pad_id).sum()))  # tokens before padding
        return out

    trainer_module.batch_generation = batch_generation
    trainer_module.forward = timed_forward
    trainer_module.truncate_response = counted_truncate


def main() -> None:
    s = json.loads(Path(sys.argv[1]).read_text())
    import torch

    torch.set_num_threads(s["threads"])
    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOTrainer
    from trl.experimental.ppo import ppo_trainer as trainer_module

    from bench_rl import Clock, figures

    clock, tokens, steps = Clock(), [], [0]

    class Timer(TrainerCallback):  # TRL's PPOTrainer ends a "step" after each rollout's updates
        def on_train_begin(self, *a, **k):
            clock.start()

        def on_step_end(self, *a, **k):
            clock.tick()

    tok = AutoTokenizer.from_pretrained(s["policy"], padding_side="left")  # TRL's queries are left-padded
    policy, reward_model, value_model = load_models(s)
    prompts = Dataset.from_dict({"input_ids": s["prompts"]})
    timed(trainer_module, clock, tokens, tok.pad_token_id)
    with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = PPOTrainer(args=ppo_config(s), processing_class=tok, model=policy, ref_model=None,
                             reward_model=reward_model, value_model=value_model, train_dataset=prompts,
                             callbacks=[Timer()])
        inner = trainer.optimizer.optimizer  # accelerate's wrapper skips step() while accumulating
        step = inner.step

        def counted_step(*a, **k):
            steps[0] += 1
            return step(*a, **k)

        inner.step = counted_step
        trainer.train()
    timed_rollouts = s["rollouts"] - 1
    result = figures(clock, 1, s["episodes"] * timed_rollouts, sum(tokens[1:]), timed_rollouts)
    result.update(optimizer_steps_per_rollout=steps[0] / s["rollouts"], trl=trl.__version__,
                  trainer="trl.experimental.ppo.PPOTrainer")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
