"""IsoFLOP sweeps: points sized by their budget, real runs, resume after a kill, the time budget."""

from __future__ import annotations

import csv
import json

import pytest

from helpers import affine_shards
from llmlab.errors import ConfigError
from llmlab.scaling import sweep as sweep_mod
from llmlab.scaling.flops import param_counts, train_flops_per_token
from llmlab.scaling.sweep import load_sweep_config, plan_points, run_sweep

SMALL = ["budgets=[2e8, 6e8]", "depths=[1, 2]", "aspect=16", "head_dim=16", "min_steps=3", "jobs=1",
         "pretrain.model.block_size=16", "pretrain.data.batch_size=4", "pretrain.optim.lr=1e-2"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return affine_shards(tmp_path_factory.mktemp("sweep") / "shards")


def _cfg(shards, *extra):
    return load_sweep_config(None, [*SMALL, f"pretrain.data.shards='{shards}'", *extra])


def test_points_spend_their_budget(shards):
    cfg = _cfg(shards, "budgets=[2e8, 6e8, 1e6]")
    points, left_out = plan_points(cfg, vocab_size=64)
    assert [p.name for p in points] == ["iso-2e08-d1", "iso-2e08-d2", "iso-6e08-d1", "iso-6e08-d2"]
    assert len(left_out) == 2 and all("min_steps=3" in line for line in left_out)  # 1e6 FLOPs: < 3 steps
    for p in points:
        assert (p.model.n_layer, p.model.d_model, p.model.n_head) == (p.depth, 16 * p.depth, p.depth)
        assert p.tokens == p.steps * 4 * 16
        assert p.flops == p.tokens * train_flops_per_token(p.model, 16)["chinchilla"]
        assert p.flops == pytest.approx(p.budget, rel=0.1)  # whole steps round the budget a little
    # The larger model gets fewer tokens for the same budget.
    assert points[0].tokens > points[1].tokens and points[2].tokens > points[3].tokens


def test_sweep_resumes_after_a_kill_without_rerunning_finished_points(shards, tmp_path, monkeypatch):
    cfg, out = _cfg(shards), tmp_path / "sweep"
    calls = []
    real = sweep_mod.run_point

    def killed_on_third(pcfg):
        calls.append(pcfg.train.run_name)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as if the sweep were killed while the third point ran
        return real(pcfg)

    monkeypatch.setattr(sweep_mod, "run_point", killed_on_third)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(cfg, out, log=lambda *_: None)
    done = {p.parent.name: p.read_text() for p in out.glob("points/*/result.json")}
    assert sorted(done) == ["iso-2e08-d1", "iso-2e08-d2"]
    calls.clear()
    summary = run_sweep(cfg, out, log=lambda *_: None)
    assert calls == ["iso-6e08-d1", "iso-6e08-d2"] and summary["done"] == 4 and summary["left"] == 0
    assert {p: (out / "points" / p / "result.json").read_text() for p in done} == done  # untouched
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["name"] for r in rows] == ["iso-2e08-d1", "iso-2e08-d2", "iso-6e08-d1", "iso-6e08-d2"]
    for r in rows:
        model = sweep_mod.family_model(cfg, int(r["depth"]), 64)
        assert int(r["N"]) == param_counts(model)["total"] and float(r["val_coverage"]) == 1.0
        assert float(r["loss"]) > 0 and float(r["wall_s"]) > 0
        assert float(r["C"]) == pytest.approx(int(r["D"]) * train_flops_per_token(model, 16)["chinchilla"])
        metrics = [json.loads(line) for line in (out / "points" / r["name"] / "metrics.jsonl").open()]
        assert metrics[-1]["step"] == int(r["steps"])  # the schedule ended where the run ended
    assert (out / "curves.csv").read_text().count("\n") > 4


def test_sweep_refuses_other_settings_in_the_same_out(shards, tmp_path):
    out = tmp_path / "sweep"
    run_sweep(_cfg(shards, "budgets=[2e8]", "depths=[1]"), out, log=lambda *_: None)
    with pytest.raises(ConfigError, match="other settings"):
        run_sweep(_cfg(shards, "budgets=[2e8]", "depths=[1]", "pretrain.optim.lr=5e-3"), out,
                  log=lambda *_: None)
    # jobs, threads and the time budget are not settings of the points: a rerun may change them.
    assert run_sweep(_cfg(shards, "budgets=[2e8]", "depths=[1]", "max_minutes=5"), out,
                     log=lambda *_: None)["done"] == 1


def test_time_budget_stops_starting_points(shards, tmp_path):
    summary = run_sweep(_cfg(shards, "max_minutes=1e-9"), tmp_path / "sweep", log=lambda *_: None)
    assert summary["done"] == 0 and summary["left"] == 4


def test_points_in_parallel_processes(shards, tmp_path):
    cfg = _cfg(shards, "budgets=[2e8]", "jobs=2")
    summary = run_sweep(cfg, tmp_path / "sweep", log=lambda *_: None)
    assert summary["done"] == 2 and (tmp_path / "sweep" / "points" / "iso-2e08-d2.toml").is_file()
