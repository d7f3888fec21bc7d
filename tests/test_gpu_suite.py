"""benchmarks/gpu_suite.py: the prepared GPU run, exercised end to end in --smoke mode (tiny sizes, CPU,
fp32), so the plumbing (commands, flags, JSON layouts of the benchmarks it calls) cannot rot before GPU time
is spent."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "gpu_suite.py"


def _suite_module():
    if str(SUITE.parent) not in sys.path:  # gpu_suite imports targets.py beside it, as when run as a script
        sys.path.insert(0, str(SUITE.parent))
    spec = importlib.util.spec_from_file_location("gpu_suite", SUITE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def _run(*argv, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SUITE), *map(str, argv)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Path:
    """One smoke run of every step; the tests below read its outputs."""
    base = tmp_path_factory.mktemp("gpu_suite")
    proc = _run("--smoke", "--out", base / "out", "--work", base / "work")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return base / "out"


def _load(out: Path, name: str) -> dict:
    return json.loads((out / name).read_text())


def test_outputs_are_few_flat_files_and_every_step_ran(smoke):
    names = sorted(p.name for p in smoke.iterdir())
    assert names == ["mfu.json", "quant.json", "speculative.json", "suite.log", "summary.json",
                     "training.json"]
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", n) for n in names)
    summary = _load(smoke, "summary.json")
    assert summary["plan"] == "smoke"
    steps = summary["steps"]
    assert set(steps) == {"env", "data", "mfu", "train", "distill", "quant", "spec"}  # data and mfu overlap
    for name, entry in steps.items():
        assert entry["status"] == "ok", (name, entry)
        assert entry["seconds"] <= entry["limit_s"] + 1
    assert summary["env"]["torch"] and summary["env"]["python"]
    assert "$ " in (smoke / "suite.log").read_text()  # every command line is logged


def test_training_learned_something(smoke):
    training = _load(smoke, "training.json")
    vocab = training["data"]["vocab_size"]
    assert training["data"]["train_tokens"] > 0 and training["data"]["val_tokens"] > 0
    for run in ("target", "draft", "distilled"):
        loss = training[run]["val_loss"]
        # Uniform guessing scores ln(vocab); a few steps must already beat it.
        assert math.isfinite(loss) and loss < math.log(vocab), (run, loss)
        assert training[run]["val_curve"][-1][1] == pytest.approx(loss, abs=1e-4)
    assert training["target"]["params"] > training["draft"]["params"]
    # the distilled draft trained on the target's own continuations (llmlab data generate)
    assert training["distilled"]["data"]["sequences"] == {"train": 32, "val": 4}


def test_quant_table(smoke):
    quant = _load(smoke, "quant.json")
    assert quant["device"] == "cpu" and quant["dtype"] == "float32"
    rows = {r["variant"]: r for r in quant["rows"]}
    expected = {"fp32", "int8-rtn", "int8-gptq", "int8-awq"} | {
        f"int4-{m}-g{g}" for m in ("rtn", "gptq", "awq", "awq-noclip") for g in (128, 32)}
    assert set(rows) == expected
    for name, row in rows.items():
        assert math.isfinite(row["ppl"]) and row["ppl"] > 1, name
        assert row["decode_tok_s_1t"] > 0, name
        assert row["ppl_delta_pct"] == pytest.approx(100 * (row["ppl"] / rows["fp32"]["ppl"] - 1), abs=2e-3)
    assert rows["int8-rtn"]["file_bytes"] < rows["fp32"]["file_bytes"]
    assert rows["int4-rtn-g128"]["file_bytes"] < rows["int8-rtn"]["file_bytes"]
    assert rows["int4-rtn-g32"]["file_bytes"] > rows["int4-rtn-g128"]["file_bytes"]  # 4x the scales and zeros
    assert abs(rows["int8-rtn"]["ppl_delta_pct"]) < 1.0
    figures = _load(smoke, "summary.json")["figures"]["quant"]
    assert set(figures["rows"]) == expected and figures["rows"]["fp32"]["decode_speedup"] == 1.0


def test_speculative_table(smoke):
    spec = _load(smoke, "speculative.json")
    assert set(spec) == {"draft", "distilled"}
    for result in spec.values():
        assert result["identical_greedy_output"] is True and result["dtype_fallback"] is False
        assert result["device"] == "cpu" and result["dtype"] == "float32"
        for method in ("draft_k2", "lookup_k4"):
            assert result[method]["speedup"] > 0
            assert 0 <= result[method]["acceptance_rate"] <= 1
    assert "lookup_k4" in _load(smoke, "summary.json")["figures"]["speculative"]["distilled"]["methods"]


def test_mfu_step_reports_skip_or_figures(smoke):
    mfu = _load(smoke, "mfu.json")
    assert "skipped" in mfu or mfu["compiled"]["mfu"] > 0


def test_summary_ends_with_every_benchmarks_targets(smoke):
    summary = _load(smoke, "summary.json")
    assert list(summary)[-1] == "targets"
    found = summary["targets"]
    assert "mfu.mfu_compiled" in found
    for prefix in ("quant.", "spec.draft.", "spec.distilled."):
        assert any(name.startswith(prefix) for name in found), prefix
    for target in found.values():
        assert {"measured", "goal", "op", "met"} <= set(target)
    mfu = found["mfu.mfu_compiled"]
    if "skipped" in _load(smoke, "mfu.json"):  # no CUDA: reported, not measured, and not a miss
        assert mfu["met"] is None and mfu["measured"] is None and mfu["why"]


def test_bad_arguments_are_one_line_exit_2(tmp_path):
    for argv, fragment in (([], "--out"), (["--out", tmp_path / "o", "--minutes", "0"], "--minutes"),
                           (["--out", tmp_path / "same", "--work", tmp_path / "same"], "separate")):
        proc = _run(*argv, timeout=60)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and fragment in lines[0], proc.stderr


def test_helpers():
    suite = _suite_module()
    assert suite.parse_json('compiling...\n{\n  "a": 1\n}\n') == {"a": 1}
    assert suite.parse_json('{"a": [1, 2]}') == {"a": [1, 2]}
    compile(suite.mfu_eager_code(suite.GPU.mfu), "<mfu-eager>", "exec")  # the fallback program is Python
    # About three epochs of the stdlib corpus's ~3M training tokens at 32 x 1024 tokens per step.
    assert suite.train_steps(suite.GPU, 3_000_000, 400) == round(3 * 3_000_000 / 32768)
    assert suite.train_steps(suite.GPU, 10**9, 400) == 400
    # A quant run cut short keeps the rows printed so far; an MFU run whose compile failed keeps eager.
    partial = {"partial": True, "device": "cuda", "dtype": "bfloat16", "targets": {}, "rows": [
        {"variant": "bf16", "ppl": 10.0, "file_bytes": 2_000_000, "packed_layers": None},
        {"variant": "int8-rtn", "ppl": 10.1, "file_bytes": 1_000_000, "packed_layers": "48/48"}]}
    figures = suite.quant_figures(partial)
    assert figures["partial"] and figures["rows"]["int8-rtn"]["ppl_delta_pct"] == pytest.approx(1.0)
    assert figures["rows"]["int8-rtn"]["decode_tok_s"] is None and figures["rows"]["bf16"]["file_mb"] == 2.0
    met = {"measured": 0.45, "goal": 0.4, "op": ">=", "met": True}
    miss = {"measured": 1.1, "goal": 1.5, "op": ">=", "met": False}
    results = {"mfu.json": {"targets": {"mfu_compiled": met}}, "quant.json": {"targets": {"old_style": True}},
               "speculative.json": {"draft": {"targets": {"k5": miss}}}}
    assert sorted(suite.collect_targets(results)) == ["mfu.mfu_compiled", "spec.draft.k5"]
    eager_only = {"device": "NVIDIA H200", "batch": 32, "eager": {"mfu": 0.3, "tokens_per_s": 4e5},
                  "compiled": None}
    assert suite.mfu_figures(eager_only)["compiled"] is None
