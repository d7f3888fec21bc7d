"""`llmlab speedrun`: the whole pipeline in one command, from raw text to a model with a report.

    llmlab speedrun --preset cpu-demo --out runs/demo        # what `make demo` runs
    llmlab speedrun --preset gpt2-124M --out runs/gpt2       # GPU preset; scale out with torchrun (README)

Stages, each leaving files the next one reads (and each skipped when its output is already complete, so an
interrupted speedrun resumes; OUT must be new, empty or an earlier speedrun's unless overwrite is given):
  1. train a byte-level BPE tokenizer on the corpus            -> OUT/tokenizer/
  2. tokenize the corpus into train/val shards                 -> OUT/shards/
  3. pretrain a Transformer with the generic trainer           -> OUT/ckpt-STEP/, metrics.jsonl, plots/*.png
  4. evaluate on the whole val split and sample some text      -> OUT/samples.md
  5. write the figures a person wants to see                   -> OUT/report.md, OUT/report.json

The report compares the model with the unigram baseline: the cross-entropy of the val tokens under the
train split's token frequencies (add-one smoothed). A model that has learned nothing beyond token counts
scores that; a model that has learned context must be clearly below it. Bits per byte divides the val loss
by ln 2 and by the val split's bytes per token, so it is comparable across tokenizers.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llmlab.config import find_preset, load_config, parse_override, read_toml, to_toml
from llmlab.fsutil import check_output, write_text_atomic
from llmlab.train.pretrain import PretrainConfig


@dataclass
class TokenizerStage:
    vocab_size: int = 4096
    pattern: str = "gpt4"
    max_chars: int | None = None        # cap on the characters the tokenizer is trained on


@dataclass
class CorpusStage:
    sources: list[str] = field(default_factory=lambda: ["stdlib"])
    text_field: str = "text"
    max_chars: int | None = None        # cap on the characters tokenized into shards
    val_fraction: float = 0.02


@dataclass
class SampleStage:
    prompts: list[str] = field(default_factory=lambda: ["def ", "import os\n", "class "])
    max_new_tokens: int = 96
    temperature: float = 0.8
    top_k: int | None = 50
    seed: int = 0


@dataclass
class SpeedrunConfig:
    pretrain_config: str = "cpu-demo"   # a preset of llmlab/configs/ (or a TOML path) for [pretrain]
    tokenizer: TokenizerStage = field(default_factory=TokenizerStage)
    corpus: CorpusStage = field(default_factory=CorpusStage)
    samples: SampleStage = field(default_factory=SampleStage)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)


def load_preset(name: str, overrides: list[str] | tuple = ()) -> SpeedrunConfig:
    """Defaults <- the pretraining config the preset names <- the preset file <- key=value overrides.

    `name` is a preset shipped in llmlab/presets/ or a path to a speedrun TOML file. Its `pretrain_config`
    (a preset of llmlab/configs/ or a path) supplies the whole [pretrain] section, so the model and schedule
    of `llmlab speedrun --preset cpu-demo` and `llmlab pretrain --config cpu-demo` are defined once.
    """
    path = find_preset(name, "llmlab.presets")
    raw = read_toml(path)
    pretrain_name = raw.get("pretrain_config", SpeedrunConfig.pretrain_config)
    for text in overrides:
        keys, value = parse_override(text)
        if keys == ["pretrain_config"]:
            pretrain_name = value
    base = SpeedrunConfig(pretrain_config=pretrain_name,
                          pretrain=load_config(PretrainConfig, find_preset(pretrain_name, "llmlab.configs")))
    return load_config(SpeedrunConfig, path, overrides, base=base)


def _stage_tokenizer(cfg: SpeedrunConfig, out: Path):
    from llmlab.data.sources import iter_documents
    from llmlab.tokenizer import Tokenizer

    tok_dir = out / "tokenizer"
    settings = dataclasses.asdict(cfg.tokenizer) | {"sources": cfg.corpus.sources}
    stamp = out / "tokenizer.settings.json"
    if tok_dir.is_dir() and stamp.is_file() and json.loads(stamp.read_text()) == settings:
        print(f"[1/5] tokenizer: reusing {tok_dir}")
        return Tokenizer.load(tok_dir)
    print(f"[1/5] tokenizer: training vocab {cfg.tokenizer.vocab_size} on {', '.join(cfg.corpus.sources)}")
    texts = iter_documents(cfg.corpus.sources, text_field=cfg.corpus.text_field,
                           max_chars=cfg.tokenizer.max_chars)
    tok = Tokenizer.train(texts, vocab_size=cfg.tokenizer.vocab_size, pattern=cfg.tokenizer.pattern)
    tok.save(tok_dir)
    write_text_atomic(stamp, json.dumps(settings))
    return tok


def _stage_shards(cfg: SpeedrunConfig, out: Path, tok) -> dict:
    from llmlab.data.prepare import prepare_shards

    print("[2/5] shards: tokenizing the corpus")
    return prepare_shards(cfg.corpus.sources, out / "tokenizer", out / "shards",
                          val_fraction=cfg.corpus.val_fraction, seed=cfg.pretrain.data.seed,
                          text_field=cfg.corpus.text_field, max_chars=cfg.corpus.max_chars, overwrite=True)


def _pretrain_config(cfg: SpeedrunConfig, out: Path) -> PretrainConfig:
    p = cfg.pretrain
    data = dataclasses.replace(p.data, shards=str(out / "shards"), tokenizer=str(out / "tokenizer"))
    train = dataclasses.replace(p.train, out_dir=str(out.parent), run_name=out.name, overwrite=True)
    return dataclasses.replace(p, data=data, train=train)


def unigram_baseline(shard_dir: Path, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of the val tokens under the train split's add-one-smoothed unigram."""
    from llmlab.data.shards import read_shard

    counts = np.zeros(vocab_size, dtype=np.float64)
    for path in sorted(shard_dir.glob("train_*.bin")):
        counts += np.bincount(read_shard(path), minlength=vocab_size)[:vocab_size]
    logp = np.log((counts + 1.0) / (counts.sum() + vocab_size))
    val = np.zeros(vocab_size, dtype=np.float64)
    for path in sorted(shard_dir.glob("val_*.bin")):
        val += np.bincount(read_shard(path), minlength=vocab_size)[:vocab_size]
    return float(-(val * logp).sum() / val.sum())


def val_bytes_per_token(shard_dir: Path, tok) -> float:
    """UTF-8 bytes per val token (document separators count as zero bytes)."""
    from llmlab.data.shards import read_shard

    lengths = np.array([len(tok.token_bytes(i)) if i not in tok.special_tokens.values() else 0
                        for i in range(tok.vocab_size)], dtype=np.float64)
    total = n = 0.0
    for path in sorted(shard_dir.glob("val_*.bin")):
        ids = np.asarray(read_shard(path))
        total += lengths[ids].sum()
        n += ids.size
    return total / n


def _samples(cfg: SpeedrunConfig, model, tok) -> list[tuple[str, str]]:
    from llmlab.infer import generate

    s = cfg.samples
    out = []
    for i, prompt in enumerate(s.prompts):
        prompt_ids = tok.encode(prompt)
        ids = generate(model, prompt_ids, s.max_new_tokens, temperature=s.temperature, top_k=s.top_k,
                       seed=s.seed + i, stop=tok.eos_id)
        out.append((prompt, tok.decode(ids[len(prompt_ids):].tolist())))
    return out


def _early_note(fig: dict) -> str:
    if fig["steps"] >= fig["max_steps"]:
        return ""
    return (" (stopped by the train.max_minutes cap; finish with `llmlab pretrain --config OUT/config.toml "
            "--resume auto train.max_minutes=60`)")


def _peak_note(device) -> str:
    if device.type == "cuda":
        return "the datasheet bf16 peak (train.peak_flops overrides)"
    return "this machine's measured fp32 matmul peak"


def _report_markdown(fig: dict, samples: list[tuple[str, str]]) -> str:
    lines = [
        "# llmlab speedrun report", "",
        f"Preset `{fig['preset']}`, corpus {', '.join(fig['sources'])}, device {fig['device']}.", "",
        "| figure | value |", "| --- | --- |",
        f"| parameters (all / non-embedding) | {fig['params']:,} / {fig['non_embedding_params']:,} |",
        f"| tokenizer vocabulary | {fig['vocab_size']:,} |",
        f"| train / val tokens in shards | {fig['train_tokens']:,} / {fig['val_tokens']:,} |",
        f"| optimizer steps | {fig['steps']:,} of {fig['max_steps']:,}{_early_note(fig)} |",
        f"| tokens seen | {fig['tokens_seen']:,} |",
        f"| training time | {fig['train_seconds']:.0f} s |",
        f"| throughput | {fig['tokens_per_s']:,.0f} tokens/s |",
        f"| MFU | {fig['mfu']:.1%} of {fig['peak_note']} |" if fig["mfu"] is not None else "| MFU | n/a |",
        f"| val loss (whole val split) | {fig['val_loss']:.4f} nats/token |",
        f"| unigram baseline | {fig['unigram_loss']:.4f} nats/token |",
        f"| improvement over unigram | {fig['unigram_loss'] - fig['val_loss']:.3f} nats/token |",
        f"| val perplexity | {fig['val_ppl']:.2f} |",
        f"| bits per byte | {fig['bits_per_byte']:.4f} ({fig['bytes_per_token']:.2f} bytes/token) |",
        "", "![loss curve](plots/loss.png)", "", "## Samples", "",
    ]
    for prompt, text in samples:
        lines += [f"Prompt `{prompt!r}`:", "", "```", prompt + text, "```", ""]
    return "\n".join(lines)


def run_speedrun(preset: str = "cpu-demo", out: str | Path = "runs/demo", overrides: list[str] = (),
                 overwrite: bool = False) -> dict:
    """Run all stages for `preset` into `out`; return the report's figures. `out` must be new, empty or an
    earlier speedrun's (resumed), unless `overwrite`; never around or inside the corpus."""
    import time

    from llmlab.data.sources import SourceFile, resolve_sources
    from llmlab.device import resolve_device
    from llmlab.evals.perplexity import evaluate_perplexity
    from llmlab.model import Transformer
    from llmlab.train.plot import plot_run
    from llmlab.train.pretrain import run_pretrain

    cfg = load_preset(preset, overrides)
    out = Path(out)
    corpus = [f.path for f in resolve_sources(cfg.corpus.sources) if isinstance(f, SourceFile)]
    check_output(out, inputs=corpus, overwrite=overwrite, into=True, what="--out",
                 reusable=lambda p: (p / "speedrun.toml").is_file())
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "speedrun.toml", to_toml(cfg))
    tok = _stage_tokenizer(cfg, out)
    meta = _stage_shards(cfg, out, tok)
    print("[3/5] pretraining")
    pcfg = _pretrain_config(cfg, out)
    t0 = time.perf_counter()
    summary = run_pretrain(pcfg)
    train_seconds = time.perf_counter() - t0
    plot_run(out)
    print("[4/5] evaluating on the whole val split and sampling")
    device = resolve_device(pcfg.train.device)
    model = Transformer.load(summary["checkpoint"], device=device)
    shard_dir = out / "shards"
    block = pcfg.data.block_size or model.config.block_size
    # Every val window, the last partial batch included (not just the periodic-eval subset).
    val_loss = evaluate_perplexity(model, shard_dir, "val", block, pcfg.data.batch_size)["nll"]
    bpt = val_bytes_per_token(shard_dir, tok)
    samples = _samples(cfg, model, tok)
    fig = {
        "preset": preset, "sources": cfg.corpus.sources, "device": str(device),
        "params": model.num_params(), "non_embedding_params": model.num_params(non_embedding=True),
        "vocab_size": tok.vocab_size, "train_tokens": meta["splits"]["train"]["tokens"],
        "val_tokens": meta["splits"]["val"]["tokens"], "steps": summary["step"],
        "max_steps": pcfg.optim.max_steps, "tokens_seen": summary["tokens"],
        "train_seconds": train_seconds, "tokens_per_s": summary.get("tokens_per_s") or 0.0,
        "mfu": summary.get("mfu"), "peak_note": _peak_note(device),
        "val_loss": val_loss, "val_ppl": math.exp(val_loss),
        "unigram_loss": unigram_baseline(shard_dir, tok.vocab_size), "bytes_per_token": bpt,
        "bits_per_byte": val_loss / math.log(2) / bpt, "checkpoint": summary["checkpoint"],
    }
    print("[5/5] report")
    write_text_atomic(out / "samples.md",
                      "\n\n".join(f"## {p!r}\n\n```\n{p}{t}\n```" for p, t in samples) + "\n")
    write_text_atomic(out / "report.json", json.dumps(fig, indent=2) + "\n")
    write_text_atomic(out / "report.md", _report_markdown(fig, samples))
    return fig
