"""Byte-level BPE training: count distinct chunks once, then merge with incremental pair counts.

The algorithm (Sennrich et al. 2016, "Neural Machine Translation of Rare Words with Subword Units", on
bytes as in GPT-2, Radford et al. 2019):

1. Split every document with the pre-tokenization regex and count each distinct chunk. This is the only
   pass over the corpus; it runs in several processes (batches of documents, one Counter each) and its
   memory grows with the number of *distinct* chunks, not with the corpus.
2. Start from the 256 byte values. Count every adjacent pair of symbols inside every chunk, weighted by
   the chunk's count, and remember which chunks hold which pair.
3. Repeatedly merge the most frequent pair into a new symbol. Only the chunks that contain the pair are
   touched, and only the counts of the pairs around each merged occurrence change (the left neighbour's
   pair and the right neighbour's pair), so a merge costs time proportional to the occurrences it merges,
   not to the corpus. A heap holds (-count, pair) entries lazily: when a pair's count grows a fresh entry is
   pushed; an entry that comes out of the heap with a stale count is pushed back with the current one, so
   the first entry whose count is current is the true maximum.

Tie-breaking (documented and deterministic): among pairs with the same count, the pair (left, right) with
the smallest left id wins, then the smallest right id; i.e. the lexicographically smallest id pair. Within
a chunk, occurrences of the merged pair are merged left to right (so "aaa" with pair (a, a) becomes
[aa, a]), exactly as an encoder applying the merge list does.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import multiprocessing
import os
import sys
import warnings
from collections.abc import Iterable, Iterator

from llmlab.errors import TokenizerError
from llmlab.tokenizer.patterns import NEWLINE_CUT_SAFE, ascii_twin, compile_pattern

BATCH_CHARS = 1 << 20  # characters of text per counting task (~1 MB: big enough to amortise pickling)

# ---- 1. counting chunks -------------------------------------------------------------------------------

_COMPILED: dict[tuple[str, str | None], tuple] = {}


def _splitters(pattern: str, name: str | None):
    key = (pattern, name)
    if key not in _COMPILED:
        _COMPILED[key] = (compile_pattern(pattern).findall, ascii_twin(name))
    return _COMPILED[key]


def count_batch(docs: list[str], pattern: str, name: str | None) -> tuple[collections.Counter, str | None]:
    """Count the chunks of a batch of documents; also return a document the pattern does not fully cover.

    Built-in patterns match every character by construction; a custom pattern that skips characters would
    make encoding lossy (tiktoken drops unmatched text), so training refuses it.
    """
    findall, twin = _splitters(pattern, name)
    twin_findall = twin.findall if twin is not None else None
    chunks: list[str] = []
    uncovered = None
    for doc in docs:
        parts = twin_findall(doc) if twin_findall is not None and doc.isascii() else findall(doc)
        if name is None and uncovered is None and sum(map(len, parts)) != len(doc):
            uncovered = _first_gap(pattern, doc)
        chunks.extend(parts)
    return collections.Counter(chunks), uncovered


def _first_gap(pattern: str, doc: str) -> str:
    """The first character the pattern skips, with a little context, for the error message."""
    pos = 0
    for m in compile_pattern(pattern).finditer(doc):
        if m.start() != pos:
            break
        pos = m.end()
    return f"{doc[pos]!r} at character {pos} of {doc[max(0, pos - 20):pos + 20]!r}"


def split_document(doc: str, size: int) -> list[str]:
    """Pieces of about `size` characters, cut only just after a newline between two non-space characters
    (where NEWLINE_CUT_SAFE patterns are known to split identically). A document without such a newline
    stays whole."""
    pieces, start, n = [], 0, len(doc)
    while n - start > size:
        p = doc.find("\n", start + size)
        # str.isspace() counts a few more characters as space than \s does, which only makes this stricter.
        while p != -1 and not (0 < p < n - 1 and not doc[p - 1].isspace() and not doc[p + 1].isspace()):
            p = doc.find("\n", p + 1)
        if p == -1:
            break
        pieces.append(doc[start:p + 1])
        start = p + 1
    pieces.append(doc[start:])
    return pieces


def _batches(texts: Iterable[str], max_chars: int | None, batch_chars: int,
             splittable: bool = False) -> Iterator[tuple[list[str], int]]:
    """Group documents into batches of about batch_chars characters, stopping after max_chars in total.

    With `splittable`, a document longer than a batch is cut into batch-sized pieces (see split_document),
    so one huge file never becomes one huge list of chunks in a worker.
    """
    total = 0
    buf: list[str] = []
    size = 0
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TokenizerError(f"training text #{i} is a {type(text).__name__}, not a str; "
                                 f"pass an iterable of strings (one document each)")
        if max_chars is not None:
            if total >= max_chars:
                break
            text = text[: max_chars - total]
        total += len(text)
        for piece in split_document(text, batch_chars) if splittable and len(text) > batch_chars else [text]:
            buf.append(piece)
            size += len(piece)
            if size >= batch_chars:
                yield buf, size
                buf, size = [], 0
    if buf:
        yield buf, size


def _fork_pool(workers: int):
    """A pool of forked workers, or None where fork is unavailable or unsafe (not Linux).

    fork starts workers instantly and needs no importable __main__; spawn/forkserver would re-import the
    caller's script (breaking stdin/notebook callers and scripts without a __main__ guard), so elsewhere we
    count in-process instead. The workers only run regex and Counter code, so the threads a parent may
    have (tqdm's monitor, torch's pools) are not a hazard for them; Python 3.12+'s warning is silenced.
    """
    if not sys.platform.startswith("linux") or "fork" not in multiprocessing.get_all_start_methods():
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return multiprocessing.get_context("fork").Pool(workers)


def count_chunks(texts: Iterable[str], pattern: str, name: str | None, *, max_chars: int | None = None,
                 workers: int | None = None, progress: bool = True,
                 batch_chars: int = BATCH_CHARS) -> collections.Counter:
    """Counter of distinct chunks over all texts, computed in `workers` processes (None: all CPUs)."""
    from tqdm.auto import tqdm

    workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
    batches = _batches(texts, max_chars, batch_chars, splittable=name in NEWLINE_CUT_SAFE)
    head = list(itertools.islice(batches, 2))
    # A corpus that fits in one batch is not worth starting processes for.
    pool = _fork_pool(workers) if len(head) > 1 and workers > 1 else None
    counts: collections.Counter = collections.Counter()
    try:
        with tqdm(desc="counting chunks", unit="char", unit_scale=True, total=max_chars,
                  disable=not progress, leave=False) as bar:
            for (counter, uncovered), size in _map_batches(pool, itertools.chain(head, batches),
                                                           (pattern, name), workers):
                if uncovered is not None:
                    raise TokenizerError(
                        f"pattern {pattern!r} does not match every character of the training text (it skips "
                        f"{uncovered}); skipped text would be lost when encoding. Add a catch-all "
                        f"alternative such as |\\s+|\\S+ at the end of the pattern")
                counts.update(counter)
                bar.update(size)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    return counts


def _map_batches(pool, batches, args, workers) -> Iterator:
    """(count_batch result, batch size) for each batch, in order; at most 2 batches per worker in flight, so
    the corpus is never all in memory at once."""
    if pool is None:
        for batch, size in batches:
            yield count_batch(batch, *args), size
        return
    pending: collections.deque = collections.deque()
    for batch, size in batches:
        pending.append((pool.apply_async(count_batch, (batch, *args)), size))
        if len(pending) >= 2 * workers:
            result, size_done = pending.popleft()
            yield result.get(), size_done
    while pending:
        result, size_done = pending.popleft()
        yield result.get(), size_done


# ---- 2-3. learning merges -------------------------------------------------------------------------------

def _chunk_symbols(counts: dict[str, int]) -> tuple[list[list[int]], list[int]]:
    """Each distinct chunk of two or more bytes as a list of byte values, with its count."""
    words, freqs = [], []
    for text, n in counts.items():
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: encode them as U+FFFD, as tiktoken does
            data = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace").encode("utf-8")
        if len(data) > 1:
            words.append(list(data))
            freqs.append(n)
    return words, freqs


def learn_merges(counts: dict[str, int], n_merges: int, *, progress: bool = True) -> list[tuple[int, int]]:
    """Up to n_merges merges (left id, right id); merge i creates id 256 + i. Fewer if pairs run out."""
    from tqdm.auto import tqdm

    words, freqs = _chunk_symbols(counts)
    width = 256 + n_merges  # pair (a, b) is stored as the int a * width + b: cheaper to hash than a tuple
    pair_counts: collections.defaultdict[int, int] = collections.defaultdict(int)
    where: collections.defaultdict[int, list[int]] = collections.defaultdict(list)
    for i, w in enumerate(words):
        n = freqs[i]
        for j in range(len(w) - 1):
            key = w[j] * width + w[j + 1]
            pair_counts[key] += n
            where[key].append(i)
    heap = [(-c, key) for key, c in pair_counts.items()]
    heapq.heapify(heap)

    merges: list[tuple[int, int]] = []
    bar = tqdm(total=n_merges, desc="merging", unit="merge", disable=not progress, leave=False)
    while len(merges) < n_merges and heap:
        neg, key = heapq.heappop(heap)
        current = pair_counts.get(key, 0)
        if current <= 0:
            continue
        if current != -neg:  # stale entry: requeue with the true count
            heapq.heappush(heap, (-current, key))
            continue
        a, b = divmod(key, width)
        new = 256 + len(merges)
        merges.append((a, b))
        del pair_counts[key]
        grown = _apply_merge(words, freqs, where.pop(key), a, b, new, key, width, pair_counts, where)
        for k in set(grown):
            c = pair_counts[k]
            if c > 0:
                heapq.heappush(heap, (-c, k))
        if len(merges) % 64 == 0:
            bar.update(64)
    bar.update(len(merges) % 64)
    bar.close()
    return merges


def _apply_merge(words, freqs, holders, a, b, new, key, width, pair_counts, where) -> list[int]:
    """Merge (a, b) -> new in place in every chunk listed in holders; return the keys whose count grew.

    holders may list a chunk several times or list chunks that lost the pair since (the index is
    append-only); both are harmless. For each merged occurrence: the pair with the left neighbour x moves
    from (x, a) to (x, new) and the pair with the right neighbour y from (b, y) to (new, y). The left
    neighbour is read after earlier merges in the same chunk, so "a b a b" correctly yields (new, new).
    """
    grown: list[int] = []
    push = grown.append
    new_row = new * width
    b_row = b * width
    same = a == b
    for i in set(holders):
        w = words[i]
        remaining = w.count(a)
        if not remaining:
            continue
        n = freqs[i]
        length = len(w)
        j = -1
        while remaining:
            j = w.index(a, j + 1)
            remaining -= 1
            if j + 1 >= length or w[j + 1] != b:
                continue
            if j:
                row = w[j - 1] * width
                old = row + a
                if old != key:
                    pair_counts[old] -= n
                grow = row + new
                pair_counts[grow] += n
                push(grow)
                where[grow].append(i)
            if j + 2 < length:
                right = w[j + 2]
                old = b_row + right
                if old != key:
                    pair_counts[old] -= n
                grow = new_row + right
                pair_counts[grow] += n
                push(grow)
                where[grow].append(i)
            w[j] = new
            del w[j + 1]
            length -= 1
            if same:  # the b consumed by this merge was also an `a` still counted in remaining
                remaining -= 1
    return grown
