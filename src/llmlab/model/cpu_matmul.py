"""CPU inference matmuls through oneDNN, with each weight reordered once into oneDNN's blocked layout.

Why: torch's CPU `F.linear` in fp32 goes to MKL's sgemm, which on this project's machines (AMD EPYC, MKL
2024.2) takes a slow path for small row counts: a product over 2-8 rows costs 2-3.5x one over a single row,
so a speculative verification forward over K+1 tokens costs several decode steps. oneDNN (shipped inside
every x86 CPU build of torch, vendor-neutral JIT kernels) with a pre-packed weight costs nearly the same for
1 to 8 rows, and is 2-3x faster than MKL from 4 rows up to prefill and evaluation sizes (d_model 512 layers,
2 threads). A forward over 8 tokens of the 21M-parameter speculative-decoding benchmark target costs 1.5
one-token steps this way, against 2.8 through MKL (benchmarks/bench_speculative.py prints both). A single
row (a plain decode step) stays on the row-block product in transformer.linear, which is as fast for
weights streamed from memory and faster for weights that stay in cache.

    y = packed_linear(module, x)   # == F.linear(x, module.weight, module.bias) up to fp32 rounding, or None

Where it applies: CPU tensors, no autograd (verification, prefill, evaluation), fp32 (or bf16 where the CPU
has bf16 instructions), and products of at least MIN_MACS multiply-adds: a oneDNN call costs ~12 us of fixed
overhead, where F.linear on a 128 x 128 weight costs 2 us. Everything else returns None and the caller uses
another route. The packed copy is kept per module, keyed by the weight's storage and version counter, so an
optimizer step, load_state_dict or .to() makes it repack on the next call (weights created under
torch.inference_mode have no version counter: changing one in place there is not seen); it costs one extra
copy of each packed weight in memory.

The ops are torch.ops.mkldnn._reorder_linear_weight / _linear_pointwise, the ones torch's inductor emits for
CPU linears. A build without them (or a CPU oneDNN refuses) is detected once, by a probe compared against
F.linear, and then everything stays on the other routes.
"""

from __future__ import annotations

import functools
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

MIN_MACS = 1 << 18  # rows x out x in below which oneDNN's call overhead outweighs its faster kernel
_enabled = True


def enable(flag: bool = True) -> bool:
    """Turn the oneDNN route on or off for the whole process (benchmarks compare the two); returns the
    previous setting."""
    global _enabled
    previous, _enabled = _enabled, bool(flag)
    return previous


def packed_linear(module: nn.Linear, x: torch.Tensor) -> torch.Tensor | None:
    """F.linear(x, module.weight, module.bias) through a packed oneDNN weight, or None where that does not pay
    or does not apply (see the module docstring)."""
    w = module.weight
    N, K = w.shape
    if (not _enabled or x.device.type != "cpu" or x.dtype != w.dtype or torch.is_grad_enabled()
            or x.numel() * N < MIN_MACS or not onednn_supports(w.dtype) or torch.compiler.is_compiling()):
        return None
    return torch.ops.mkldnn._linear_pointwise(x, _packed_weight(module), module.bias, "none", [], "")


# module -> ((storage, version, dtype) of the weight it was packed from, packed weight). Kept beside the modules,
# not on them: an opaque oneDNN tensor cannot be deep-copied or pickled, and the entry goes with the module.
_PACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _packed_weight(module: nn.Linear) -> torch.Tensor:
    w = module.weight
    # Inference tensors (made under torch.inference_mode) keep no version counter; only their storage counts.
    key = (w.data_ptr(), -1 if w.is_inference() else w._version, w.dtype)
    cached = _PACKED.get(module)
    if cached is None or cached[0] != key:
        cached = _PACKED[module] = (key, torch.ops.mkldnn._reorder_linear_weight(w.detach(), None))
    return cached[1]


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
