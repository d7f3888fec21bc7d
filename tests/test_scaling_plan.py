"""Sizing: the closed-form allocation, Chinchilla's Table 3, inference-aware sizing and the Llama 3 case."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.optimize import minimize_scalar

from llmlab.errors import ConfigError, DataError
from llmlab.scaling.plan import CHINCHILLA, ScalingLaw, llama3_case, load_law, plan, scale_allocation

# Hoffmann et al. (2022), Table 3: parameters, FLOPs, tokens.
TABLE3 = [(400e6, 1.92e19, 8.0e9), (1e9, 1.21e20, 20.2e9), (10e9, 1.23e22, 205.1e9),
          (67e9, 5.76e23, 1.5e12), (175e9, 3.85e24, 3.7e12), (280e9, 9.90e24, 5.9e12),
          (520e9, 3.43e25, 11.0e12), (1e12, 1.27e26, 21.2e12), (10e12, 1.30e28, 216.2e12)]


@pytest.mark.parametrize("C", [1e18, 5.76e23, 1e26])
def test_closed_form_allocation_is_the_minimum_at_fixed_compute(C):
    best = CHINCHILLA.compute_optimal(C)
    numeric = minimize_scalar(lambda log_n: CHINCHILLA.loss(math.exp(log_n), C / (6 * math.exp(log_n))),
                              bounds=(math.log(1e6), math.log(1e14)), method="bounded",
                              options={"xatol": 1e-9})
    assert best["N"] == pytest.approx(math.exp(numeric.x), rel=1e-3)
    assert 6 * best["N"] * best["D"] == pytest.approx(C)
    # N_opt ~ C^(beta/(alpha+beta)) with the published constants: a = 0.28 / 0.62.
    assert CHINCHILLA.compute_optimal(10 * C)["N"] / best["N"] == pytest.approx(10 ** (0.28 / 0.62))


def test_table3_from_half_exponents_anchored_at_the_first_row():
    anchor = {"N": 400e6, "C": 1.92e19, "D": 8.0e9}
    for N, C, D in TABLE3:
        got = scale_allocation(anchor, C, a=0.5, b=0.5)
        assert got["N"] == pytest.approx(N, rel=0.10) and got["D"] == pytest.approx(D, rel=0.10), (N, got)


def test_inference_aware_sizing():
    loss = CHINCHILLA.compute_optimal(1e22)["loss"]
    plain = CHINCHILLA.inference_optimal(loss, 0.0)
    # With no inference the cheapest model for a loss is the compute-optimal one for its own budget.
    assert plain["N"] == pytest.approx(CHINCHILLA.compute_optimal(1e22)["N"], rel=1e-3)
    served = CHINCHILLA.inference_optimal(loss, 1e13)
    assert served["loss"] == pytest.approx(loss) and served["N"] < plain["N"] and served["D"] > plain["D"]
    costs = [CHINCHILLA.costs(n, CHINCHILLA.tokens_for(n, loss), 1e13)["total_flops"]
             for n in served["N"] * np.array([0.8, 0.9, 1.1, 1.25])]
    assert min(costs) > served["total_flops"]


def test_llama3_8b_case():
    case = llama3_case()
    assert case["loss"] == pytest.approx(1.69 + 406.4 / 8e9**0.34 + 410.7 / 15e12**0.28)
    chin = case["chinchilla_optimal"]
    assert chin["N"] > 8e9 and chin["D"] < 15e12 and chin["train_flops"] < case["llama3_8b"]["train_flops"]
    # At the break-even lifetime use 8B/15T is itself the inference-optimal choice ...
    assert case["inference_optimal"]["N"] == pytest.approx(8e9, rel=1e-3)
    assert case["llama3_8b"]["total_flops"] < chin["total_flops"]
    # ... and with little use the Chinchilla-optimal model is cheaper overall.
    light = llama3_case(inference_tokens=1e11)
    assert light["chinchilla_optimal"]["total_flops"] < light["llama3_8b"]["total_flops"]


def test_plan_and_fitted_laws(tmp_path):
    out = plan(1e21, CHINCHILLA, inference_tokens=1e12)
    assert out["compute_optimal"]["N"] > out["inference_optimal"]["N"]
    fit = {"approach3": {k: {"value": v} for k, v in dict(E=2.0, A=100.0, B=200.0, alpha=0.3,
                                                          beta=0.3).items()}}
    (tmp_path / "fit.json").write_text(json.dumps(fit))
    law = load_law(tmp_path / "fit.json")
    assert law == ScalingLaw(2.0, 100.0, 200.0, 0.3, 0.3) and law.exponents == (0.5, 0.5)
    (tmp_path / "bad.json").write_text('{"approach3": {}}')
    with pytest.raises(DataError, match="bad.json"):
        load_law(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="neither"):
        load_law(tmp_path / "nope.json")
    with pytest.raises(ConfigError, match="irreducible"):
        CHINCHILLA.inference_optimal(1.5, 1e12)
