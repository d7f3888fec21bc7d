"""Encoding throughput: llmlab's Tokenizer vs tiktoken (same ranks) vs Hugging Face `tokenizers` (same merges).

A tokenizer is trained by llmlab on the built-in `stdlib` corpus (vocab 8192, GPT-4 pattern, every 10th
document held out); tiktoken gets an Encoding built from its ranks and `tokenizers` loads its exported
tokenizer.json, so all three produce the same ids (checked). Throughput is held-out UTF-8 megabytes per
second, single thread (one encode call per document) and batch (encode_batch of all documents with each
library's default threading); contenders alternate (in rotating order) round by round and the figure is
each one's best round.
Prints one JSON object; ratios are llmlab / peer (targets: >= 0.9 x tiktoken, >= 2 x tokenizers).

    python benchmarks/bench_tokenizer_encode.py [--rounds 5] [--copies 3]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds per contender (the best counts)")
    ap.add_argument("--copies", type=int, default=3, help="the held-out documents are encoded this many times "
                                                          "per round")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--corpus", default="stdlib")
    args = ap.parse_args()
    load_before = os.getloadavg()[0]
    tok, enc, hf, held = setup(args.corpus, args.vocab_size)
    docs = held * args.copies
    megabytes = sum(len(d.encode("utf-8")) for d in docs) / 1e6
    table = contenders(tok, enc, hf)
    outputs = {name: fn(held) for name, fn in table["single"].items()}
    identical = outputs["llmlab"] == outputs["tiktoken"] == outputs["tokenizers"]
    best: dict[str, dict[str, float]] = {mode: {} for mode in table}
    for r in range(args.rounds):
        for mode, fns in table.items():
            names = list(fns)
            for name in names[r % 3:] + names[:r % 3]:  # rotate who goes first, so no one always runs cold
                fn = fns[name]
                start = time.perf_counter()
                fn(docs)
                seconds = time.perf_counter() - start
                best[mode][name] = min(best[mode].get(name, float("inf")), seconds)
    mbps = {mode: {name: round(megabytes / s, 2) for name, s in times.items()} for mode, times in best.items()}
    result = {
        "benchmark": "tokenizer_encode",
        "corpus": args.corpus,
        "vocab_size": tok.vocab_size,
        "megabytes_per_round": round(megabytes, 3),
        "documents_per_round": len(docs),
        "identical_ids": identical,
        "cpus": os.cpu_count(),
        "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "mb_per_s": mbps,
        "ratio_vs_tiktoken": {m: round(v["llmlab"] / v["tiktoken"], 3) for m, v in mbps.items()},
        "ratio_vs_tokenizers": {m: round(v["llmlab"] / v["tokenizers"], 3) for m, v in mbps.items()},
        "targets": {"vs_tiktoken_min": 0.9, "vs_tokenizers_min": 2.0},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
