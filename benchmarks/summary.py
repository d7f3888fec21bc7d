"""One table of every benchmark's targets, from the JSON the benchmarks printed (`make bench` runs this).

    python benchmarks/summary.py runs/bench/*.json [--not-run benchmarks/bench_quant.py ...]

Each file holds one benchmark's stdout (named after the benchmark); its result is the last JSON object in
it, whose `targets` (see targets.py) become rows: benchmark, target, measured, goal, met. A file without a
JSON object carrying `targets` is a benchmark that failed or predates the convention: one row saying so.
--not-run lists benchmarks left out of the run (they need trained checkpoints); each is shown with the
command its docstring gives. Exit status 1 when a target was missed or a benchmark gave no targets, else 0.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

HEADER = ("benchmark", "target", "measured", "goal", "met")


def last_result(text: str) -> dict | None:
    """The last JSON object in `text` that starts at the beginning of a line and carries `targets`."""
    decoder = json.JSONDecoder()
    lines = text.splitlines(keepends=True)
    starts = [sum(map(len, lines[:i])) for i, line in enumerate(lines) if line.startswith("{")]
    for start in reversed(starts):
        try:
            obj, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict) and isinstance(obj.get("targets"), dict):
            return obj
    return None


def rows(benchmark: str, result: dict | None) -> list[tuple[str, ...]]:
    if result is None:
        return [(benchmark, "-", "-", "-", "NO RESULT (no JSON with targets; see its output)")]
    out = []
    for name, t in result["targets"].items():
        met = {True: "yes", False: "MISSED", None: f"not measured: {t.get('why', '')}"}[t.get("met")]
        wanted = f"{t.get('op', '')} {_fmt(t.get('goal'))}"
        out.append((benchmark, name, _fmt(t.get("measured")), wanted, met))
    return out or [(benchmark, "-", "-", "-", "no targets")]


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return json.dumps(value)


def usage(script: Path) -> str:
    """The first `python benchmarks/...` command in a script's docstring (with its continuation lines)."""
    doc = ast.get_docstring(ast.parse(script.read_text())) or ""
    command: list[str] = []
    for line in doc.splitlines():
        if command or line.strip().startswith("python "):
            command.append(line.strip().rstrip("\\").strip())
            if not line.rstrip().endswith("\\"):
                break
    return " ".join(" ".join(command).split()) or f"python {script}"


def table(all_rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in [HEADER, *all_rows]) for i in range(len(HEADER) - 1)]
    lines = []
    for r in [HEADER, tuple("-" * w for w in widths) + ("---",), *all_rows]:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("outputs", nargs="*", type=Path, help="one file per benchmark holding its stdout")
    ap.add_argument("--not-run", nargs="*", type=Path, default=[],
                    help="benchmark scripts left out of the run")
    args = ap.parse_args(argv)
    all_rows = []
    for path in sorted(args.outputs):
        all_rows += rows(path.stem, last_result(path.read_text(errors="replace")))
    print(table(all_rows))
    for script in args.not_run:
        print(f"not run: {script.stem} needs trained checkpoints (see its docstring): {usage(script)}")
    met = sum(r[-1] == "yes" for r in all_rows)
    unmeasured = sum(r[-1].startswith("not measured") for r in all_rows)
    bad = len(all_rows) - met - unmeasured
    print(f"{met} met, {bad} missed or not reported, {unmeasured} not measured here")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
