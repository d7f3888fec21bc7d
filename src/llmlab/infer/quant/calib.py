"""Calibration data for GPTQ and AWQ: `n_samples` windows of `seq_len` tokens, as a LongTensor [n, T].

    calib = calibration_tokens("data/stdlib/shards", n_samples=128, seq_len=256)      # prepared shards
    calib = calibration_tokens("stdlib", 64, 256, tokenizer="runs/demo/ckpt-600/tokenizer")  # any text

A source is
  * a prepared shard directory (meta.json + {train,val}_NNNNN.bin): its *train* split, so calibration never
    touches the held-out text perplexity is measured on;
  * one shard file (`.bin`, the llmlab shard format) or a NumPy `.npy` array of token ids;
  * anything `llmlab.data.sources.iter_documents` reads (.txt/.jsonl/.parquet files, globs, directories,
    the built-in corpus "stdlib"), encoded with `tokenizer` (documents separated by its eos token, as in
    the shards). Only as many documents are encoded as the request needs (a few times over, so the windows
    can be drawn from a spread of the text).
The windows do not overlap and are drawn at random (seeded) from the token stream. A stream shorter than
n_samples * seq_len raises DataError naming what was asked, what there is, and the fix.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from llmlab.errors import ConfigError, DataError

_ENCODE_FACTOR = 4  # encode ~4x the requested tokens of a text source, so windows come from a spread of it
ID_DTYPES = (torch.int64, torch.int32)


def calibration_tokens(source: str | Path, n_samples: int = 128, seq_len: int = 256, seed: int = 0,
                       tokenizer=None) -> torch.Tensor:
    """LongTensor [n_samples, seq_len] of non-overlapping windows drawn from `source` (see module doc)."""
    for key, value in (("n_samples", n_samples), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"calibration {key}={value!r} must be a positive integer")
    stream = _token_stream(source, n_samples * seq_len, tokenizer)
    slots = len(stream) // seq_len
    if slots < n_samples:
        raise DataError(f"calibration data {source} has {len(stream)} tokens but {n_samples} samples x "
                        f"{seq_len} tokens = {n_samples * seq_len} were requested; lower the sample count or "
                        f"length (at most {slots} samples of {seq_len}) or give more text")
    rng = np.random.default_rng(seed)
    starts = np.sort(rng.choice(slots, size=n_samples, replace=False)) * seq_len
    windows = np.stack([np.asarray(stream[s:s + seq_len], dtype=np.int64) for s in starts])
    return torch.from_numpy(windows)


def _token_stream(source: str | Path, needed: int, tokenizer) -> np.ndarray:
    from llmlab.data.shards import META_NAME, read_shard, split_shards

    path = Path(source)
    if path.is_dir() and (path / META_NAME).is_file():
        train = [np.asarray(read_shard(p)) for p in split_shards(path, "train")]
        return np.concatenate(train or [np.zeros(0)])
    if path.is_file() and path.suffix == ".bin":
        return read_shard(path)
    if path.is_file() and path.suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except ValueError as e:
            raise DataError(f"{path} is not a NumPy array of token ids ({e}); save one with "
                            "np.save") from None
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise DataError(f"{path} holds a {arr.dtype} array of shape {arr.shape}; calibration needs a 1-D "
                            "integer array of token ids")
        return arr
    return _encode_text(str(source), needed, tokenizer)


def _encode_text(source: str, needed: int, tokenizer) -> np.ndarray:
    from llmlab.data.sources import iter_documents

    if tokenizer is None:
        raise ConfigError(f"calibration source {source!r} is text, so it needs a tokenizer; pass the "
                          "checkpoint's tokenizer directory (or use prepared shards / a token file)")
    if isinstance(tokenizer, (str, Path)):
        from llmlab.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(tokenizer)
    eos = tokenizer.eos_id
    parts, total = [], 0
    for doc in iter_documents([source]):
        ids = tokenizer.encode(doc, allowed_special="none")
        if eos is not None:
            ids = [eos] + ids
        parts.append(np.asarray(ids, dtype=np.int64))
        total += len(ids)
        if total >= _ENCODE_FACTOR * needed:
            break
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def check_calibration(calib, vocab_size: int, block_size: int) -> torch.Tensor:
    """ConfigError unless calib is a LongTensor [n, T] of ids in [0, vocab) with 2 <= T <= block_size."""
    if not isinstance(calib, torch.Tensor) or calib.dim() != 2 or calib.dtype not in ID_DTYPES:
        shape = tuple(calib.shape) if isinstance(calib, torch.Tensor) else type(calib).__name__
        raise ConfigError(f"calibration data must be a LongTensor [n_samples, seq_len], got {shape}; "
                          "build it with llmlab.infer.quant.calib.calibration_tokens")
    n, T = calib.shape
    if n < 1 or T < 2:
        raise ConfigError(f"calibration data has shape {(n, T)}; give at least one sample of >= 2 tokens")
    if T > block_size:
        raise ConfigError(f"calibration length {T} exceeds the model's block_size {block_size}; use "
                          f"seq_len <= {block_size}")
    lo, hi = int(calib.min()), int(calib.max())
    if lo < 0 or hi >= vocab_size:
        raise ConfigError(f"calibration token id {lo if lo < 0 else hi} is outside the model's vocabulary "
                          f"[0, {vocab_size}); tokenize the calibration text with the model's tokenizer")
    return calib.long()
