"""`llmlab experiment chinchilla` at its smoke size: every stage runs, the report is written, a rerun
resumes."""

from __future__ import annotations

import json

from llmlab.cli import main

TINY = ["max_chars=120000", "sweep.budgets=[1e9, 3e9]", "sweep.depths=[1, 2, 3]", "boots=5"]


def test_smoke_experiment_writes_its_report_and_resumes(tmp_path, capsys):
    out = tmp_path / "chin"
    assert main(["experiment", "chinchilla", "--smoke", "--out", str(out), *TINY]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["done"] == report["points"] == 6 and report["left"] == 0
    assert [r["name"] for r in report["results"]][:3] == ["iso-1e09-d1", "iso-1e09-d2", "iso-1e09-d3"]
    assert all(r["val_coverage"] == 1.0 for r in report["results"])
    assert [m["depth"] for m in report["family"]] == [1, 2, 3]
    assert report["family"][0]["embedding_share"] > report["family"][2]["embedding_share"]
    best = report["best_points"]
    assert [b["budget"] for b in best] == [1e9, 3e9]
    for b in best:  # the lowest loss of its budget, with its tokens per parameter
        same = [r for r in report["results"] if r["budget"] == b["budget"]]
        assert b["loss"] == min(r["loss"] for r in same) and b["ratio"] == b["D"] / b["N"]
    text = (out / "report.md").read_text()
    for heading in ("## Points", "## Exponents", "## Tokens per parameter", "## Plans", "## What differs"):
        assert heading in text
    assert "0.076" in text and "| 20 |" in text and "Llama 3 8B" in text
    for name in ("fit.json", "isoflop.png", "optimal.png", "contours.png"):
        assert (out / "fit" / name).is_file()
    capsys.readouterr()
    # A rerun reuses the data and every finished point.
    assert main(["experiment", "chinchilla", "--smoke", "--out", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    assert "reusing" in printed and "6 already done, 0 to run" in printed
