"""`llmlab experiment chinchilla`: measure scaling laws on the built-in corpus, fit them, size runs from them.

    llmlab experiment chinchilla --out runs/chinchilla            # sweep + fit + plan, report.md
    llmlab experiment chinchilla --out runs/chinchilla --smoke    # the seconds-long size the tests run

Stages, each reusing its output when it is already complete (so an interrupted experiment resumes):
  1. a byte-level BPE tokenizer on the corpus (small vocabulary, so embeddings are a smaller share of the
     tiny models' parameters)                                             -> OUT/tokenizer/
  2. train/val shards                                                      -> OUT/shards/
  3. the IsoFLOP sweep (llmlab.scaling.sweep), capped by sweep.max_minutes -> OUT/sweep/results.csv
  4. Kaplan and Chinchilla fits (llmlab.scaling.fit)                       -> OUT/fit/fit.json, *.png
  5. compute-optimal sizes from the fitted law and the published one, the Llama-3-8B case
                                                                           -> OUT/report.md, report.json
Settings come from ChinchillaConfig; `key=value` overrides address it (sweep.budgets=[...],
sweep.pretrain.optim.lr=...).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from llmlab.config import NonNegativeInt, PositiveInt, check_config, load_config
from llmlab.fsutil import check_output, write_text_atomic
from llmlab.scaling.fit import run_fit, value
from llmlab.scaling.flops import param_counts
from llmlab.scaling.plan import CHINCHILLA, ScalingLaw, llama3_case
from llmlab.scaling.sweep import SweepConfig, family_model, run_sweep

# Published exponents the report compares with (Kaplan et al. 2020, eqs. 1.1-1.3; Hoffmann et al. 2022,
# Table 2 and eq. 10).
KAPLAN = {"N": 0.076, "D": 0.095, "C": 0.050}
CHINCHILLA_AB = {"approach1": (0.50, 0.50), "approach2": (0.49, 0.51), "approach3": (0.46, 0.54)}


@dataclass
class ChinchillaConfig:
    sources: list[str] = field(default_factory=lambda: ["stdlib"])
    vocab_size: PositiveInt = 512
    tokenizer_chars: PositiveInt | None = 2_000_000  # characters the tokenizer learns from
    max_chars: PositiveInt | None = None              # characters tokenized into shards (None: all)
    val_fraction: float = 0.02
    boots: NonNegativeInt = 100                       # bootstrap resamples per fit
    plan_budgets: list[float] = field(default_factory=lambda: [1e18, 1e21, 1e24])
    sweep: SweepConfig = field(default_factory=lambda: SweepConfig(max_minutes=25.0))


SMOKE = ["vocab_size=300", "tokenizer_chars=60000", "max_chars=200000", "boots=10",
         "sweep.budgets=[2e9, 6e9]", "sweep.depths=[1, 2, 3]", "sweep.min_steps=4", "sweep.jobs=1",
         "sweep.aspect=16", "sweep.head_dim=16", "sweep.pretrain.model.block_size=32",
         "sweep.pretrain.data.batch_size=8", "sweep.max_minutes=10"]


def load_chinchilla_config(overrides: list[str] | tuple = (), smoke: bool = False) -> ChinchillaConfig:
    return load_config(ChinchillaConfig, None, [*(SMOKE if smoke else []), *overrides])


def _stage_data(cfg: ChinchillaConfig, out: Path, log) -> tuple[Path, Path]:
    from llmlab.data.prepare import prepare_shards
    from llmlab.data.sources import iter_documents
    from llmlab.tokenizer import Tokenizer

    settings = {"sources": cfg.sources, "vocab_size": cfg.vocab_size, "tokenizer_chars": cfg.tokenizer_chars,
                "max_chars": cfg.max_chars, "val_fraction": cfg.val_fraction}
    stamp = out / "data.settings.json"
    tok, shards = out / "tokenizer", out / "shards"
    if stamp.is_file() and json.loads(stamp.read_text()) == settings and (shards / "meta.json").is_file():
        log(f"[1-2/5] tokenizer and shards: reusing {tok}, {shards}")
        return tok, shards
    log(f"[1/5] tokenizer: vocab {cfg.vocab_size} on {', '.join(cfg.sources)}")
    texts = iter_documents(cfg.sources, max_chars=cfg.tokenizer_chars)
    Tokenizer.train(texts, vocab_size=cfg.vocab_size, progress=False, workers=1).save(tok)
    log("[2/5] shards")
    prepare_shards(cfg.sources, tok, shards, val_fraction=cfg.val_fraction, max_chars=cfg.max_chars,
                   overwrite=True, progress=False, workers=1)
    write_text_atomic(stamp, json.dumps(settings))
    return tok, shards


def _sweep_config(cfg: ChinchillaConfig, tok: Path, shards: Path) -> SweepConfig:
    p = cfg.sweep.pretrain
    data = dataclasses.replace(p.data, shards=str(shards), tokenizer=str(tok))
    return check_config(dataclasses.replace(cfg.sweep, pretrain=dataclasses.replace(p, data=data)))


def fitted_law(fit: dict) -> ScalingLaw | None:
    k = {name: value(fit, "approach3", name) for name in ("E", "A", "B", "alpha", "beta")}
    if any(v is None or not math.isfinite(v) for v in k.values()) or k["alpha"] <= 0 or k["beta"] <= 0:
        return None
    return ScalingLaw(**k)


def run_chinchilla(out: str | Path, overrides: list[str] | tuple = (), smoke: bool = False,
                   log=print) -> dict:
    """Run (or resume) the experiment into OUT; return report.json's content."""
    cfg = load_chinchilla_config(overrides, smoke)
    out = Path(out)
    check_output(out, overwrite=True, into=True, kept=True, what="experiment directory")
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    tok, shards = _stage_data(cfg, out, log)
    sweep_cfg = _sweep_config(cfg, tok, shards)
    log("[3/5] sweep")
    sweep = run_sweep(sweep_cfg, out / "sweep", log=log)
    log("[4/5] fit")
    fit = run_fit(out / "sweep" / "results.csv", out / "fit", boots=cfg.boots)
    log("[5/5] plan and report")
    report = _report_data(cfg, sweep_cfg, sweep, fit, shards, time.perf_counter() - started)
    write_text_atomic(out / "report.json", json.dumps(report, indent=2) + "\n")
    write_text_atomic(out / "report.md", render_report(report))
    return report


def _report_data(cfg, sweep_cfg, sweep, fit, shards: Path, wall_s: float) -> dict:
    from llmlab.data.loader import TokenLoader

    vocab = cfg.vocab_size
    family = []
    for depth in sweep_cfg.depths:
        counts = param_counts(family_model(sweep_cfg, depth, vocab))
        family.append({"depth": depth, "N": counts["total"], "N_nonembed": counts["non_embedding"],
                       "embedding_share": counts["embedding"] / counts["total"]})
    minima = fit["approach2"].get("minima", [])
    law = fitted_law(fit)
    plans = [{"C": c, "fitted": law.compute_optimal(c) if law else None,
              "chinchilla": CHINCHILLA.compute_optimal(c)} for c in cfg.plan_budgets]
    results = sweep.get("results", [])
    return {"config": dataclasses.asdict(cfg), "wall_s": wall_s, "points": len(sweep["points"]),
            "done": sweep["done"], "left": sweep["left"], "left_out": sweep["left_out"],
            "train_tokens": TokenLoader(shards, "train", 1, 1).num_tokens,
            "val_tokens": TokenLoader(shards, "val", 1, 1).num_tokens, "family": family,
            "results": results, "max_epochs": max((r["epochs"] for r in results), default=0.0),
            "tokens_per_param": [{"C": m["C"], "N_opt": m["N_opt"], "D_opt": m["D_opt"],
                                  "ratio": m["D_opt"] / m["N_opt"], "inside": m["inside"]} for m in minima],
            "best_points": _best_points(results),
            "fit": fit, "plans": plans, "llama3": llama3_case(CHINCHILLA)}


def _best_points(results: list[dict]) -> list[dict]:
    """The lowest-loss point of each IsoFLOP budget, with its tokens per parameter (no parabola needed)."""
    best: dict[float, dict] = {}
    for r in results:
        if r["kind"] == "isoflop" and (r["budget"] not in best or r["loss"] < best[r["budget"]]["loss"]):
            best[r["budget"]] = r
    return [{"budget": b, "name": r["name"], "N": r["N"], "D": r["D"], "loss": r["loss"],
             "ratio": r["D"] / r["N"]} for b, r in sorted(best.items())]


def _ci(fit: dict, *keys: str) -> str:
    node = fit
    for k in keys:
        node = node.get(k, {}) if isinstance(node, dict) else {}
    if not isinstance(node, dict) or "value" not in node:
        return "skipped"
    ci = node.get("ci95")
    return f"{node['value']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def render_report(r: dict) -> str:
    """report.md: setup, points, exponents beside the published ones, tokens per parameter, plans, and
    what differs at this scale."""
    f = r["fit"]
    sw = r["config"]["sweep"]
    lines = [
        "# Chinchilla on the built-in corpus", "",
        f"Sweep, fit and plan in {r['wall_s'] / 60:.1f} minutes: {r['done']}/{r['points']} points"
        + (f" ({r['left']} left: rerun the same command to finish them)" if r["left"] else "") + ".",
        f"Corpus {', '.join(r['config']['sources'])}: {r['train_tokens']:,} train and "
        f"{r['val_tokens']:,} val "
        f"tokens at vocabulary {r['config']['vocab_size']}. Family: depth d gives n_layer = d, d_model = "
        f"{sw['aspect']} d; budgets {', '.join(f'{b:.2g}' for b in sw['budgets'])} FLOPs; every loss is the "
        "whole val split's, after a cosine schedule that ends with the run.", "",
        "## Points", "", "| point | N | D | C | val loss | epochs | wall s |",
        "|---|---|---|---|---|---|---|"]
    for p in r["results"]:
        lines.append(f"| {p['name']} | {p['N']:,} | {p['D']:,} | {p['C']:.3g} | {p['loss']:.4f} | "
                     f"{p['epochs']:.2f} | {p['wall_s']:.0f} |")
    lines += ["", "## Exponents", "",
              "| quantity | measured (95% bootstrap interval) | published |", "|---|---|---|"]
    for var in ("N", "D", "C"):
        lines.append(f"| Kaplan alpha_{var} in L = E + ({var}_c/{var})^alpha | "
                     f"{_ci(f, 'kaplan', var, 'alpha')} "
                     f"| {KAPLAN[var]} (Kaplan, no E term) |")
    for ap, (a, b) in CHINCHILLA_AB.items():
        lines.append(f"| {ap}: a in N_opt ~ C^a | {_ci(f, ap, 'a')} | {a} (Chinchilla) |")
        lines.append(f"| {ap}: b in D_opt ~ C^b | {_ci(f, ap, 'b')} | {b} (Chinchilla) |")
    for k, pub in (("alpha", 0.34), ("beta", 0.28), ("E", 1.69), ("A", 406.4), ("B", 410.7)):
        lines.append(f"| approach 3: {k} | {_ci(f, 'approach3', k)} | {pub} (Chinchilla) |")
    lines += ["", "## Tokens per parameter at the IsoFLOP minima", "",
              "| C | N_opt | D_opt | D_opt / N_opt | Chinchilla | minimum inside the sizes tried |",
              "|---|---|---|---|---|---|"]
    for t in r["tokens_per_param"]:
        lines.append(f"| {t['C']:.3g} | {t['N_opt']:,.0f} | {t['D_opt']:,.0f} | {t['ratio']:.1f} | 20 | "
                     f"{'yes' if t['inside'] else 'no (extrapolated)'} |")
    if not r["tokens_per_param"]:
        lines.append("| – | – | – | – | 20 | no profile had a minimum |")
    lines += ["", "The best point actually trained at each budget (no parabola):", "",
              "| budget | point | N | D | D / N | Chinchilla |", "|---|---|---|---|---|---|"]
    for b in r["best_points"]:
        lines.append(f"| {b['budget']:.3g} | {b['name']} | {b['N']:,} | {b['D']:,} | {b['ratio']:.1f} | 20 |")
    lines += ["", "## Plans (C = 6ND)", "",
              "| budget C | fitted law: N, D, D/N | Chinchilla's law: N, D, D/N |",
              "|---|---|---|"]
    for p in r["plans"]:
        fit_s = "no usable fit" if p["fitted"] is None else \
            f"{p['fitted']['N']:.3g}, {p['fitted']['D']:.3g}, {p['fitted']['tokens_per_param']:.1f}"
        ch = p["chinchilla"]
        lines.append(f"| {p['C']:.3g} | {fit_s} | {ch['N']:.3g}, {ch['D']:.3g}, "
                     f"{ch['tokens_per_param']:.1f} |")
    ll = r["llama3"]
    lines += ["", "Inference-aware (Sardana et al. 2023), Chinchilla's law: Llama 3 8B on 15T tokens reaches "
              f"L = {ll['loss']:.3f}. The Chinchilla-optimal model for that loss has "
              f"{ll['chinchilla_optimal']['N']:.3g} parameters on {ll['chinchilla_optimal']['D']:.3g} tokens "
              f"({ll['chinchilla_optimal']['train_flops']:.3g} training FLOPs against Llama's "
              f"{ll['llama3_8b']['train_flops']:.3g}); 8B/15T becomes the cheapest way to that loss once the "
              f"model serves {ll['break_even_inference_tokens']:.3g} tokens over its life, where its total "
              f"is {ll['llama3_8b']['total_flops']:.3g} FLOPs against "
              f"{ll['chinchilla_optimal']['total_flops']:.3g}.",
              "", "Plots: fit/isoflop.png, fit/optimal.png, fit/contours.png.", "",
              "## What differs at this scale", ""]
    shares = ", ".join(f"d{m['depth']} {m['N']:,} ({100 * m['embedding_share']:.0f}%)" for m in r["family"])
    lines += [f"- Embeddings. Total parameters per depth, with the embedding share: {shares}. Chinchilla's "
              "smallest model (44M) is dominated by its body; here the token table is a large share, so N "
              "(total, as Chinchilla counts) and Kaplan's non-embedding N give different exponents; "
              "`llmlab scaling fit --params N_nonembed` fits the latter.",
              f"- Tokenizer. A {r['config']['vocab_size']}-token BPE on Python source gives nats per token "
              "that are not comparable with MassiveText's: E, A and B are in other units; the exponents are "
              "the comparable part, and only roughly, for a code corpus.",
              f"- Repetition. The longest point saw the training split {r['max_epochs']:.1f} times; "
              "Chinchilla never repeated data. Past a few epochs (Muennighoff et al. 2023) repeated tokens "
              "are worth less than fresh ones, which bends L(D) and pushes the optimum towards larger "
              "models.",
              "- Range. A decade or so of compute and of model size, against Chinchilla's four: exponents "
              "come with wide intervals, and a profile whose minimum lies outside the sizes tried is "
              "extrapolated.",
              "- FLOPs. C counts Chinchilla's per-layer FLOPs (attention included, which matters at these "
              "widths); the plans use C = 6ND like the paper's closed form.", ""]
    return "\n".join(lines)

