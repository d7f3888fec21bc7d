"""benchmarks/targets.py and benchmarks/summary.py: a missed target fails a benchmark (unless --no-check),
and `make bench`'s table collects the targets of several benchmarks' outputs. Fake outputs only: nothing is
timed."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


targets = _load("targets")
summary = _load("summary")

FAKE_BENCH = '''"""A fake benchmark.

    python fake.py --ratio 1.3 \\\\
        --no-check
"""
import argparse, sys
from targets import add_no_check, finish, goal, unmeasured
ap = argparse.ArgumentParser(); ap.add_argument("--ratio", type=float); add_no_check(ap)
args = ap.parse_args()
print("warming up")
sys.exit(finish({"benchmark": "fake", "ratio": args.ratio},
                {"ratio": goal(args.ratio, ">=", 1.5), "gpu": unmeasured(">=", 0.4, "no CUDA device")},
                args.no_check))
'''


def test_goal_says_measured_goal_and_met():
    assert targets.goal(1.2, ">=", 1.5) == {"measured": 1.2, "goal": 1.5, "op": ">=", "met": False}
    assert targets.goal(1.5, ">=", 1.5)["met"] is True
    assert targets.goal(0.7, "<=", 1.5)["met"] is True and targets.goal(1.6, "<=", 1.5)["met"] is False
    assert targets.goal(True, "==", True)["met"] is True
    gpu = targets.unmeasured(">=", 0.4, "no CUDA device")
    assert gpu["met"] is None and gpu["measured"] is None and gpu["why"] == "no CUDA device"
    with pytest.raises(ValueError, match="comparison"):
        targets.goal(1.0, ">", 0.5)
    assert targets.missed({"a": targets.goal(1, ">=", 2), "b": targets.goal(3, ">=", 2), "c": gpu}) == ["a"]


def test_finish_prints_targets_last_and_returns_the_verdict(capsys):
    missed = {"ratio": targets.goal(1.2, ">=", 1.5)}
    assert targets.finish({"targets": "old", "ratio": 1.2}, missed) == 1
    printed = json.loads(capsys.readouterr().out)
    assert list(printed) == ["ratio", "targets"] and printed["targets"] == missed
    assert targets.finish({"ratio": 1.2}, missed, no_check=True) == 0
    unmeasured_only = {"gpu": targets.unmeasured(">=", 0.4, "no CUDA device")}
    assert targets.finish({}, unmeasured_only) == 0  # what could not be measured never fails a run


def _run_fake(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess:
    script = tmp_path / "fake.py"
    script.write_text(FAKE_BENCH)
    env = {"PYTHONPATH": str(BENCH), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True, env=env,
                          timeout=60)


def test_a_benchmark_exits_1_on_a_miss_and_0_with_no_check(tmp_path):
    miss = _run_fake(tmp_path, "--ratio", "1.2")
    assert miss.returncode == 1, miss.stderr
    result = summary.last_result(miss.stdout)
    assert result["targets"]["ratio"] == {"measured": 1.2, "goal": 1.5, "op": ">=", "met": False}
    assert _run_fake(tmp_path, "--ratio", "1.2", "--no-check").returncode == 0
    assert _run_fake(tmp_path, "--ratio", "1.6").returncode == 0


def _outputs(tmp_path: Path, **texts: str) -> list[str]:
    paths = []
    for name, text in texts.items():
        (tmp_path / f"{name}.json").write_text(text)
        paths.append(str(tmp_path / f"{name}.json"))
    return paths


def _result(**named_targets) -> str:
    return json.dumps({"benchmark": "x", "targets": named_targets}, indent=2) + "\n"


def test_summary_collects_every_benchmark_into_one_table(tmp_path, capsys):
    # bench_quant-like output: progress and one-line JSON rows before the final object
    rows_first = '{"variant": "fp32", "ppl": 10.0}\n' + _result(int8=targets.goal(0.5, "<=", 1.0))
    paths = _outputs(tmp_path, bench_a=rows_first,
                     bench_b="compiling...\n" + _result(speed=targets.goal(1.3, ">=", 1.2),
                                                        mfu=targets.unmeasured(">=", 0.4, "no CUDA device")))
    script = tmp_path / "bench_model.py"
    script.write_text(FAKE_BENCH)
    assert summary.main([*paths, "--not-run", str(script)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["benchmark", "target", "measured", "goal", "met"]
    table = [re.split(r"\s{2,}", line) for line in out[2:5]]
    assert table == [["bench_a", "int8", "0.5", "<= 1", "yes"], ["bench_b", "speed", "1.3", ">= 1.2", "yes"],
                     ["bench_b", "mfu", "-", ">= 0.4", "not measured: no CUDA device"]]
    assert "not run: bench_model" in out[5] and out[5].endswith("python fake.py --ratio 1.3 --no-check")
    assert out[-1] == "2 met, 0 missed or not reported, 1 not measured here"


def test_summary_fails_on_a_miss_or_a_benchmark_without_targets(tmp_path, capsys):
    paths = _outputs(tmp_path, bench_a=_result(speed=targets.goal(1.1, ">=", 1.2)))
    assert summary.main(paths) == 1
    assert "MISSED" in capsys.readouterr().out
    crashed = _outputs(tmp_path, bench_c="Traceback (most recent call last):\n  ...\nValueError: boom\n",
                       bench_d='{"benchmark": "old style", "target": 1.5}\n')
    assert summary.main(crashed) == 1
    out = capsys.readouterr().out
    assert out.count("NO RESULT") == 2 and "0 met, 2 missed or not reported" in out
