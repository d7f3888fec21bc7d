"""Pure-Python BPE encoders: the specification that the fast (tiktoken) path is checked against.

There are two ways to apply byte-level BPE to a chunk, and they are not the same in general:

- merge-list BPE (Hugging Face `tokenizers`, and what training does): repeatedly apply the merge rule
  (left, right) with the lowest merge index among adjacent symbol pairs, leftmost occurrence first.
- rank BPE (tiktoken, SentencePiece): repeatedly merge the adjacent pair whose *concatenated bytes* form
  the token of lowest rank, leftmost first; and a chunk that is itself a token is emitted whole.

Rank BPE can merge a pair that is not a rule ("a"+"bc" when the rule was "ab"+"c") and can emit a token
the rules never build. For merge lists produced by BPE training both give the same result; see
`tiktoken_compatible` for the exact condition we check before handing a merge list to tiktoken (and
Berglund & van der Merwe 2023, "Formalizing BPE Tokenization", for the formal treatment of the two
semantics). Tokenizers imported from tiktoken files are *defined* by rank BPE; those from tokenizer.json by
merge-list BPE.
"""

from __future__ import annotations

from collections.abc import Sequence


def merge_list_bpe(symbols: list[int], merge_rank: dict[tuple[int, int], tuple[int, int]]) -> list[int]:
    """Apply merge rules to a list of symbol ids, Hugging Face style.

    merge_rank maps (left id, right id) -> (priority, merged id); lower priority applies first and equal
    priorities (the same rule twice) apply left to right.
    """
    symbols = list(symbols)
    while len(symbols) > 1:
        best = None
        best_at = -1
        for i in range(len(symbols) - 1):
            rule = merge_rank.get((symbols[i], symbols[i + 1]))
            if rule is not None and (best is None or rule[0] < best[0]):
                best, best_at = rule, i
        if best is None:
            break
        symbols[best_at:best_at + 2] = [best[1]]
    return symbols


def rank_bpe(piece: bytes, ranks: dict[bytes, int], whole_piece: bool = True,
             below: int | None = None) -> list[int]:
    """Encode one chunk the way tiktoken does; returns ranks.

    whole_piece: emit the chunk as one token if it is one (tiktoken's shortcut). below: only merge into
    tokens of lower rank (used to recover merge rules from ranks). Raises KeyError if a byte has no rank.
    """
    if whole_piece and piece in ranks:
        return [ranks[piece]]
    limit = below if below is not None else float("inf")
    parts = [piece[i:i + 1] for i in range(len(piece))]
    while len(parts) > 1:
        best = None
        best_at = -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < limit and (best is None or rank < best):
                best, best_at = rank, i
        if best is None:
            break
        parts[best_at:best_at + 2] = [parts[best_at] + parts[best_at + 1]]
    return [ranks[p] for p in parts]


def tiktoken_compatible(tokens: Sequence[bytes | None], merges: Sequence[tuple[int, int]],
                        merged_ids: Sequence[int], byte_ids: Sequence[int | None],
                        require_all_bytes: bool = True) -> str | None:
    """None if rank BPE over ranks {byte b: b, merge i: 256 + i} equals merge-list BPE on every input;
    otherwise the reason it might not. With require_all_bytes=False condition (1) is dropped and the
    guarantee covers the inputs made only of bytes that have tokens.

    Sufficient condition (checked exactly): (1) all 256 bytes are tokens; (2) every merge makes a distinct
    byte string that is not a single byte; (3) every merged token T is "self-consistent": merge-list BPE
    of T's own bytes yields [T].

    Why it suffices. Suppose both encoders are in the same state and rank BPE picks the adjacent pair X, Y
    whose concatenation is token T_j (rank j), while merge-list BPE would pick rule i >= j elsewhere; the
    pair X, Y is not rule j. No symbol crosses the left edge of X or the right edge of Y now, so none ever
    did: symbols only grow. Inside such a span the merge rules act as on the span alone (an occurrence
    straddling the edge was never applied, so it blocked nothing inside). By (3), the span alone is exactly
    [L_j, R_j] just before rule j and one token afterwards. Either way it is never the two symbols X, Y:
    contradiction. Hence rank BPE always picks the same pair as merge-list BPE, and by (3) tiktoken's
    whole-chunk shortcut also agrees. Training produces lists that satisfy (2) and (3) by the same argument
    (a pair is only ever merged inside a span that BPE, run on the span alone, would build the same way).
    """
    if require_all_bytes and any(b is None for b in byte_ids):
        missing = next(i for i, b in enumerate(byte_ids) if b is None)
        return f"byte 0x{missing:02x} has no token"
    seen: set[bytes] = set()
    for i, t in enumerate(merged_ids):
        data = tokens[t]
        if data is None or len(data) < 2 or data in seen:
            return f"merge #{i} makes a token ({data!r}) that another merge or a byte already makes"
        seen.add(data)
    merge_rank = {pair: (i, merged_ids[i]) for i, pair in enumerate(merges)}
    for t in merged_ids:
        if merge_list_bpe([byte_ids[c] for c in tokens[t]], merge_rank) != [t]:
            return f"token {t} ({tokens[t]!r}) is not rebuilt by the merge rules from its own bytes"
    return None
