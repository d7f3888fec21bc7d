"""Fit scaling laws to sweep results the ways Kaplan et al. (2020) and Hoffmann et al. (2022) did.

    llmlab scaling fit runs/sweep/results.csv --out runs/sweep/fit     # fit.json + PNG plots

Input: a CSV with columns N (parameters), D (training tokens) and loss, and optionally C (training FLOPs;
default 6ND), kind (isoflop | size | data) and budget (the IsoFLOP profile a row belongs to; default C
rounded to 0.05 decades). `llmlab scaling sweep` writes one, and curves.csv (training-loss curves) beside it.

  - Kaplan: single-variable laws L(X) = E + (X_c / X)^alpha for X = N (the size-only rows, else each size's
    best loss), D (the data-only rows) and C (the compute frontier, approach 1's envelope), fitted on log
    loss by least squares with the irreducible term E >= 0.
  - Chinchilla approach 1: the lower envelope of the training curves (loss against FLOPs, smoothed; the
    final points when no curves are given), binned in log C; the run at the bottom of each bin gives N_opt
    and D_opt, and log-log lines give N_opt ~ C^a and D_opt ~ C^b.
  - Approach 2: a parabola in log N (and one in log D) through each IsoFLOP profile; its minimum is that
    budget's N_opt (D_opt), and log-log lines across budgets give a and b.
  - Approach 3: L(N, D) = E + A / N^alpha + B / D^beta fitted as the paper did: in log-sum-exp form,
    log L = LSE(a - alpha log N, b - beta log D, e) with A = e^a, B = e^b, E = e^e, minimising the Huber
    loss (delta 1e-3) of the log-loss residuals with L-BFGS, started from the paper's grid of
    initialisations (alpha, beta in {0, 0.5, ..., 2}, e in {-1, -0.5, ..., 1}, a, b in {0, 5, ..., 25});
    L-BFGS runs from the grid points with the lowest objective (all 4,500 would add nothing but time: the
    rest start far worse and end in the same or a worse basin). The compute-optimal exponents follow as
    a = beta / (alpha + beta), b = alpha / (alpha + beta).
Every fitted number gets a percentile bootstrap interval (rows resampled with replacement, within each
budget for approach 2; resamples too degenerate to fit are dropped).
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import least_squares, minimize
from threadpoolctl import threadpool_limits

from llmlab.errors import DataError
from llmlab.fsutil import write_bytes_atomic, write_text_atomic
from llmlab.scaling.plan import ScalingLaw

MIN_ROWS = 5          # the parametric law has five constants
HUBER_DELTA = 1e-3
CHINCHILLA_GRID = dict(alpha=np.arange(0, 2.01, 0.5), beta=np.arange(0, 2.01, 0.5),
                       e=np.arange(-1, 1.01, 0.5), a=np.arange(0, 26, 5.0), b=np.arange(0, 26, 5.0))
STARTS = 20           # L-BFGS runs from this many of the best grid points (approach 3)
EXPONENT_BOUNDS = [(None, None)] * 3 + [(0.0, None)] * 2  # a, b, e free; alpha, beta >= 0 (loss falls)


@dataclass
class Results:
    """Sweep rows as arrays; `group` is the IsoFLOP profile of each row (its budget)."""

    N: np.ndarray
    D: np.ndarray
    C: np.ndarray
    loss: np.ndarray
    kind: np.ndarray
    group: np.ndarray

    def take(self, idx: np.ndarray) -> Results:
        return Results(*(getattr(self, k)[idx] for k in ("N", "D", "C", "loss", "kind", "group")))

    def __len__(self) -> int:
        return len(self.loss)


# ---------------------------------------------------------------- reading

def _number(path: Path, line: int, column: str, text: str | None) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise DataError(f"{path} line {line}: {column}={text!r} is not a positive number; fix or drop the "
                        "row")
    return value


def read_results(path: str | Path, params: str = "N") -> Results:
    """Read and check a results CSV (see the module docstring); `params` picks the parameter column (N or
    N_nonembed)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"results file {path} does not exist; pass the results.csv of `llmlab scaling sweep`")
    try:
        rows = list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"))))
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path} is not a readable CSV ({e}); write columns N,D,loss[,C,kind,budget]") from e
    header = set(rows[0]) if rows else set()
    missing = [c for c in (params, "D", "loss") if c not in header]
    if missing:
        has = sorted(k for k in header if k) or "none"
        raise DataError(f"{path} lacks column {missing[0]!r} (has {has}); "
                        f"write a header with {params},D,loss and optionally C,kind,budget")
    if len(rows) < MIN_ROWS:
        raise DataError(f"{path} has {len(rows)} rows; a fit needs at least {MIN_ROWS} (N, D, loss) rows")
    cols: dict[str, list] = {k: [] for k in ("N", "D", "C", "loss", "kind", "group")}
    for line, row in enumerate(rows, start=2):
        n = _number(path, line, params, row.get(params))
        d = _number(path, line, "D", row.get("D"))
        c = _number(path, line, "C", row["C"]) if row.get("C") not in (None, "") else 6.0 * n * d
        budget = row.get("budget")
        group = _number(path, line, "budget", budget) if budget not in (None, "", "0", "0.0") else \
            10 ** (round(math.log10(c) * 20) / 20)
        cols["N"].append(n), cols["D"].append(d), cols["C"].append(c)
        cols["loss"].append(_number(path, line, "loss", row.get("loss")))
        cols["kind"].append(row.get("kind") or "isoflop"), cols["group"].append(group)
    return Results(*(np.array(cols[k]) for k in ("N", "D", "C", "loss", "kind", "group")))


def read_curves(path: str | Path) -> dict[str, np.ndarray] | None:
    """curves.csv (name, N, D, C, loss per logged step) as arrays, or None when absent or empty."""
    path = Path(path)
    if not path.is_file():
        return None
    rows = list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"))))
    if not rows or not {"name", "N", "D", "C", "loss"} <= set(rows[0]):
        return None
    try:
        out = {k: np.array([float(r[k]) for r in rows]) for k in ("N", "D", "C", "loss")}
    except ValueError as e:
        raise DataError(f"{path}: {e}; rerun the sweep to rewrite it, or delete it") from e
    out["name"] = np.array([r["name"] for r in rows])
    return out


# ---------------------------------------------------------------- helpers

def _interval(samples: list[float]) -> list[float] | None:
    vals = np.array([s for s in samples if s is not None and np.isfinite(s)])
    return [float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))] if len(vals) >= 10 else None


def _with_intervals(point: dict, boots: list[dict]) -> dict:
    """{name: {"value", "ci95"}} for each number of `point`, intervals from the bootstrap fits."""
    return {k: {"value": v, "ci95": _interval([b.get(k) for b in boots if b])} for k, v in point.items()}


def _loglog_line(x: np.ndarray, y: np.ndarray) -> dict | None:
    """y = k * x^slope by least squares in log-log: {"exponent", "coefficient"}."""
    if len(np.unique(x)) < 2:
        return None
    slope, intercept = np.polyfit(np.log(x), np.log(y), 1)
    return {"exponent": float(slope), "coefficient": float(np.exp(intercept))}


def _bootstrap(fn, n: int, rng: np.random.Generator, size: int) -> list[dict]:
    out = []
    for _ in range(n):
        try:
            out.append(fn(rng.integers(0, size, size)))
        except (ValueError, np.linalg.LinAlgError, FloatingPointError):
            out.append(None)
    return out


# ---------------------------------------------------------------- Kaplan

def power_law(x: np.ndarray, y: np.ndarray, start: dict | None = None) -> dict:
    """L = E + (X_c / X)^alpha, least squares on log L, E in [0, min L): {"E", "alpha", "X_c"}; from a
    small grid of starts, or from `start` (an earlier fit) alone."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(np.unique(x)) < 3:
        raise ValueError("a power law with an irreducible term needs three distinct x")
    scale = math.exp(np.log(x).mean())
    u, logy = np.log(x / scale), np.log(y)

    def resid(p):  # p = (log A at x = scale, alpha, E)
        return np.log(p[2] + np.exp(p[0] - p[1] * u)) - logy

    top = y.min() * (1 - 1e-9)
    if start is not None and math.isfinite(start["X_c"]):
        e0 = min(start["E"], top * (1 - 1e-6))
        starts = [(start["alpha"] * (math.log(start["X_c"]) - math.log(scale)), start["alpha"], e0)]
    else:
        starts = [(math.log(max(y.mean() - f * y.min(), 1e-6)), alpha, f * y.min())
                  for alpha in (0.05, 0.2, 0.6) for f in (0.0, 0.5, 0.9)]
    best = None
    for p0 in starts:
        p0 = (min(max(p0[0], -49), 49), min(max(p0[1], 0), 5), min(max(p0[2], 0), top))
        fit = least_squares(resid, p0, bounds=([-50, 0, 0], [50, 5, top]))
        if best is None or fit.cost < best.cost:
            best = fit
    log_a, alpha, e = best.x
    # A x^-alpha with x in raw units: A_raw = exp(log_a) * scale^alpha; X_c = A_raw^(1/alpha).
    x_c = math.exp((log_a + alpha * math.log(scale)) / alpha) if alpha > 1e-9 else math.inf
    return {"E": float(e), "alpha": float(alpha), "X_c": float(x_c)}


def kaplan_fits(res: Results, envelope: dict | None, boots: int, rng: np.random.Generator) -> dict:
    """L(N), L(D), L(C) with bootstrap intervals; each entry says which rows it used, or why it was
    skipped."""
    data = {}
    size = res.kind == "size"
    if size.sum() >= 3:
        data["N"] = (res.N[size], res.loss[size], "size-only rows")
    else:
        ns = np.unique(res.N)
        data["N"] = (ns, np.array([res.loss[res.N == n].min() for n in ns]), "best loss of each size")
    datak = res.kind == "data"
    if datak.sum() >= 3:
        data["D"] = (res.D[datak], res.loss[datak], "data-only rows")
    if envelope is not None:
        data["C"] = (np.array(envelope["C"]), np.array(envelope["loss"]), "approach 1 envelope")
    out = {}
    for var in ("N", "D", "C"):
        if var not in data:
            out[var] = {"skipped": "needs a data-only sweep (data_depth, data_tokens)" if var == "D"
                        else "needs the envelope"}
            continue
        x, y, source = data[var]
        try:
            point = power_law(x, y)
        except ValueError as e:
            out[var] = {"skipped": str(e)}
            continue
        fits = _bootstrap(lambda idx, x=x, y=y, p=point: power_law(x[idx], y[idx], p), boots, rng, len(x))
        out[var] = {"source": source, "points": len(x), **_with_intervals(point, fits)}
    return out


# ---------------------------------------------------------------- approach 1

def _smooth(y: np.ndarray) -> np.ndarray:
    w = max(1, len(y) // 20)
    if w == 1:
        return y
    kernel = np.ones(w) / w
    padded = np.concatenate([np.full(w // 2, y[0]), y, np.full(w - 1 - w // 2, y[-1])])
    return np.convolve(padded, kernel, mode="valid")


def envelope(res: Results, curves: dict | None, bins: int = 20) -> dict:
    """The lowest (smoothed) loss in each log-C bin between the smallest and largest final FLOPs, with the
    N and D of the run that reached it: {"C", "N", "D", "loss"} lists."""
    if curves is not None:
        C, N, D, L = [], [], [], []
        for name in dict.fromkeys(curves["name"]):
            m = curves["name"] == name
            C.append(curves["C"][m]), N.append(curves["N"][m]), D.append(curves["D"][m])
            L.append(_smooth(curves["loss"][m]))
        C, N, D, L = (np.concatenate(v) for v in (C, N, D, L))
        lo = min(curves["C"][curves["name"] == n].max() for n in dict.fromkeys(curves["name"]))
    else:
        C, N, D, L = res.C, res.N, res.D, res.loss
        lo = C.min()
    edges = np.geomspace(lo, C.max() * (1 + 1e-9), bins + 1)
    out = {"C": [], "N": [], "D": [], "loss": []}
    for a, b in zip(edges[:-1], edges[1:], strict=True):
        m = (C >= a) & (C < b)
        if m.any():
            i = np.flatnonzero(m)[np.argmin(L[m])]
            for k, v in (("C", C), ("N", N), ("D", D), ("loss", L)):
                out[k].append(float(v[i]))
    return out


def approach1(res: Results, curves: dict | None, boots: int, rng: np.random.Generator) -> dict:
    env = envelope(res, curves)
    C, N, D = (np.array(env[k]) for k in ("C", "N", "D"))
    if len(np.unique(N)) < 2:
        return {"skipped": "the envelope holds fewer than two model sizes", "envelope": env}

    def fit(idx):
        n, d = _loglog_line(C[idx], N[idx]), _loglog_line(C[idx], D[idx])
        return {"a": n["exponent"], "b": d["exponent"]} if n and d else None

    point = fit(np.arange(len(C)))
    return {"source": "training curves" if curves is not None else "final points", "envelope": env,
            **_with_intervals(point, _bootstrap(fit, boots, rng, len(C)))}


# ---------------------------------------------------------------- approach 2

def _parabola_min(x: np.ndarray, y: np.ndarray) -> float | None:
    """argmin of a parabola through (log x, y), or None if it opens downwards or is undetermined."""
    if len(np.unique(x)) < 3:
        return None
    c2, c1, _ = np.polyfit(np.log(x), y, 2)
    return float(np.exp(-c1 / (2 * c2))) if c2 > 0 else None


def isoflop_minima(res: Results) -> list[dict]:
    """Each IsoFLOP profile's parabola minimum in N and in D (profiles with a minimum in both)."""
    out = []
    iso = res.kind == "isoflop"
    for g in np.unique(res.group[iso]):
        m = iso & (res.group == g)
        n_opt, d_opt = _parabola_min(res.N[m], res.loss[m]), _parabola_min(res.D[m], res.loss[m])
        if n_opt and d_opt:
            c2, c1, c0 = np.polyfit(np.log(res.N[m]), res.loss[m], 2)
            out.append({"C": float(res.C[m].mean()), "N_opt": n_opt, "D_opt": d_opt,
                        "loss_opt": float(c0 - c1 * c1 / (4 * c2)),
                        "parabola": [float(c2), float(c1), float(c0)],
                        "inside": bool(res.N[m].min() <= n_opt <= res.N[m].max())})
    return out


def approach2(res: Results, boots: int, rng: np.random.Generator) -> dict:
    minima = isoflop_minima(res)
    if len(minima) < 2:
        return {"skipped": "needs two IsoFLOP profiles, each with three sizes and a loss minimum",
                "minima": minima}

    def exponents(mins):
        C = np.array([m["C"] for m in mins])
        n = _loglog_line(C, np.array([m["N_opt"] for m in mins]))
        d = _loglog_line(C, np.array([m["D_opt"] for m in mins]))
        return {"a": n["exponent"], "b": d["exponent"]} if n and d and len(mins) >= 2 else None

    groups = [np.flatnonzero((res.kind == "isoflop") & (res.group == g)) for g in np.unique(res.group)]
    fits = []
    for _ in range(boots):
        idx = np.concatenate([rng.choice(g, len(g)) for g in groups if len(g)])
        fits.append(exponents(isoflop_minima(res.take(idx))))
    return {"minima": minima, **_with_intervals(exponents(minima), fits)}


# ---------------------------------------------------------------- approach 3

def _objective(p: np.ndarray, logn: np.ndarray, logd: np.ndarray,
               logl: np.ndarray) -> tuple[float, np.ndarray]:
    """Huber(LSE(a - alpha logN, b - beta logD, e) - log L) summed, and its gradient in (a, b, e, alpha,
    beta)."""
    a, b, e, alpha, beta = p
    terms = np.stack([a - alpha * logn, b - beta * logd, np.full_like(logn, e)])
    top = terms.max(axis=0)
    w = np.exp(terms - top)
    total = w.sum(axis=0)
    r = top + np.log(total) - logl
    w /= total
    small = np.abs(r) <= HUBER_DELTA
    value = np.where(small, 0.5 * r * r, HUBER_DELTA * (np.abs(r) - 0.5 * HUBER_DELTA)).sum()
    g = np.where(small, r, HUBER_DELTA * np.sign(r))
    grad = np.array([(g * w[0]).sum(), (g * w[1]).sum(), (g * w[2]).sum(),
                     -(g * w[0] * logn).sum(), -(g * w[1] * logd).sum()])
    return float(value), grad


def _grid_starts(logn, logd, logl, count: int) -> np.ndarray:
    """The `count` grid initialisations with the lowest objective (evaluated in one vectorised pass)."""
    g = CHINCHILLA_GRID
    mesh = np.meshgrid(g["a"], g["b"], g["e"], g["alpha"], g["beta"], indexing="ij")
    grid = np.array(mesh).reshape(5, -1).T
    values = np.empty(len(grid))
    for lo in range(0, len(grid), 500):
        p = grid[lo:lo + 500, :, None]
        terms = np.stack([p[:, 0] - p[:, 3] * logn, p[:, 1] - p[:, 4] * logd,
                          np.broadcast_to(p[:, 2], (len(p), len(logn)))])
        r = np.logaddexp.reduce(terms, axis=0) - logl
        ar = np.abs(r)
        values[lo:lo + 500] = np.where(ar <= HUBER_DELTA, 0.5 * r * r,
                                       HUBER_DELTA * (ar - 0.5 * HUBER_DELTA)).sum(axis=1)
    return grid[np.argsort(values)[:count]]


def _lbfgs(starts, logn, logd, logl) -> np.ndarray:
    best = None
    # L-BFGS-B calls BLAS on 5-element vectors, where extra BLAS threads only spin; on a busy machine that
    # spinning turned microsecond calls into milliseconds. One thread meanwhile (threadpoolctl).
    with threadpool_limits(limits=1, user_api="blas"):
        for p0 in starts:
            fit = minimize(_objective, p0, args=(logn, logd, logl), jac=True, method="L-BFGS-B",
                           bounds=EXPONENT_BOUNDS, options={"maxiter": 1000, "gtol": 1e-8, "ftol": 1e-12})
            if best is None or fit.fun < best.fun:
                best = fit
    return best.x


def _constants(p: np.ndarray) -> dict:
    a, b, e, alpha, beta = (float(v) for v in p)
    out = {"E": math.exp(e), "A": math.exp(a), "B": math.exp(b), "alpha": alpha, "beta": beta}
    if alpha + beta > 0:
        out.update(a=beta / (alpha + beta), b=alpha / (alpha + beta))
    return out


def fit_parametric(N, D, loss, starts: int = STARTS) -> tuple[dict, np.ndarray]:
    """Approach 3's point estimate: (constants, raw parameters (a, b, e, alpha, beta))."""
    logn, logd, logl = np.log(N), np.log(D), np.log(loss)
    p = _lbfgs(_grid_starts(logn, logd, logl, starts), logn, logd, logl)
    return _constants(p), p


def approach3(res: Results, boots: int, rng: np.random.Generator) -> dict:
    point, p = fit_parametric(res.N, res.D, res.loss)
    logn, logd, logl = np.log(res.N), np.log(res.D), np.log(res.loss)

    def refit(idx):  # from the full-data optimum: a resample's optimum lies close to it
        return _constants(_lbfgs([p], logn[idx], logd[idx], logl[idx]))

    return _with_intervals(point, _bootstrap(refit, boots, rng, len(res)))


# ---------------------------------------------------------------- all together

def fit_all(res: Results, curves: dict | None = None, boots: int = 100, seed: int = 0) -> dict:
    """Kaplan's three laws and Chinchilla's three approaches, each with bootstrap intervals."""
    rng = np.random.default_rng(seed)
    a1 = approach1(res, curves, boots, rng)
    return {"rows": len(res), "bootstrap": boots, "seed": seed,
            "kaplan": kaplan_fits(res, a1.get("envelope"), boots, rng),
            "approach1": a1, "approach2": approach2(res, boots, rng), "approach3": approach3(res, boots, rng)}


def value(fit: dict, *keys: str) -> float | None:
    """fit[k1][k2]["value"], or None when that fit was skipped."""
    node = fit
    for k in keys:
        if not isinstance(node, dict) or k not in node:
            return None
        node = node[k]
    return node.get("value") if isinstance(node, dict) else node


def run_fit(results_csv: str | Path, out: str | Path | None = None, curves: str | Path | None = None,
            boots: int = 100, seed: int = 0, params: str = "N", plots: bool = True) -> dict:
    """Read the CSV (and curves.csv beside it unless `curves` names another), fit, write OUT/fit.json and
    the plots; return the fit."""
    res = read_results(results_csv, params)
    curves_path = Path(curves) if curves else Path(results_csv).with_name("curves.csv")
    fit = fit_all(res, read_curves(curves_path), boots, seed)
    if out is not None:
        out = Path(out)
        write_text_atomic(out / "fit.json", json.dumps(fit, indent=2) + "\n")
        if plots:
            for name, png in plot_fit(res, fit).items():
                write_bytes_atomic(out / name, png)
    return fit


# ---------------------------------------------------------------- plots

def _figure(ncols: int = 1):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5 * ncols, 4.2), layout="constrained")
    return fig, [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def plot_fit(res: Results, fit: dict) -> dict[str, bytes]:
    """isoflop.png (profiles, parabolas, minima), optimal.png (N_opt and D_opt against C), contours.png
    (the approach-3 loss surface with the data and the compute-optimal frontier)."""
    return {"isoflop.png": _plot_isoflop(res, fit), "optimal.png": _plot_optimal(fit),
            "contours.png": _plot_contours(res, fit)}


def _plot_isoflop(res: Results, fit: dict) -> bytes:
    fig, (ax,) = _figure()
    minima = fit["approach2"].get("minima", [])
    iso = res.kind == "isoflop"
    colors = {}
    for i, g in enumerate(np.unique(res.group[iso])):
        m = iso & (res.group == g)
        line = ax.scatter(res.N[m], res.loss[m], label=f"C = {g:.2g}", color=f"C{i}")
        colors[float(res.C[m].mean())] = line.get_facecolor()[0]
    for i, mn in enumerate(minima):
        c2, c1, c0 = mn["parabola"]
        m = iso & np.isclose(res.C, mn["C"], rtol=0.2)
        xs = np.geomspace(res.N[m].min() / 1.5, res.N[m].max() * 1.5, 100) if m.any() \
            else np.array([mn["N_opt"]])
        ax.plot(xs, c2 * np.log(xs) ** 2 + c1 * np.log(xs) + c0, color=f"C{i}", alpha=0.6)
        ax.plot([mn["N_opt"]], [mn["loss_opt"]], "k*", markersize=10)
    ax.set(xscale="log", xlabel="parameters N", ylabel="final val loss (nats/token)",
           title="IsoFLOP profiles (approach 2), minima starred")
    ax.legend(fontsize=8)
    return _png(fig)


def _plot_optimal(fit: dict) -> bytes:
    fig, axes = _figure(2)
    minima = fit["approach2"].get("minima", [])
    env = fit["approach1"].get("envelope", {})
    for ax, key, col in ((axes[0], "N_opt", "N"), (axes[1], "D_opt", "D")):
        if minima:
            C = np.array([m["C"] for m in minima])
            ax.plot(C, [m[key] for m in minima], "o", label="approach 2 minima")
            exp = value(fit, "approach2", "a" if col == "N" else "b")
            if exp is not None:
                k = np.exp(np.mean(np.log([m[key] for m in minima]) - exp * np.log(C)))
                xs = np.geomspace(C.min(), C.max(), 50)
                ax.plot(xs, k * xs ** exp, "-", label=f"approach 2: {col} ~ C^{exp:.2f}")
        if env.get("C"):
            ax.plot(env["C"], env[col], ".", alpha=0.5, label="approach 1 envelope")
        ax.set(xscale="log", yscale="log", xlabel="training FLOPs C", ylabel=key)
        ax.legend(fontsize=8)
    return _png(fig)


def _plot_contours(res: Results, fit: dict) -> bytes:
    fig, (ax,) = _figure()
    k = {name: value(fit, "approach3", name) for name in ("E", "A", "B", "alpha", "beta")}
    n = np.geomspace(res.N.min() / 3, res.N.max() * 3, 120)
    d = np.geomspace(res.D.min() / 3, res.D.max() * 3, 120)
    nn, dd = np.meshgrid(n, d)
    surface = k["E"] + k["A"] / nn ** k["alpha"] + k["B"] / dd ** k["beta"]
    cs = ax.contour(nn, dd, surface, levels=12, cmap="viridis")
    ax.clabel(cs, fontsize=7, fmt="%.2f")
    ax.scatter(res.N, res.D, c=res.loss, cmap="viridis", edgecolors="k", s=25)
    if k["alpha"] + k["beta"] > 0:
        law = ScalingLaw(**k)
        cs_line = np.geomspace(6 * n.min() * d.min(), 6 * n.max() * d.max(), 60)
        opt = [law.compute_optimal(c) for c in cs_line]
        ax.plot([o["N"] for o in opt], [o["D"] for o in opt], "r--", label="compute-optimal (C = 6ND)")
        ax.legend(fontsize=8)
    ax.set(xscale="log", yscale="log", xlim=(n[0], n[-1]), ylim=(d[0], d[-1]), xlabel="parameters N",
           ylabel="tokens D", title="approach 3: L(N, D) contours")
    return _png(fig)
