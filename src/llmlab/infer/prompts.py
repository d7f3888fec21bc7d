"""Prompts in, token rows out: the checks and padding every decoder shares (plain and speculative).

`ids` may be a list of ints or a 1-D LongTensor (one prompt), or a 2-D LongTensor / list of lists (a batch;
lists may have different lengths). prepare_prompts right-pads a batch into one tensor; assemble puts each
row's prompt and new tokens back together:
  * one prompt  -> LongTensor [P + n]: the prompt followed by the n generated tokens;
  * a batch     -> LongTensor [B, W]: row b is prompt_b followed by its generated tokens, right-padded with
                   `pad_id` (default -1, never a real token) to the longest row. Without stop tokens and with
                   equal-length prompts that is exactly [B, P + max_new_tokens].
A row's new tokens end right after its first stop token (the stop token is kept).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from llmlab.errors import ConfigError, ModelError


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
    if not rows or min(lens) == 0:
        raise ModelError("the prompt is empty; give at least one token (e.g. the tokenizer's eos/bos id)")
    _check_fit(model.config, prompt, max(lens), max_new_tokens)
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


def _check_fit(cfg, prompt: torch.Tensor, longest: int, max_new_tokens: int) -> None:
    """Every id in the vocabulary, and the longest prompt plus max_new_tokens within the context."""
    if prompt.numel() and (int(prompt.min()) < 0 or int(prompt.max()) >= cfg.vocab_size):
        bad = int(prompt.min()) if int(prompt.min()) < 0 else int(prompt.max())
        raise ModelError(f"prompt token id {bad} is outside the model's vocabulary [0, {cfg.vocab_size}); "
                         "encode the prompt with the tokenizer the model was trained with")
    if longest > cfg.block_size:
        raise ModelError(f"the prompt has {longest} tokens but the model's context (block_size) is "
                         f"{cfg.block_size}; shorten the prompt to at most {cfg.block_size} tokens")
    if longest + max_new_tokens > cfg.block_size:
        raise ModelError(f"the prompt ({longest} tokens) plus max_new_tokens ({max_new_tokens}) exceeds the "
                         f"model's context of {cfg.block_size} tokens; ask for at most "
                         f"{cfg.block_size - longest} new tokens or shorten the prompt")


def stop_tensor(stop, device) -> torch.Tensor | None:
    """`stop` (a token id, a list of them, or None) as a LongTensor on `device`; ConfigError if malformed."""
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
    stop_ids = stop_tensor(stop, new.device)
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
