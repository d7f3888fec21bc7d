"""One prepared GPU run for the figures issues 3/4 and 6 ask of an H100/H200-class GPU: the MFU of
gpt2-124M-class bf16 training with torch.compile, and the quantization and speculative-decoding tables in
bf16.

    PYTHONPATH=src python3 benchmarks/gpu_suite.py --out DIR          # GPU: ~5-6 min estimated, 7.5 at most
    PYTHONPATH=src python3 benchmarks/gpu_suite.py --out DIR --smoke  # CPU, tiny sizes, about a minute

It needs nothing but the repository and torch/numpy/regex/tiktoken/safetensors/tqdm: no data, no checkpoints,
no network. The steps (each in its own process, under a wall-clock limit carved from --minutes):

  env      Python, torch, CUDA and package versions, GPU name and memory, bf16 support
  mfu      benchmarks/bench_gpu_mfu.py: gpt2-124M bf16 training MFU, eager and torch.compile (runs beside
           `data`, which only uses CPU cores, so the GPU figure is undisturbed); if it fails (compile is the
           fragile part), the eager measurement alone is rerun so that figure is kept
  data     a byte-level BPE tokenizer (vocab 8192) trained on the built-in `stdlib` corpus (~11 MB of Python
           sources and docs) and its token shards, 2% of documents held out
  train    a Llama-style 12 x 768 target (RoPE, RMSNorm, SwiGLU, untied head; 98M parameters) for about three
           epochs of the corpus (~3M tokens: the data, not the GPU, limits this run; training.json has the
           val-loss curve), and a 2 x 256 draft (5.8M) beside it
  distill  a second 2 x 256 draft trained on the target's own greedy continuations of corpus prompts
           (`llmlab data generate`, sequence-level distillation), for speculative decoding
  quant    benchmarks/bench_quant.py --device cuda --dtype bfloat16 on the target: bf16 / int8 / int4 RTN,
           GPTQ, AWQ at group 128 and 32: val perplexity, file size, batch-1 decode tokens/s
  spec     benchmarks/bench_speculative.py --device cuda --dtype bfloat16: target with each draft, and prompt
           lookup: speedup over plain greedy decoding and acceptance rate at identical greedy output. If bf16
           breaks the identity (a near-tie argmax flipped by a different kernel for a k-token forward), the
           run is repeated in fp32 on the GPU when time allows, and both outcomes are recorded

A step that fails or runs out of time is recorded (exit code, seconds, the tail of its output) and the steps
that do not depend on it still run. Outputs in --out, rewritten after every step so a run cut short keeps
what it finished (flat names, six files):

  summary.json      environment, every step's status / seconds / limit, the headline figures, and last
                    `targets`: every target the benchmarks reported, named STEP.TARGET (spec.DRAFT.TARGET)
  mfu.json, training.json, quant.json, speculative.json   each step's full JSON
  suite.log         every command line with its (tail of) stdout and stderr

The benchmarks run with --no-check, so a missed target does not fail its step. Exit status: 1 when a step
failed or (unless --no-check or --smoke, whose tiny models are not meant to meet them) a target was missed,
0 otherwise (summary.json says which and why), 2 for bad arguments. Working files (tokenizer, shards,
checkpoints) go to --work (default runs/gpu-suite, rebuilt by the data step).
`--only quant spec` reruns steps on the working files of an earlier run. --smoke shrinks every size (tiny
models, a 1M-character slice of the corpus, a few steps) and runs on the CPU in fp32 with one thread, so the
plumbing can be tested without a GPU (tests/test_gpu_suite.py does).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from targets import missed, unmeasured

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
STEPS = ("mfu", "data", "train", "distill", "quant", "spec")
LOG_CHARS = 20000  # per stream and command in suite.log: enough for any traceback, small enough to ship back


@dataclass(frozen=True)
class Plan:
    """Every size of one suite run. GPU figures are estimates for an H200 (see `seconds` and the report)."""

    name: str
    device: str
    dtype: str                      # bench_quant / bench_speculative dtype; training autocasts (dtype auto)
    vocab: int
    max_chars: int | None           # of the stdlib corpus (None: all of it)
    val_fraction: float
    workers: int                    # tokenizer / shard processes
    threads: int                    # torch CPU threads per process (0: torch's default)
    target: dict                    # model.* overrides
    draft: dict
    block: int
    batch: int
    epochs: float                   # target and draft training length, in passes over the train split
    max_steps: int                  # cap on that (the distilled draft trains as long as the plain one)
    lr: tuple[float, float]         # target, draft
    train_minutes: float            # train.max_minutes of the target (the trainer stops cleanly at the cap)
    mfu: dict                       # bench_gpu_mfu.py's --batch / --steps / --warmup
    quant_args: list[str]
    spec_args: list[str]            # per draft run
    lookup_second: str              # --lookup-k of the second (distilled-draft) run: one setting suffices
    imitation: dict                 # llmlab data generate options (--sequences, --length, ...)
    seconds: dict = field(default_factory=dict)  # step -> (floor, cap): start with floor s left; limit cap


LLAMA = {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": "false", "tie_embeddings": "false"}

GPU = Plan(
    name="gpu", device="cuda", dtype="bfloat16", vocab=8192, max_chars=None, val_fraction=0.02, workers=8,
    threads=0,
    target={**LLAMA, "n_layer": 12, "n_head": 12, "d_model": 768, "block_size": 1024},
    draft={**LLAMA, "n_layer": 2, "n_head": 4, "d_model": 256, "block_size": 1024},
    block=1024, batch=32, epochs=3.0, max_steps=400, lr=(6e-4, 3e-3), train_minutes=2.0,
    mfu={"batch": 32, "steps": 20, "warmup": 5},
    quant_args=["--groups", "128", "32", "--calib-samples", "128", "--calib-len", "256", "--batch-size", "16",
                "--prompt-tokens", "16", "--new-tokens", "128", "--rounds", "2"],
    spec_args=["--max-new-tokens", "128", "--repeats", "2", "--k", "3,5", "--lookup-k", "4,10",
               "--lookup-draft-k", "5"],
    lookup_second="10",
    imitation={"sequences": 4096, "length": 256, "batch-size": 256},
    seconds={"env": (5, 45), "mfu": (60, 170), "data": (30, 150), "train": (60, 210), "distill": (30, 150),
             "quant": (60, 240), "spec": (60, 220)},
)

SMOKE = Plan(
    name="smoke", device="cpu", dtype="float32", vocab=512, max_chars=1_000_000, val_fraction=0.2, workers=1,
    threads=1,
    target={**LLAMA, "n_layer": 2, "n_head": 2, "d_model": 128, "block_size": 128},
    draft={**LLAMA, "n_layer": 1, "n_head": 2, "d_model": 64, "block_size": 128},
    block=128, batch=8, epochs=0.2, max_steps=12, lr=(3e-3, 3e-3), train_minutes=1.0,
    mfu={"batch": 2, "steps": 1, "warmup": 1},
    quant_args=["--groups", "128", "32", "--calib-samples", "4", "--calib-len", "64", "--batch-size", "16",
                "--prompt-tokens", "8", "--new-tokens", "6", "--rounds", "1"],
    spec_args=["--max-new-tokens", "8", "--repeats", "1", "--k", "2", "--lookup-k", "4",
               "--lookup-draft-k", "2"],
    lookup_second="4",
    imitation={"sequences": 32, "val-sequences": 4, "length": 64, "batch-size": 8},  # val: 129+ tokens
    seconds={"env": (1, 60), "mfu": (5, 60), "data": (5, 120), "train": (10, 180), "distill": (5, 120),
             "quant": (10, 240), "spec": (10, 240)},
)


# ----- running commands -----
@dataclass
class Command:
    """One finished subprocess: what ran, how it ended, and its output."""

    argv: list[str]
    rc: int | None                  # None: killed at its time limit
    seconds: float
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.rc == 0

    def record(self) -> dict:
        status = "ok" if self.ok else ("timeout" if self.rc is None else "failed")
        out = {"argv": " ".join(self.argv), "status": status, "rc": self.rc,
               "seconds": round(self.seconds, 1)}
        if not self.ok:
            out["tail"] = (self.stderr or self.stdout)[-1500:]
        return out


class Suite:
    """Runs the steps, keeps the time budget, and writes the output files after each step."""

    def __init__(self, args, plan: Plan):
        self.args, self.plan = args, plan
        self.out, self.work = Path(args.out), Path(args.work)
        self.started = time.monotonic()
        self.deadline = self.started + 60 * args.minutes
        self.lock = threading.Lock()
        self.summary: dict = {"suite": "llmlab gpu_suite", "plan": plan.name, "minutes": args.minutes,
                              "steps": {}, "figures": {}}
        self.results: dict[str, dict] = {}  # output file name -> content
        self.env = dict(os.environ)
        src = str(ROOT / "src")
        if self.env.get("PYTHONPATH"):
            src += os.pathsep + self.env["PYTHONPATH"]
        self.env["PYTHONPATH"] = src
        self.env["PYTHONUNBUFFERED"] = "1"
        if plan.threads:  # the smoke plan: one core, like the tests
            self.env.update(OMP_NUM_THREADS=str(plan.threads), MKL_NUM_THREADS=str(plan.threads))
        self.out.mkdir(parents=True, exist_ok=True)
        self.log = (self.out / "suite.log").open("w", encoding="utf-8")

    # -- time --
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def limit(self, step: str, later: tuple[str, ...] = ()) -> float | None:
        """Seconds `step` may take: its cap, less what later steps need to start; None if under its floor."""
        floor, cap = self.plan.seconds[step]
        reserve = sum(self.plan.seconds[s][0] for s in later if s in self.args.only)
        left = self.deadline - time.monotonic() - reserve - 5  # 5 s to write the outputs
        return min(cap, left) if left >= floor else None

    # -- processes --
    def run(self, argv: list[str], timeout: float) -> Command:
        """Run argv under `timeout` seconds; at the limit its process group gets SIGTERM, then SIGKILL."""
        start = time.monotonic()
        proc = subprocess.Popen(argv, cwd=ROOT, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, errors="replace", start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=max(timeout, 1))
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            stdout, stderr = self._stop(proc)
            rc = None
        cmd = Command(argv, rc, time.monotonic() - start, stdout, stderr)
        self._log(cmd)
        return cmd

    @staticmethod
    def _stop(proc: subprocess.Popen) -> tuple[str, str]:
        # SIGTERM first: a trainer saves a checkpoint and exits; anything still running after 15 s is killed.
        for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                return proc.communicate(timeout=grace)
            except subprocess.TimeoutExpired:
                continue
        return "", ""

    def _log(self, cmd: Command) -> None:
        with self.lock:
            self.log.write(f"$ {' '.join(cmd.argv)}\n# rc={cmd.rc} seconds={cmd.seconds:.1f}\n")
            for name, text in (("stdout", cmd.stdout), ("stderr", cmd.stderr)):
                if text:
                    cut = "...\n" if len(text) > LOG_CHARS else ""
                    self.log.write(f"--- {name}\n{cut}{text[-LOG_CHARS:]}\n")
            self.log.write("\n")
            self.log.flush()

    def python(self, *argv: str) -> list[str]:
        return [sys.executable, *argv]

    # -- bookkeeping --
    def step(self, name: str, fn, later: tuple[str, ...] = ()) -> bool:
        """Run fn(limit_seconds) -> (ok, details dict) as step `name`; record it; True if it succeeded."""
        if name not in self.args.only and name != "env":
            return False
        limit = self.limit(name, later)
        entry: dict = {"started_at_s": round(self.elapsed(), 1)}
        if limit is None:
            entry.update(status="skipped", reason="not enough of the --minutes budget left")
            ok = False
        else:
            start = time.monotonic()
            try:
                ok, details = fn(limit)
            except Exception as e:  # a bug in a step must not cost the other steps' figures
                ok, details = False, {"error": f"{type(e).__name__}: {e}"}
            entry.update(status="ok" if ok else "failed", seconds=round(time.monotonic() - start, 1),
                         limit_s=round(limit), **details)
        with self.lock:
            self.summary["steps"][name] = entry
        self.write()
        return ok

    def record(self, file: str | None = None, key: str | None = None, value=None, figures: str | None = None,
               headline=None) -> None:
        """Store step results under the lock (`data` and `mfu` run in two threads): results[file][key] = value
        (or results[file] = value without a key) and summary["figures"][figures] = headline."""
        with self.lock:
            if file is not None:
                if key is None:
                    self.results[file] = value
                else:
                    self.results.setdefault(file, {})[key] = value
            if figures is not None:
                self.summary["figures"][figures] = headline

    def skip(self, name: str, reason: str) -> None:
        if name in self.args.only:
            with self.lock:
                self.summary["steps"][name] = {"status": "skipped", "reason": reason}
            self.write()

    def write(self) -> None:
        with self.lock:
            self.summary["elapsed_s"] = round(self.elapsed(), 1)
            self.summary.pop("targets", None)  # re-added last, so it ends the file
            self.summary["targets"] = collect_targets(self.results)
            for name, content in self.results.items():
                _write_json(self.out / name, content)
            _write_json(self.out / "summary.json", self.summary)


def collect_targets(results: dict) -> dict:
    """Every target in the step results (those with `met`), named STEP.TARGET; spec: spec.DRAFT.TARGET."""
    sources = [("mfu", results.get("mfu.json")), ("quant", results.get("quant.json"))]
    sources += [(f"spec.{name}", r) for name, r in (results.get("speculative.json") or {}).items()]
    found = {}
    for prefix, result in sources:
        for name, target in ((result or {}).get("targets") or {}).items():
            if isinstance(target, dict) and "met" in target:
                found[f"{prefix}.{name}"] = target
    return found


def _write_json(path: Path, content) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(content, indent=2) + "\n")
    os.replace(tmp, path)


def parse_json(text: str) -> dict:
    """The JSON object a benchmark printed last (a whole-output object, or one starting at a line's start)."""
    text = text.strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    start = text.rfind("\n{")
    if start < 0:
        raise ValueError(f"no JSON object in the output: {text[-200:]!r}")
    return json.loads(text[start + 1:])


# ----- the steps -----
def env_step(suite: Suite, limit: float):
    cmd = suite.run(suite.python(str(Path(__file__).resolve()), "--facts"), limit)
    if not cmd.ok:
        return False, {"command": cmd.record()}
    facts = parse_json(cmd.stdout)
    with suite.lock:
        suite.summary["env"] = facts
    return True, {}


def facts() -> dict:
    """Versions and devices of this machine (the `env` step; `--facts` prints them)."""
    import platform
    from importlib import metadata

    import torch

    info = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "cuda_runtime": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(), "packages": {}}
    for pkg in ("numpy", "regex", "tiktoken", "safetensors", "tqdm", "matplotlib", "transformers",
                "tokenizers"):
        try:
            info["packages"][pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            info["packages"][pkg] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count(),
                    capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                    gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    bf16_supported=torch.cuda.is_bf16_supported())
    else:
        info.update(gpu=None, bf16_supported=False)
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                            text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    return info


def mfu_step(suite: Suite, limit: float):
    deadline = time.monotonic() + limit
    argv = [f"--{k}={v}" for k, v in suite.plan.mfu.items()] + ["--no-check"]
    cmd = suite.run(suite.python(str(BENCH / "bench_gpu_mfu.py"), *argv), limit)
    details = {"commands": [cmd.record()]}
    if cmd.ok:
        result = parse_json(cmd.stdout)
    elif deadline - time.monotonic() > 30:
        # bench_gpu_mfu prints nothing unless both modes finish; torch.compile is the fragile one (Triton
        # builds its launchers with the system C compiler), so keep at least the eager figure.
        retry = suite.run(suite.python("-c", mfu_eager_code(suite.plan.mfu)), deadline - time.monotonic())
        details["commands"].append(retry.record())
        if not retry.ok:
            return False, details
        result = {**parse_json(retry.stdout), "compile_error": (cmd.stderr or cmd.stdout)[-1500:],
                  "targets": {"mfu_compiled": unmeasured(">=", 0.40, "torch.compile failed; eager only")}}
    else:
        return False, details
    suite.record("mfu.json", value=result, figures="mfu", headline=mfu_figures(result))
    return cmd.ok, details


def mfu_eager_code(sizes: dict) -> str:
    """A `python -c` program: bench_gpu_mfu's eager measurement alone, printed in its JSON layout."""
    return (
        "import argparse, json, sys\n"
        f"sys.path.insert(0, {str(BENCH)!r})\n"
        "import torch\n"
        "import bench_gpu_mfu\n"
        f"args = argparse.Namespace(flavour='gpt2', **{sizes!r})\n"
        "print(json.dumps({'device': torch.cuda.get_device_name(), 'torch': torch.__version__, "
        "'batch': args.batch, 'flavour': args.flavour, 'eager': bench_gpu_mfu.measure(False, args), "
        "'compiled': None}))\n")


def data_step(suite: Suite, limit: float):
    plan, work = suite.plan, suite.work
    for sub in ("tokenizer", "shards"):  # always rebuilt: a leftover from another plan must not be reused
        shutil.rmtree(work / sub, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    chars = ["--max-chars", str(plan.max_chars)] if plan.max_chars else []
    common = ["--no-progress", "--workers", str(plan.workers), *chars]
    deadline = time.monotonic() + limit
    commands = []
    tokenizer, shards = str(work / "tokenizer"), str(work / "shards")
    for argv in (["tokenizer", "train", "stdlib", "--vocab-size", str(plan.vocab), "--out", tokenizer],
                 ["data", "prepare", "stdlib", "--tokenizer", tokenizer, "--out", shards,
                  "--val-fraction", str(plan.val_fraction)]):
        cmd = suite.run(suite.python("-m", "llmlab", *argv, *common), deadline - time.monotonic())
        commands.append(cmd.record())
        if not cmd.ok:
            return False, {"commands": commands}
    meta = json.loads((work / "shards" / "meta.json").read_text())
    data = {"vocab_size": meta["tokenizer"]["vocab_size"], "documents": meta["documents"],
            "characters": meta["characters"], "train_tokens": meta["splits"]["train"]["tokens"],
            "val_tokens": meta["splits"]["val"]["tokens"], "val_fraction": plan.val_fraction}
    suite.record("training.json", "data", data)
    return True, {"commands": commands}


def train_steps(plan: Plan, train_tokens: int, steps_cap: int) -> int:
    """Optimizer steps for plan.epochs passes over the train split, at least 5, at most steps_cap."""
    per_step = plan.batch * plan.block
    return max(5, min(steps_cap, round(plan.epochs * train_tokens / per_step)))


def pretrain_argv(suite: Suite, run_name: str, model: dict, steps: int, lr: float, minutes: float,
                  extra: tuple[str, ...] = ()) -> list[str]:
    plan = suite.plan
    keys = {f"model.{k}": v for k, v in model.items()}
    keys.update({
        "model.vocab_size": 0, "data.shards": suite.work / "shards", "data.block_size": plan.block,
        "data.batch_size": plan.batch, "optim.lr": lr, "optim.warmup_steps": max(1, min(30, steps // 10)),
        "optim.max_steps": steps, "optim.min_lr_ratio": 0.1, "train.out_dir": suite.work / "runs",
        "train.run_name": run_name, "train.overwrite": "true", "train.device": plan.device,
        "train.dtype": "auto",
        "train.eval_every": max(1, steps // 4), "train.eval_batches": 20, "train.ckpt_every": 0,
        "train.keep_last": 1, "train.progress": "false", "train.plot": "false", "train.threads": plan.threads,
        "train.max_minutes": round(minutes, 2), "train.seed": 1337,
        # The guard is tested elsewhere; here a rollback would need earlier checkpoints than the runs keep.
        "spike.enabled": "false",
    })
    return suite.python("-m", "llmlab", "pretrain", *(f"{k}={v}" for k, v in keys.items()), *extra)


def run_summary(suite: Suite, run_name: str) -> dict:
    """The run's summary.json plus its validation-loss curve (from metrics.jsonl)."""
    run_dir = suite.work / "runs" / run_name
    summary = json.loads((run_dir / "summary.json").read_text())
    curve = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "val_loss" in record:
            curve.append([record["step"], round(record["val_loss"], 4)])
    return {**summary, "val_curve": curve}


def train_step(suite: Suite, limit: float):
    """Target and draft, side by side: the draft is small enough not to slow the target much."""
    plan = suite.plan
    meta = json.loads((suite.work / "shards" / "meta.json").read_text())
    tokens = meta["splits"]["train"]["tokens"]
    # Leave a minute of the limit for start-up, the final evaluation and the checkpoint.
    minutes = max(0.2, min(plan.train_minutes, (limit - 60) / 60))
    jobs = {"target": pretrain_argv(suite, "target", plan.target, train_steps(plan, tokens, plan.max_steps),
                                    plan.lr[0], minutes),
            "draft": pretrain_argv(suite, "draft", plan.draft, train_steps(plan, tokens, plan.max_steps),
                                   plan.lr[1], minutes)}
    done: dict[str, Command] = {}
    threads = [threading.Thread(target=lambda n=n, a=a: done.__setitem__(n, suite.run(a, limit)))
               for n, a in jobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    details = {"commands": [done[n].record() for n in jobs]}
    for name in jobs:
        if done[name].ok:
            suite.record("training.json", name, run_summary(suite, name))
    return done["target"].ok, details


def distill_step(suite: Suite, limit: float):
    """The target continues corpus prompts (greedy); a draft of the plain one's size and length trains on that
    text (a draft trained on its target's own outputs agrees with it more: llmlab/infer/continuations.py)."""
    plan = suite.plan
    deadline = time.monotonic() + limit
    text = suite.work / "target-text"
    sizes = [f"--{k}={v}" for k, v in plan.imitation.items()]
    generate = suite.run(suite.python("-m", "llmlab", "data", "generate", str(checkpoint(suite, "target")),
                                      "--shards", str(suite.work / "shards"), "--out", str(text), *sizes,
                                      "--device", plan.device, "--overwrite", "--no-progress"), limit)
    details = {"commands": [generate.record()]}
    if not generate.ok:
        return False, details
    left = deadline - time.monotonic()
    minutes = max(0.2, min(plan.train_minutes / 2, (left - 45) / 60))
    tokens = json.loads((suite.work / "shards" / "meta.json").read_text())["splits"]["train"]["tokens"]
    steps = train_steps(plan, tokens, plan.max_steps)
    argv = pretrain_argv(suite, "distilled", plan.draft, steps, plan.lr[1], minutes,
                         extra=(f"data.shards={text}",))
    cmd = suite.run(argv, left)
    details["commands"].append(cmd.record())
    if cmd.ok:
        generated = json.loads((text / "meta.json").read_text())["generated"]
        suite.record("training.json", "distilled", {**run_summary(suite, "distilled"), "data": generated})
    return cmd.ok, details


def checkpoint(suite: Suite, run_name: str) -> Path:
    """The final checkpoint of a finished run (FileNotFoundError if the run did not finish)."""
    return Path(json.loads((suite.work / "runs" / run_name / "summary.json").read_text())["checkpoint"])


def quant_step(suite: Suite, limit: float):
    plan = suite.plan
    out = suite.work / "quant.json"
    out.unlink(missing_ok=True)
    threads = ["--threads", str(plan.threads)] if plan.threads else []
    cmd = suite.run(suite.python(str(BENCH / "bench_quant.py"), "--ckpt", str(checkpoint(suite, "target")),
                                 "--data", str(suite.work / "shards"), "--device", plan.device,
                                 "--dtype", plan.dtype, *plan.quant_args, *threads, "--json-out", str(out),
                                 "--no-check"), limit)
    if cmd.ok:
        result = json.loads(out.read_text())
    else:
        # bench_quant prints each variant's row (perplexity, file size) as soon as it has it; decode timing
        # comes last. A run cut short still leaves those rows.
        rows = [json.loads(line) for line in cmd.stdout.splitlines() if line.startswith('{"variant"')]
        if not rows:
            return False, {"command": cmd.record()}
        result = {"partial": True, "device": plan.device, "dtype": plan.dtype, "rows": rows, "targets": {}}
    suite.record("quant.json", value=result, figures="quant", headline=quant_figures(result))
    return cmd.ok, {"command": cmd.record()}


def spec_step(suite: Suite, limit: float):
    """bench_speculative once per trained draft; the second run times one prompt-lookup setting only."""
    plan = suite.plan
    drafts = [n for n in ("draft", "distilled") if (suite.work / "runs" / n / "summary.json").is_file()]
    if not drafts:
        return False, {"error": "no trained draft (the train and distill steps failed or did not run)"}
    deadline = time.monotonic() + limit
    commands, results, ok = [], {}, True
    for i, name in enumerate(drafts):
        args = list(plan.spec_args)
        if i:
            args[args.index("--lookup-k") + 1] = plan.lookup_second
        base = [str(BENCH / "bench_speculative.py"), "--target", str(checkpoint(suite, "target")),
                "--draft", str(checkpoint(suite, name)), "--device", plan.device, *args, "--no-check"]
        dtype = plan.dtype
        cmd = suite.run(suite.python(*base, "--dtype", dtype), deadline - time.monotonic())
        commands.append(cmd.record())
        if not cmd.ok and dtype != "float32" and "output differs" in cmd.stderr and \
                deadline - time.monotonic() > 30:
            dtype = "float32"  # the identity check failed in bf16: the fp32 figures at least, flagged as such
            cmd = suite.run(suite.python(*base, "--dtype", dtype), deadline - time.monotonic())
            commands.append(cmd.record())
        if cmd.ok:
            results[name] = {**parse_json(cmd.stdout), "dtype_fallback": dtype != plan.dtype}
        ok = ok and cmd.ok and dtype == plan.dtype
        if dtype != plan.dtype:
            commands[-1]["note"] = f"{plan.dtype} broke the greedy-output identity; these figures are {dtype}"
        if deadline - time.monotonic() < 20:
            break
    if results:
        suite.record("speculative.json", value=results, figures="speculative",
                     headline={n: spec_figures(r) for n, r in results.items()})
    return ok, {"commands": commands}


# ----- headline figures for summary.json -----
def mfu_figures(result: dict) -> dict:
    if "skipped" in result:
        return {"skipped": result["skipped"]}
    compiled = result["compiled"]
    return {"device": result["device"], "batch": result["batch"],
            "eager": {k: result["eager"][k] for k in ("mfu", "tokens_per_s")},
            "compiled": {k: compiled[k] for k in ("mfu", "tokens_per_s", "warmup_s")} if compiled else None}


def quant_figures(result: dict) -> dict:
    """Per variant: perplexity (and its change vs the baseline, the first row), file MB, decode tokens/s."""
    base = result["rows"][0]["ppl"]
    rows = {}
    for row in result["rows"]:
        decode = next((k for k in row if k.startswith("decode_tok_s_")), None)
        speedup = decode.replace("tok_s", "speedup") if decode else None
        rows[row["variant"]] = {"ppl": round(row["ppl"], 4),
                                "ppl_delta_pct": round(100 * (row["ppl"] / base - 1), 3),
                                "file_mb": round(row["file_bytes"] / 1e6, 2),
                                "packed_layers": row["packed_layers"],
                                "decode_tok_s": row.get(decode), "decode_speedup": row.get(speedup)}
    return {"device": result.get("device"), "dtype": result.get("dtype"),
            "partial": result.get("partial", False), "rows": rows}


def spec_figures(result: dict) -> dict:
    methods = {k: {"speedup": v["speedup"], "acceptance_rate": v["acceptance_rate"]}
               for k, v in result.items() if isinstance(v, dict) and "speedup" in v}
    return {"dtype": result["dtype"], "dtype_fallback": result["dtype_fallback"],
            "identical_greedy_output": result["identical_greedy_output"],
            "plain_tokens_per_s": result["plain"]["tokens_per_s"], "draft_params": result["draft"]["params"],
            "methods": methods}


# ----- entry point -----
def run_suite(args) -> dict:
    plan = SMOKE if args.smoke else GPU
    suite = Suite(args, plan)
    try:
        suite.step("env", lambda limit: env_step(suite, limit))  # always: seconds, and the figures need it
        if not args.smoke and not suite.summary.get("env", {}).get("cuda_available"):
            suite.summary["warning"] = ("no CUDA device: the GPU plan's steps will fail; "
                                        "use --smoke on a CPU machine")
        # mfu (GPU) and data (CPU) side by side; everything after needs the data.
        data_ok: list[bool] = []
        after_data = ("train", "distill", "quant", "spec")
        worker = threading.Thread(target=lambda: data_ok.append(
            suite.step("data", lambda limit: data_step(suite, limit), later=after_data)))
        worker.start()
        suite.step("mfu", lambda limit: mfu_step(suite, limit), later=after_data)
        worker.join()
        if "data" in args.only and not data_ok[0]:
            for name in ("train", "distill", "quant", "spec"):
                suite.skip(name, "the data step failed")
            return suite.summary
        trained = suite.step("train", lambda limit: train_step(suite, limit),
                             later=("distill", "quant", "spec"))
        if "train" in args.only and not trained:
            for name in ("distill", "quant"):
                suite.skip(name, "the target did not train")
        else:
            suite.step("distill", lambda limit: distill_step(suite, limit), later=("quant", "spec"))
            suite.step("quant", lambda limit: quant_step(suite, limit), later=("spec",))
        suite.step("spec", lambda limit: spec_step(suite, limit))
        return suite.summary
    finally:
        suite.write()
        suite.log.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="directory for the JSON files and suite.log (created)")
    ap.add_argument("--work", default=str(ROOT / "runs" / "gpu-suite"),
                    help="directory for the tokenizer, shards and checkpoints")
    ap.add_argument("--minutes", type=float, default=None,
                    help="wall-clock budget for the whole suite (default 7.5; 5 with --smoke)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU in fp32: test the plumbing")
    ap.add_argument("--only", nargs="+", choices=STEPS, default=list(STEPS),
                    help="run only these steps (later ones read the working files of an earlier run)")
    ap.add_argument("--facts", action="store_true",
                    help="print this machine's versions and devices as JSON and exit")
    ap.add_argument("--no-check", action="store_true", help="a missed target does not make the exit status 1")
    args = ap.parse_args()
    if args.facts:
        print(json.dumps(facts(), indent=2))
        return
    if not args.out:
        _fail("--out DIR is required (where the JSON files go)")
    args.minutes = args.minutes if args.minutes is not None else (5.0 if args.smoke else 7.5)
    if not args.minutes > 0:
        _fail(f"--minutes {args.minutes} must be a positive number of minutes")
    out, work = Path(args.out).resolve(), Path(args.work).resolve()
    if out == work or work in out.parents or out in work.parents:
        _fail(f"--out {args.out} and --work {args.work} must be separate directories "
              "(checkpoints stay out of --out)")
    if out.exists() and not out.is_dir():
        _fail(f"--out {args.out} exists and is not a directory; pass a directory path")
    summary = run_suite(args)
    print(json.dumps(summary, indent=2))
    failed = any(step["status"] != "ok" for step in summary["steps"].values())
    check = not (args.no_check or args.smoke)
    sys.exit(1 if failed or (check and missed(summary["targets"])) else 0)


def _fail(message: str) -> None:
    print(f"gpu_suite: error: {message}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main()
