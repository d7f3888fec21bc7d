"""Encoding throughput: llmlab's Tokenizer vs tiktoken (same ranks) vs HF `tokenizers` (same merges).

A tokenizer is trained by llmlab on the built-in `stdlib` corpus (vocab 8192, GPT-4 pattern, every 10th
document held out); tiktoken gets an Encoding built from its ranks and `tokenizers` loads its exported
tokenizer.json, so all three produce the same ids (checked). Throughput is held-out UTF-8 megabytes per
second, single thread (one encode call per document) and batch (encode_batch over groups of documents with
each library's default threading). The contenders take turns document by document (group by group for
batches), cycling through every running order, so load from other processes and cache warmth fall on all
alike; the figure is total bytes
over total time; median_paired_ratio is the median over groups of (peer time / llmlab time) for the same
group, a steadier figure on a busy machine. Prints one JSON object; ratios are llmlab speed / peer speed.
It ends with `targets` (single and batch: >= 0.9 x tiktoken, >= 2 x tokenizers; identical ids) and exits 1
when one is missed (0 with --no-check).

    python benchmarks/bench_tokenizer_encode.py [--rounds 5] [--batch-docs 16] [--no-check]
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import tempfile
import time

from targets import add_no_check, finish, goal


def setup(corpus: str, vocab_size: int):
    import tiktoken
    from tokenizers import Tokenizer as HFTokenizer

    from llmlab.data.sources import iter_documents
    from llmlab.tokenizer import Tokenizer

    docs = list(iter_documents([corpus]))
    train = [d for i, d in enumerate(docs) if i % 10 != 9]
    held = [d for i, d in enumerate(docs) if i % 10 == 9]
    tok = Tokenizer.train(train, vocab_size=vocab_size, progress=False)
    n = 256 + len(tok.merges)
    enc = tiktoken.Encoding("bench", pat_str=tok.pattern, special_tokens=tok.special_tokens,
                            mergeable_ranks={tok.token_bytes(i): i for i in range(n)})
    with tempfile.TemporaryDirectory() as tmp:
        tok.to_hf(os.path.join(tmp, "tokenizer.json"))
        hf = HFTokenizer.from_file(os.path.join(tmp, "tokenizer.json"))
    return tok, enc, hf, held


def contenders(tok, enc, hf) -> dict:
    """mode -> name -> function encoding a list of documents (one call per document for "single")."""
    return {
        "single": {
            "llmlab": lambda docs: [tok.encode(d) for d in docs],
            "tiktoken": lambda docs: [enc.encode(d) for d in docs],
            "tokenizers": lambda docs: [hf.encode(d, add_special_tokens=False).ids for d in docs],
        },
        "batch": {
            "llmlab": lambda docs: tok.encode_batch(docs),
            "tiktoken": lambda docs: enc.encode_batch(docs),
            "tokenizers": lambda docs: [e.ids for e in hf.encode_batch(docs, add_special_tokens=False)],
        },
    }


def timed_rounds(fns: dict, groups: list[list[str]], rounds: int) -> dict[str, list[float]]:
    """Seconds per contender per group. Contenders take turns group by group, so a burst of load from other
    processes falls on all of them alike instead of on whoever ran at that moment."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    # Every order in turn: each contender runs first, and right after each other one, equally often (the one
    # before leaves the caches warm with the same text, or cold after a big allocation).
    orders = itertools.cycle(itertools.permutations(fns))
    for _ in range(rounds):
        for group in groups:
            for name in next(orders):
                start = time.perf_counter()
                fns[name](group)
                times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5, help="passes over the held-out documents")
    ap.add_argument("--batch-docs", type=int, default=16, help="documents per encode_batch call")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--corpus", default="stdlib")
    add_no_check(ap)
    args = ap.parse_args()
    load_before = os.getloadavg()[0]
    tok, enc, hf, held = setup(args.corpus, args.vocab_size)
    megabytes = sum(len(d.encode("utf-8")) for d in held) / 1e6
    table = contenders(tok, enc, hf)
    outputs = {name: fn(held) for name, fn in table["single"].items()}
    identical = outputs["llmlab"] == outputs["tiktoken"] == outputs["tokenizers"]
    groups = {"single": [[d] for d in held],
              "batch": [held[i:i + args.batch_docs] for i in range(0, len(held), args.batch_docs)]}
    mbps, paired = {}, {}
    for mode, fns in table.items():
        times = timed_rounds(fns, groups[mode], args.rounds)
        mbps[mode] = {name: round(megabytes * args.rounds / sum(t), 2) for name, t in times.items()}
        # The same group encoded back to back by both: the median of these speed ratios shrugs off bursts.
        paired[mode] = {peer: round(statistics.median(p / o for p, o in zip(times[peer], times["llmlab"],
                                                                          strict=True)), 3)
                        for peer in ("tiktoken", "tokenizers")}
    result = {
        "benchmark": "tokenizer_encode",
        "corpus": args.corpus,
        "vocab_size": tok.vocab_size,
        "held_out_megabytes": round(megabytes, 3),
        "held_out_documents": len(held),
        "rounds": args.rounds,
        "batch_docs": args.batch_docs,
        "identical_ids": identical,
        "cpus": os.cpu_count(),
        "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "mb_per_s": mbps,
        "ratio_vs_tiktoken": {m: round(v["llmlab"] / v["tiktoken"], 3) for m, v in mbps.items()},
        "ratio_vs_tokenizers": {m: round(v["llmlab"] / v["tokenizers"], 3) for m, v in mbps.items()},
        "median_paired_ratio": paired,
    }
    targets = {"identical_ids": goal(identical, "==", True)}
    for mode in ("single", "batch"):
        targets[f"vs_tiktoken_{mode}"] = goal(result["ratio_vs_tiktoken"][mode], ">=", 0.9)
        targets[f"vs_tokenizers_{mode}"] = goal(result["ratio_vs_tokenizers"][mode], ">=", 2.0)
    sys.exit(finish(result, targets, args.no_check))


if __name__ == "__main__":
    main()
