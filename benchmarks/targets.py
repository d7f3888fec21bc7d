"""Pass/fail verdicts for benchmarks: each one ends its JSON with a `targets` object and exits 1 on a miss.

    from targets import add_no_check, finish, goal, unmeasured

    ap = argparse.ArgumentParser(); add_no_check(ap); args = ap.parse_args()
    targets = {"decode_ratio": goal(1.62, ">=", 1.5),                      # met: true
               "mfu_compiled": unmeasured(">=", 0.4, "no CUDA device")}    # met: null, never a miss
    sys.exit(finish(result, targets, args.no_check))

goal(measured, op, wanted) -> {"measured", "goal", "op", "met"}; op is ">=", "<=" or "==" (e.g. identical).
unmeasured(op, wanted, why) -> the same with measured and met null and a "why": reported, never a miss.
finish(result, targets, no_check) prints result as JSON with `targets` as its last key and returns the exit
status: 1 when a target has met false (unless no_check), else 0.
missed(targets) -> names of the targets with met false (the summary table uses it too).
"""

from __future__ import annotations

import argparse
import json
import operator

OPS = {">=": operator.ge, "<=": operator.le, "==": operator.eq}


def goal(measured: float, op: str, wanted: float) -> dict:
    """A measured target: met is whether `measured op wanted` holds."""
    if op not in OPS:
        raise ValueError(f"target comparison {op!r}: use one of {sorted(OPS)}")
    return {"measured": measured, "goal": wanted, "op": op, "met": bool(OPS[op](measured, wanted))}


def unmeasured(op: str, wanted: float, why: str) -> dict:
    """A target this run could not measure (say why): met is null and it does not fail the run."""
    if op not in OPS:
        raise ValueError(f"target comparison {op!r}: use one of {sorted(OPS)}")
    return {"measured": None, "goal": wanted, "op": op, "met": None, "why": why}


def add_no_check(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-check", action="store_true",
                        help="exit 0 even when a target is missed (the JSON still says which)")


def missed(targets: dict) -> list[str]:
    return [name for name, t in targets.items() if t.get("met") is False]


def finish(result: dict, targets: dict, no_check: bool = False) -> int:
    """Print `result` + `targets` (last) as JSON; 1 if a target was missed and checks are on, else 0."""
    result = {k: v for k, v in result.items() if k != "targets"}
    result["targets"] = targets
    print(json.dumps(result, indent=2), flush=True)
    return 0 if no_check or not missed(targets) else 1
