"""The shared launcher (llmlab.train.launch) with a small objective of its own, as sft/reward/dpo plug in:
run directory rules, config.toml and summary.json, the tokenizer in every checkpoint, resume, the resume
check, the finish hook, a failed start leaving nothing behind."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
import torch

from llmlab.errors import ConfigError, LLMLabError, OutputError
from llmlab.model import ModelConfig, Transformer
from llmlab.tokenizer import Tokenizer
from llmlab.train import OptimConfig, TrainConfig
from llmlab.train.checkpoint import read_train_state
from llmlab.train.distributed import ParallelConfig
from llmlab.train.launch import Built, Plan, Run, launch
from llmlab.train.metrics import read_metrics
from llmlab.train.objective import NextToken
from llmlab.train.spike import SpikeConfig

V, T = 300, 8


@dataclass
class ToyConfig:
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(max_steps=4, warmup_steps=1))
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    spike: SpikeConfig = field(default_factory=SpikeConfig)
    data: str = "unused"


class Counting:
    """Batches of x[t+1] = x[t] + 1 (mod V) rows; position kept for resume."""

    def __init__(self):
        self.step = 0

    def next_batch(self):
        start = torch.arange(2)[:, None] + self.step
        rows = (start + torch.arange(T + 1)) % V
        self.step += 1
        return rows[:, :-1], rows[:, 1:]

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, state):
        self.step = state["step"]

    def skip(self, a, b):
        pass


@pytest.fixture(scope="module")
def tok():
    texts = ["The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs away.\n"] * 4
    return Tokenizer.train(texts, vocab_size=V, progress=False, workers=1)


def config(tmp_path, **train) -> ToyConfig:
    kw = dict(out_dir=str(tmp_path), run_name="toy", progress=False, plot=False, eval_every=2, ckpt_every=2,
              peak_flops=1e12, **train)
    return ToyConfig(train=TrainConfig(**kw))


def builder(tok, seen: list):
    def build(run: Run) -> Built:
        seen.append(run)
        torch.manual_seed(0)
        model = Transformer(ModelConfig(vocab_size=V, n_layer=1, n_head=2, d_model=32, block_size=T))
        objective = NextToken(lambda m: {"val_loss": 1.0 / (1 + len(seen))})
        return Built(model.to(run.device), objective, Counting(), tokenizer=tok, summary={"extra": 7},
                     finish=lambda trainer, summary: summary.update(finished_at=trainer.step))
    return build


def test_a_run_writes_its_directory_and_resumes(tmp_path, tok):
    seen: list[Run] = []
    summary = launch(config(tmp_path), builder(tok, seen))
    run_dir = tmp_path / "toy"
    assert summary["step"] == 4 and summary["extra"] == 7 and summary["finished_at"] == 4
    assert summary["objective"] == "lm" and summary["best_metric"] == "val_loss"
    assert json.loads((run_dir / "summary.json").read_text()) == summary
    assert 'run_name = "toy"' in (run_dir / "config.toml").read_text()
    ckpt = run_dir / "ckpt-000004"
    assert Tokenizer.load(ckpt / "tokenizer").encode("the fox") == tok.encode("the fox")
    assert (ckpt / "tokenizer_id.json").is_file()
    assert seen[0].rank == 0 and seen[0].world_size == 1 and seen[0].resume_path is None

    with pytest.raises(ConfigError, match="already holds a run"):
        launch(config(tmp_path), builder(tok, seen))
    assert len(seen) == 1  # refused before building anything

    longer = config(tmp_path)
    longer.optim.max_steps = 6
    summary = launch(longer, builder(tok, seen), resume="auto")
    assert seen[-1].resume_path == ckpt and summary["step"] == 6
    assert read_train_state(run_dir / "ckpt-000006")["batches"] == {"step": 6}
    steps = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resolve_plan_inputs_and_resume_check(tmp_path, tok):
    data = tmp_path / "data"
    data.mkdir()
    inside = config(data)  # the run directory would be inside the run's input
    with pytest.raises(OutputError, match="input"):
        launch(inside, builder(tok, []), resolve=lambda cfg: Plan(cfg, inputs=[data]))

    launch(config(tmp_path), builder(tok, []))

    def refuse(path):
        raise ConfigError(f"{path} is not mine")

    with pytest.raises(ConfigError, match="is not mine"):
        launch(config(tmp_path), builder(tok, []), resume="auto",
               resolve=lambda cfg: Plan(cfg, check_resume=refuse))


def test_a_failed_start_leaves_no_run_directory(tmp_path, tok):
    def build(run: Run) -> Built:
        raise LLMLabError("no data")

    with pytest.raises(LLMLabError, match="no data"):
        launch(config(tmp_path), build)
    assert not (tmp_path / "toy").exists()
