r"""Serving under load: continuous batching vs one request at a time vs static batching, same model, same
requests; prefix caching on a shared system prompt; transformers' batched generate as the familiar baseline.

    python benchmarks/bench_serve.py                      # a bounded run: a few minutes on 2 CPU cores
    python benchmarks/bench_serve.py --checkpoint runs/demo/ckpt-000500 \
        --prompt-len 16,96 --output-len 8,128 --shared-prefix 96   # requests that fit a 256-token context

Requests: --requests (64) with mixed prompt lengths (--prompt-len, uniform) and output lengths (--output-len,
drawn by --output-dist), greedy, every request generating exactly its max_tokens (ignore_eos). Output lengths
are log-uniform by default: most answers short, a few long, the long tail real chat traffic has (e.g.
ShareGPT, which vLLM's serving benchmarks replay). That tail is what static batching pays for: each batch runs
until its longest request is done (static_row_steps_per_token below). `--output-dist uniform` draws them
uniformly instead, a narrow spread that bounds any scheduler's gain over static batching near 1.5x. Token-id
prompts, so any checkpoint works; without --checkpoint the model is a randomly initialised GPT-2-style
--layers x --d-model Transformer with a BPE tokenizer trained on the repository's own text (speed does not
depend on what the weights say).

The offered load exceeds the server's capacity, as in real serving: more requests (--requests) than
batch slots (--max-running). With as many slots as requests every request is admitted at once and no
scheduling policy can differ from another; the policies differ in what happens when a slot frees up.

Modes, each timed from the moment all requests are sent:
  continuous         `llmlab serve`'s stack: uvicorn on a loopback port, the engine with max_running =
                     --max-running, every client streaming (SSE) at once through httpx. A finished request's
                     slot goes to the next waiting one at the next step.
  static             the same server, client and max_running with the engine's policy="static":
                     request-level batching as Orca (Yu et al. 2022) defines the baseline and as
                     FasterTransformer, transformers' generate and llmlab.infer.stream run it. A batch of up
                     to max_running waiting requests is admitted only when none runs; a request that
                     finishes gets its last token at once, but its row stays in the batch (computed every
                     step, outputs discarded, blocks held) until the batch's longest request is done.
  static_shrinking   reported, no target: policy="static_shrinking", the same but a finished request leaves
                     the batch at once (no padded rows); a stronger peer than the literature's static
                     batching, whose gap to continuous is only the slots left idle while a batch drains.
  one_at_a_time      the same server with max_running = 1: requests run one after another.
  static_in_process  reported, no target: llmlab's batched KV-cached decoding (llmlab.infer.stream) in
                     fixed batches of --static-batch (default: --max-running) in arrival order, each padded
                     to its longest prompt and run until its longest output is done; in process, without
                     HTTP or paging, so it is not the same stack.
  transformers       AutoModelForCausalLM.generate on the same weights (save_hf), left-padded batches as
                     static_in_process.
  shared_prefix      a variant where every prompt starts with the same --shared-prefix tokens: the
                     continuous server with the engine's prefix caching on and off.

The server modes run in --repeats rounds, in alternating order, and each keeps its fastest run (the
machine's load varies); static_in_process and transformers run once. The client is a process of its own, as
real clients are, streaming through aiohttp (the client of vLLM's serving benchmark): its C HTTP parser keeps
the load generator's share of the cores small (client_cpu_s per mode in the JSON).

Figures: throughput (generated tokens / wall time), time to first token (TTFT) and per-token latency
(TPOT: (last token - first token) / (tokens - 1) per request) p50/p99, and peak resident memory while each
mode runs (peak CUDA memory on a GPU). Targets: continuous throughput >= 3x one at a time and >= 1.5x
static (the server's policy="static"); continuous p99 TTFT <= static's; prefix caching >= 2x faster p50
TTFT on the shared variant. The static_shrinking, static_in_process and transformers ratios are reported,
not targets, and so is static_row_steps_per_token: the decode rows static batching computes per generated
token for these requests, the most continuous batching can gain over it when a step costs in proportion to
its rows. Prints one JSON object ending with `targets`; exit 1 on a miss (0 with --no-check).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import numpy as np
import torch

from llmlab.device import synchronize
from llmlab.infer import stream
from llmlab.infer.engine import Engine
from llmlab.infer.server import BackgroundServer, Limits, create_app
from llmlab.model import ModelConfig, Transformer
from llmlab.tokenizer import Tokenizer
from targets import add_no_check, finish, goal

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Req:
    prompt: list[int]
    max_tokens: int


# ----- model and requests -----------------------------------------------------------------------------------
def build_model(args) -> tuple[Transformer, Tokenizer, str]:
    device = torch.device(args.device)
    if args.checkpoint:
        from llmlab.infer.generate import _load_tokenizer
        from llmlab.infer.quant import load_model

        model = load_model(args.checkpoint, device=device, dtype="fp32" if device.type == "cpu" else "auto")
        tok = _load_tokenizer(Path(args.checkpoint), None, model.config.vocab_size)
        return model.eval(), tok, str(args.checkpoint)
    texts = [p.read_text(errors="replace") for p in sorted((ROOT / "src").rglob("*.py"))[:80]]
    tok = Tokenizer.train(texts, vocab_size=args.vocab, progress=False, workers=1)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, n_layer=args.layers, n_head=args.d_model // 64,
                      d_model=args.d_model, block_size=args.context)
    name = (f"random GPT-2-style {args.layers} x {args.d_model}, vocab {tok.vocab_size}, "
            f"context {args.context}")
    return Transformer(cfg).to(device).eval(), tok, name


SHARED_PROMPT, SHARED_OUTPUT = (8, 32), (16, 64)  # the shared-prefix variant's own part and output lengths


def make_requests(args, vocab: int, shared: bool) -> list[Req]:
    rng = np.random.default_rng(args.seed + shared)
    regular = vocab - 16  # stay clear of the special tokens at the end of the vocabulary
    prefix = rng.integers(0, regular, args.shared_prefix).tolist() if shared else []
    lo, hi = SHARED_PROMPT if shared else args.prompt_len
    out_lo, out_hi = SHARED_OUTPUT if shared else args.output_len
    log_uniform = args.output_dist == "log-uniform" and not shared

    def output_len() -> int:
        if log_uniform:
            return min(out_hi, int(np.exp(rng.uniform(np.log(out_lo), np.log(out_hi + 1)))))
        return int(rng.integers(out_lo, out_hi + 1))

    return [Req(prefix + rng.integers(0, regular, int(rng.integers(lo, hi + 1))).tolist(), output_len())
            for _ in range(args.requests)]


# ----- measuring --------------------------------------------------------------------------------------------
class PeakMemory:
    """Peak resident set size (MiB) while the block runs, sampled every 10 ms; peak CUDA memory on a GPU."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0.0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.done.wait(0.01):
            self.peak = max(self.peak, rss_mib())

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, rss_mib())

    def report(self) -> dict:
        out = {"peak_rss_mib": round(self.peak, 1)}
        if self.device.type == "cuda":
            out["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
        return out


def rss_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def summarize(rows: list[dict], wall: float) -> dict:
    """Throughput and latency percentiles from per-request {start, first, end, tokens}."""
    ttft = [r["first"] - r["start"] for r in rows]
    tpot = [(r["end"] - r["first"]) / (r["tokens"] - 1) for r in rows if r["tokens"] > 1]
    tokens = sum(r["tokens"] for r in rows)
    return {"tokens": tokens, "wall_s": round(wall, 3), "tokens_per_s": round(tokens / wall, 1),
            "ttft_ms": percentiles(ttft), "tpot_ms": percentiles(tpot)}


def percentiles(values: list[float]) -> dict:
    ms = np.array(values) * 1000
    return {"p50": round(float(np.percentile(ms, 50)), 2), "p99": round(float(np.percentile(ms, 99)), 2),
            "mean": round(float(ms.mean()), 2)}


# ----- the modes --------------------------------------------------------------------------------------------
async def _one(http: aiohttp.ClientSession, url: str, req: Req) -> dict:
    body = {"model": "bench", "prompt": req.prompt, "max_tokens": req.max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    start, first, usage, text = time.perf_counter(), None, None, []
    async with http.post(url + "/v1/completions", json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {(await r.text())[:300]}")
        async for raw in r.content:  # one SSE line at a time
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"]:
                first = first or time.perf_counter()
                text.append(chunk["choices"][0]["text"])
            usage = chunk.get("usage") or usage
    return {"start": start, "first": first, "end": time.perf_counter(), "tokens": usage["completion_tokens"],
            "text": "".join(text)}


async def _load(url: str, reqs: list[Req]) -> list[dict]:
    connector = aiohttp.TCPConnector(limit=len(reqs) + 8)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=3600)) as http:
        return await asyncio.gather(*(_one(http, url, r) for r in reqs))


def client_main(url: str) -> int:
    """The load generator's process (--client URL): requests as JSON on stdin, {wall, client_cpu_s, rows} on
    stdout (client_cpu_s: what the load itself cost the client, which shares the machine's cores)."""
    reqs = [Req(**r) for r in json.load(sys.stdin)]
    # Warm-up (connections, the server's first steps) on reversed prompts: the timed requests must not find
    # their own prompts in the prefix cache.
    asyncio.run(_load(url, [Req(r.prompt[::-1], r.max_tokens) for r in reqs[:4]]))
    start, cpu = time.perf_counter(), time.process_time()
    rows = asyncio.run(_load(url, reqs))
    json.dump({"wall": time.perf_counter() - start, "client_cpu_s": time.process_time() - cpu, "rows": rows},
              sys.stdout)
    return 0


def run_server(model, tok, reqs: list[Req], args, max_running: int, prefix_caching: bool = True,
               policy: str = "continuous") -> tuple:
    """(summary, per-request texts) of the requests sent at once to a loopback server by a client process
    of its own (as real clients are: the server's Python threads do not share the client's)."""
    engine = Engine(model, tok, block_size=16, max_running=max_running, prefill_chunk=args.prefill_chunk,
                    prefix_caching=prefix_caching, policy=policy)
    limits = Limits(max_tokens=model.config.block_size, max_waiting=len(reqs) * 2, max_body_bytes=1 << 24)
    payload = json.dumps([{"prompt": r.prompt, "max_tokens": r.max_tokens} for r in reqs])
    with BackgroundServer(create_app(engine, tok, model_name="bench", limits=limits)) as url:
        with PeakMemory(torch.device(args.device)) as mem:
            proc = subprocess.run([sys.executable, __file__, "--client", url], input=payload, text=True,
                                  capture_output=True, check=False)
        if proc.returncode != 0:
            sys.exit(f"bench_serve: the load client failed:\n{proc.stderr[-2000:]}")
        stats = engine.stats()
    out = json.loads(proc.stdout)
    rows, wall = out["rows"], out["wall"]
    result = (summarize(rows, wall) | mem.report() | {"prefix_hit_tokens": stats["prefix_hit_tokens"],
                                                     "client_cpu_s": round(out["client_cpu_s"], 2)})
    return result, [r["text"] for r in rows]


def run_static_in_process(model, tok, reqs: list[Req], args) -> tuple:
    """(summary, texts): fixed batches decoded with llmlab.infer.stream, one batch after another."""
    device = torch.device(args.device)
    stream(model, [reqs[0].prompt], 2, temperature=0)  # warm-up
    for _ in stream(model, [r.prompt for r in reqs[:4]], 2, temperature=0):
        pass
    rows, texts = [], []
    with PeakMemory(device) as mem:
        start = time.perf_counter()
        for b in range(0, len(reqs), args.static_batch):
            group = reqs[b:b + args.static_batch]
            times, steps = [], []
            for step in stream(model, [r.prompt for r in group], max(r.max_tokens for r in group),
                               temperature=0):
                steps.append(step.tolist())
                synchronize(device)
                times.append(time.perf_counter())
            for i, r in enumerate(group):
                rows.append({"start": start, "first": times[0], "end": times[r.max_tokens - 1],
                             "tokens": r.max_tokens})
                texts.append(tok.decode([s[i] for s in steps[:r.max_tokens]]))
        wall = time.perf_counter() - start
    return summarize(rows, wall) | mem.report(), texts


def run_transformers(model, reqs: list[Req], args) -> dict:
    """Left-padded batches through transformers' generate on the same weights; useful tokens / wall time."""
    from transformers import AutoModelForCausalLM

    from llmlab.model.hf import save_hf

    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as d:
        save_hf(model, Path(d) / "hf")
        hf = AutoModelForCausalLM.from_pretrained(Path(d) / "hf", dtype=torch.float32).to(device).eval()

    def batch(group: list[Req]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r.prompt) for r in group)
        ids = torch.tensor([[0] * (width - len(r.prompt)) + r.prompt for r in group], device=device)
        mask = torch.tensor([[0] * (width - len(r.prompt)) + [1] * len(r.prompt) for r in group],
                            device=device)
        return ids, mask

    def generate(group: list[Req]) -> None:
        ids, mask = batch(group)
        with torch.no_grad():
            hf.generate(ids, attention_mask=mask, max_new_tokens=max(r.max_tokens for r in group),
                        do_sample=False, eos_token_id=None, pad_token_id=0)

    generate(reqs[:4])  # warm-up
    with PeakMemory(device) as mem:
        start = time.perf_counter()
        for b in range(0, len(reqs), args.static_batch):
            generate(reqs[b:b + args.static_batch])
        synchronize(device)
        wall = time.perf_counter() - start
    tokens = sum(r.max_tokens for r in reqs)
    result = {"tokens": tokens, "wall_s": round(wall, 3), "tokens_per_s": round(tokens / wall, 1)}
    return result | mem.report()


# ----- main -------------------------------------------------------------------------------------------------
def pair(text: str) -> tuple[int, int]:
    lo, hi = (int(x) for x in text.split(","))
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"{text!r}: give LOW,HIGH with 1 <= LOW <= HIGH")
    return lo, hi


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="a checkpoint to serve instead of the random model")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt-len", type=pair, default=(16, 192), help="LOW,HIGH prompt tokens")
    ap.add_argument("--output-len", type=pair, default=(8, 256), help="LOW,HIGH new tokens")
    ap.add_argument("--output-dist", choices=("log-uniform", "uniform"), default="log-uniform",
                    help="how output lengths spread between LOW and HIGH (module docstring)")
    ap.add_argument("--shared-prefix", type=int, default=384, help="tokens of the shared system prompt")
    ap.add_argument("--max-running", type=int, default=16,
                    help="batch slots of the server; fewer than --requests, or no scheduler matters")
    ap.add_argument("--static-batch", type=int, default=None, help="None: --max-running")
    ap.add_argument("--prefill-chunk", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; 1 leaves the second core of a 2-core machine to the client process")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=2,
                    help="rounds over the server modes (alternating order); each keeps its fastest run")
    ap.add_argument("--skip-transformers", action="store_true")
    add_no_check(ap)
    args = ap.parse_args(argv)
    args.static_batch = args.static_batch or args.max_running
    return args


def longest_request(args) -> int:
    """Prompt plus output tokens of the longest request either workload can draw (make_requests)."""
    shared = args.shared_prefix + SHARED_PROMPT[1] + SHARED_OUTPUT[1]
    return max(args.prompt_len[1] + args.output_len[1], shared)


def static_row_steps_per_token(reqs: list[Req], batch: int) -> float:
    """Decode row-steps static batching computes per generated token (continuous: 1): each batch runs all
    its rows until its longest output is done. What continuous batching can gain over static at most when a
    step costs in proportion to its rows (less where a step's fixed cost dominates)."""
    groups = [reqs[b:b + batch] for b in range(0, len(reqs), batch)]
    return round(sum(len(g) * max(r.max_tokens for r in g) for g in groups)
                 / sum(r.max_tokens for r in reqs), 3)


def same_texts(a: list[str], b: list[str]) -> int:
    return sum(x == y for x, y in zip(a, b, strict=True))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--client"]:
        return client_main(argv[1])
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok, described = build_model(args)
    too_long = longest_request(args) - model.config.block_size
    if too_long > 0:
        print(f"bench_serve: requests of up to {longest_request(args)} tokens (prompt and output) do not fit "
              f"the model's context of {model.config.block_size}; pass smaller --prompt-len, --output-len or "
              f"--shared-prefix (each request's longest must fit)", file=sys.stderr)
        return 2
    mixed = make_requests(args, model.config.vocab_size, shared=False)
    shared = make_requests(args, model.config.vocab_size, shared=True)
    modes, texts = {}, {}
    slots = args.max_running
    runs = {"continuous": lambda: run_server(model, tok, mixed, args, slots),
            "static": lambda: run_server(model, tok, mixed, args, slots, policy="static"),
            "static_shrinking": lambda: run_server(model, tok, mixed, args, slots, policy="static_shrinking"),
            "one_at_a_time": lambda: run_server(model, tok, mixed, args, 1),
            "shared_prefix_cached": lambda: run_server(model, tok, shared, args, slots, True),
            "shared_prefix_uncached": lambda: run_server(model, tok, shared, args, slots, False)}
    for rep in range(args.repeats):  # rounds in alternating order; each mode keeps its fastest run
        for name in (list(runs) if rep % 2 == 0 else list(reversed(runs))):
            summary, out = runs[name]()
            if name not in modes or summary["tokens_per_s"] > modes[name]["tokens_per_s"]:
                modes[name], texts[name] = summary, out
    modes["static_in_process"], texts["static_in_process"] = run_static_in_process(model, tok, mixed, args)
    if not args.skip_transformers:
        modes["transformers"] = run_transformers(model, mixed, args)
    tps = {name: m["tokens_per_s"] for name, m in modes.items()}
    ratios = {
        "continuous_over_one_at_a_time": round(tps["continuous"] / tps["one_at_a_time"], 3),
        "continuous_over_static": round(tps["continuous"] / tps["static"], 3),
        "continuous_over_static_shrinking": round(tps["continuous"] / tps["static_shrinking"], 3),
        "continuous_over_static_in_process": round(tps["continuous"] / tps["static_in_process"], 3),
        "p99_ttft_continuous_over_static": round(modes["continuous"]["ttft_ms"]["p99"]
                                                 / modes["static"]["ttft_ms"]["p99"], 3),
        "prefix_cache_ttft_speedup": round(modes["shared_prefix_uncached"]["ttft_ms"]["p50"]
                                           / modes["shared_prefix_cached"]["ttft_ms"]["p50"], 3),
        "static_row_steps_per_token": static_row_steps_per_token(mixed, args.static_batch),
    }
    if "transformers" in tps:
        ratios["continuous_over_transformers"] = round(tps["continuous"] / tps["transformers"], 3)
    result = {
        "benchmark": f"serve_{torch.device(args.device).type}", "model": described,
        "requests": args.requests, "prompt_len": args.prompt_len, "output_len": args.output_len,
        "output_dist": args.output_dist,
        "shared_prefix": args.shared_prefix, "max_running": args.max_running,
        "static_batch": args.static_batch, "prefill_chunk": args.prefill_chunk, "threads": args.threads,
        "torch": torch.__version__,
        "repeats": args.repeats,
        "same_text_as_static": same_texts(texts["continuous"], texts["static"]),
        "same_text_as_static_shrinking": same_texts(texts["continuous"], texts["static_shrinking"]),
        "same_text_as_static_in_process": same_texts(texts["continuous"], texts["static_in_process"]),
        "modes": modes, "ratios": ratios,
    }
    targets = {
        "throughput_vs_one_at_a_time": goal(ratios["continuous_over_one_at_a_time"], ">=", 3.0),
        "throughput_vs_static": goal(ratios["continuous_over_static"], ">=", 1.5),
        "p99_ttft_vs_static": goal(ratios["p99_ttft_continuous_over_static"], "<=", 1.0),
        "prefix_cache_ttft_speedup": goal(ratios["prefix_cache_ttft_speedup"], ">=", 2.0),
    }
    return finish(result, targets, args.no_check)


if __name__ == "__main__":
    sys.exit(main())
