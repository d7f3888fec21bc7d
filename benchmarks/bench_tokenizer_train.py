"""Tokenizer training: llmlab's pure-Python BPE trainer vs Hugging Face `tokenizers`' BpeTrainer (Rust).

Both learn a byte-level BPE of the same total vocabulary (default 8192, the 7 llmlab special tokens
included) from the same documents of the built-in `stdlib` corpus (every 10th document held out), with the
same GPT-4 (cl100k) pre-tokenization: `tokenizers` gets it as a Split(Regex) pre-tokenizer followed by
ByteLevel(use_regex=False), and the initial alphabet of all 256 bytes. Each training runs in a fresh
subprocess (so peak memory is that run's own ru_maxrss; llmlab's counting workers are reported apart),
contenders alternate run by run so machine load hits both alike, and the figure is each one's fastest run.
CPU seconds (all threads and worker processes) are reported too: on a busy machine they vary less than
wall time. Compression is bytes per token on the held-out documents. Prints one JSON object:
`time_ratio` = llmlab / tokenizers (target <= 1.5, stretch <= 1.0, reported beside the targets),
`compression_ratio` = llmlab bytes per token / tokenizers bytes per token (target within 1%). It ends with
`targets` and exits 1 when one is missed (0 with --no-check).

    python benchmarks/bench_tokenizer_train.py [--repeats 3] [--vocab-size 8192] [--corpus stdlib]
                                               [--no-check]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

from targets import add_no_check, finish, goal


def split_corpus(corpus: str) -> tuple[list[str], list[str]]:
    from llmlab.data.sources import iter_documents

    docs = list(iter_documents([corpus]))
    return [d for i, d in enumerate(docs) if i % 10 != 9], [d for i, d in enumerate(docs) if i % 10 == 9]


def _mib(kib: int) -> float:
    return round(kib / 1024, 1)  # ru_maxrss is in KiB on Linux


def _cpu_seconds() -> float:
    """User + system CPU time of this process, its threads and its finished worker processes."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def child(name: str, corpus: str, vocab_size: int) -> dict:
    """Train one contender once in this process and describe the run."""
    train, held = split_corpus(corpus)
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cpu_start = _cpu_seconds()
    start = time.perf_counter()
    if name == "llmlab":
        from llmlab.tokenizer import Tokenizer

        tok = Tokenizer.train(train, vocab_size=vocab_size, pattern="gpt4", progress=False)
        seconds = time.perf_counter() - start
        cpu = _cpu_seconds() - cpu_start
        tokens = sum(map(len, tok.encode_batch(held, allowed_special="none")))
        size = tok.vocab_size
    else:
        from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
        from tokenizers import Tokenizer as HFTokenizer

        from llmlab.tokenizer import DEFAULT_SPECIAL_TOKENS, GPT4_PATTERN
        from llmlab.tokenizer.patterns import hf_spelling

        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(hf_spelling(GPT4_PATTERN, "gpt4")), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(DEFAULT_SPECIAL_TOKENS),
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        hf.train_from_iterator(train, trainer=trainer)
        seconds = time.perf_counter() - start
        cpu = _cpu_seconds() - cpu_start
        tokens = sum(len(e.ids) for e in hf.encode_batch(held, add_special_tokens=False))
        size = hf.get_vocab_size()
    held_bytes = sum(len(d.encode("utf-8")) for d in held)
    return {"seconds": round(seconds, 3), "cpu_seconds": round(cpu, 3), "vocab_size": size,
            "bytes_per_token": round(held_bytes / tokens, 4),
            "rss_after_load_mib": _mib(loaded),
            "peak_rss_mib": _mib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss),
            "worker_peak_rss_mib": _mib(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss),
            "train_chars": sum(map(len, train)), "held_out_bytes": held_bytes}


def run_child(name: str, args) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", name, "--corpus", args.corpus,
                          "--vocab-size", str(args.vocab_size)], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{name} run failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3, help="runs per contender (the fastest counts)")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--corpus", default="stdlib", help="any llmlab source (files, globs, 'stdlib')")
    ap.add_argument("--child", choices=["llmlab", "tokenizers"], help=argparse.SUPPRESS)
    add_no_check(ap)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.corpus, args.vocab_size)))
        return
    load_before = os.getloadavg()[0]
    runs: dict[str, list[dict]] = {"llmlab": [], "tokenizers": []}
    for r in range(args.repeats):
        for name in list(runs)[:: 1 if r % 2 == 0 else -1]:  # alternate who goes first
            runs[name].append(run_child(name, args))
    best = {name: min(r, key=lambda x: x["seconds"]) for name, r in runs.items()}
    result = {
        "benchmark": "tokenizer_train",
        "corpus": args.corpus,
        "pattern": "gpt4",
        "vocab_size": args.vocab_size,
        "train_chars": best["llmlab"]["train_chars"],
        "held_out_bytes": best["llmlab"]["held_out_bytes"],
        "cpus": os.cpu_count(),
        "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        **{name: {**{k: v for k, v in b.items() if k not in ("train_chars", "held_out_bytes")},
                  "all_seconds": [r["seconds"] for r in runs[name]]} for name, b in best.items()},
        "time_ratio": round(best["llmlab"]["seconds"] / best["tokenizers"]["seconds"], 3),
        "cpu_ratio": round(best["llmlab"]["cpu_seconds"] / best["tokenizers"]["cpu_seconds"], 3),
        "compression_ratio": round(best["llmlab"]["bytes_per_token"] / best["tokenizers"]["bytes_per_token"],
                                   4),
    }
    result["stretch"] = {"time_ratio": 1.0, "met": result["time_ratio"] <= 1.0}
    targets = {"time_ratio": goal(result["time_ratio"], "<=", 1.5),
               "compression_gap": goal(round(abs(result["compression_ratio"] - 1), 4), "<=", 0.01)}
    sys.exit(finish(result, targets, args.no_check))


if __name__ == "__main__":
    main()
