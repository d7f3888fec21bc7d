"""`llmlab scaling flops|sweep|fit|plan`: FLOP accounting, sweeps, fits and sizing (llmlab.scaling)."""

from __future__ import annotations

import json

from llmlab.cli.options import real, whole


def register(sub, formatter_class) -> None:
    s = sub.add_parser("scaling", formatter_class=formatter_class,
                       help="scaling laws: FLOPs, sweeps, fits, compute-optimal sizing",
                       description="Measure, fit and use scaling laws (Kaplan et al. 2020; Hoffmann et al. "
                                   "2022).")
    ssub = s.add_subparsers(dest="scaling_verb", metavar="ACTION")
    _register_flops(ssub, formatter_class)
    _register_sweep(ssub, formatter_class)
    _register_fit(ssub, formatter_class)
    _register_plan(ssub, formatter_class)


def _register_flops(ssub, formatter_class) -> None:
    f = ssub.add_parser("flops", formatter_class=formatter_class,
                        help="parameters and FLOPs of a model config",
                        description="Parameters (total, embedding, non-embedding as Kaplan counts), training "
                                    "FLOPs per token (6N and Chinchilla's per-layer count) and inference "
                                    "FLOPs per token with a KV cache, as JSON.\n\nexample:\n"
                                    "  llmlab scaling flops --config gpt2-124M model.vocab_size=50257")
    f.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides (TOML literals)")
    f.add_argument("--config", metavar="TOML", default=None,
                   help="a pretraining config file or preset (tiny, cpu-demo, gpt2-124M)")
    f.add_argument("--seq-len", type=whole(1), default=None, help="sequence length; none = model.block_size")
    f.set_defaults(func=_flops)


def _register_sweep(ssub, formatter_class) -> None:
    w = ssub.add_parser("sweep", formatter_class=formatter_class, help="run an IsoFLOP (and size/data) sweep",
                        description="Real pretraining runs over a grid of budgets x depths (and optional "
                                    "size-only/data-only points); resumable, parallel over CPU cores, "
                                    "capped by max_minutes.\nWrites OUT/results.csv (N, D, C, loss, wall "
                                    "time), curves.csv and points/.\n\nexample:\n  llmlab scaling sweep "
                                    "--out runs/sweep pretrain.data.shards=data/stdlib/shards jobs=2")
    w.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="sweep config overrides (TOML literals)")
    w.add_argument("--config", metavar="TOML", default=None, help="a sweep TOML file (SweepConfig keys)")
    w.add_argument("--out", default="runs/sweep", help="sweep directory (rerun to continue)")
    w.add_argument("--dry-run", action="store_true", help="list the points with N, D, C and stop")
    w.add_argument("--overwrite", action="store_true", help="start the sweep in OUT over")
    w.set_defaults(func=_sweep)


def _register_fit(ssub, formatter_class) -> None:
    t = ssub.add_parser("fit", formatter_class=formatter_class,
                        help="fit Kaplan and Chinchilla laws to a CSV",
                        description="Kaplan's L(N), L(D), L(C) and Chinchilla's approaches 1-3 with "
                                    "bootstrap "
                                    "intervals, from a CSV with columns N, D, loss [, C, kind, budget].\n"
                                    "Writes OUT/fit.json and OUT/isoflop.png, optimal.png, contours.png.")
    t.add_argument("results", metavar="RESULTS.csv", help="results of `llmlab scaling sweep` or your own")
    t.add_argument("--out", default=None, help="directory for fit.json and plots; none = RESULTS' dir/fit")
    t.add_argument("--curves", default=None, help="training curves CSV; none = curves.csv beside RESULTS")
    t.add_argument("--bootstrap", type=whole(0), default=100, help="bootstrap resamples per fit")
    t.add_argument("--params", choices=["N", "N_nonembed"], default="N",
                   help="parameter column: total (Chinchilla) or non-embedding (Kaplan)")
    t.add_argument("--seed", type=whole(0), default=0, help="bootstrap seed")
    t.set_defaults(func=_fit)


def _register_plan(ssub, formatter_class) -> None:
    p = ssub.add_parser("plan", formatter_class=formatter_class, help="compute- and inference-optimal N, D",
                        description="The compute-optimal parameters and tokens for a FLOP budget (C = 6ND) "
                                    "from a fitted law or Chinchilla's, and with --inference-tokens the "
                                    "model that reaches the same loss with the fewest training + inference "
                                    "FLOPs (Sardana et al. 2023). --llama3 adds the Llama-3-8B case.")
    p.add_argument("--budget", type=real(0, low_open=True), required=True, help="training FLOPs, e.g. 1e21")
    p.add_argument("--law", default="chinchilla", help="'chinchilla' (published fit) or a fit.json")
    p.add_argument("--inference-tokens", type=real(0), default=0.0,
                   help="tokens served over the model's life")
    p.add_argument("--llama3", action="store_true", help="also show Llama 3 8B (15T tokens) against "
                                                         "Chinchilla-optimal for the same loss")
    p.set_defaults(func=_plan)


def _flops(args) -> int:
    from llmlab.config import find_preset, load_config
    from llmlab.errors import ConfigError, ModelError
    from llmlab.scaling.flops import accounting
    from llmlab.train.pretrain import PretrainConfig

    cfg = load_config(PretrainConfig, find_preset(args.config) if args.config else None, args.overrides)
    model = cfg.model
    if model.vocab_size == 0:
        raise ConfigError("model.vocab_size is 0 (taken from the shards at training time); give it, e.g. "
                          "model.vocab_size=50257")
    try:
        model.validate()
    except ModelError as e:
        raise ConfigError(str(e)) from e
    print(json.dumps(accounting(model, args.seq_len or cfg.data.block_size), indent=2))
    return 0


def _sweep(args) -> int:
    from llmlab.scaling.sweep import load_sweep_config, run_sweep

    cfg = load_sweep_config(args.config, args.overrides)
    run_sweep(cfg, args.out, overwrite=args.overwrite, dry_run=args.dry_run)
    return 0


def _fit(args) -> int:
    from pathlib import Path

    from llmlab.scaling.fit import run_fit

    out = args.out or str(Path(args.results).parent / "fit")
    fit = run_fit(args.results, out, curves=args.curves, boots=args.bootstrap, seed=args.seed,
                  params=args.params)
    summary = {k: {name: v.get("value") for name, v in fit[k].items() if isinstance(v, dict) and "value" in v}
               or fit[k].get("skipped") for k in ("approach1", "approach2", "approach3")}
    summary["kaplan"] = {var: fit["kaplan"][var].get("alpha", {}).get("value") for var in ("N", "D", "C")}
    print(json.dumps(summary, indent=2))
    print(f"-> {out}/fit.json")
    return 0


def _plan(args) -> int:
    from llmlab.scaling.plan import llama3_case, load_law, plan

    law = load_law(args.law)
    out = plan(args.budget, law, args.inference_tokens)
    if args.llama3:
        out["llama3"] = llama3_case(law, args.inference_tokens or None)
    print(json.dumps(out, indent=2))
    return 0
