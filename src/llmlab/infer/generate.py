"""Autoregressive generation with a static KV cache: prefill the prompt once, then one token per step.

    from llmlab.infer import generate, stream
    out = generate(model, [5, 17, 42], max_new_tokens=50, temperature=0.8, top_k=50, seed=0)
    for tok in stream(model, ids, 50, temperature=0): ...

`ids` is one prompt (a list of ints or a 1-D LongTensor) or a batch (a 2-D LongTensor or a list of lists of
any lengths); the result is the prompt(s) followed by the new tokens, shapes as in llmlab.infer.prompts.
A row ends after max_new_tokens or right after emitting a token in `stop` (the stop token is kept).
Generation as a whole ends when every row has ended.

Batched prompts of different lengths are right-padded and prefilled together; the cache then rolls each row
back to its own length so its first new token overwrites the padding (see llmlab/model/kv_cache.py). Every
row thus sees exactly the positions and keys it would see alone.

Determinism: `seed` seeds a private torch.Generator, so the same seed gives the same tokens on the same
machine, whatever else uses torch's global RNG.

`sample_with_logprobs` is generate() that also returns what the sampler computed anyway: each new token's
log-probability under softmax(logits / temperature) and the hidden state it was drawn from. RL fine-tuning
needs both (the old policy's log-probs, a value head's input) and would otherwise run the policy again.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from llmlab.device import resolve_device
from llmlab.errors import CheckpointError, ConfigError
from llmlab.infer.cpu_linear import route_cpu_linears
from llmlab.infer.prompts import assemble, prepare_prompts, stop_tensor
from llmlab.infer.quant import load_model
from llmlab.infer.sampling import check_sampling, next_token, seeded_generator
from llmlab.infer.speculative import load_draft, speculative_generate
from llmlab.model.kv_cache import KVCache
from llmlab.tokenizer import Tokenizer
from llmlab.tokenizer.identity import checkpoint_tokenizer, directory_tokenizer, require_same_tokenizer


def generate(model, ids, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, seed: int | None = None, stop: int | Iterable[int] | None = None,
             draft=None, speculate_k: int = 4, draft_confidence: float | None = None,
             pad_id: int = -1) -> torch.Tensor:
    """Prompt(s) + up to max_new_tokens new tokens (shapes in the module docstring).

    temperature 0 is greedy. With `draft` (a smaller model sharing the vocabulary) the tokens come from
    speculative decoding (llmlab.infer.speculative), whose output distribution equals this function's.
    """
    if draft is not None:
        return speculative_generate(model, draft, ids, max_new_tokens, temperature=temperature, top_k=top_k,
                                    top_p=top_p, seed=seed, stop=stop, speculate_k=speculate_k,
                                    draft_confidence=draft_confidence, pad_id=pad_id)
    if draft_confidence is not None:
        raise ConfigError(f"draft_confidence={draft_confidence} needs a draft model; pass draft=... or "
                          "drop it")
    prompt, lengths, single = prepare_prompts(model, ids, max_new_tokens)
    check_sampling(temperature, top_k, top_p)
    steps = list(_decode(model, prompt, lengths, max_new_tokens, temperature, top_k, top_p, seed, stop,
                         pad_id))
    new = torch.stack(steps, dim=1) if steps else prompt.new_empty(prompt.shape[0], 0)
    return assemble(prompt, lengths, new, pad_id, single, stop)


def sample_with_logprobs(model, ids, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                         top_p: float | None = None, seed: int | None = None,
                         stop: int | Iterable[int] | None = None, pad_id: int = -1, hidden: bool = False
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """-> (generate()'s output, the new tokens' log-probs, their hidden states or None) for the same
    arguments and seed; the same tokens as generate().

    log-probs [B, N] (N new-token columns, [N] for one prompt): log softmax(logits / temperature) of each new
    token (the raw logits at temperature 0), the distribution sampled from before top-k/top-p; 0 after a
    row's end. With hidden=True also the final-normed hidden states [B, N, d_model] whose logits drew each
    token (0 after a row's end)."""
    prompt, lengths, single = prepare_prompts(model, ids, max_new_tokens)
    check_sampling(temperature, top_k, top_p)
    steps = list(_decode(model, prompt, lengths, max_new_tokens, temperature, top_k, top_p, seed, stop,
                         pad_id, extras=True))
    B = prompt.shape[0]
    if steps:
        tokens, logprobs, states = (torch.stack(part, dim=1) for part in zip(*steps, strict=True))
    else:
        tokens, logprobs = prompt.new_empty(B, 0), torch.zeros(B, 0, device=prompt.device)
        states = torch.zeros(B, 0, model.config.d_model, device=prompt.device)
    out = assemble(prompt, lengths, tokens, pad_id, single, stop)
    states = states if hidden else None
    if single:
        return out, logprobs[0], None if states is None else states[0]
    return out, logprobs, states


def stream(model, ids, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, seed: int | None = None, stop: int | Iterable[int] | None = None,
           pad_id: int = -1) -> Iterator:
    """An iterator over new tokens as they are made: ints for one prompt, LongTensor [B] per step for a batch
    (rows that have ended hold pad_id). Same arguments and the same tokens as generate()."""
    # Checks run now, not at the first next(): a bad prompt fails before anything is printed.
    prompt, lengths, single = prepare_prompts(model, ids, max_new_tokens)
    check_sampling(temperature, top_k, top_p)
    stop_tensor(stop, prompt.device)
    steps = _decode(model, prompt, lengths, max_new_tokens, temperature, top_k, top_p, seed, stop, pad_id)
    return (int(tok[0]) for tok in steps) if single else steps


@torch.inference_mode()
def _decode(model, prompt, lengths, max_new_tokens, temperature, top_k, top_p, seed, stop, pad_id,
            extras: bool = False):
    """Yield one LongTensor [B] per step (pad_id for rows that already ended); with extras, (those tokens,
    their log-probs [B] float32, the hidden states [B, d_model] they were drawn from), 0 for ended rows."""
    if max_new_tokens == 0:
        return
    B, P = prompt.shape
    device = prompt.device
    generator = seeded_generator(seed, temperature, device)
    stop_ids = stop_tensor(stop, device)
    was_training = model.training
    model.eval()
    try:
        if extras:
            cache, hidden = _prefill_distinct(model, prompt, lengths, P + max_new_tokens)
        else:
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
            out = tok if ended is None else tok.masked_fill(ended, pad_id)
            if extras:
                yield (out, *_token_extras(logits, tok, hidden, temperature, ended))
            else:
                yield out
            if ended is not None:
                ended = ended | torch.isin(tok, stop_ids)
                if bool(ended.all()):
                    return
            if i + 1 < max_new_tokens:  # the head runs here, so the hidden state is at hand for extras
                hidden = model(tok[:, None], cache=cache, return_hidden=True)[:, -1]
                logits = model.head(hidden)
    finally:
        model.train(was_training)


PREFILL_CHUNK = 8   # distinct prompts per prefill forward (sorted by length: little padding in each)


def _prefill_distinct(model, prompt, lengths, max_len) -> tuple[KVCache, torch.Tensor]:
    """-> (a cache of B rows holding each row's prompt, positioned after it; the hidden states of each
    row's last prompt token [B, d_model]). Each distinct prompt is computed once (RL samples several
    responses per prompt), in forwards over PREFILL_CHUNK prompts of similar lengths (less padding than
    one forward over all)."""
    B, P = prompt.shape
    lens = lengths if lengths is not None else [P] * B
    index: dict[tuple[int, ...], int] = {}
    source = [index.setdefault(tuple(prompt[b, :n].tolist()), len(index)) for b, n in enumerate(lens)]
    distinct = sorted(index, key=len)
    cache = KVCache.for_model(model, B, max_len)
    hidden = torch.empty(B, model.config.d_model, device=prompt.device, dtype=cache.k.dtype)
    for start in range(0, len(distinct), PREFILL_CHUNK):
        chunk = distinct[start:start + PREFILL_CHUNK]
        width = len(chunk[-1])
        ids = torch.tensor([list(c) + [0] * (width - len(c)) for c in chunk], device=prompt.device)
        part = KVCache.for_model(model, len(chunk), width)
        states = model(ids, cache=part, return_hidden=True)
        slot = {index[c]: i for i, c in enumerate(chunk)}
        rows = [b for b in range(B) if source[b] in slot]
        src = torch.tensor([slot[source[b]] for b in rows], device=prompt.device)
        dst = torch.tensor(rows, device=prompt.device)
        cache.k[:, dst, :, :width] = part.k[:, src]
        cache.v[:, dst, :, :width] = part.v[:, src]
        last = torch.tensor([len(chunk[i]) - 1 for i in src.tolist()], device=prompt.device)
        hidden[dst] = states[src, last].to(hidden.dtype)
    cache.set_pos(lens)
    return cache, hidden


def _token_extras(logits, tok, hidden, temperature, ended) -> tuple[torch.Tensor, torch.Tensor]:
    """(log softmax(logits / temperature)[tok] [B], hidden [B, d]), zeroed on ended rows."""
    scaled = logits.float() / temperature if temperature else logits.float()
    logprob = scaled.log_softmax(-1).gather(-1, tok[:, None]).squeeze(-1)
    if ended is None:
        return logprob, hidden
    return logprob.masked_fill(ended, 0.0), hidden.masked_fill(ended[:, None], 0.0)


# ----- text in, text out (the `llmlab generate` command) -----
def complete(checkpoint: str | Path, prompt: str, *, tokenizer: str | Path | None = None,
             max_new_tokens: int | None = None, temperature: float = 0.8, top_k: int | None = 50,
             top_p: float | None = None, seed: int | None = None, stream_text: bool = False,
             stop_at_eos: bool = True, doc_start: bool = True, draft: str | Path | None = None,
             speculate_k: int = 4, draft_confidence: float | None = None, lookup: bool = False,
             device: str = "auto", dtype: str = "auto", cpu_routes: bool = False) -> Iterator[str]:
    """Load CHECKPOINT (and its tokenizer), continue `prompt`; return an iterator over the new text (piece by
    piece as tokens are made if stream_text, else all at once). Loading and checks happen before it returns.

    doc_start prepends the tokenizer's eos id, which separates documents in the training shards, so the
    prompt reads as the start of a document. max_new_tokens None fills the context up to 256 new tokens.
    `draft` (a checkpoint) or `lookup` (draft-free prompt lookup) switches to speculative decoding
    (draft_confidence: see llmlab.infer.speculative.speculative_generate). On CPU, cpu_routes (opt-in)
    lets the models' linears take the matmul route measured fastest per shape (llmlab.infer.cpu_linear);
    by default they stay plain F.linear.
    """
    checkpoint = Path(checkpoint)
    dev = resolve_device(device)
    model = load_model(checkpoint, device=dev, dtype=dtype)
    draft_model = None
    if draft_confidence is not None and draft is None:
        raise ConfigError(f"--draft-confidence {draft_confidence} needs --draft CKPT (a draft model); "
                          "add one or drop the confidence")
    if draft is not None or lookup:  # checked before the tokenizer loads: a bad draft fails fast
        tok_dir = Path(tokenizer) if tokenizer is not None else checkpoint / "tokenizer"
        draft_model = load_draft(model, draft, lookup=lookup, speculate_k=speculate_k,
                                 tokenizer_dir=tok_dir, device=dev, dtype=dtype)
    if cpu_routes and dev.type == "cpu":
        for m in (model, draft_model, getattr(draft_model, "fallback", None)):
            if isinstance(m, torch.nn.Module):
                route_cpu_linears(m)
    tok = _load_tokenizer(checkpoint, tokenizer, model.config.vocab_size)
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


def _load_tokenizer(checkpoint: Path, tokenizer: str | Path | None, vocab_size: int) -> Tokenizer:
    """The checkpoint's tokenizer (or --tokenizer's), refused unless the model was trained with it."""
    directory = Path(tokenizer) if tokenizer is not None else checkpoint / "tokenizer"
    if not directory.is_dir():
        where = "--tokenizer" if tokenizer is not None else f"checkpoint {checkpoint}"
        raise CheckpointError(f"no tokenizer directory at {directory} (from {where}); pass --tokenizer DIR "
                              "pointing at a saved tokenizer (tokenizer.json + llmlab.json)")
    tok = Tokenizer.load(directory)
    require_same_tokenizer(checkpoint_tokenizer(checkpoint, vocab_size), directory_tokenizer(directory, tok),
                           "pass the --tokenizer the model was trained with, "
                           "or drop it to use the checkpoint's")
    return tok
