"""Scaling-law fit benchmark: wall time of every fit (Kaplan's three laws, Chinchilla's approaches 1-3) on
1,000 synthetic sweep rows with 100 bootstrap resamples each.

    python benchmarks/bench_scaling_fit.py [--rows 1000] [--bootstrap 100] [--no-check]

The rows are IsoFLOP profiles (5 budgets from 1e18 to 1e22 FLOPs, sizes spread 2 e-folds either side of each
optimum) drawn from Chinchilla's published law with 0.5% multiplicative noise, so the JSON also says how
close approach 3 came to the constants it was drawn from. Ends with `targets` and exits 1 when one is missed
(0 with --no-check): the whole fit under 60 s, and approach 3's alpha and beta within 10% of the truth.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from llmlab.scaling.fit import Results, fit_all
from llmlab.scaling.plan import CHINCHILLA
from targets import add_no_check, finish, goal


def synthetic(rows: int, seed: int = 0) -> Results:
    rng = np.random.default_rng(seed)
    C = np.repeat(np.geomspace(1e18, 1e22, 5), rows // 5)
    N = np.array([CHINCHILLA.compute_optimal(c)["N"] for c in C]) * np.exp(rng.uniform(-2, 2, len(C)))
    D = C / (6 * N)
    loss = np.array([CHINCHILLA.loss(n, d) for n, d in zip(N, D, strict=True)])
    loss *= np.exp(rng.normal(0, 0.005, len(C)))
    return Results(N, D, C, loss, np.array(["isoflop"] * len(C)), C)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--bootstrap", type=int, default=100)
    add_no_check(ap)
    args = ap.parse_args()
    res = synthetic(args.rows)
    started = time.perf_counter()
    fit = fit_all(res, None, boots=args.bootstrap, seed=0)
    seconds = time.perf_counter() - started
    a3 = {k: fit["approach3"][k]["value"] for k in ("E", "A", "B", "alpha", "beta")}
    result = {"benchmark": "scaling_fit", "rows": len(res), "bootstrap": args.bootstrap,
              "fit_s": round(seconds, 2), "approach3": a3,
              "approach2_a": fit["approach2"]["a"]["value"], "approach2_b": fit["approach2"]["b"]["value"]}
    targets = {"fit_s": goal(round(seconds, 2), "<=", 60.0),
               "alpha_rel_error": goal(round(abs(a3["alpha"] / 0.34 - 1), 4), "<=", 0.1),
               "beta_rel_error": goal(round(abs(a3["beta"] / 0.28 - 1), 4), "<=", 0.1)}
    return finish(result, targets, args.no_check)


if __name__ == "__main__":
    sys.exit(main())
