"""Perplexity of a language model on held-out token shards.

    from llmlab.evals.perplexity import evaluate_checkpoints
    rows = evaluate_checkpoints(["runs/demo/ckpt-600", "runs/demo/int4-gptq"], "data/stdlib/shards")

    llmlab eval ppl runs/demo/ckpt-600 runs/demo/int4-gptq --data data/stdlib/shards

Perplexity = exp(mean negative log-likelihood per predicted token), the mean taken over every token of
the evaluated windows (not a mean of per-batch means, which would over-weight a short last batch). The
text is the shards' `val` split cut into consecutive windows of block_size + 1 tokens that share one token
(as TokenLoader.iter_eval cuts it, but keeping a last partial batch): each token is predicted once, with
between 0 and block_size - 1 tokens of context. All checkpoints compared in one call see exactly the same
windows, so their numbers are comparable; numbers from different block sizes are not (more context, lower
perplexity).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from llmlab.data.shards import read_meta, read_shard, split_shards
from llmlab.errors import ConfigError, DataError
from llmlab.tokenizer.identity import checkpoint_tokenizer, require_same_tokenizer, shards_tokenizer


@torch.no_grad()
def perplexity(model, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], progress: bool = False,
               total: int | None = None) -> dict:
    """{"ppl", "nll", "tokens"} of `model` (idx [B, T] -> logits [B, T, V]) over (x, y) batches."""
    from tqdm.auto import tqdm

    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    nll, count = 0.0, 0
    try:
        for x, y in tqdm(batches, total=total, desc="perplexity", unit="batch", disable=not progress):
            logits = model(x)
            nll += float(F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum"))
            count += y.numel()
    finally:
        if hasattr(model, "train"):
            model.train(was_training)
    if count == 0:
        raise DataError("no tokens to evaluate perplexity on; give a held-out split with at least one window")
    mean = nll / count
    return {"ppl": math.exp(mean), "nll": mean, "tokens": count}


def eval_windows(shards: str | Path, split: str, block_size: int, batch_size: int,
                 max_batches: int | None = None, device=None):
    """(x, y) batches over `split`: windows of block_size + 1 tokens at stride block_size from token 0 (the
    TokenLoader.iter_eval windows), the last batch possibly smaller so that every window counts."""
    meta = read_meta(shards)
    stream = np.concatenate([np.asarray(read_shard(p)) for p in split_shards(shards, split, meta)] or [[]])
    count = (len(stream) - 1) // block_size
    if count < 1:
        raise DataError(f"the {split} split of {shards} has {len(stream)} tokens, fewer than one window of "
                        f"{block_size + 1}; evaluate with a smaller --block-size or prepare more held-out "
                        "text")
    starts = list(range(0, count * block_size, block_size))
    batches = [starts[i:i + batch_size] for i in range(0, count, batch_size)][:max_batches]
    for batch in batches:
        data = torch.from_numpy(np.stack([stream[s:s + block_size + 1] for s in batch]).astype(np.int64))
        data = data.to(device) if device is not None else data
        yield data[:, :-1], data[:, 1:]


def evaluate_perplexity(model, shards: str | Path, split: str = "val", block_size: int | None = None,
                        batch_size: int = 8, max_batches: int | None = None, progress: bool = False) -> dict:
    """Perplexity of a model on `split` of a prepared shard directory (see module docstring)."""
    block_size = model.config.block_size if block_size is None else block_size
    if block_size > model.config.block_size or block_size < 1:
        raise ConfigError(f"block_size {block_size} exceeds the model's context {model.config.block_size}; "
                          f"use 1 to {model.config.block_size}")
    vocab = int(read_meta(shards)["tokenizer"]["vocab_size"])
    if vocab > model.config.vocab_size:
        raise DataError(f"shards {shards} use a vocabulary of {vocab} tokens but the model has "
                        f"{model.config.vocab_size}; evaluate on shards made with the model's tokenizer")
    device = next(model.parameters()).device
    batches = eval_windows(shards, split, block_size, batch_size, max_batches, device)
    result = perplexity(model, batches, progress=progress)
    return {**result, "block_size": block_size, "split": split}


def evaluate_checkpoints(checkpoints: list[str | Path], shards: str | Path, split: str = "val",
                         block_size: int | None = None, batch_size: int = 8, max_batches: int | None = None,
                         device: str = "cpu", dtype: str | None = None, progress: bool = True,
                         cpu_routes: bool = False) -> list[dict]:
    """One row per checkpoint: perplexity, mean NLL, tokens, file size and quantization scheme.

    Every checkpoint's config is read (and checked) before the first evaluation starts, so a bad path
    fails fast. Checkpoints with different contexts are compared at the smallest block size of them all.
    On CPU, cpu_routes (opt-in) lets linears take the matmul route measured fastest per shape
    (llmlab.infer.cpu_linear).
    """
    from llmlab.device import resolve_device
    from llmlab.infer.cpu_linear import route_cpu_linears
    from llmlab.infer.quant import load_model, require_lm_head
    from llmlab.model.transformer import WEIGHTS_FILE, read_config

    if not checkpoints:
        raise ConfigError("no checkpoints given; pass one or more checkpoint directories")
    dev = resolve_device(device)
    configs = [read_config(Path(c)) for c in checkpoints]
    shards_id = shards_tokenizer(shards, read_meta(shards))
    for path, config in zip(checkpoints, configs, strict=True):
        require_lm_head(config, path)
        require_same_tokenizer(checkpoint_tokenizer(path, config.vocab_size), shards_id,
                               "evaluate on shards made with the model's tokenizer")
    block = block_size if block_size is not None else min(c.block_size for c in configs)
    rows = []
    for path in checkpoints:
        model = load_model(path, device=dev, dtype=dtype)
        if cpu_routes and dev.type == "cpu":
            route_cpu_linears(model)
        result = evaluate_perplexity(model, shards, split, block, batch_size, max_batches, progress)
        rows.append({"checkpoint": str(path), "ppl": result["ppl"], "nll": result["nll"],
                     "tokens": result["tokens"], "block_size": block,
                     "file_bytes": (Path(path) / WEIGHTS_FILE).stat().st_size,
                     "quantization": getattr(model, "quantization", None)})
    return rows
