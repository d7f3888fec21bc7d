"""Fits recover known constants from synthetic data with noise; bad CSVs are one-line errors."""

from __future__ import annotations

import numpy as np
import pytest

from llmlab.errors import DataError
from llmlab.scaling.fit import Results, fit_all, power_law, read_results, run_fit
from llmlab.scaling.plan import CHINCHILLA as LAW


def isoflop_data(rows_per_budget: int = 12, noise: float = 0.005, seed: int = 0) -> Results:
    """IsoFLOP profiles drawn from Chinchilla's published law, sizes spread around each optimum, with
    multiplicative noise on the loss."""
    rng = np.random.default_rng(seed)
    C = np.repeat(np.geomspace(1e18, 1e22, 5), rows_per_budget)
    opt = np.array([LAW.compute_optimal(c)["N"] for c in C])
    N = opt * np.exp(np.tile(np.linspace(-2, 2, rows_per_budget), 5))
    D = C / (6 * N)
    loss = np.array([LAW.loss(n, d) for n, d in zip(N, D, strict=True)])
    loss *= np.exp(rng.normal(0, noise, len(C)))
    return Results(N, D, C, loss, np.array(["isoflop"] * len(C)), C)


@pytest.fixture(scope="module")
def fitted():
    return fit_all(isoflop_data(), None, boots=40, seed=0)


def test_approach3_recovers_the_constants_within_their_intervals(fitted):
    truth = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
    truth.update(a=0.28 / 0.62, b=0.34 / 0.62)
    for name, want in truth.items():
        got = fitted["approach3"][name]
        lo, hi = got["ci95"]
        assert lo <= want <= hi, (name, got)
        assert got["value"] == pytest.approx(want, rel=0.15), name


def test_approaches_1_and_2_find_the_closed_form_exponents(fitted):
    a, b = LAW.exponents
    assert fitted["approach2"]["a"]["value"] == pytest.approx(a, abs=0.02)
    assert fitted["approach2"]["b"]["value"] == pytest.approx(b, abs=0.02)
    lo, hi = fitted["approach2"]["a"]["ci95"]
    assert lo <= a <= hi
    for m in fitted["approach2"]["minima"]:
        assert m["N_opt"] == pytest.approx(LAW.compute_optimal(m["C"])["N"], rel=0.15) and m["inside"]
    # The envelope of final points only: the best size per budget, coarse but the right trend.
    assert fitted["approach1"]["a"]["value"] == pytest.approx(a, abs=0.15)


def test_kaplan_power_law_recovers_known_constants():
    rng = np.random.default_rng(1)
    x = np.geomspace(1e5, 1e9, 30)
    y = (1.5 + (8.8e6 / x) ** 0.2) * np.exp(rng.normal(0, 0.002, len(x)))
    fit = power_law(x, y)
    assert fit["E"] == pytest.approx(1.5, abs=0.05) and fit["alpha"] == pytest.approx(0.2, abs=0.02)
    assert fit["X_c"] == pytest.approx(8.8e6, rel=0.3)


def _write(path, text):
    path.write_text(text)
    return path


def test_run_fit_writes_json_and_plots(tmp_path):
    res = isoflop_data(rows_per_budget=5)
    lines = ["N,D,C,loss,kind,budget"] + [f"{n},{d},{c},{loss},isoflop,{c}" for n, d, c, loss
                                          in zip(res.N, res.D, res.C, res.loss, strict=True)]
    csv_path = _write(tmp_path / "results.csv", "\n".join(lines) + "\n")
    fit = run_fit(csv_path, tmp_path / "fit", boots=5)
    assert fit["rows"] == 25 and (tmp_path / "fit" / "fit.json").is_file()
    for name in ("isoflop.png", "optimal.png", "contours.png"):
        assert (tmp_path / "fit" / name).read_bytes()[:4] == b"\x89PNG"
    assert fit["kaplan"]["D"] == {"skipped": "needs a data-only sweep (data_depth, data_tokens)"}


@pytest.mark.parametrize("text,fragment", [
    ("N,D\n1,2\n", "lacks column 'loss'"),
    ("N,D,loss\n" + "1e6,1e9,3\n" * 4, "at least 5"),
    ("N,D,loss\n" + "1e6,1e9,3\n" * 5 + "1e6,x,3\n", "line 7: D='x'"),
    ("N,D,loss\n" + "1e6,1e9,3\n" * 5 + "1e6,1e9,-1\n", "loss='-1'"),
    ("N,D,loss\n" + "1e6,1e9,3\n" * 5 + "1e6,1e9,nan\n", "loss='nan'"),
    ("", "lacks column"),
])
def test_bad_csv_is_a_data_error(tmp_path, text, fragment):
    with pytest.raises(DataError, match=None) as err:
        read_results(_write(tmp_path / "r.csv", text))
    assert fragment in str(err.value) and "\n" not in str(err.value)
