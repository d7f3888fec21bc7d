"""`llmlab experiment rlhf` at smoke size: from a tiny base checkpoint every stage runs (SFT included, as
when no cpu-chat run is there), the report has its sections and every arm's metrics are finite, a rerun
reuses every stage, a cpu-chat run's SFT model is reused, and the interval helpers match hand-computed
values."""

from __future__ import annotations

import json
import math

import pytest

from helpers import run_cli, tiny_base_checkpoint
from llmlab.experiments.rlhf import ARMS, mean_interval, summarize

KEYS = ("score", "accuracy", "kl", "length")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_base_checkpoint(tmp_path_factory.mktemp("base"))


def _args(out, base, tmp_path):
    return ("experiment", "rlhf", "--out", out, "--smoke", f"base_checkpoint='{base}'",
            f"chat_run='{tmp_path / 'no-chat-run'}'")


def test_smoke_run_reports_every_arm_and_resumes(base, tmp_path, capsys):
    out = tmp_path / "rlhf"
    code, stdout, err = run_cli(capsys, *_args(out, base, tmp_path))
    assert code == 0, err
    for i, stage in enumerate(("sft", "preferences", "reward", *ARMS, "eval"), start=1):
        assert f"[{i}/8] {stage}: " in stdout, stage
    assert "true accuracy: SFT" in stdout
    report = json.loads((out / "report.json").read_text())
    assert set(report["arms"]) == set(ARMS)
    for arm, a in report["arms"].items():
        assert a["steps"] == a["planned_steps"] == 2, arm
        assert [p["step"] for p in a["curve"]] == [0, 2], arm   # the SFT start and eval_points=1
        for point in a["curve"]:
            assert point["n"] == 6
            for key in KEYS:
                lo, hi = point[f"{key}_ci95"]
                assert all(math.isfinite(v) for v in (point[key], lo, hi)), (arm, key)
                assert lo <= point[key] <= hi, (arm, key)
    assert report["arms"]["dpo"]["sampled_responses"] == 0
    sampled = [report["arms"][arm]["sampled_responses"] for arm in ("ppo_beta0", "ppo_kl", "grpo")]
    assert sampled == [8, 8, 8]
    start = report["arms"]["ppo_beta0"]["curve"][0]
    assert all(a["curve"][0] == start for a in report["arms"].values())  # one SFT measurement for all
    assert abs(start["kl"]) < 1e-4                                      # the SFT model against itself
    md = (out / "report.md").read_text()
    for fragment in ("## Expectation", "## Preferences and the reward model", "## Over training",
                     "## Final (95% intervals", "## What happened", "rlhf.png", "| SFT (start) | 0 | 0 |",
                     *(f"| {arm} | 2 |" for arm in ARMS)):
        assert fragment in md, fragment
    assert (out / "rlhf.png").stat().st_size > 0

    code, stdout, err = run_cli(capsys, *_args(out, base, tmp_path))
    assert code == 0, err
    for stage in ("sft", "preferences", "reward", *ARMS):
        assert f"{stage}: reusing" in stdout, stage
    again = json.loads((out / "report.json").read_text())
    assert again["arms"] == report["arms"]

    # A changed arm setting reruns that arm only (and the evaluation of its checkpoints).
    code, stdout, err = run_cli(capsys, *_args(out, base, tmp_path), "kl_coef=0.5")
    assert code == 0, err
    assert "ppo_kl: PPO against the reward model, beta 0.5" in stdout
    for stage in ("sft", "preferences", "reward", "ppo_beta0", "dpo", "grpo"):
        assert f"{stage}: reusing" in stdout, stage
    changed = json.loads((out / "report.json").read_text())["arms"]
    assert changed["ppo_beta0"] == report["arms"]["ppo_beta0"]

    # Measuring differently measures every checkpoint again, training nothing.
    code, stdout, err = run_cli(capsys, *_args(out, base, tmp_path), "kl_coef=0.5", "eval_per_task=2")
    assert code == 0, err
    assert stdout.count(": reusing") == 7
    assert all(a["final"]["n"] == 4 for a in json.loads((out / "report.json").read_text())["arms"].values())


def test_reuses_a_chat_runs_sft_model(base, tmp_path, capsys):
    """Given a cpu-chat run (its sft/summary.json and tasks/), the experiment starts from its SFT model."""
    first = tmp_path / "first"
    assert run_cli(capsys, *_args(first, base, tmp_path))[0] == 0
    chat = first / "chat"               # laid out as a cpu-chat run: sft/summary.json, tasks/
    code, stdout, err = run_cli(capsys, "experiment", "rlhf", "--out", tmp_path / "second", "--smoke",
                                f"chat_run='{chat}'")
    assert code == 0, err
    assert f"[1/8] sft: reusing the {chat} run's" in stdout
    sft = json.loads((chat / "sft" / "summary.json").read_text())["checkpoint"]
    assert json.loads((tmp_path / "second" / "report.json").read_text())["sft_checkpoint"] == sft
    assert not (tmp_path / "second" / "chat").exists()


def test_intervals_by_hand():
    mean, (lo, hi) = mean_interval([1.0, 2.0, 3.0, 4.0])
    half = 1.959963984540054 * math.sqrt(5 / 3) / 2
    assert mean == 2.5 and lo == pytest.approx(2.5 - half) and hi == pytest.approx(2.5 + half)
    stats = summarize({"score": [0.0, 1.0], "kl": [0.0, 0.0], "length": [3.0, 5.0], "correct": [True, False],
                       "greedy_length": [1.0, 1.0], "greedy_score": [0.0, 0.0]})
    assert stats["accuracy"] == 0.5 and stats["n"] == 2
    assert stats["accuracy_ci95"][0] == pytest.approx(0.0945, abs=1e-4)   # Wilson, 1 of 2
    assert stats["kl_ci95"] == [0.0, 0.0] and stats["length"] == 4.0
