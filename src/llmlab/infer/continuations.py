"""Token shards of a model's own continuations: training data for a draft that imitates its target.

    llmlab data generate runs/big/ckpt-000700 --shards shards --out big-text --sequences 4096
    llmlab pretrain --config cpu-demo data.shards=big-text model.n_layer=1 model.d_model=128 ...

A speculative draft is worth what it agrees with its target, and a small model trained on the corpus learns
the corpus, not the target: it agrees with the target's greedy token where the corpus is predictable and
misses the target's own habits (its favourite phrasings, its loops). Training the draft on text the target
wrote (sequence-level distillation, Kim & Rush 2016; DistillSpec, Zhou et al. 2023, shows drafts gain most
from model-generated data) aims it at exactly what it is scored on (measured agreement: docs/performance.md,
"Speculative decoding").

Each sequence is a `prompt_tokens`-token window drawn at random from the source shards, followed by the
model's continuation up to `length` tokens (greedy at temperature 0, the default, which is what greedy
speculative decoding checks against; sampled otherwise). The train split continues train-split prompts,
the val split val-split prompts, so a draft's val_loss measures how well it predicts the target on text
it has not seen. The output is an ordinary shard directory (meta.json records how it was made, the
tokenizer is copied along), so every loader, `llmlab pretrain` and `distill.teacher` work on it unchanged.
Generation does not stop at end-of-text tokens: the model's continuation past one is its behaviour too.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from llmlab.data.shards import read_meta, read_shard, split_shards, write_shard_dir
from llmlab.errors import ConfigError, DataError
from llmlab.fsutil import atomic_dir, check_output
from llmlab.infer.generate import generate
from llmlab.infer.sampling import check_sampling
from llmlab.tokenizer.identity import checkpoint_tokenizer, require_same_tokenizer, shards_tokenizer


def write_continuations(checkpoint: str | Path, shards: str | Path, out: str | Path, *, sequences: int = 4096,
                        val_sequences: int | None = None, prompt_tokens: int = 32, length: int = 256,
                        temperature: float = 0.0, batch_size: int = 64, seed: int = 0, device: str = "auto",
                        overwrite: bool = False, progress: bool = True) -> dict:
    """Write `out`: `sequences` train and `val_sequences` (default sequences // 32, at least 1) val sequences
    of `length` tokens, each a prompt from `shards` and the checkpoint's continuation. Returns meta.json's
    content. `out` appears complete or not at all."""
    from llmlab.device import resolve_device
    from llmlab.infer.quant import load_model

    checkpoint, shards, out = Path(checkpoint), Path(shards), Path(out)
    val_sequences = max(1, sequences // 32) if val_sequences is None else val_sequences
    _check_counts(sequences, val_sequences, prompt_tokens, length, batch_size)
    check_sampling(temperature, None, None)
    check_output(out, inputs=[checkpoint, shards], overwrite=overwrite, what="--out")
    if not (checkpoint / "config.json").is_file():
        raise ConfigError(f"{checkpoint} is not a checkpoint directory (no config.json); point it at a "
                          "ckpt-STEP directory of a trained model")
    meta = read_meta(shards)
    model = load_model(checkpoint, device=resolve_device(device)).eval()
    tokenizer_dir = _check_fit(model, checkpoint, shards, meta, length)

    rng = np.random.default_rng(seed)
    prompts = {split: _draw_prompts(shards, meta, split, count, prompt_tokens, rng)
               for split, count in (("train", sequences), ("val", val_sequences))}
    bar = tqdm(total=sequences + val_sequences, unit="seq", desc="generating", disable=not progress,
               dynamic_ncols=True)
    start = time.perf_counter()
    with bar:
        texts = {split: _continue(model, p, length, temperature, batch_size, rng, bar)
                 for split, p in prompts.items()}
    seconds = time.perf_counter() - start
    made = {"model": str(checkpoint), "source": str(shards),
            "sequences": {s: len(t) for s, t in texts.items()},
            "prompt_tokens": prompt_tokens, "length": length, "temperature": temperature, "seed": seed,
            "tokens_per_s": round((sequences + val_sequences) * (length - prompt_tokens) / seconds, 1)}
    tokenizer_meta = dict(meta["tokenizer"])
    with atomic_dir(out, overwrite=overwrite) as tmp:
        splits = {split: [t.reshape(-1)] if len(t) else [] for split, t in texts.items()}
        if tokenizer_dir is not None:
            shutil.copytree(tokenizer_dir, tmp / "tokenizer")
            tokenizer_meta["copy"] = "tokenizer"
        else:
            tokenizer_meta.pop("copy", None)
        written = write_shard_dir(tmp, splits, vocab_size=model.config.vocab_size,
                                  eos_id=tokenizer_meta.get("eos_id"),
                                  extra={"tokenizer": tokenizer_meta, "generated": made})
    return written


def _check_counts(sequences: int, val_sequences: int, prompt_tokens: int, length: int,
                  batch_size: int) -> None:
    if sequences < 1 or val_sequences < 0:
        raise ConfigError(f"--sequences={sequences} / --val-sequences={val_sequences}: "
                          "need at least one train sequence and no negative count")
    if not 1 <= prompt_tokens < length:
        raise ConfigError(f"--prompt-tokens={prompt_tokens} must be at least 1 and below --length={length} "
                          "(each sequence is a prompt plus the model's continuation)")
    if batch_size < 1:
        raise ConfigError(f"--batch-size={batch_size} must be at least 1")


def _check_fit(model, checkpoint: Path, shards: Path, meta: dict, length: int) -> Path | None:
    """The model must read the shards' tokens; returns the shards' tokenizer directory (None if none)."""
    vocab = meta["tokenizer"]["vocab_size"]
    if model.config.vocab_size != vocab:
        raise ConfigError(f"{checkpoint} has a {model.config.vocab_size}-token vocabulary but {shards} "
                          f"has {vocab}; draw prompts from shards made with the model's tokenizer")
    if length > model.config.block_size:
        raise ConfigError(f"--length={length} is longer than the model's context "
                          f"({model.config.block_size}); use --length {model.config.block_size} or less")
    shards_id = shards_tokenizer(shards, meta)
    require_same_tokenizer(checkpoint_tokenizer(checkpoint, model.config.vocab_size), shards_id,
                           "draw prompts from shards made with the model's tokenizer")
    return shards_id.directory


def _draw_prompts(shards: Path, meta: dict, split: str, count: int, prompt_tokens: int,
                  rng: np.random.Generator) -> np.ndarray:
    """[count, prompt_tokens] windows drawn uniformly over the split's shards (a window never spans two)."""
    if count == 0:
        return np.zeros((0, prompt_tokens), dtype=np.int64)
    arrays = [read_shard(p) for p in split_shards(shards, split, meta)]
    starts_per_shard = np.array([max(0, len(a) - prompt_tokens + 1) for a in arrays], dtype=np.int64)
    if starts_per_shard.sum() == 0:
        hint = " or pass --val-sequences 0" if split == "val" else ""
        raise DataError(f"{shards} has no {split} shard of {prompt_tokens}+ tokens to draw prompts from; "
                        f"lower --prompt-tokens{hint}")
    flat = rng.integers(0, starts_per_shard.sum(), size=count)
    bounds = np.cumsum(starts_per_shard)
    which = np.searchsorted(bounds, flat, side="right")
    offsets = flat - (bounds[which] - starts_per_shard[which])
    windows = [arrays[w][o:o + prompt_tokens] for w, o in zip(which, offsets, strict=True)]
    return np.stack(windows).astype(np.int64)


@torch.inference_mode()
def _continue(model, prompts: np.ndarray, length: int, temperature: float, batch_size: int,
              rng: np.random.Generator, bar: tqdm) -> np.ndarray:
    """[N, length]: each prompt followed by the model's continuation, `batch_size` rows at a time."""
    device = next(model.parameters()).device
    rows = []
    for i in range(0, len(prompts), batch_size):
        batch = torch.from_numpy(prompts[i:i + batch_size]).to(device)
        out = generate(model, batch, length - prompts.shape[1], temperature=temperature,
                       seed=int(rng.integers(2**62)))
        rows.append(out.cpu().numpy())
        bar.update(len(batch))
    return np.concatenate(rows) if rows else np.zeros((0, length), dtype=np.int64)
