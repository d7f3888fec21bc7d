"""Measured CPU routes for nn.Linear (llmlab.infer.cpu_linear): every route computes F.linear, the choice is
made once per shape by measurement and reused, training and other devices keep F.linear, and the model's
parameters, state_dict and outputs are those of the plain model."""

from __future__ import annotations

import copy
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from llmlab.infer import cpu_linear
from llmlab.infer.cpu_linear import RoutedLinear, RouteTable, route_cpu_linears, route_table, unroute
from llmlab.model import ModelConfig, Transformer

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def routed(in_features: int, out_features: int, bias: bool = True, dtype=torch.float32) -> RoutedLinear:
    torch.manual_seed(0)
    return RoutedLinear(nn.Linear(in_features, out_features, bias=bias).to(dtype), RouteTable())


def tiny_model(flavour: str = "llama") -> Transformer:
    torch.manual_seed(0)
    extra = dict(n_kv_head=2) if flavour == "llama" else {}
    return Transformer(ModelConfig.preset(flavour, "tiny", **extra)).eval()


def ids(B: int, T: int, vocab: int = 256) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,out_features,bias", [((1, 1, 64), 96, True), ((1, 5, 64), 128, False),
                                                     ((2, 3, 32), 1000, False), ((9, 64), 64, True),
                                                     ((3, 1, 48), 31, True)])
def test_every_route_computes_f_linear(shape, out_features, bias, dtype):
    layer = routed(shape[-1], out_features, bias, dtype)
    x = torch.randn(*shape).to(dtype)
    expected = F.linear(x.float(), layer.weight.float(), None if layer.bias is None else layer.bias.float())
    names = cpu_linear.candidates(layer)
    assert names[0] == "linear" and ("rowblock" in names) == (out_features != 31)  # 31: no row blocks
    with torch.no_grad():
        for name in names:
            got = cpu_linear.ROUTES[name](layer, x)
            assert got.dtype == dtype and got.shape == expected.shape, name
            torch.testing.assert_close(got.float(), expected, **TOL[dtype], msg=name)
        torch.testing.assert_close(layer(x).float(), expected, **TOL[dtype])  # whichever route it picked


def test_each_shape_is_measured_once_and_its_route_reused(monkeypatch):
    layer = routed(64, 128)
    measured = []
    real_measure = cpu_linear.measure

    def counting(layer, x, names):
        measured.append(tuple(x.shape))
        return real_measure(layer, x, names)

    monkeypatch.setattr(cpu_linear, "measure", counting)
    with torch.no_grad():
        for _ in range(3):
            layer(torch.randn(1, 64))
            layer(torch.randn(2, 4, 64))
        layer(torch.randn(4, 2, 64))  # same rows, same shape key: no new measurement
    assert measured == [(1, 64), (2, 4, 64)]
    table = layer.table
    assert len(table.choice) == 2 and set(table.choice.values()) <= set(cpu_linear.ROUTES)
    assert len(layer._routes) == 3 and set(layer._routes.values()) == set(table.choice.values())


def _sleepy(seconds: float):
    def route(layer, x):
        time.sleep(seconds)
        return F.linear(x, layer.weight, layer.bias)
    return route


def test_a_slow_route_is_never_picked(monkeypatch):
    """Routes made slow on purpose lose; made slow on purpose, F.linear loses too (measurement decides)."""
    layer = routed(64, 128)
    for name in cpu_linear.ROUTES:
        if name != "linear":
            monkeypatch.setitem(cpu_linear.ROUTES, name, _sleepy(2e-3))
    with torch.no_grad():
        for rows in (1, 3, 16):
            layer(torch.randn(rows, 64))
    assert set(layer.table.choice.values()) == {"linear"}

    monkeypatch.undo()
    layer = routed(64, 128)
    monkeypatch.setitem(cpu_linear.ROUTES, "linear", _sleepy(2e-3))
    with torch.no_grad():
        layer(torch.randn(2, 64))
    [chosen] = layer.table.choice.values()
    assert chosen != "linear"
    used = []

    def recording(lay, x):
        used.append(chosen)
        return F.linear(x, lay.weight, lay.bias)

    monkeypatch.setitem(cpu_linear.ROUTES, chosen, recording)
    with torch.no_grad():
        layer(torch.randn(2, 64))
    assert used == [chosen]  # later calls of that shape take the chosen route, unmeasured


def test_another_route_must_beat_f_linear_by_the_margin_in_median_and_best_round():
    def pick(*medians_and_bests):
        return cpu_linear.pick({name: [best, med, med, med, 9.9] for name, med, best in medians_and_bests})

    assert pick(("linear", 1.0, 1.0), ("rowblock", 0.93, 0.8), ("onednn", 1.2, 1.2)) == "linear"
    assert pick(("linear", 1.0, 1.0), ("rowblock", 0.85, 0.8), ("onednn", 0.8, 0.7)) == "onednn"
    # a median win with no win in the best round (F.linear's rounds stalled by load): F.linear stays
    assert pick(("linear", 1.0, 0.5), ("onednn", 0.8, 0.5)) == "linear"
    assert pick(("linear", 1.0, 1.0)) == "linear"


def test_autograd_takes_f_linear_and_trains_as_nn_linear():
    torch.manual_seed(0)
    plain = nn.Linear(64, 96)
    layer = RoutedLinear(copy.deepcopy(plain), RouteTable())
    x = torch.randn(3, 64)
    layer(x).square().sum().backward()
    plain(x).square().sum().backward()
    assert not layer.table.choice  # nothing measured: grad mode never consults the table
    torch.testing.assert_close(layer.weight.grad, plain.weight.grad)
    torch.testing.assert_close(layer.bias.grad, plain.bias.grad)


def test_dtype_mismatch_fails_as_nn_linear_does():
    layer = routed(16, 8)
    with torch.no_grad(), pytest.raises(RuntimeError):
        layer(torch.randn(2, 16, dtype=torch.float64))
    assert not layer.table.choice


def test_routed_model_keeps_parameters_state_dict_and_outputs():
    model = tiny_model("gpt2")  # tied head
    state = model.state_dict()
    x = ids(2, 12)
    with torch.no_grad():
        expected = model(x)
    route_cpu_linears(model)
    layers = [m for m in model.modules() if isinstance(m, RoutedLinear)]
    assert len(layers) == 4 * model.config.n_layer + 1 and len({id(m.table) for m in layers}) == 1
    assert model.lm_head.weight is model.tok_emb.weight
    routed_state = model.state_dict()
    assert list(routed_state) == list(state)
    assert all(routed_state[k].data_ptr() == state[k].data_ptr() for k in state)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    assert route_table(model).choice  # measured during that forward
    assert route_cpu_linears(model) is model and route_table(model) is layers[0].table  # idempotent
    unroute(model)
    assert not any(isinstance(m, RoutedLinear) for m in model.modules())
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith(("qkv", "fc", "lm_head")))
    assert model.lm_head.weight is model.tok_emb.weight
    assert list(model.state_dict()) == list(state)


def test_routed_model_generates_and_computes_the_loss_as_the_plain_one(tmp_path):
    from llmlab.infer import generate

    model = tiny_model("llama")
    x, y = ids(2, 16), ids(2, 16)
    with torch.no_grad():
        loss = model.loss(x, y)
    prompt = ids(1, 8)[0].tolist()
    greedy = generate(model, prompt, 12, temperature=0)
    route_cpu_linears(model)
    with torch.no_grad():
        assert model.loss(x, y).item() == pytest.approx(loss.item(), abs=1e-5)
    assert generate(model, prompt, 12, temperature=0).tolist() == greedy.tolist()
    model.save(tmp_path / "ckpt")  # a routed model saves as a plain one
    back = Transformer.load(tmp_path / "ckpt")
    assert all(type(m) is not RoutedLinear for m in back.modules())
    stored = back.state_dict()
    for name, p in model.state_dict().items():
        torch.testing.assert_close(p, stored[name], rtol=0, atol=0, msg=name)


def test_layers_with_hooks_and_swapped_in_modules_are_left_alone():
    class Custom(nn.Linear):
        pass

    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), Custom(8, 8))
    seen = []
    model[1].register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape))
    route_cpu_linears(model)
    assert [type(m) for m in model] == [RoutedLinear, nn.Linear, Custom]
    model[0].register_forward_hook(lambda mod, inp, out: seen.append(("routed", inp[0].shape)))
    with torch.no_grad():
        model(torch.randn(1, 8))
    assert seen == [("routed", (1, 8)), (1, 8)]  # hooks on a routed layer fire too


def test_onednn_route_follows_weight_updates_and_survives_deepcopy():
    if not cpu_linear.onednn_supports(torch.float32):
        pytest.skip("this torch build / CPU has no packed oneDNN linear")
    layer = routed(128, 128)
    x = torch.randn(4, 128)
    onednn = cpu_linear.ROUTES["onednn"]

    def matches_f_linear(module):
        want = F.linear(x, module.weight, module.bias)
        torch.testing.assert_close(onednn(module, x), want, **TOL[torch.float32])

    with torch.no_grad():
        matches_f_linear(layer)
        layer.weight.mul_(2.0)  # an in-place change (an optimizer step)
        matches_f_linear(layer)
        layer.load_state_dict({"weight": torch.randn(128, 128), "bias": torch.zeros(128)})
        matches_f_linear(layer)
        twin = copy.deepcopy(layer)
        twin.weight.add_(1.0)
        matches_f_linear(twin)
    with torch.inference_mode():  # weights made here carry no version counter
        matches_f_linear(routed(128, 64))


def test_summary_lists_each_measured_shape():
    layer = routed(32, 64)
    with torch.no_grad():
        layer(torch.randn(1, 32))
        layer(torch.randn(5, 32))
    rows = layer.table.summary()
    assert [r["rows"] for r in rows] == [1, 5]
    assert all(r["route"] in r["us"] and "linear" in r["us"] and r["dtype"] == "float32" for r in rows)
