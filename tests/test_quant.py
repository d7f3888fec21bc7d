"""Quantization formats and layer-level algorithms: exact bounds, packing, GPTQ against its specification,
GPTQ/AWQ against RTN on the same layer and calibration data, and the packed kernels against dequantization."""

from __future__ import annotations

import warnings

import pytest
import torch

from llmlab.errors import ConfigError
from llmlab.infer.quant.awq import awq_quantize_layer
from llmlab.infer.quant.gptq import HessianAccumulator, gptq_quantize_weight
from llmlab.infer.quant.linear import (
    QuantLinear,
    check_scheme,
    find_params,
    pack_int4,
    quantize_codes,
    unpack_int4,
)
from llmlab.infer.quant.rtn import dequantize_weight, fake_quantize, rtn_linear, rtn_quantize_weight


def _weights(N=48, K=128, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * 0.05
    w[3, 7] = 0.9  # an outlier weight sets its channel's / group's range
    w[5, 64:96] = torch.rand(32, generator=g) * 0.1  # an all-positive group: zero point 0
    w[6, :32] = 0.0  # an all-zero group: scale at its floor, reconstructs exactly 0
    return w


def _activations(T=1024, K=128, seed=1) -> torch.Tensor:
    """Correlated inputs with a few large-magnitude channels, as LLM activations have (Dettmers et al.
    2022)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(K) + torch.randn(K, K, generator=g) / K ** 0.5
    x = torch.randn(T, K, generator=g) @ mix
    x[:, [5, K // 3, 2 * K // 3]] *= 12.0
    return x


def test_pack_unpack_exact():
    codes = torch.tensor([[1, 2, 15, 0], [7, 8, 0, 15]], dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.tolist() == [[0x21, 0x0F], [0x87, 0xF0]]  # column 2j low nibble, 2j+1 high nibble
    assert torch.equal(unpack_int4(packed), codes)
    rand = torch.randint(0, 16, (33, 96), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    assert torch.equal(unpack_int4(pack_int4(rand)), rand)


def test_int8_round_trip_error_bound():
    w = _weights()
    codes, scales, zeros = rtn_quantize_weight(w, 8)
    assert codes.abs().max() <= 127 and torch.equal(zeros, torch.zeros(48))
    assert torch.equal(scales, scales.half().float())  # stored as fp16 without loss
    err = (dequantize_weight(codes, scales, zeros, 8) - w).abs()
    assert bool((err <= scales[:, None] / 2 * (1 + 1e-6)).all())
    assert float((err / scales[:, None]).max()) > 0.45  # the bound is tight, not vacuous
    q = QuantLinear.from_codes(codes, scales, None, 8)
    assert q.qweight.dtype == torch.int8 and q.qweight.shape == (48, 128)
    assert torch.equal(q.dequantized_weight(), dequantize_weight(codes, scales, zeros, 8))


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_round_trip_error_bound(group_size):
    w = _weights()
    codes, scales, zeros = rtn_quantize_weight(w, 4, group_size)
    assert scales.shape == zeros.shape == (48, 128 // group_size)
    assert codes.min() >= 0 and codes.max() <= 15 and zeros.min() >= 0 and zeros.max() <= 15
    assert torch.equal(scales, scales.half().float())
    w_hat = dequantize_weight(codes, scales, zeros, 4, group_size)
    per_elem_scale = scales.repeat_interleave(group_size, dim=1)
    err = (w_hat - w).abs()
    assert bool((err <= per_elem_scale / 2 * (1 + 1e-6)).all())
    if group_size <= 32:
        assert float(zeros[5, 64 // group_size]) == 0.0  # all-positive group: range [0, max]
    assert torch.equal(w_hat[6, :32], torch.zeros(32))  # all-zero group exact
    exact_zero = w == 0
    assert torch.equal(w_hat[exact_zero], torch.zeros(int(exact_zero.sum())))  # zero is on every grid
    q = QuantLinear.from_codes(codes, scales, zeros, 4, group_size)
    assert q.qweight.shape == (48, 64) and q.qweight.dtype == torch.uint8
    assert torch.equal(q.dequantized_weight(), w_hat)


def test_find_params_by_hand():
    scale, zero = find_params(torch.tensor([[-0.3, 0.0, 0.45]]), 4)
    # range [-0.3, 0.45] / 15 = 0.05 (rounded up to fp16), zero = round(0.3 / 0.05) = 6
    assert float(scale) == pytest.approx(0.05, rel=1e-3) and float(scale) >= 0.05 and float(zero) == 6
    q = quantize_codes(torch.tensor([-0.3, 0.0, 0.45, 0.1]), scale, zero, 4)
    assert q.tolist() == [0.0, 6.0, 15.0, 8.0]
    scale8, _ = find_params(torch.tensor([[0.5, -1.27]]), 8)
    assert float(scale8) == pytest.approx(0.01, rel=1e-3)


def test_quantlinear_matches_dequantized_weight_and_keeps_bias():
    lin = torch.nn.Linear(128, 48)
    with torch.no_grad():
        lin.weight.copy_(_weights())
    x = torch.randn(5, 3, 128)
    for bits, g in ((8, None), (4, 32)):
        q = rtn_linear(lin, bits, g)
        q.kernel = "dequant"
        want = x @ q.dequantized_weight().t() + lin.bias
        assert torch.allclose(q(x), want, atol=1e-5)
        assert torch.allclose(q.dequantized_weight(), fake_quantize(lin.weight, bits, g))


def test_casting_to_half_precision_keeps_the_scales_exact():
    """model.to(bfloat16) must not round the quantization grid: the scales stay fp32 (bf16 would move them
    by up to 0.4%), and the dequantized weight in bf16 is the fp32 one rounded once."""
    lin = torch.nn.Linear(128, 48)
    with torch.no_grad():
        lin.weight.copy_(_weights())
    for bits, g in ((8, None), (4, 32)):
        q = rtn_linear(lin, bits, g)
        scales = q.scales.clone()
        half = q.to(torch.bfloat16)
        assert half.scales.dtype == torch.float32 and torch.equal(half.scales, scales)
        assert half.bias.dtype == torch.bfloat16  # everything else follows the cast
        assert torch.equal(half.dequantized_weight(torch.bfloat16), q.dequantized_weight().to(torch.bfloat16))
        from_bf16_bias = QuantLinear.from_codes(q.codes(), scales, q.zeros, bits, g, bias=half.bias)
        assert from_bf16_bias.scales.dtype == torch.float32 and torch.equal(from_bf16_bias.scales, scales)


def _output_error(W, W_hat, X):
    return float((X @ W.t() - X @ W_hat.t()).norm())


@pytest.mark.parametrize("bits,group_size", [(4, 32), (4, 128), (8, None)])
def test_gptq_and_awq_beat_rtn_on_the_same_layer(bits, group_size):
    W, X = _weights(64, 128) * 1.0, _activations()
    rtn = _output_error(W, fake_quantize(W, bits, group_size), X)
    acc = HessianAccumulator(128)
    for chunk in X.split(256):
        acc.add(chunk)
    assert torch.allclose(acc.result(), 2 * X.t() @ X / X.shape[0], rtol=1e-4, atol=1e-3)
    for act_order in (False, True):
        codes, scales, zeros = gptq_quantize_weight(W, acc.result(), bits, group_size, act_order=act_order)
        gptq = _output_error(W, dequantize_weight(codes, scales, zeros, bits, group_size), X)
        assert gptq < 0.8 * rtn, (act_order, gptq, rtn)
    s, W_scaled, clip = awq_quantize_layer(W, X, bits, group_size)
    W_awq = fake_quantize(W_scaled, bits, group_size, clip) / s  # what (X / s) Q(W s)^T computes
    awq = _output_error(W, W_awq, X)
    assert awq < 0.9 * rtn, (awq, rtn)


def _gptq_reference(W, H, bits, G, percdamp=0.01):
    """The algorithm as first stated (OBS, one column at a time, explicit inverse downdates, float64):
    the specification the Cholesky / lazy-batch implementation must reproduce."""
    W, H = W.double().clone(), H.double().clone()
    N, K = W.shape
    H += percdamp * H.diagonal().mean() * torch.eye(K, dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    codes = torch.zeros(N, K, dtype=torch.float64)
    for j in range(K):
        if j % G == 0:
            s, z = find_params(W[:, j:j + G].float(), bits)
            s, z = s.double(), z.double()
        q = quantize_codes(W[:, j], s, z, bits).double()
        codes[:, j] = q
        err = (W[:, j] - (q - z) * s) / Hinv[j, j]
        W[:, j + 1:] -= err[:, None] * Hinv[j, j + 1:][None, :]
        Hinv = Hinv - Hinv[:, j:j + 1] @ Hinv[j:j + 1, :] / Hinv[j, j]  # drop column j (Gaussian elimination)
    return codes


def test_gptq_matches_the_column_by_column_specification():
    torch.manual_seed(0)
    W = torch.randn(8, 32) * 0.1
    X = _activations(T=256, K=32)
    H = 2 * X.t() @ X / X.shape[0]
    want = _gptq_reference(W, H, 4, 8)
    got, _, _ = gptq_quantize_weight(W, H, 4, 8, blocksize=16)  # two lazy blocks of two groups each
    assert (got.double() != want).float().mean() < 0.01  # fp32 vs fp64 may flip a rare tie
    # With uncorrelated unit-variance inputs H is diagonal: no error feedback, GPTQ is exactly RTN.
    rtn, _, _ = rtn_quantize_weight(W, 4, 8)
    diag, _, _ = gptq_quantize_weight(W, torch.eye(32) * 2, 4, 8)
    assert torch.equal(diag, rtn)


def test_gptq_dead_inputs_get_zero_weight():
    W, X = _weights(16, 128), _activations(256, 128)
    X[:, 10] = 0.0
    codes, scales, zeros = gptq_quantize_weight(W, 2 * X.t() @ X / 256, 4, 32)
    assert torch.equal(dequantize_weight(codes, scales, zeros, 4, 32)[:, 10], torch.zeros(16))


@pytest.mark.parametrize("bits,group_size", [(8, None), (4, 32), (4, 128)])
def test_packed_kernel_agrees_with_dequantization(bits, group_size):
    lin = torch.nn.Linear(256, 64, bias=True)
    q = rtn_linear(lin, bits, group_size)
    x = torch.randn(37, 256)
    q.kernel = "dequant"
    want = q(x)
    q.kernel = "packed"
    with warnings.catch_warnings(record=True):
        got = q(x)
    # the CPU kernels take bf16 activations: agreement to bf16 precision
    assert float((got - want).norm() / want.norm()) < 1e-2
    # misaligned storage (as safetensors maps it) must not crash the int8 kernel
    buf = torch.empty(q.qweight.numel() + 64, dtype=q.qweight.dtype)
    q.qweight = buf[8:8 + q.qweight.numel()].view_as(q.qweight).copy_(q.qweight)
    q._impl = {}
    with warnings.catch_warnings(record=True):
        assert float((q(x) - want).norm() / want.norm()) < 1e-2


def test_packed_kernel_falls_back_cleanly():
    q = rtn_linear(torch.nn.Linear(64, 40), 4, 32)  # 40 outputs: the CPU int4 kernel needs N % 16 == 0
    x = torch.randn(4, 64)
    q.kernel = "dequant"
    want = q(x)
    q.kernel = "packed"
    with pytest.warns(UserWarning, match="dequantize-on-the-fly"):
        got = q(x)
    assert torch.equal(got, want)


def test_check_scheme_bad_inputs():
    with pytest.raises(ConfigError, match="bits=3"):
        check_scheme(3, 32)
    with pytest.raises(ConfigError, match="group_size=48 does not divide the input width 64 of layer x"):
        check_scheme(4, 48, 64, "x")
    with pytest.raises(ConfigError, match="group_size=0"):
        check_scheme(4, 0)
    check_scheme(8, 48, 64)  # int8 is per channel: the group size does not apply
