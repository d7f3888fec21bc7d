"""Training metrics: the metrics.jsonl writer, throughput, and model FLOPs utilisation (MFU).

metrics.jsonl holds one JSON object per logged optimizer step: step, tokens, loss, lr, grad_norm,
clipped, tokens_per_s, mfu, events (a list of {"type": ...} dicts: eval, checkpoint, skip, rollback, ...)
plus whatever the objective's loss function reported. Plots are derived from it, never the reverse.

MFU (PaLM, Chowdhery et al. 2022, appendix B) = achieved model FLOPs/s / peak FLOPs/s, where the model
FLOPs per token come from the model (6N for the matmuls of forward+backward plus the attention term) and
do not count activation recomputation. Peaks are dense bf16 tensor-core figures from NVIDIA's datasheets
for the GPUs in PEAK_FLOPS. For any other device (the CPU included) there is no honest datasheet number,
so `peak_flops` measures the best matmul throughput this process achieves in the training dtype once
(the fastest of the 1024^3 GEMMs run in a quarter of a second) and uses that: CPU "MFU" is therefore
relative to what this machine's BLAS can do with the current thread count, not to a vendor figure. On a
machine busy with other work the measurement catches a depressed peak and MFU reads too high; set
`train.peak_flops` (it overrides both the table and the measurement) for numbers comparable across runs.

With `train.tensorboard = true` the writer also sends the main scalars (TB_SCALARS) to a TensorBoard
event file in RUN_DIR/tensorboard (torch.utils.tensorboard; needs `pip install tensorboard`, the
`tensorboard` extra). metrics.jsonl stays the record of truth; the event file is a view of it.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from llmlab.device import synchronize
from llmlab.errors import ConfigError, DataError
from llmlab.fsutil import write_text_atomic

# Dense (no sparsity) bf16/fp16 tensor-core peak FLOP/s per GPU, matched against
# torch.cuda.get_device_name() in order, so the more specific names come first.
PEAK_FLOPS: list[tuple[str, float]] = [
    ("H200 NVL", 835e12),
    ("H200", 989e12),      # H200 SXM: same compute as H100 SXM, more and faster HBM
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),      # H100 SXM5 ("NVIDIA H100 80GB HBM3")
    ("A100", 312e12),      # A100 SXM4 and PCIe
]

_measured: dict[tuple[str, torch.dtype, int], float] = {}


def table_peak_flops(device_name: str, dtype: torch.dtype) -> float | None:
    """The datasheet peak for a GPU name in bf16/fp16, else None."""
    if dtype not in (torch.bfloat16, torch.float16):
        return None
    for key, flops in PEAK_FLOPS:
        if key.lower() in device_name.lower():
            return flops
    return None


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, n: int = 1024, min_seconds: float = 0.25,
                         min_reps: int = 4, max_reps: int = 64) -> float:
    """Best achieved FLOP/s of an n x n GEMM on `device` in `dtype` (cached per process and thread count).

    The GEMM repeats for at least min_seconds (and min_reps times, at most max_reps): a handful of ~10 ms
    products can all land in a moment when other work holds a core (a run's start is busy), which
    depresses the best one and makes MFU read over 100%."""
    key = (str(device), dtype, torch.get_num_threads())
    if key not in _measured:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        torch.mm(a, b)  # warms up the BLAS threads/kernels
        best, spent, reps = math.inf, 0.0, 0
        while reps < max_reps and (reps < min_reps or spent < min_seconds):
            synchronize(device)
            t0 = time.perf_counter()
            torch.mm(a, b)
            synchronize(device)
            took = time.perf_counter() - t0
            best, spent, reps = min(best, took), spent + took, reps + 1
        _measured[key] = 2 * n**3 / best
    return _measured[key]


def peak_flops(device: torch.device, dtype: torch.dtype, override: float | None = None) -> float:
    """Peak FLOP/s for MFU: `override`, else the datasheet table, else a measured GEMM peak."""
    if override:
        return float(override)
    if device.type == "cuda":
        found = table_peak_flops(torch.cuda.get_device_name(device), dtype)
        if found:
            return found
    # Measuring must not disturb the training RNG streams (resume exactness depends on them).
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        return measure_matmul_flops(device, dtype)


def mfu(flops_per_token: float | None, tokens_per_s: float, peak: float | None,
        world_size: int = 1) -> float | None:
    """Model FLOPs utilisation in [0, 1] (None when the FLOPs per token or the peak is unknown)."""
    if not flops_per_token or not peak:
        return None
    return flops_per_token * tokens_per_s / (peak * world_size)


class Throughput:
    """Tokens/s of the last step and an exponential moving average for the progress bar."""

    def __init__(self, smoothing: float = 0.9):
        self.smoothing = smoothing
        self.last = 0.0
        self.ema: float | None = None
        self.total_tokens = 0
        self.total_time = 0.0

    def update(self, tokens: int, seconds: float) -> float:
        self.last = tokens / max(seconds, 1e-9)
        s = self.smoothing
        self.ema = self.last if self.ema is None else s * self.ema + (1 - s) * self.last
        self.total_tokens += tokens
        self.total_time += seconds
        return self.last

    @property
    def mean(self) -> float:
        """Tokens/s over all timed steps (eval and checkpoint time excluded)."""
        return self.total_tokens / self.total_time if self.total_time else 0.0


def _clean(value: Any) -> Any:
    """JSON-safe: tensors to numbers, non-finite floats to None (strict JSON has no NaN/Infinity)."""
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


TB_SCALARS = ("loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "mfu")


def require_tensorboard() -> None:
    """ConfigError (one line, with the fix) unless the `tensorboard` package is importable."""
    try:
        import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it)
    except ImportError:
        raise ConfigError("train.tensorboard=true needs the tensorboard package; pip install tensorboard "
                          "(or pip install 'llmlab[tensorboard]'), or set train.tensorboard=false") from None


class MetricsWriter:
    """Appends one JSON object per line to metrics.jsonl, flushed per line so a crash loses at most one.

    With `tensorboard_dir`, each record's TB_SCALARS also go to a TensorBoard SummaryWriter there,
    created on the first write (only the writing rank, rank 0, ever makes the directory).
    """

    def __init__(self, path: str | Path, tensorboard_dir: str | Path | None = None):
        self.path = Path(path)  # created on the first write, so a run that fails early leaves nothing
        self.tensorboard_dir = Path(tensorboard_dir) if tensorboard_dir is not None else None
        if self.tensorboard_dir is not None:
            require_tensorboard()  # fail at startup, not at the first logged step
        self._tb = None
        self._purge_step: int | None = None

    def truncate_after(self, step: int) -> None:
        """Drop records past `step` (left by a run that died after its last checkpoint) before resuming."""
        self._purge_step = step + 1  # TensorBoard hides the dead run's events from here on
        if not self.path.exists():
            return
        kept = [line for line in read_metrics_lines(self.path) if json.loads(line).get("step", 0) <= step]
        write_text_atomic(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = _clean(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tensorboard_dir is not None:
            self._write_tensorboard(record)

    def _write_tensorboard(self, record: dict) -> None:
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.tensorboard_dir), purge_step=self._purge_step)
        step = record.get("step")
        for key in TB_SCALARS:
            if step is not None and isinstance(record.get(key), (int, float)):
                self._tb.add_scalar(f"train/{key}", record[key], global_step=step)
        self._tb.flush()  # like metrics.jsonl: a crash loses at most the current record

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics_lines(path: str | Path) -> list[str]:
    """The records of a metrics file as lines, each checked (`record_problem`). A torn last line, which a
    crash mid-write leaves, is ignored; any other bad line is a DataError naming the file and the line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise  # callers check for the file first (a run that has not logged yet has none)
    except OSError as e:
        raise DataError(f"{path} cannot be read ({e.strerror}); check the run directory's permissions") from e
    numbered = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    lines = []
    for i, (n, line) in enumerate(numbered):
        try:
            problem = record_problem(json.loads(line))
        except json.JSONDecodeError:
            problem = "not JSON"
        if problem is None:
            lines.append(line)
        elif i < len(numbered) - 1 or not text.endswith(line) or problem != "not JSON":
            raise DataError(f"{path} line {n} is not a metrics record ({problem}); delete or fix that line "
                            "(each line is one JSON object with an integer step)")
    return lines


_NUMBERS = ("tokens", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "val_loss")


def record_problem(record: Any) -> str | None:
    """Why a parsed metrics line is not a record (None if it is one): a JSON object whose step is an integer,
    whose figures are numbers or null and whose events are a list of objects."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"
    step = record.get("step")
    if "step" in record and (not isinstance(step, int) or isinstance(step, bool)):
        return f"step is {step!r}, not an integer"
    for key in _NUMBERS:
        value = record.get(key)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
            return f"{key} is {value!r}, not a number"
    events = record.get("events")
    if events is not None and not (isinstance(events, list) and all(isinstance(e, dict) for e in events)):
        return f"events is {events!r}, not a list of objects"
    return None


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in read_metrics_lines(path)]
