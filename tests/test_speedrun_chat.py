"""`llmlab speedrun --preset cpu-chat` at smoke size: every stage runs from a tiny base checkpoint, the report
tells the whole story, and a second run reuses every stage. Plus the paired test the report relies on."""

from __future__ import annotations

import json

import pytest

from helpers import run_cli, tiny_base_checkpoint
from llmlab.speedrun_chat import is_chat_preset, load_chat_preset, mcnemar

SMOKE = [
    "tasks.tasks=['lookup', 'sort']", "tasks.difficulty={lookup = 2, sort = 3}", "tasks.train_per_task=40",
    "tasks.test_per_task=6",
    "sft.optim.max_steps=3", "sft.optim.warmup_steps=1", "sft.data.batch_size=4", "sft.data.block_size=64",
    "sft.train.eval_every=0", "sft.train.plot=false", "sft.train.max_minutes=2.0",
    "preferences.prompts_per_task=6", "preferences.samples=3", "preferences.max_new_tokens=6",
    "preferences.rater='length'", "preferences.heldout_fraction=0.3",
    "reward.optim.max_steps=2", "reward.optim.warmup_steps=1", "reward.data.batch_size=4",
    "reward.train.eval_every=0", "reward.train.plot=false",
    "dpo.optim.max_steps=2", "dpo.optim.warmup_steps=1", "dpo.data.batch_size=4",
    "dpo.train.eval_every=0", "dpo.train.plot=false",
    "eval.batch_size=16",
]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_base_checkpoint(tmp_path_factory.mktemp("base"))


def test_the_preset_is_a_chat_pipeline():
    assert is_chat_preset("cpu-chat") and not is_chat_preset("cpu-demo")
    cfg = load_chat_preset("cpu-chat")
    assert cfg.preferences.rater == "correct" and cfg.preferences.noise > 0
    assert sorted(cfg.tasks.tasks) == sorted(["add", "mul", "count", "reverse", "sort", "lookup"])


def test_smoke_run_writes_the_report_and_resumes(base, tmp_path, capsys):
    out = tmp_path / "chat"
    code, stdout, err = run_cli(capsys, "speedrun", "--preset", "cpu-chat", "--out", out,
                                f"base.checkpoint={base}", *SMOKE)
    assert code == 0, err
    assert "task accuracy: base" in stdout
    fig = json.loads((out / "report.json").read_text())
    for model in ("base", "sft", "dpo"):
        overall = fig["accuracy"][model]["overall"]
        assert overall["n"] == 12 and 0.0 <= overall["ci95"][0] <= overall["accuracy"] <= overall["ci95"][1]
    prefs = fig["preferences"]
    assert prefs["pairs"] == prefs["train_pairs"] + prefs["heldout_pairs"] > 0
    assert fig["reward_model"]["n"] == prefs["heldout_pairs"]
    report = (out / "report.md").read_text()
    for fragment in ("| lookup | 6 |", "| sort | 6 |", "**overall** | 12", "McNemar", "Reward model on the",
                     "stand-in for human raters", "## Samples", "eval/tasks.png"):
        assert fragment in report, fragment
    assert (out / "eval" / "tasks.png").is_file()
    for name in ("sft", "reward", "dpo"):
        assert (out / name / "summary.json").is_file()

    code, stdout, err = run_cli(capsys, "speedrun", "--preset", "cpu-chat", "--out", out,
                                f"base.checkpoint={base}", *SMOKE)
    assert code == 0, err
    for stage in ("tasks", "sft", "preferences", "reward", "dpo"):
        assert f"{stage}: reusing" in stdout, stage
    again = json.loads((out / "report.json").read_text())
    assert again["accuracy"] == fig["accuracy"]


def test_mcnemar_by_hand():
    a = [True] * 6 + [False] * 4
    b = [False] * 6 + [True] * 1 + [False] * 3
    test = mcnemar(a, b)  # 6 prompts only a, 1 only b: p = 2 * (1 + 7) / 2**7
    assert (test["a_only"], test["b_only"]) == (6, 1)
    assert test["p_value"] == pytest.approx(16 / 128)
    assert mcnemar([True, False], [True, False])["p_value"] == 1.0
