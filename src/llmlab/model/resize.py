"""Growing a model's vocabulary, so a tokenizer's new special tokens (chat turns, padding) get rows.

    model = grow_vocab(model, 300)                      # embedding and LM head now have 300 rows
    model, tok, message = add_chat_tokens(model, tok)   # what fine-tuning does first

The new rows of the embedding and of the LM head (the same tensor when tied) are the mean of the existing
rows. Hewitt (2021), "Initializing New Word Embeddings for Pretrained Language Models": with a random
(or zero) output row a new token can take a large or arbitrary share of the probability mass and disturb
what the model already does; with the mean row its logit is the average of the old logits, so the model's
distribution over old tokens barely moves and the new token starts out neither favoured nor impossible.
Old rows are left untouched, so old ids keep exactly their logits (up to the softmax normaliser).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from llmlab.errors import ModelError
from llmlab.tokenizer.chat import with_chat_tokens


def grow_vocab(model: nn.Module, new_vocab_size: int, reference_rows: int | None = None) -> nn.Module:
    """Give `model` (a Transformer) new_vocab_size embedding rows (and LM-head rows), in place; returns it.

    New rows are the mean of rows [0, reference_rows) (default: all existing rows), computed in fp32.
    model.config.vocab_size follows, so the model saves and loads as usual.
    """
    old = model.config.vocab_size
    if isinstance(new_vocab_size, bool) or not isinstance(new_vocab_size, int) or new_vocab_size < old:
        raise ModelError(f"new_vocab_size={new_vocab_size!r} must be an integer >= the model's vocabulary "
                         f"({old}); a vocabulary can only grow")
    if new_vocab_size == old:
        return model
    reference_rows = old if reference_rows is None else reference_rows
    head = getattr(model, "lm_head", None)
    tied = head is not None and head.weight is model.tok_emb.weight
    if head is not None and not tied and type(head) is not nn.Linear:
        raise ModelError(f"cannot grow the LM head of type {type(head).__name__} (quantized?); grow the "
                         "vocabulary of the full-precision model")
    model.tok_emb.weight = _grown(model.tok_emb.weight, new_vocab_size, reference_rows)
    model.tok_emb.num_embeddings = new_vocab_size
    if head is not None:
        head.weight = model.tok_emb.weight if tied else _grown(head.weight, new_vocab_size, reference_rows)
        head.out_features = new_vocab_size
    model.config = dataclasses.replace(model.config, vocab_size=new_vocab_size)
    return model


def set_rows_to_mean(model: nn.Module, ids: list[int], reference_rows: int) -> None:
    """Rows `ids` of the embedding and LM head set to the mean of rows [0, reference_rows) (for ids that
    fall inside a padded vocabulary, whose rows were never trained)."""
    head = getattr(model, "lm_head", None)
    weights = [model.tok_emb.weight]
    if head is not None and head.weight is not model.tok_emb.weight:
        weights.append(head.weight)
    with torch.no_grad():
        for w in weights:
            w[ids] = w[:reference_rows].float().mean(0).to(w.dtype)


def _grown(weight: torch.Tensor, rows: int, reference_rows: int) -> nn.Parameter:
    with torch.no_grad():
        out = torch.empty(rows, weight.shape[1], dtype=weight.dtype, device=weight.device)
        out[:weight.shape[0]] = weight
        out[weight.shape[0]:] = weight[:reference_rows].float().mean(0).to(weight.dtype)
    return nn.Parameter(out, requires_grad=weight.requires_grad)


def add_chat_tokens(model: nn.Module, tok):
    """(model, tok2, message): the tokenizer with its chat template's special tokens (with_chat_tokens) and
    the model grown to hold them; message is one line saying what was added, or None when nothing was.

    New ids past the model's vocabulary grow it (grow_vocab); ids that fall inside a model vocabulary
    padded past the tokenizer's (common for Hugging Face models) reuse those untrained rows. Either way the
    new rows are the mean of the rows of the tokenizer's old ids.
    """
    tok2, added = with_chat_tokens(tok)
    if not added:
        return model, tok2, None
    old_rows, ids = model.config.vocab_size, [tok2.special_tokens[t] for t in added]
    if tok.vocab_size > old_rows:
        raise ModelError(f"the tokenizer has {tok.vocab_size} ids but the model only {old_rows} embedding "
                         "rows; use the model's own tokenizer")
    inside = [i for i in ids if i < old_rows]
    if inside:
        set_rows_to_mean(model, inside, tok.vocab_size)
    grow_vocab(model, max(old_rows, tok2.vocab_size), reference_rows=tok.vocab_size)
    rows = model.config.vocab_size
    grew = f"grew the embedding to {rows} rows" if rows > old_rows else \
        f"their rows in the model's padded {rows}-row embedding set to the mean"
    return model, tok2, f"added {len(added)} chat tokens to the tokenizer ({', '.join(added)}); {grew}"
