"""Autoregressive generation with a static KV cache: prefill the prompt once, then one token per step.

    from llmlab.infer import generate, stream
    out = generate(model, [5, 17, 42], max_new_tokens=50, temperature=0.8, top_k=50, seed=0)
    for tok in stream(model, ids, 50, temperature=0): ...

`ids` may be a list of ints or a 1-D LongTensor (one prompt), or a 2-D LongTensor / list of lists (a batch;
lists may have different lengths). The result:
  * one prompt  -> LongTensor [P + n]: the prompt followed by the n generated tokens;
  * a batch     -> LongTensor [B, W]: row b is prompt_b followed by its generated tokens, right-padded with
                   `pad_id` (default -1, never a real token) to the longest row. Without stop tokens and with
                   equal-length prompts that is exactly [B, P + max_new_tokens].
A row ends after max_new_tokens or right after emitting a token in `stop` (the stop token is kept).
Generation as a whole ends when every row has ended.

Batched prompts of different lengths are right-padded and prefilled together; the cache then rolls each row
back to its own length so its first new token overwrites the padding (see llmlab/model/kv_cache.py). Every
row thus sees exactly the positions and keys it would see alone.

Determinism: `seed` seeds a private torch.Generator, so the same seed gives the same tokens on the same
machine, whatever else uses torch's global RNG.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch

from llmlab.errors import CheckpointError, ConfigError, ModelError
from llmlab.infer.sampling import check_sampling, next_token
from llmlab.model.kv_cache import KVCache


def generate(model, ids, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, seed: int | None = None, stop: int | Iterable[int] | None = None,
             draft=None, speculate_k: int = 4, draft_confidence: float | None = None, pad_id: int = -1) -> torch.Tensor:
    """Prompt(s) + up to max_new_tokens new tokens (shapes in the module docstring).

    temperature 0 is greedy. With `draft` (a smaller model sharing the vocabulary) the tokens come from
    speculative decoding (llmlab.infer.speculative), whose output distribution equals this function's.
    """
    if draft is not None:
        from llmlab.infer.speculative import speculative_generate

        return speculative_generate(model, draft, ids, max_new_tokens, temperature=temperature, top_k=top_k,
                                    top_p=top_p, seed=seed, stop=stop, speculate_k=speculate_k,
                                    draft_confidence=draft_confidence, pad_id=pad_id)
    if draft_confidence is not None:
        raise ConfigError(f"draft_confidence={draft_confidence} needs a draft model; pass draft=... or drop it")
    prompt, lengths, single = prepare_prompts(model, ids, max_new_tokens)
    check_sampling(temperature, top_k, top_p)
    steps = list(_decode(model, prompt, lengths, max_new_tokens, temperature, top_k, top_p, seed, stop, pad_id))
    new = torch.stack(steps, dim=1) if steps else prompt.new_empty(prompt.shape[0], 0)
    return assemble(prompt, lengths, new, pad_id, single, stop)


def stream(model, ids, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, seed: int | None = None, stop: int | Iterable[int] | None = None,
           pad_id: int = -1) -> Iterator:
    """An iterator over new tokens as they are made: ints for one prompt, LongTensor [B] per step for a batch
    (rows that have ended hold pad_id). Same arguments and the same tokens as generate()."""
    # Checks run now, not at the first next(): a bad prompt fails before anything is printed.
    prompt, lengths, single = prepare_prompts(model, ids, max_new_tokens)
    check_sampling(temperature, top_k, top_p)
    _stop_tensor(stop, prompt.device)
    steps = _decode(model, prompt, lengths, max_new_tokens, temperature, top_k, top_p, seed, stop, pad_id)
    return (int(tok[0]) for tok in steps) if single else steps


def prepare_prompts(model, ids, max_new_tokens: int) -> tuple[torch.Tensor, list[int] | None, bool]:
    """-> (right-padded prompts [B, P] on the model's device, per-row lengths or None if all equal, single?).

    Raises ModelError for empty prompts, ids outside the vocabulary, or prompts that do not fit the context.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 0")
    device = next(model.parameters()).device
    single = _is_single(ids)
    rows = [ids] if single else list(ids)
    if isinstance(ids, torch.Tensor):
        prompt = ids.to(device=device, dtype=torch.long).reshape(len(rows), -1)
        lens = [prompt.shape[1]] * prompt.shape[0]
    else:
        rows = [list(r.tolist() if isinstance(r, torch.Tensor) else r) for r in rows]
        lens = [len(r) for r in rows]
        width = max(lens, default=0)
        prompt = torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.long, device=device)
    cfg = model.config
    if not rows or min(lens) == 0:
        raise ModelError("the prompt is empty; give at least one token (e.g. the tokenizer's eos/bos id)")
    if prompt.numel() and (int(prompt.min()) < 0 or int(prompt.max()) >= cfg.vocab_size):
        bad = int(prompt.min()) if int(prompt.min()) < 0 else int(prompt.max())
        raise ModelError(f"prompt token id {bad} is outside the model's vocabulary [0, {cfg.vocab_size}); "
                         "encode the prompt with the tokenizer the model was trained with")
    longest = max(lens)
    if longest > cfg.block_size:
        raise ModelError(f"the prompt has {longest} tokens but the model's context (block_size) is "
                         f"{cfg.block_size}; shorten the prompt to at most {cfg.block_size} tokens")
    if longest + max_new_tokens > cfg.block_size:
        raise ModelError(f"the prompt ({longest} tokens) plus max_new_tokens ({max_new_tokens}) exceeds the "
                         f"model's context of {cfg.block_size} tokens; ask for at most "
                         f"{cfg.block_size - longest} new tokens or shorten the prompt")
    return prompt, (None if len(set(lens)) == 1 else lens), single


def _is_single(ids) -> bool:
    if isinstance(ids, torch.Tensor):
        if ids.dim() not in (1, 2):
            raise ModelError(f"prompt tensor has shape {tuple(ids.shape)}; pass [T] (one prompt) or [B, T]")
        return ids.dim() == 1
    if not isinstance(ids, Sequence) or isinstance(ids, (str, bytes)):
        raise ModelError(f"prompt must be token ids (list of ints, list of lists, or a LongTensor), got "
                         f"{type(ids).__name__}; encode text with the tokenizer first")
    return len(ids) == 0 or not isinstance(ids[0], (Sequence, torch.Tensor))


@torch.inference_mode()
def _decode(model, prompt, lengths, max_new_tokens, temperature, top_k, top_p, seed, stop, pad_id):
    """Yield one LongTensor [B] per step (pad_id for rows that already ended)."""
    if max_new_tokens == 0:
        return
    B, P = prompt.shape
    device = prompt.device
    generator = None
    if seed is not None and temperature > 0:
        generator = torch.Generator(device=device).manual_seed(int(seed))
    stop_ids = _stop_tensor(stop, device)
    was_training = model.training
    model.eval()
    try:
        cache = KVCache.for_model(model, B, P + max_new_tokens)
        hidden = model(prompt, cache=cache, return_hidden=True)
        if lengths is None:
            hidden = hidden[:, -1]
        else:  # each row continues after its own last prompt token; padding gets overwritten
            cache.set_pos(lengths)
            hidden = hidden[torch.arange(B, device=device), torch.tensor(lengths, device=device) - 1]
        logits = model.head(hidden)
        ended = torch.zeros(B, dtype=torch.bool, device=device) if stop_ids is not None else None
        for i in range(max_new_tokens):
            tok = next_token(logits, temperature, top_k, top_p, generator)
            if ended is None:
                yield tok
            else:
                yield tok.masked_fill(ended, pad_id)
                ended = ended | torch.isin(tok, stop_ids)
                if bool(ended.all()):
                    return
            if i + 1 < max_new_tokens:
                logits = model(tok[:, None], cache=cache)[:, -1]
    finally:
        model.train(was_training)


def _stop_tensor(stop, device) -> torch.Tensor | None:
    if stop is None:
        return None
    ids = [stop] if isinstance(stop, int) else list(stop)
    if not ids or any(isinstance(s, bool) or not isinstance(s, int) for s in ids):
        raise ConfigError(f"stop={stop!r} must be a token id or a list of token ids")
    return torch.tensor(ids, dtype=torch.long, device=device)


def assemble(prompt: torch.Tensor, lengths: list[int] | None, new: torch.Tensor, pad_id: int,
             single: bool, stop=None) -> torch.Tensor:
    """Concatenate each row's prompt with its new tokens, right-padded with pad_id (see module docstring).

    A row's new tokens run up to and including its first stop token (later entries are padding)."""
    if lengths is None:
        out = torch.cat([prompt, new], dim=1)  # the last step always has a row that had not yet ended
        return out[0] if single else out
    stop_ids = _stop_tensor(stop, new.device)
    rows = []
    for b, n in enumerate(lengths):
        count = new.shape[1]
        if stop_ids is not None:
            hits = torch.isin(new[b], stop_ids).nonzero()
            count = int(hits[0]) + 1 if hits.numel() else count
        rows.append(torch.cat([prompt[b, :n], new[b, :count]]))
    out = prompt.new_full((len(rows), max(r.numel() for r in rows)), pad_id)
    for b, row in enumerate(rows):
        out[b, : row.numel()] = row
    return out


# ----- text in, text out (the `llmlab generate` command) -----
def complete(checkpoint: str | Path, prompt: str, *, tokenizer: str | Path | None = None,
             max_new_tokens: int | None = None, temperature: float = 0.8, top_k: int | None = 50,
             top_p: float | None = None, seed: int | None = None, stream_text: bool = False,
             stop_at_eos: bool = True, doc_start: bool = True, draft: str | Path | None = None,
             speculate_k: int = 4, draft_confidence: float | None = None, lookup: bool = False,
             device: str = "auto", dtype: str = "auto") -> Iterator[str]:
    """Load CHECKPOINT (and its tokenizer), continue `prompt`; return an iterator over the new text (piece by
    piece as tokens are made if stream_text, else all at once). Loading and checks happen before it returns.

    doc_start prepends the tokenizer's eos id, which separates documents in the training shards, so the
    prompt reads as the start of a document. max_new_tokens None fills the context up to 256 new tokens.
    `draft` (a checkpoint) or `lookup` (draft-free prompt lookup) switches to speculative decoding
    (draft_confidence: see llmlab.infer.speculative.speculative_generate).
    """
    from llmlab.device import resolve_device
    from llmlab.model import Transformer

    checkpoint = Path(checkpoint)
    dev = resolve_device(device)
    model = Transformer.load(checkpoint, device=dev, dtype=dtype)
    draft_model = None
    if draft_confidence is not None and draft is None:
        raise ConfigError(f"--draft-confidence {draft_confidence} needs --draft CKPT (a draft model); add one or "
                          "drop the confidence")
    if draft is not None or lookup:  # checked before the tokenizer loads: a bad draft fails fast
        from llmlab.infer.speculative import load_draft

        tok_dir = Path(tokenizer) if tokenizer is not None else checkpoint / "tokenizer"
        draft_model = load_draft(model, draft, lookup=lookup, speculate_k=speculate_k, tokenizer_dir=tok_dir,
                                 device=dev, dtype=dtype)
    tok = _load_tokenizer(checkpoint, tokenizer)
    ids = tok.encode(prompt, allowed_special="all")
    if doc_start and tok.eos_id is not None:
        ids = [tok.eos_id] + ids
    if max_new_tokens is None:
        max_new_tokens = max(0, min(256, model.config.block_size - len(ids)))
    stop = tok.eos_id if stop_at_eos else None
    options = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stop=stop)
    if stream_text and draft_model is None:
        return _decode_text(tok, stream(model, ids, max_new_tokens, **options), stop)
    out = generate(model, ids, max_new_tokens, draft=draft_model, speculate_k=speculate_k,
                   draft_confidence=draft_confidence, **options)
    return _decode_text(tok, out[len(ids):].tolist(), stop)


def _decode_text(tok, tokens: Iterable[int], stop: int | None) -> Iterator[str]:
    """Bytes -> text incrementally, so a character split across tokens is printed once it is whole."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for t in tokens:
        if t == stop:
            break
        piece = decoder.decode(tok.decode_bytes([t]))
        if piece:
            yield piece
    tail = decoder.decode(b"", final=True)
    if tail:
        yield tail


def _load_tokenizer(checkpoint: Path, tokenizer: str | Path | None):
    from llmlab.tokenizer import Tokenizer

    directory = Path(tokenizer) if tokenizer is not None else checkpoint / "tokenizer"
    if not directory.is_dir():
        where = "--tokenizer" if tokenizer is not None else f"checkpoint {checkpoint}"
        raise CheckpointError(f"no tokenizer directory at {directory} (from {where}); pass --tokenizer DIR "
                              "pointing at a saved tokenizer (tokenizer.json + llmlab.json)")
    return Tokenizer.load(directory)
