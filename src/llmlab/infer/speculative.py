"""Speculative decoding: a cheap proposer guesses K tokens, the target model checks them all in one forward.

    from llmlab.infer import generate
    out = generate(target, ids, 200, temperature=0, draft=draft_model, speculate_k=4)   # same tokens, faster
    out, stats = speculative_generate(target, "lookup", ids, 200, temperature=0, return_stats=True)
    stats.acceptance_rate, stats.mean_accepted_length, stats.target_forwards_per_token

Where a forward is bound by streaming the weights, one over K+1 tokens costs about as much as one over a
single token. Speculative sampling (Leviathan, Kalman & Matias 2023, "Fast Inference from Transformers via
Speculative Decoding"; Chen et al. 2023, "Accelerating Large Language Model Decoding with Speculative
Sampling") turns that spare width into tokens without changing the output distribution. One round, per row:
  1. the proposer guesses d1..dK, keeping q_i, its distribution after the sampling transform;
  2. the target scores [cur, d1..dK] in one forward: p_1..p_{K+1} under the same transform
     (llmlab.infer.sampling.probs_from_logits);
  3. left to right, d_i is accepted with probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection the
     next token is drawn from norm(max(0, p_i - q_i)); if all K are accepted, a bonus token from p_{K+1};
  4. both KV caches roll back to the committed tokens (KVCache.set_pos); rejected entries get overwritten.
A token x is emitted with probability min(q, p)(x) + max(0, p(x) - q(x)) = p(x) (Leviathan et al., A.1), and
stopping a row early keeps a prefix. Greedy decoding is the one-hot case: the tokens equal generate()'s.

Proposers: a draft model, which with draft_confidence=c stops a row's guesses at the first position where its
top probability is below c (decided from q before the guess is drawn, so still exact; HF's
assistant_confidence_threshold); prompt lookup (draft="lookup", llmlab.infer.lookup), whose guesses are a
function of the context, i.e. q is one-hot; or PromptLookup(fallback=draft), which takes lookup in rounds
where every live row has a match and the draft otherwise, chosen from the context alone, so each round is an
exact round of one of them. Measured speed-ups: docs/performance.md and benchmarks/bench_speculative.py.

Batches: every row keeps its own cache positions, so rows accept different numbers of tokens and prompts may
differ in length; an ended row rides along at position 0, ignored. K shrinks near the end so no row writes
past its prompt + max_new_tokens. Invariant: at the start of a round row b has committed seqs[b] (host-side;
one device-to-host copy per round), and its last token, cur, is in neither cache yet, so the prefill leaves
out each prompt's last token.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from llmlab.errors import ConfigError, ModelError
from llmlab.infer.lookup import PromptLookup
from llmlab.infer.prompts import assemble, prepare_prompts, stop_tensor
from llmlab.infer.quant import load_model
from llmlab.infer.sampling import check_sampling, probs_from_logits, sample, seeded_generator
from llmlab.model.kv_cache import KVCache
from llmlab.tokenizer.identity import check_same_tokenizer


@dataclass
class SpeculativeStats:
    """Counters of one speculative_generate call; rows are counted separately, rounds once per batch."""

    rows: int = 0              # batch size
    rounds: int = 0            # verification rounds = target forwards after the prefill
    target_forwards: int = 0   # including the prompt prefill (plain decoding needs one per token)
    draft_forwards: int = 0    # 0 in draft-free mode
    lookup_rounds: int = 0     # rounds proposed by prompt lookup (draft-free, or lookup-then-draft)
    proposed: int = 0          # guesses offered to the target, summed over rows still generating
    accepted: int = 0          # guesses the target accepted
    row_rounds: int = 0        # (row, round) pairs with the row still generating
    generated: int = 0         # new tokens emitted, summed over rows

    @property
    def acceptance_rate(self) -> float:
        """Accepted / proposed guesses (1.0 when nothing was proposed)."""
        return self.accepted / self.proposed if self.proposed else 1.0

    @property
    def mean_accepted_length(self) -> float:
        """Guesses accepted per round and row (0..K); each round also emits one target token on top."""
        return self.accepted / self.row_rounds if self.row_rounds else 0.0

    @property
    def target_forwards_per_token(self) -> float:
        """Target forward passes (prefill included) per generated token of a row; plain decoding: 1.0."""
        return self.target_forwards * self.rows / self.generated if self.generated else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "acceptance_rate": self.acceptance_rate,
                "mean_accepted_length": self.mean_accepted_length,
                "target_forwards_per_token": self.target_forwards_per_token}


def speculative_generate(model, draft, ids, max_new_tokens: int, temperature: float = 1.0,
                         top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                         stop=None, speculate_k: int = 4, draft_confidence: float | None = None,
                         pad_id: int = -1, return_stats: bool = False):
    """generate() with proposals from `draft` (a Transformer sharing the target's vocabulary, a PromptLookup,
    or the string "lookup"), checked by `model`. Same arguments and output format as llmlab.infer.generate;
    return_stats=True returns (tokens, SpeculativeStats). draft_confidence (draft models only): a row stops
    proposing for the round at the first position where the draft's most likely token has a probability
    below it, so unlikely guesses cost no verification width (None: always speculate_k guesses)."""
    check_speculate_k(speculate_k)
    prompt, lengths, single = prepare_prompts(model, ids, max_new_tokens)
    check_sampling(temperature, top_k, top_p)
    stop_tensor(stop, prompt.device)  # validates `stop`
    B, P = prompt.shape
    draft = check_draft(model, draft, P + max_new_tokens)
    check_draft_confidence(draft_confidence, draft)
    generator = seeded_generator(seed, temperature, prompt.device)
    lens = lengths or [P] * B
    stats = SpeculativeStats(rows=B)
    opts = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    draft_model = draft.fallback if isinstance(draft, PromptLookup) else draft
    models = [model] + ([draft_model] if draft_model is not None else [])
    modes = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        new = _speculate(model, draft, prompt, lens, max_new_tokens, speculate_k, opts, generator,
                         stop, pad_id, stats, draft_confidence)
    finally:
        for m, mode in zip(models, modes, strict=True):
            m.train(mode)
    out = assemble(prompt, lengths, new, pad_id, single, stop)
    return (out, stats) if return_stats else out


# ----- checks -----
def check_speculate_k(k) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"speculate_k={k!r} must be an integer >= 1 (tokens the draft proposes per round; "
                          "4 is a good start)")


def check_draft_confidence(confidence, draft) -> None:
    if confidence is None:
        return
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0 < confidence < 1:
        raise ConfigError(f"draft_confidence={confidence!r} must be a probability strictly between 0 and 1 "
                          "(e.g. 0.5), or None to always propose speculate_k tokens")
    if isinstance(draft, PromptLookup) and draft.fallback is None:
        raise ConfigError("draft_confidence applies to a draft model; prompt lookup has no probabilities "
                          "(drop the confidence or pass a draft checkpoint)")


def check_draft(model, draft, needed_len: int):
    """The proposer to use: a Transformer that can stand in for `model`, or a PromptLookup (ModelError if
    not)."""
    if isinstance(draft, str):
        if draft != "lookup":
            raise ModelError(f"draft={draft!r} is not a model; pass a Transformer, a PromptLookup, or "
                             "'lookup' for draft-free prompt lookup")
        return PromptLookup()
    if isinstance(draft, PromptLookup):
        if draft.fallback is not None:
            check_draft_model(model, draft.fallback, needed_len)
        return draft
    return check_draft_model(model, draft, needed_len)


def check_draft_model(model, draft, needed_len: int):
    """`draft` if it is a Transformer that can stand in for `model` (vocabulary, context, device), else
    ModelError."""
    if not isinstance(draft, torch.nn.Module) or not hasattr(draft, "config"):
        raise ModelError(f"draft of type {type(draft).__name__} is not a model; pass a Transformer sharing "
                         "the target's vocabulary, a PromptLookup, or 'lookup'")
    tv, dv = model.config.vocab_size, draft.config.vocab_size
    if tv != dv:
        raise ModelError(f"the draft model's vocabulary has {dv} tokens but the target's has {tv}; use a "
                         "draft trained with the target's tokenizer (same vocab_size)")
    if draft.config.block_size < needed_len:
        raise ModelError(f"the draft model's context (block_size {draft.config.block_size}) is shorter than "
                         f"the prompt plus max_new_tokens ({needed_len}); use a draft with a longer context "
                         "or ask for fewer tokens")
    td, dd = next(model.parameters()).device, next(draft.parameters()).device
    if td != dd:
        raise ModelError(f"the draft model is on {dd} but the target is on {td}; load both on the same "
                         "device")
    return draft


def load_draft(model, draft: str | Path | None, *, lookup: bool = False, speculate_k: int = 4,
               tokenizer_dir: str | Path | None = None, device="cpu", dtype=None):
    """The proposer for `llmlab generate --draft CKPT` / `--lookup` / both: a loaded draft Transformer checked
    against the target `model` (vocabulary size; the tokenizer too when both tokenizer directories exist), a
    PromptLookup, or a PromptLookup that falls back on the draft. `tokenizer_dir` is the target's tokenizer;
    the draft's is CKPT/tokenizer."""
    check_speculate_k(speculate_k)
    if draft is None:
        return PromptLookup() if lookup else None
    draft_model = load_model(draft, device=device, dtype=dtype)
    check_draft_model(model, draft_model, 0)
    if tokenizer_dir is not None:
        check_same_tokenizer(Path(tokenizer_dir), Path(draft) / "tokenizer")
    return PromptLookup(fallback=draft_model) if lookup else draft_model


# ----- the acceptance rule (module-level so tests can check it exactly, and break it on purpose) -----
def accept_probability(px: torch.Tensor, qx: torch.Tensor) -> torch.Tensor:
    """min(1, p(x) / q(x)) for guesses x drawn from q (so q(x) > 0)."""
    return (px / qx).clamp(max=1.0)


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)) over the last axis: what to sample after a rejection. Where p <= q everywhere (then
    p == q, and rejections only happen through rounding) it falls back to p."""
    d = (p - q).clamp(min=0.0)
    total = d.sum(-1, keepdim=True)
    return torch.where(total > 0, d / total.clamp(min=1e-30), p)


def verify(logits: torch.Tensor, proposal: torch.Tensor, n_proposed: torch.Tensor, q: torch.Tensor | None,
           temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Accept/reject one round of guesses. -> (accepted [B], next_token [B]).

    logits [B, K+1, V]: the target's logits after cur, d1..dK; proposal [B, K]: the guesses; n_proposed [B]:
    how many of them row b really proposed (later ones are ignored); q [B, K, V]: the draft's distributions,
    or None for deterministic proposals (one-hot q). Row b emits proposal[b, :accepted[b]] then next_token[b].
    """
    B, K = proposal.shape
    device = logits.device
    rows = torch.arange(B, device=device)
    live = torch.arange(K, device=device) < n_proposed[:, None]  # [B, K]: guess i was really proposed
    if temperature == 0:
        best = logits.argmax(-1)  # [B, K+1]
        ok = (proposal == best[:, :K]) & live
        accepted = ok.long().cumprod(1).sum(1)
        return accepted, best[rows, accepted]
    p = probs_from_logits(logits, temperature, top_k, top_p)  # [B, K+1, V]
    if K:
        px = p[:, :K].gather(-1, proposal[..., None]).squeeze(-1)
        qx = torch.ones_like(px) if q is None else q.gather(-1, proposal[..., None]).squeeze(-1)
        u = torch.rand(B, K, device=device, generator=generator)
        ok = (u < accept_probability(px, qx)) & live
        accepted = ok.long().cumprod(1).sum(1)
    else:
        accepted = torch.zeros(B, dtype=torch.long, device=device)
    p_next = p[rows, accepted]
    rejected = accepted < n_proposed
    if bool(rejected.any()):
        at = accepted.clamp(max=max(K - 1, 0))
        if q is None:
            q_next = torch.zeros_like(p_next).scatter_(-1, proposal[rows, at][:, None], 1.0)
        else:
            q_next = q[rows, at]
        p_next = torch.where(rejected[:, None], residual_distribution(p_next, q_next), p_next)
    return accepted, sample(p_next, generator)


# ----- proposers -----
class _DraftProposer:
    """A draft Transformer with its own KV cache. `valid[b]`: the cache holds row b's positions < valid[b]
    (n-1 normally, n-2 after a round in which every guess was accepted: the last guess never went through the
    draft). The first forward of a round feeds the missing 1 or 2 tokens, ending with cur; forward j > 0 feeds
    guess j. With `confidence`, row b proposes guesses while the draft's top probability stays >= confidence
    (a stopping rule that looks at the draft's distribution before the guess is drawn, so sampling stays
    exact), and the round's drafting ends when no row is still proposing."""

    def __init__(self, draft, batch: int, max_len: int, opts: dict, generator, stats: SpeculativeStats,
                 confidence: float | None = None):
        self.model, self.opts, self.generator, self.stats = draft, opts, generator, stats
        self.greedy = opts["temperature"] == 0
        self.confidence = confidence
        self.cache = KVCache.for_model(draft, batch, max_len)
        self.valid: list[int] = []
        self.fed = 0  # draft forwards in the current round

    def prefill(self, prompt: torch.Tensor, seqs: list[list[int]]) -> None:
        if prompt.shape[1] > 1:
            self.model(prompt[:, :-1], cache=self.cache, return_hidden=True)
            self.stats.draft_forwards += 1
        self.valid = [len(s) - 1 for s in seqs]

    def propose(self, seqs, active, K):
        T = max(len(s) - v for s, v, a in zip(seqs, self.valid, active, strict=True) if a)
        starts = [len(s) - T if a else 0 for s, a in zip(seqs, active, strict=True)]
        self.cache.set_pos(starts)
        device = self.cache.k.device
        rows = [(s[i:i + T] + [0] * T)[:T] for s, i in zip(seqs, starts, strict=True)]
        x = torch.tensor(rows, device=device)
        guesses, qs = [], []
        proposing = torch.ones(len(seqs), dtype=torch.bool, device=device)
        counts = torch.zeros(len(seqs), dtype=torch.long, device=device)
        self.fed = 0
        for _ in range(K):
            logits = self.model.head(self.model(x, cache=self.cache, return_hidden=True)[:, -1])
            self.fed += 1
            q = None if self.greedy else probs_from_logits(logits, **self.opts)
            if self.confidence is not None:
                top = (logits.float().softmax(-1) if q is None else q).amax(-1)
                proposing &= top >= self.confidence
                counts += proposing
                if not bool(proposing.any()):
                    break
            d = logits.argmax(-1) if q is None else sample(q, self.generator)
            if q is not None:
                qs.append(q)
            guesses.append(d)
            x = d[:, None]
        self.stats.draft_forwards += self.fed
        n_proposed = counts.tolist() if self.confidence is not None else [K] * len(seqs)
        if guesses:
            guesses = torch.stack(guesses, 1)
        else:
            guesses = torch.zeros(len(seqs), 0, dtype=torch.long, device=device)
        return guesses, (torch.stack(qs, 1) if qs else None), n_proposed

    def extend(self, b: int, tokens: list[int]) -> None:
        pass

    def commit(self, b: int, n: int, accepted: int) -> None:
        # Fed this round: cur at n-1 and guesses 1..fed-1; kept: cur and the accepted guesses.
        self.valid[b] = n + min(accepted, self.fed - 1)


class _LookupProposer:
    """PromptLookup with one NgramIndex per row, extended as tokens are committed."""

    def __init__(self, lookup: PromptLookup, stats: SpeculativeStats):
        self.lookup, self.stats = lookup, stats
        self.indexes: list = []

    def prefill(self, prompt: torch.Tensor, seqs: list[list[int]]) -> None:
        self.indexes = [self.lookup.index(s) for s in seqs]

    def propose(self, seqs, active, K):
        self.stats.lookup_rounds += 1
        return self.candidates(active, K)

    def candidates(self, active, K):
        """This round's proposals without counting the round as a lookup round."""
        props = [ix.propose(K) if a else [] for ix, a in zip(self.indexes, active, strict=True)]
        width = max(len(p) for p in props)  # no row with a match -> an ordinary one-token step
        guesses = torch.tensor([p + [0] * (width - len(p)) for p in props], dtype=torch.long)
        return guesses, None, [len(p) for p in props]

    def extend(self, b: int, tokens: list[int]) -> None:
        self.indexes[b].extend(tokens)

    def commit(self, b: int, n: int, accepted: int) -> None:
        pass


class _LookupThenDraft:
    """Prompt lookup where every live row has a match, the draft model otherwise, decided per round for the
    whole batch (the choice is a function of the context, so each round is an ordinary exact round of one
    proposer or the other). The draft skips lookup rounds; its next round feeds it the tokens it missed in
    one forward (_DraftProposer.valid)."""

    def __init__(self, lookup: _LookupProposer, draft: _DraftProposer):
        self.lookup, self.draft = lookup, draft
        self.used: _LookupProposer | _DraftProposer = draft

    def prefill(self, prompt: torch.Tensor, seqs: list[list[int]]) -> None:
        self.lookup.prefill(prompt, seqs)
        self.draft.prefill(prompt, seqs)

    def propose(self, seqs, active, K):
        guesses, q, n_proposed = self.lookup.candidates(active, K)
        if all(n > 0 for n, a in zip(n_proposed, active, strict=True) if a):
            self.used = self.lookup
            self.lookup.stats.lookup_rounds += 1
            return guesses, q, n_proposed
        self.used = self.draft
        return self.draft.propose(seqs, active, K)

    def extend(self, b: int, tokens: list[int]) -> None:
        self.lookup.extend(b, tokens)

    def commit(self, b: int, n: int, accepted: int) -> None:
        self.used.commit(b, n, accepted)


def _proposer(draft, batch, max_len, opts, generator, stats, confidence):
    if not isinstance(draft, PromptLookup):
        return _DraftProposer(draft, batch, max_len, opts, generator, stats, confidence)
    lookup = _LookupProposer(draft, stats)
    if draft.fallback is None:
        return lookup
    draft_proposer = _DraftProposer(draft.fallback, batch, max_len, opts, generator, stats, confidence)
    return _LookupThenDraft(lookup, draft_proposer)


# ----- the loop -----
def _speculate(model, draft, prompt, lens, max_new, k, opts, generator, stop, pad_id, stats, confidence=None):
    """New tokens [B, max generated] (pad_id after a row's end); fills `stats`."""
    B, P = prompt.shape
    device = prompt.device
    if max_new == 0:
        return prompt.new_empty(B, 0)
    stop_set = set() if stop is None else {stop} if isinstance(stop, int) else set(stop)
    with torch.inference_mode():
        seqs = [row[:n] for row, n in zip(prompt.tolist(), lens, strict=True)]  # prompt + committed tokens
        new: list[list[int]] = [[] for _ in range(B)]
        active = [True] * B
        cache = KVCache.for_model(model, B, P + max_new)
        if P > 1:  # every prompt token but the last: the first round feeds it with the guesses
            model(prompt[:, :-1], cache=cache, return_hidden=True)
            stats.target_forwards += 1
        proposer = _proposer(draft, B, P + max_new, opts, generator, stats, confidence)
        proposer.prefill(prompt, seqs)
        while any(active):
            live = [b for b in range(B) if active[b]]
            K = min(k, min(max_new - len(new[b]) for b in live))  # no row writes past its P_b + max_new
            guesses, q, n_proposed = proposer.propose(seqs, active, K)
            guesses = guesses.to(device)
            cache.set_pos([len(s) - 1 if a else 0 for s, a in zip(seqs, active, strict=True)])  # roll back
            cur = torch.tensor([[s[-1]] for s in seqs], device=device)
            logits = model(torch.cat([cur, guesses], 1), cache=cache)
            stats.target_forwards += 1
            stats.rounds += 1
            accepted, nxt = verify(logits, guesses, torch.tensor(n_proposed, device=device), q,
                                   generator=generator, **opts)
            result = torch.cat([accepted[:, None], nxt[:, None], guesses], 1).tolist()  # the one sync
            for b in live:
                a, token, *g = result[b]
                emitted = (g[:a] + [token])[:max_new - len(new[b])]
                hit = next((i for i, t in enumerate(emitted) if t in stop_set), None)
                if hit is not None:
                    emitted, active[b] = emitted[:hit + 1], False
                stats.proposed += n_proposed[b]
                stats.accepted += a
                stats.row_rounds += 1
                proposer.commit(b, len(seqs[b]), a)
                proposer.extend(b, emitted)
                seqs[b] += emitted
                new[b] += emitted
                if len(new[b]) >= max_new:
                    active[b] = False
        stats.generated = sum(len(r) for r in new)
        width = max(len(r) for r in new)
        return torch.tensor([r + [pad_id] * (width - len(r)) for r in new], dtype=torch.long, device=device)
