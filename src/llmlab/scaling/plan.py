"""Size a run from a scaling law: compute-optimal N and D for a FLOP budget, and inference-aware sizing.

    llmlab scaling plan --budget 1e21                          # Chinchilla's published fit
    llmlab scaling plan --budget 1e21 --law runs/sweep/fit/fit.json --inference-tokens 2e12

The law is L(N, D) = E + A / N^alpha + B / D^beta (Hoffmann et al. 2022, approach 3; the paper's fit
E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28 is the preset `chinchilla`), with training compute C = 6ND.
Minimising L at fixed C gives the closed form
    N_opt = G (C/6)^(beta/(alpha+beta)),  D_opt = G^-1 (C/6)^(alpha/(alpha+beta)),
    G = (alpha A / (beta B))^(1/(alpha+beta)).

Inference-aware sizing (Sardana et al. 2023, "Beyond Chinchilla-Optimal"): a model that will serve
D_inf tokens over its life costs 6ND to train plus 2N D_inf to serve. For a target loss, each N > N_min needs
D(N) = (B / (loss - E - A/N^alpha))^(1/beta) tokens; the N minimising 6 N D(N) + 2 N D_inf is found by a
bounded search in log N. With D_inf = 0 it is the Chinchilla-optimal model for that loss; the larger D_inf,
the smaller and longer-trained the model. `llama3_case` puts Llama 3 8B (8B parameters, 15T tokens) beside
the Chinchilla-optimal model of the same loss and gives the lifetime inference tokens at which 8B/15T is
the cheapest choice.

`scale_allocation` is the other published check: Chinchilla's Table 3 scales one (N, C, D) row by N ~ C^a,
D ~ C^b (a = b = 0.5 for approaches 1 and 2).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import minimize_scalar

from llmlab.errors import ConfigError, DataError

LLAMA3_8B = {"N": 8.0e9, "D": 15.0e12}


@dataclass(frozen=True)
class ScalingLaw:
    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, N: float, D: float) -> float:
        return self.E + self.A / N ** self.alpha + self.B / D ** self.beta

    @property
    def exponents(self) -> tuple[float, float]:
        """(a, b): N_opt ~ C^a, D_opt ~ C^b."""
        s = self.alpha + self.beta
        return self.beta / s, self.alpha / s

    def compute_optimal(self, C: float) -> dict:
        """The loss-minimising N, D for C = 6ND training FLOPs (closed form)."""
        a, b = self.exponents
        G = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
        N = G * (C / 6) ** a
        D = (C / 6) ** b / G
        return {"C": C, "N": N, "D": D, "tokens_per_param": D / N, "loss": self.loss(N, D)}

    def tokens_for(self, N: float, loss: float) -> float:
        """Tokens a model of N parameters needs to reach `loss` (inf if it never does)."""
        left = loss - self.E - self.A / N ** self.alpha
        return (self.B / left) ** (1 / self.beta) if left > 0 else math.inf

    def smallest_model(self, loss: float) -> float:
        """N below which no amount of data reaches `loss`."""
        if loss <= self.E:
            raise ConfigError(f"target loss {loss} is at or below the law's irreducible loss E={self.E:.4g}; "
                              "aim higher")
        return (self.A / (loss - self.E)) ** (1 / self.alpha)

    def inference_optimal(self, loss: float, inference_tokens: float) -> dict:
        """The N, D reaching `loss` with the fewest training + inference FLOPs (6ND + 2N D_inf)."""
        n_min = self.smallest_model(loss)

        def cost(log_n: float) -> float:
            n = math.exp(log_n)
            return math.log(6 * n * self.tokens_for(n, loss) + 2 * n * inference_tokens)

        lo = math.log(n_min) + 1e-9
        grid = np.linspace(lo, lo + 25, 501)
        best = int(np.argmin([cost(x) for x in grid]))
        bounds = (grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)])
        log_n = minimize_scalar(cost, bounds=bounds, method="bounded", options={"xatol": 1e-10}).x
        return self.costs(math.exp(log_n), self.tokens_for(math.exp(log_n), loss), inference_tokens)

    def costs(self, N: float, D: float, inference_tokens: float) -> dict:
        train, infer = 6 * N * D, 2 * N * inference_tokens
        return {"N": N, "D": D, "tokens_per_param": D / N, "loss": self.loss(N, D), "train_flops": train,
                "inference_flops": infer, "total_flops": train + infer}

    def break_even_inference_tokens(self, N: float, D: float) -> float:
        """The lifetime inference tokens for which (N, D) is the inference-optimal choice for its own loss
        (where d/dN of 6 N D(N) + 2 N D_inf vanishes along the loss's contour); 0 if (N, D) is already
        larger than Chinchilla-optimal."""
        a_term, b_term = self.A / N ** self.alpha, self.B / D ** self.beta
        return max(0.0, 3 * D * (self.alpha * a_term / (self.beta * b_term) - 1))


CHINCHILLA = ScalingLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)


def load_law(source: str | Path = "chinchilla") -> ScalingLaw:
    """`chinchilla` (the published fit) or a fit.json written by `llmlab scaling fit` (its approach 3)."""
    if str(source) == "chinchilla":
        return CHINCHILLA
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"law {source!r} is neither 'chinchilla' nor a file; pass the fit.json written by "
                          "`llmlab scaling fit`")
    try:
        fit = json.loads(path.read_text(encoding="utf-8"))
        k = {name: float(fit["approach3"][name]["value"]) for name in ("E", "A", "B", "alpha", "beta")}
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        raise DataError(f"{path} is not a fit.json with approach3 E, A, B, alpha, beta ({e}); rerun "
                        "`llmlab scaling fit`") from e
    if not all(math.isfinite(v) for v in k.values()) or k["alpha"] <= 0 or k["beta"] <= 0:
        raise DataError(f"{path}: the fitted law {k} has no positive exponents; refit on more points")
    return ScalingLaw(**k)


def scale_allocation(anchor: dict, C: float, a: float = 0.5, b: float = 0.5) -> dict:
    """N and D for budget C from an anchor row {"N", "C", "D"} and N ~ C^a, D ~ C^b."""
    r = C / anchor["C"]
    return {"C": C, "N": anchor["N"] * r ** a, "D": anchor["D"] * r ** b}


def llama3_case(law: ScalingLaw = CHINCHILLA, inference_tokens: float | None = None) -> dict:
    """Llama 3 8B (8B params, 15T tokens) beside the Chinchilla-optimal model of the same loss, costed with
    `inference_tokens` of lifetime use (default: the break-even count), and the inference-optimal choice."""
    N, D = LLAMA3_8B["N"], LLAMA3_8B["D"]
    loss = law.loss(N, D)
    break_even = law.break_even_inference_tokens(N, D)
    served = break_even if inference_tokens is None else inference_tokens
    chinchilla = law.inference_optimal(loss, 0.0)
    return {"loss": loss, "inference_tokens": served, "break_even_inference_tokens": break_even,
            "llama3_8b": law.costs(N, D, served),
            "chinchilla_optimal": law.costs(chinchilla["N"], chinchilla["D"], served),
            "inference_optimal": law.inference_optimal(loss, served)}


def plan(budget: float, law: ScalingLaw = CHINCHILLA, inference_tokens: float = 0.0) -> dict:
    """What `llmlab scaling plan` prints: the law, the compute-optimal run for `budget` and, with
    inference tokens, the inference-aware run that reaches the same loss."""
    if not (math.isfinite(budget) and budget > 0):
        raise ConfigError(f"budget={budget} must be a positive number of FLOPs, e.g. 1e21")
    out = {"law": asdict(law), "exponents": dict(zip(("a", "b"), law.exponents, strict=True)),
           "compute_optimal": law.compute_optimal(budget)}
    if inference_tokens > 0:
        out["inference_tokens"] = inference_tokens
        out["compute_optimal_with_inference"] = law.costs(out["compute_optimal"]["N"],
                                                          out["compute_optimal"]["D"], inference_tokens)
        out["inference_optimal"] = law.inference_optimal(out["compute_optimal"]["loss"], inference_tokens)
    return out
