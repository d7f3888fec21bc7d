"""Device and dtype resolution shared by training, inference and evaluation, and the device sync timers use.

`device="auto"` picks cuda, then mps, then cpu; `dtype="auto"` is bf16 on GPUs that support it and fp32
elsewhere (CPU bf16 matmuls are slow and lossy, so CPU runs stay in fp32).
"""

from __future__ import annotations

import torch

from llmlab.errors import ConfigError

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"device={device!r} is not a device torch knows; use auto, cpu, cuda, cuda:N "
                          "or mps") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r}: torch sees no CUDA device here; use cpu (or auto)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"device={device!r}: only {torch.cuda.device_count()} CUDA device(s) here; "
                          f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"device={device!r}: torch sees no MPS device here; use cpu (or auto)")
    return dev


def resolve_dtype(dtype: str | torch.dtype = "auto", device: torch.device | str = "cpu") -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    device = torch.device(device)
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype={dtype!r} is unknown; use one of auto, {', '.join(sorted(_DTYPES))}")
    return _DTYPES[dtype]


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a wall-clock interval covers the kernels it launched (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
