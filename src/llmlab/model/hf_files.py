"""The weight files of a Hugging Face model directory: read tensor by tensor, write in one stream.

Reading: model.safetensors, model.safetensors.index.json (shards), pytorch_model.bin or
pytorch_model.bin.index.json, in that order of preference. Safetensors tensors are read with plain file reads
straight into memory the caller owns (a fresh tensor, or rows of a larger one for fused q|k|v), rather than
through a memory map: a map's touched pages stay resident while any tensor from the file lives, which would
count the file on top of the model. So the peak is the finished model plus at most one tensor in flight.
pytorch_model.bin goes only through torch.load(weights_only=True), since unpickling can run arbitrary code.

Writing: `write_safetensors` streams tensors into one file, each produced only when its turn comes, so export
holds at most one transposed copy beside the model.

Safetensors format (github.com/huggingface/safetensors): an unsigned 64-bit little-endian header length, a
JSON header {name: {"dtype", "shape", "data_offsets": [begin, end)}, "__metadata__": {...}} padded with
spaces, then the tensors' bytes (offsets relative to the end of the header), little-endian, row-major.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import torch

from llmlab.errors import CheckpointError, ModelError

SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
PT_BIN, PT_BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 2**20  # the reference implementation's limit


class SafetensorsFile:
    """One .safetensors file: its header parsed and checked up front, tensors read on demand."""

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        self._f = open(path, "rb")  # kept open for reads until close()
        try:
            self.entries = self._read_header(size)
        except CheckpointError:
            self._f.close()
            raise

    def _read_header(self, size: int) -> dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]:
        def bad(why: str) -> CheckpointError:
            return CheckpointError(f"{self.path} is not a readable safetensors file ({why}); re-download it")

        head = self._f.read(8)
        if len(head) < 8:
            raise bad("shorter than its 8-byte header length")
        n = struct.unpack("<Q", head)[0]
        if n > min(MAX_HEADER, size - 8):
            raise bad(f"header length {n} exceeds the file")
        try:
            header = json.loads(self._f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise bad(f"header is not JSON: {e}") from e
        if not isinstance(header, dict):
            raise bad("header is not a JSON object")
        self.data_start, data_size = 8 + n, size - 8 - n
        entries = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype, shape = DTYPES[info["dtype"]], tuple(int(d) for d in info["shape"])
                begin, end = (int(x) for x in info["data_offsets"])
            except (KeyError, TypeError, ValueError) as e:
                raise bad(f"entry {name!r} is malformed or has an unknown dtype ({e!r})") from e
            size = torch.Size(shape).numel() * dtype.itemsize
            if end - begin != size or not 0 <= begin <= end <= data_size:
                raise bad(f"tensor {name!r} has byte range [{begin}, {end}) that does not fit its shape "
                          f"{shape} or the file")
            entries[name] = (dtype, shape, begin, end)
        return entries

    def read_into(self, name: str, out: torch.Tensor) -> None:
        """Fill `out` (contiguous CPU tensor, same dtype and element count) with tensor `name`'s bytes."""
        dtype, shape, begin, end = self.entries[name]
        assert out.is_contiguous() and out.dtype == dtype and out.numel() == torch.Size(shape).numel()
        buf = memoryview(out.view(-1).view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
        pos, filled = self.data_start + begin, 0
        while filled < end - begin:  # one read() may return less than asked (Linux caps a read at ~2 GiB)
            got = os.preadv(self._f.fileno(), [buf[filled:]], pos + filled)
            if got <= 0:
                raise CheckpointError(f"{self.path} ends inside tensor {name!r}; re-download the file")
            filled += got

    def close(self) -> None:
        self._f.close()


def write_safetensors(file: Path, tensors, metadata: dict[str, str] | None = None) -> None:
    """Write [(name, shape, dtype, make)] to FILE, calling make() for each tensor only when writing it."""
    tensors = list(tensors)
    header: dict[str, Any] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for name, shape, dtype, _ in tensors:
        if dtype not in DTYPE_NAMES:
            raise ModelError(f"cannot write tensor {name!r} of dtype {dtype} as safetensors; convert the "
                             "model to fp32, bf16 or fp16")
        size = torch.Size(shape).numel() * dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype, make in tensors:
            t = make().detach().to("cpu").contiguous()
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:  # a bug in the caller, never user input
                raise AssertionError(f"{name}: made {tuple(t.shape)} {t.dtype}, header says {shape} {dtype}")
            if t.numel():
                f.write(t.view(-1).view(torch.uint8).numpy().data)


def torch_load_weights(file: Path) -> dict[str, torch.Tensor]:
    """A pytorch_model.bin state dict. weights_only: a pickle can run code, so only tensors and plain
    containers are accepted. mmap=True reads lazily (zip-format files; the legacy format falls back to a plain
    read)."""
    import pickle

    try:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{file} holds objects other than tensors, which weights_only loading refuses "
                              f"({str(e).splitlines()[0]}); convert it to safetensors") from e
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{file} is not a readable PyTorch weights file ({e}); re-download it") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{file} is not a flat state dict of tensors; convert it to safetensors")
    return state


class Scratch:
    """One reusable byte buffer for tensors that must be staged (a Conv1D weight before its transpose, a
    tensor changing dtype or device): reusing it leaves no freed holes behind in the allocator, so the process
    holds the model and this buffer, nothing more."""

    def __init__(self):
        self._buf = torch.empty(0, dtype=torch.uint8)

    def take(self, nbytes: int) -> torch.Tensor:
        if nbytes > self._buf.numel():
            self._buf = torch.empty(0, dtype=torch.uint8)  # free before allocating the larger one
            self._buf = torch.empty(nbytes, dtype=torch.uint8)
        return self._buf[:nbytes]


class HFWeights:
    """The tensors of a HF model directory across its shards: names, shapes, and reads one tensor at a
    time."""

    def __init__(self, path: Path):
        self.path = path
        self.where: dict[str, str] = {}  # tensor name -> file name
        self._open: dict[str, Any] = {}
        if (path / SAFETENSORS).is_file():
            self.kind, files = "safetensors", [SAFETENSORS]
        elif (path / SAFETENSORS_INDEX).is_file():
            self.kind, files = "safetensors", self._index(SAFETENSORS_INDEX)
        elif (path / PT_BIN).is_file():
            self.kind, files = "bin", [PT_BIN]
        elif (path / PT_BIN_INDEX).is_file():
            self.kind, files = "bin", self._index(PT_BIN_INDEX)
        else:
            raise CheckpointError(f"{path} has no weights: expected {SAFETENSORS}, {SAFETENSORS_INDEX}, "
                                  f"{PT_BIN} or {PT_BIN_INDEX}; download the model's weight files too")
        indexed = bool(self.where)
        for file in files:
            names = self._names(self._handle(file))
            if not indexed:
                self.where.update(dict.fromkeys(names, file))
                continue
            missing = [n for n, f in self.where.items() if f == file and n not in names]
            if missing:
                raise CheckpointError(f"{path / file} lacks tensor {missing[0]!r} that the shard index "
                                      "places there; re-download the shards")

    def _index(self, index_name: str) -> list[str]:
        file = self.path / index_name
        try:
            weight_map = json.loads(file.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{file} is not a valid shard index (needs a 'weight_map' object: {e!r}); "
                                  "re-download it") from e
        missing = [f for f in files if not (self.path / f).is_file()]
        if missing:
            raise CheckpointError(f"{file} names shard {missing[0]!r} which is not in {self.path} "
                                  f"({len(missing)} missing); download every shard")
        self.where = dict(weight_map)
        return files

    def _names(self, handle) -> set[str]:
        return set(handle.entries) if self.kind == "safetensors" else set(handle)

    def _handle(self, file: str):
        if file not in self._open:
            full = self.path / file
            safetensors = self.kind == "safetensors"
            self._open[file] = SafetensorsFile(full) if safetensors else torch_load_weights(full)
        return self._open[file]

    def shape(self, name: str) -> tuple[int, ...]:
        handle = self._handle(self.where[name])
        return handle.entries[name][1] if self.kind == "safetensors" else tuple(handle[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        handle = self._handle(self.where[name])
        return handle.entries[name][0] if self.kind == "safetensors" else handle[name].dtype

    def view(self, name: str, scratch: Scratch) -> torch.Tensor:
        """Tensor `name` as stored, valid until the next call: read into `scratch` (safetensors) or the
        memory-mapped tensor itself (.bin)."""
        handle = self._handle(self.where[name])
        if self.kind != "safetensors":
            return handle[name]
        dtype, shape, begin, end = handle.entries[name]
        out = scratch.take(end - begin).view(dtype).view(shape)
        handle.read_into(name, out)
        return out

    def read_into(self, name: str, out: torch.Tensor, scratch: Scratch) -> None:
        """Copy tensor `name` into `out` (any device and dtype, e.g. its rows of a fused weight). The common
        case, a CPU tensor in the stored dtype, is one read straight from the file with no copy in between."""
        handle = self._handle(self.where[name])
        if (self.kind == "safetensors" and out.device.type == "cpu" and out.dtype == handle.entries[name][0]
                and out.is_contiguous()):
            handle.read_into(name, out)
        else:
            out.copy_(self.view(name, scratch))

    def close(self) -> None:
        for handle in self._open.values():
            if isinstance(handle, SafetensorsFile):
                handle.close()
        self._open.clear()
