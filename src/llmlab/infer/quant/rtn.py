"""Round-to-nearest (RTN) weight quantization: the baseline GPTQ and AWQ are measured against.

Each weight is rounded independently to the nearest point of its channel's (int8) or group's (int4) grid
(see linear.py for the formats). No data is needed. `clip` optionally shrinks each group's range before
the grid is chosen -- AWQ's clipping search (awq.py) finds such ranges; RTN alone never clips.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from llmlab.infer.quant.linear import QuantLinear, dequantize_codes, find_params, quantize_codes


def rtn_quantize_weight(w: torch.Tensor, bits: int, group_size: int | None = None,
                        clip: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K] -> (codes [N, K] as float, scales, zeros): [N] for int8, [N, K/G] for int4.

    clip: max |w| kept per row (int8, [N]) or per group (int4, [N, K/G]); weights beyond are clamped.
    """
    N, K = w.shape
    G = K if bits == 8 else group_size
    groups = w.float().reshape(N, K // G, G)
    if clip is not None:
        c = clip.reshape(N, K // G, 1).float()
        groups = torch.maximum(torch.minimum(groups, c), -c)
    scale, zero = find_params(groups, bits)  # [N, K/G]
    codes = quantize_codes(groups, scale[..., None], zero[..., None], bits).reshape(N, K)
    if bits == 8:
        return codes, scale.reshape(N), zero.reshape(N)
    return codes, scale, zero


def dequantize_weight(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                      group_size: int | None = None) -> torch.Tensor:
    """Float weight [N, K] from rtn_quantize_weight's output (the same numbers QuantLinear computes with)."""
    N, K = codes.shape
    G = K if bits == 8 else group_size
    w = dequantize_codes(codes.float().reshape(N, K // G, G), scales.reshape(N, -1, 1).float(),
                         zeros.reshape(N, -1, 1).float())
    return w.reshape(N, K)


def fake_quantize(w: torch.Tensor, bits: int, group_size: int | None = None,
                  clip: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize then dequantize (float [N, K]): what the layer will compute with."""
    return dequantize_weight(*rtn_quantize_weight(w, bits, group_size, clip), bits, group_size)


def to_quant_linear(linear: nn.Linear, codes, scales, zeros, bits: int, group_size: int | None,
                    input_scale: torch.Tensor | None = None) -> QuantLinear:
    """A QuantLinear holding the given codes, with `linear`'s bias (None for int8's all-zero zeros)."""
    bias = linear.bias.detach() if linear.bias is not None else None
    zeros = zeros if bits == 4 else None  # int8 is symmetric
    q = QuantLinear.from_codes(codes, scales, zeros, bits, group_size, bias, input_scale)
    return q.to(linear.weight.device)


def rtn_linear(linear: nn.Linear, bits: int, group_size: int | None = None,
               clip: torch.Tensor | None = None, input_scale: torch.Tensor | None = None) -> QuantLinear:
    """Quantize an nn.Linear (whose weight may already carry AWQ's input-channel scales) by RTN."""
    codes, scales, zeros = rtn_quantize_weight(linear.weight.detach(), bits, group_size, clip)
    return to_quant_linear(linear, codes, scales, zeros, bits, group_size, input_scale)
