"""CPU inference routes for nn.Linear, each chosen by measuring it on the machine at hand.

    from llmlab.infer.cpu_linear import route_cpu_linears, unroute
    route_cpu_linears(model)   # in place: every plain nn.Linear becomes a RoutedLinear (same parameters)
    unroute(model)             # back to plain nn.Linear modules

Why: F.linear is not the fastest way to compute every small CPU product everywhere. On some processors a
one-row product (a decode step) runs faster as a batch of row blocks of the weight, and a product over a
few rows (speculative verification, prefill) through oneDNN with the weight packed once into its blocked
layout; on others both are slower than F.linear. Which holds depends on the processor, the BLAS, the
thread count and the shape, so no constant decides it: the first time a RoutedLinear sees a product shape
(rows, out, in, bias, dtype, threads) under no_grad on CPU, it times every available route on that input,
in interleaved rounds, and keeps the fastest. A route other than F.linear must beat F.linear by MARGIN, so
routing costs nothing beyond measurement noise where F.linear is best.
The choice is cached per shape (as torch.backends.cudnn.benchmark does) in a RouteTable shared by the
layers of one model, so each shape is measured once per model; each layer keeps its own shape -> route map
too, so a routed call costs one dictionary lookup more than nn.Linear's.

Every route computes F.linear(x, weight, bias) up to fp32 rounding. Autograd, other devices, torch.compile
and a dtype mismatch take F.linear. A RoutedLinear holds the nn.Linear's own parameters under the same
names, so state_dict keys, tied weights, save/load and HF export are unchanged. The oneDNN route keeps
one packed copy of each weight it serves, rebuilt when the weight changes (storage or version counter;
a weight made under torch.inference_mode has no version counter, so an in-place change there is not seen).

The oneDNN ops are torch.ops.mkldnn._reorder_linear_weight / _linear_pointwise, the ones torch's inductor
emits for CPU linears; a build or CPU without them (checked once per dtype by a probe against F.linear)
leaves that route out.
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

# Measurement settings (the only constants). Each route is timed in ROUNDS interleaved rounds, each timing
# repeating the call until it lasts MIN_TIMING_S (at most MAX_CALLS calls) so that timer resolution and call
# overhead do not decide. Another route is taken only where it beats F.linear by MARGIN both in its median
# round and in its best one: load from other processes adds long stalls to random rounds, and this way
# stalls can only keep F.linear, never pick a route that is not faster. The margin is wide because a
# product timed alone runs with its weight in cache, which it may not have inside a model's forward: a
# route that wins alone by a few percent can lose there, one that wins clearly does not.
MARGIN = 0.10
ROUNDS = 7
MIN_TIMING_S = 2e-4
MAX_CALLS = 64
PLAIN = "linear"


class RoutedLinear(nn.Linear):
    """An nn.Linear whose no-grad CPU forward takes the route its RouteTable timed fastest for the shape."""

    def __init__(self, linear: nn.Linear, table: RouteTable):
        nn.Module.__init__(self)  # no new parameters: the linear's own are registered below
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_parameter("weight", linear.weight)
        self.register_parameter("bias", linear.bias)
        self.table = table
        # (x.shape, x.dtype, threads) -> route name: the cheap per-call key
        self._routes: dict[tuple, str] = {}
        self._packed: tuple[tuple, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or not x.is_cpu or torch.compiler.is_compiling():
            return F.linear(x, self.weight, self.bias)
        key = (x.shape, x.dtype, torch.get_num_threads())
        name = self._routes.get(key)
        if name is None:
            name = self._routes[key] = self.table.route(self, x) if self.routable(x) else PLAIN
        return F.linear(x, self.weight, self.bias) if name == PLAIN else ROUTES[name](self, x)

    def routable(self, x: torch.Tensor) -> bool:
        w = self.weight
        return w.is_cpu and x.dtype == w.dtype and x.numel() > 0

    def packed_weight(self) -> torch.Tensor:
        """The weight in oneDNN's blocked layout, repacked when the weight has changed since."""
        w = self.weight
        key = (w.data_ptr(), -1 if w.is_inference() else w._version, w.dtype)
        if self._packed is None or self._packed[0] != key:
            self._packed = (key, torch.ops.mkldnn._reorder_linear_weight(w.detach(), None))
        return self._packed[1]

    def __getstate__(self):  # an opaque oneDNN tensor cannot be copied or pickled; it is rebuilt on demand
        return {**super().__getstate__(), "_packed": None}


class RouteTable:
    """The route measured fastest per product shape, shared by the RoutedLinears of one model.

    choice: shape key -> route name; runs: shape key -> {route name: seconds per call in each round}."""

    def __init__(self):
        self.choice: dict[tuple, str] = {}
        self.runs: dict[tuple, dict[str, list[float]]] = {}

    def route(self, layer: RoutedLinear, x: torch.Tensor) -> str:
        key = shape_key(layer, x)
        name = self.choice.get(key)
        if name is None:
            self.runs[key] = measure(layer, x, candidates(layer))
            name = self.choice[key] = pick(self.runs[key])
            if name != "onednn":
                layer._packed = None  # measuring packed a copy of the weight; keep it only where it is used
        return name

    def summary(self) -> list[dict]:
        """One row per measured shape: rows, out, in, dtype, threads, the route taken, and the median and
        best microseconds per call of every route (for benchmarks' reports)."""
        return [{"rows": k[0], "out": k[1], "in": k[2], "dtype": str(k[4]).removeprefix("torch."),
                 "threads": k[5], "route": self.choice[k],
                 "us": {name: round(1e6 * statistics.median(r), 2) for name, r in self.runs[k].items()},
                 "best_us": {name: round(1e6 * min(r), 2) for name, r in self.runs[k].items()}}
                for k in self.choice]


def shape_key(layer: RoutedLinear, x: torch.Tensor) -> tuple:
    rows = x.numel() // layer.in_features
    has_bias = layer.bias is not None
    return rows, layer.out_features, layer.in_features, has_bias, x.dtype, torch.get_num_threads()


# ----- the routes: each computes F.linear(x, layer.weight, layer.bias) -----
def plain_linear(layer: RoutedLinear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, layer.weight, layer.bias)


def rowblock_linear(layer: RoutedLinear, x: torch.Tensor) -> torch.Tensor:
    """The product as a bmm over c row blocks of the weight: W.view(c, N/c, K) @ x^T."""
    weight, bias = layer.weight, layer.bias
    N, K = weight.shape
    c = row_blocks(N)
    rows = x.reshape(-1, K)
    w3, x3 = weight.view(c, N // c, K), rows.t().expand(c, K, rows.shape[0])
    out = torch.bmm(w3, x3) if bias is None else torch.baddbmm(bias.view(c, N // c, 1), w3, x3)
    return out.view(N, rows.shape[0]).t().contiguous().view(*x.shape[:-1], N)


def onednn_linear(layer: RoutedLinear, x: torch.Tensor) -> torch.Tensor:
    """The product through oneDNN with the weight packed once (RoutedLinear.packed_weight)."""
    return torch.ops.mkldnn._linear_pointwise(x, layer.packed_weight(), layer.bias, "none", [], "")


Route = Callable[[RoutedLinear, torch.Tensor], torch.Tensor]
ROUTES: dict[str, Route] = {PLAIN: plain_linear, "rowblock": rowblock_linear, "onednn": onednn_linear}


def row_blocks(out_features: int) -> int:
    """How many row blocks the row-block route splits a weight into (1: it does not apply)."""
    return next((c for c in (4, 2, 3, 5, 7) if out_features % c == 0), 1)


def candidates(layer: RoutedLinear) -> list[str]:
    """The routes that apply to this layer: F.linear always, the others where the weight and build allow."""
    names = [PLAIN]
    if row_blocks(layer.out_features) > 1 and layer.weight.is_contiguous():
        names.append("rowblock")
    if onednn_supports(layer.weight.dtype):
        names.append("onednn")
    return names


# ----- measuring and choosing -----
def measure(layer: RoutedLinear, x: torch.Tensor, names: list[str]) -> dict[str, list[float]]:
    """Seconds per call of each named route on this input in each of ROUNDS rounds, interleaved so that load
    from other processes falls on all routes alike."""
    calls = {}
    for name in names:  # warm-up: first-call work (packing, allocation) stays out of the timings
        _seconds(ROUTES[name], layer, x, 1)
        once = _seconds(ROUTES[name], layer, x, 1)
        calls[name] = max(1, min(MAX_CALLS, math.ceil(MIN_TIMING_S / max(once, 1e-9))))
    runs: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(ROUNDS):
        for name in names:
            runs[name].append(_seconds(ROUTES[name], layer, x, calls[name]) / calls[name])
    return runs


def _seconds(route: Route, layer: RoutedLinear, x: torch.Tensor, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        route(layer, x)
    return time.perf_counter() - start


def pick(runs: dict[str, list[float]]) -> str:
    """The route with the lowest median, where it beats F.linear by MARGIN in its median and its best round;
    F.linear otherwise."""
    median = {name: statistics.median(r) for name, r in runs.items()}
    name = min(median, key=median.get)
    best = {n: min(runs[n]) for n in (name, PLAIN)}
    faster = median[name] <= (1 - MARGIN) * median[PLAIN] and best[name] <= (1 - MARGIN) * best[PLAIN]
    return name if faster else PLAIN


@functools.cache
def onednn_supports(dtype: torch.dtype) -> bool:
    """Whether this torch build and CPU run packed oneDNN linears in `dtype` correctly (probed once)."""
    if dtype not in (torch.float32, torch.bfloat16) or not torch.backends.mkldnn.is_available():
        return False
    ops = torch.ops.mkldnn
    if not (hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise")):
        return False
    if dtype == torch.bfloat16 and not ops._is_mkldnn_bf16_supported():
        return False
    g = torch.Generator().manual_seed(0)
    w, b, x = (torch.randn(*shape, generator=g).to(dtype) for shape in ((48, 64), (48,), (3, 5, 64)))
    try:
        with torch.no_grad():
            got = ops._linear_pointwise(x, ops._reorder_linear_weight(w, None), b, "none", [], "")
    except (RuntimeError, NotImplementedError):
        return False
    want = F.linear(x.float(), w.float(), b.float())
    return got.shape == want.shape and bool(torch.allclose(got.float(), want, rtol=2e-2, atol=5e-2))


# ----- the transformation -----
def route_cpu_linears(model: nn.Module) -> nn.Module:
    """Replace every plain nn.Linear in `model` (in place) by a RoutedLinear holding the same parameters, all
    sharing one RouteTable; returns the model. Swapped-in layers (quantized linears), layers that are
    already routed and layers with hooks are left as they are."""
    table = route_table(model) or RouteTable()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and not _has_hooks(child):
                setattr(parent, name, RoutedLinear(child, table))
    return model


def unroute(model: nn.Module) -> nn.Module:
    """Undo route_cpu_linears: every RoutedLinear becomes a plain nn.Linear holding the same parameters."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, RoutedLinear):
                setattr(parent, name, _plain(child))
    return model


def route_table(model: nn.Module) -> RouteTable | None:
    """The RouteTable of a routed model (None if it has no RoutedLinear)."""
    return next((m.table for m in model.modules() if isinstance(m, RoutedLinear)), None)


def _plain(layer: RoutedLinear) -> nn.Linear:
    with torch.device("meta"):  # no throwaway initialisation: the parameters are replaced below
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    linear.register_parameter("weight", layer.weight)
    linear.register_parameter("bias", layer.bias)
    return linear


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks)
