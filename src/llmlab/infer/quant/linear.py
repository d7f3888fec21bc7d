"""Weight-only quantized linear layers and the integer formats behind them.

Two schemes, both "weight-only": activations stay in floating point, weights are stored as small integers
plus floating-point scales, and the matmul either dequantizes on the fly or calls one of torch's packed
integer-weight kernels.

    int8  symmetric, one scale per output channel:     w ~= q * s,          q in [-127, 127]
    int4  asymmetric, one scale and zero point per      w ~= (q - z) * s,    q, z in [0, 15]
          group of `group_size` consecutive inputs

Storage (the tensors a quantized checkpoint holds for a layer with N outputs and K inputs):
    int8: qweight int8 [N, K], scales fp16 [N]
    int4: qweight uint8 [N, K/2] (two codes per byte: column 2j in the low nibble, 2j+1 in the high one),
          scales fp16 [N, K/G], zeros uint8 [N, K/G]
    plus bias [N] when the layer had one, and input_scale [K] when AWQ put a per-input-channel scale in
    front of the layer (see awq.py). Scales are written as fp16 (half the bytes of fp32; rounding is
    taken into account when quantizing, see `find_params`) and follow the model's dtype in memory.

Why the scale is rounded *up* to fp16: with s >= the exact range / qmax, every weight of the group maps into
[qmin, qmax] without clipping, so the reconstruction error of round-to-nearest is at most s/2 per element --
a bound the tests check exactly. The int4 range always contains 0 (min <= 0 <= max), so zero is exact and
the integer zero point never needs clamping (the GPTQ reference quantizer does the same).

Kernels. `QuantLinear.kernel` picks how the matmul runs:
  "dequant"  rebuild the weight in the activation dtype, a block of output rows at a time so the temporary
             stays in cache, then F.linear: exact w.r.t. the stored integers on any device;
  "packed"   torch's integer-weight kernels: torch._weight_int8pack_mm (int8) and
             torch._weight_int4pack_mm_for_cpu / torch._weight_int4pack_mm (int4, "tinygemm" layout with
             w = (q - 8) * s + z'). On CPU their fast paths take bf16 activations -- with fp32
             activations they fall back to a scalar loop far slower than an fp32 matmul
             (docs/performance.md), so fp32 inputs are cast to bf16 for the kernel and the result cast back;
  "auto"     (default) "packed" when the op exists for this device and shape and agrees with "dequant" on a
             probe input, otherwise "dequant". The choice is made once per device/dtype and cached.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmlab.errors import ConfigError

BITS = (4, 8)
QMIN = {8: -127, 4: 0}
QMAX = {8: 127, 4: 15}
KERNELS = ("auto", "packed", "dequant")
_FP16_TINY = 2.0 ** -24  # smallest positive fp16 (subnormal): a scale of 0 would divide by zero


# ----- the integer formats -----
def round_scale_up(scale: torch.Tensor) -> torch.Tensor:
    """The smallest fp16 value >= scale, returned as float32 (so storing it as fp16 is lossless)."""
    scale = scale.float().clamp(min=_FP16_TINY, max=65504.0)
    half = scale.half()
    up = torch.nextafter(half, torch.full_like(half, float("inf")))
    return torch.where(half.float() < scale, up, half).float()


def find_params(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for quantizing the last dim of `w` as one group: shapes w.shape[:-1].

    int8: symmetric, s = max|w| / 127, zero 0.  int4: range [min(w, 0), max(w, 0)] onto [0, 15],
    s = range / 15, zero = round(-min / s).
    """
    w = w.float()
    if bits == 8:
        scale = round_scale_up(w.abs().amax(-1) / QMAX[8])
        return scale, torch.zeros_like(scale)
    lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
    scale = round_scale_up((hi - lo) / QMAX[4])
    zero = torch.round(-lo / scale).clamp(0, QMAX[4])
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (as float) of w with broadcastable scale/zero: clamp(round(w / s) + z)."""
    return (torch.round(w.float() / scale) + zero).clamp(QMIN[bits], QMAX[bits])


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (q - zero) * scale


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] codes in [0, 15] -> uint8 [N, K/2]: column 2j in the low nibble, 2j+1 in the high."""
    codes = codes.to(torch.uint8)
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4: uint8 [N, K/2] -> uint8 [N, K]."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def check_scheme(bits: int, group_size: int | None, in_features: int | None = None, name: str = "") -> None:
    """ConfigError (one line, with the fix) for bits outside {4, 8} or a group size that does not fit."""
    if isinstance(bits, bool) or bits not in BITS:
        raise ConfigError(f"bits={bits!r} is not supported; use 8 (per-channel int8) or 4 (group-wise int4)")
    if bits == 8:
        return  # int8 is per output channel: group_size does not apply
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2 or group_size % 2:
        raise ConfigError(f"group_size={group_size!r} must be an even integer >= 2 for int4 (e.g. 32, 64 "
                          "or 128)")
    if in_features is not None and in_features % group_size:
        fits = [g for g in (256, 128, 64, 32, 16) if in_features % g == 0]
        hint = f"use one of {', '.join(map(str, fits))}" if fits else "use a group size that divides it"
        raise ConfigError(f"group_size={group_size} does not divide the input width {in_features} of layer "
                          f"{name or '?'}; {hint} (it must divide every quantized layer's width)")


# ----- the module -----
class QuantLinear(nn.Module):
    """Drop-in replacement for nn.Linear(in_features, out_features) with int8 or int4 weights."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int | None = None,
                 bias: bool = False, input_scale: bool = False, device=None, dtype=torch.float32):
        super().__init__()
        check_scheme(bits, group_size, in_features)
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.group_size = group_size if bits == 4 else None
        N, K = out_features, in_features
        if bits == 8:
            self.register_buffer("qweight", torch.zeros(N, K, dtype=torch.int8, device=device))
            self.register_buffer("scales", torch.ones(N, dtype=torch.float32, device=device))
            self.zeros = None
        else:
            G = self.group_size
            self.register_buffer("qweight", torch.zeros(N, K // 2, dtype=torch.uint8, device=device))
            self.register_buffer("scales", torch.ones(N, K // G, dtype=torch.float32, device=device))
            self.register_buffer("zeros", torch.zeros(N, K // G, dtype=torch.uint8, device=device))
        self.register_buffer("bias", torch.zeros(N, dtype=dtype, device=device) if bias else None)
        ones = torch.ones(K, dtype=dtype, device=device) if input_scale else None
        self.register_buffer("input_scale", ones)
        self.kernel = "auto"
        self._impl: dict = {}  # (device, dtype, kernel) -> (function or None for dequant, payload)

    # ----- construction -----
    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
                   group_size: int | None = None, bias: torch.Tensor | None = None,
                   input_scale: torch.Tensor | None = None) -> QuantLinear:
        """Build from integer codes [N, K] (int8 values, or int4 values in [0, 15]) and their parameters:
        scales [N] (int8) or [N, K/G] (int4, with zeros [N, K/G])."""
        N, K = codes.shape
        dtype = bias.dtype if bias is not None else torch.float32
        m = cls(K, N, bits, group_size, bias is not None, input_scale is not None, codes.device, dtype)
        with torch.no_grad():
            if bits == 8:
                m.qweight.copy_(codes.round().to(torch.int8))
                m.scales.copy_(scales.reshape(N))
            else:
                m.qweight.copy_(pack_int4(codes.round().to(torch.uint8)))
                m.scales.copy_(scales.reshape(N, -1))
                m.zeros.copy_(zeros.reshape(N, -1).round().to(torch.uint8))
            if bias is not None:
                m.bias.copy_(bias)
            if input_scale is not None:
                m.input_scale.copy_(input_scale)
        return m

    def codes(self) -> torch.Tensor:
        """Integer codes [N, K] (int8 or uint8)."""
        return self.qweight if self.bits == 8 else unpack_int4(self.qweight)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32,
                           rows: slice = slice(None)) -> torch.Tensor:
        """The weight the stored integers stand for, [N, K] (or the given block of rows), computed in fp32 and
        rounded once to `dtype`."""
        if self.bits == 8:
            return (self.qweight[rows].float() * self.scales[rows, None]).to(dtype)
        q = unpack_int4(self.qweight[rows]).float()
        n, G = q.shape[0], self.group_size
        scales, zeros = self.scales[rows], self.zeros[rows].float()
        return ((q.view(n, -1, G) - zeros[..., None]) * scales[..., None]).view(n, -1).to(dtype)

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.bits == 4 else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}{g}, "
                f"bias={self.bias is not None}, kernel={self.kernel}")

    # ----- scales: fp32 in memory whatever the compute dtype (a bf16 copy would round them by up to 0.4%;
    # kernels convert them when they build their payload), fp16 in checkpoints (quantizers round them to
    # fp16-representable values, so that is exact) -----
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "scales"] = destination[prefix + "scales"].to(torch.float16)

    def _apply(self, fn, recurse=True):
        self._impl = {}  # moved or cast: packed copies of the weight are stale
        scales = self.scales
        super()._apply(fn, recurse)
        if self.scales.dtype != torch.float32:  # model.to(bfloat16): move the scales, keep them exact
            self.scales = scales.to(device=self.scales.device, dtype=torch.float32)
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._impl = {}
        key = prefix + "scales"
        if key in state_dict and state_dict[key].dtype != self.scales.dtype:
            state_dict[key] = state_dict[key].to(self.scales.dtype)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ----- forward -----
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[:-1]
        x = x.reshape(-1, self.in_features)
        if self.input_scale is not None:
            x = x * self.input_scale.to(x.dtype)
        fn, payload = self._kernel_for(x)
        y = self._dequant_matmul(x) if fn is None else fn(x, payload)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape, self.out_features)

    def _dequant_matmul(self, x: torch.Tensor) -> torch.Tensor:
        # Rebuild the weight a block of rows at a time: the fp temporary (~1 MB) stays in cache instead
        # of streaming a full-size copy through memory before the matmul reads it again.
        # On GPUs one whole-weight rebuild is cheaper than a kernel launch per block.
        step = max(16, (1 << 18) // self.in_features)
        if step >= self.out_features or x.device.type != "cpu":
            return F.linear(x, self.dequantized_weight(x.dtype))
        out = [F.linear(x, self.dequantized_weight(x.dtype, slice(i, i + step)))
               for i in range(0, self.out_features, step)]
        return torch.cat(out, dim=-1)

    def _kernel_for(self, x: torch.Tensor):
        key = (x.device, x.dtype, self.kernel)
        if key not in self._impl:
            self._impl[key] = self._choose_kernel(x.device, x.dtype)
        return self._impl[key]

    def _choose_kernel(self, device: torch.device, dtype: torch.dtype):
        if self.kernel not in KERNELS:
            raise ConfigError(f"kernel={self.kernel!r} is unknown; use one of {', '.join(KERNELS)}")
        if self.kernel == "dequant":
            return None, None
        try:
            with torch.inference_mode(False), torch.no_grad():
                fn, payload = (_int8_packed if self.bits == 8 else _int4_packed)(self, device)
                probe = torch.randn(3, self.in_features, generator=torch.Generator().manual_seed(0))
                probe = probe.to(device=device, dtype=dtype)
                got, want = fn(probe, payload).float(), self._dequant_matmul(probe).float()
            err = ((got - want).norm() / want.norm().clamp(min=1e-12)).item()
            if not err < 2e-2:  # bf16 activations give ~3e-3; a wrong layout gives ~1
                raise RuntimeError(f"packed kernel disagrees with dequantization (relative error {err:.2g})")
            return fn, payload
        except (RuntimeError, NotImplementedError, AttributeError) as e:
            if self.kernel == "packed":
                warnings.warn(f"QuantLinear: packed int{self.bits} kernel unavailable on {device} "
                              f"({str(e).splitlines()[0][:120]}); using dequantize-on-the-fly", stacklevel=3)
            return None, None


# ----- torch's packed kernels (payloads are derived, never saved) -----
def _kernel_dtype(device: torch.device) -> torch.dtype:
    # CPU int8/int4 kernels are vectorised for bf16 inputs only; tinygemm on CUDA requires bf16.
    return torch.bfloat16


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """t, copied if it is not contiguous and 64-byte aligned. torch 2.13's CPU _weight_int8pack_mm reads
    out of bounds (segfault) on misaligned inputs with more than a few rows, and tensors loaded from a
    safetensors file sit at arbitrary offsets of the mapped file."""
    if t.is_contiguous() and t.data_ptr() % 64 == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _int8_packed(m: QuantLinear, device: torch.device):
    if not hasattr(torch, "_weight_int8pack_mm"):
        raise NotImplementedError("torch._weight_int8pack_mm is missing")
    kdt = _kernel_dtype(device)
    weight, scales = _aligned(m.qweight.to(device)), _aligned(m.scales.to(device=device, dtype=kdt))

    def run(x, payload):
        w, s = payload
        return torch._weight_int8pack_mm(_aligned(x.to(kdt)), w, s).to(x.dtype)

    return run, (weight, scales)


def _int4_packed(m: QuantLinear, device: torch.device):
    G = m.group_size
    kdt = _kernel_dtype(device)
    codes = unpack_int4(m.qweight).to(device)
    # tinygemm dequantizes as (q - 8) * s + z', so z' = (8 - zero) * s turns our integer zero point into its
    # floating-point offset; layout [K/G, N, 2].
    scales = m.scales.to(device=device, dtype=torch.float32)
    offset = (8.0 - m.zeros.to(device=device, dtype=torch.float32)) * scales
    scale_zero = torch.stack([scales.t(), offset.t()], dim=-1).to(kdt).contiguous()
    if device.type == "cpu":
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
        op = torch.ops.aten._weight_int4pack_mm_for_cpu
    else:
        # StopIteration (no tile fits) becomes the RuntimeError below
        tiles = next(t for t in (8, 4, 2) if m.in_features % (t * 16) == 0)
        as_bytes = ((codes[:, 0::2] << 4) | codes[:, 1::2]).to(torch.uint8).contiguous()
        packed = torch.ops.aten._convert_weight_to_int4pack(as_bytes, tiles)
        op = torch.ops.aten._weight_int4pack_mm

    def run(x, payload):
        w, sz = payload
        return op(_aligned(x.to(kdt)), w, G, sz).to(x.dtype)

    return run, (packed, scale_zero)


def set_kernel(model: nn.Module, kernel: str) -> nn.Module:
    """Choose "auto" | "packed" | "dequant" for every QuantLinear in `model` (see module docstring)."""
    if kernel not in KERNELS:
        raise ConfigError(f"kernel={kernel!r} is unknown; use one of {', '.join(KERNELS)}")
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.kernel = kernel
    return model


__all__ = ["QuantLinear", "find_params", "quantize_codes", "dequantize_codes", "pack_int4", "unpack_int4",
           "check_scheme", "set_kernel", "round_scale_up", "BITS", "QMIN", "QMAX"]
