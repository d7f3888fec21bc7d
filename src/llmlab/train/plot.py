"""PNG plots of a run, derived from its metrics.jsonl (`llmlab plot RUN_DIR`; also run when training ends).

Writes RUN_DIR/plots/loss.png (train loss, val loss) and RUN_DIR/plots/training.png (loss, learning rate,
grad norm with the clip threshold, tokens/s with MFU). Events are marked as vertical lines: rollbacks
(red), spikes (pink), skipped steps (orange), resumes (grey dashed), a time-limit stop (dark grey).
Records a rollback superseded (steps that were trained and then undone) are drawn faded, so a spike
stays visible next to the recovered curve.

Uses matplotlib's object API with the Agg canvas, so it needs no display and leaves pyplot state alone.
"""

from __future__ import annotations

import io
from pathlib import Path

from llmlab.errors import DataError
from llmlab.fsutil import write_bytes_atomic
from llmlab.train.metrics import read_metrics

_EVENT_STYLE = {"rollback": ("tab:red", "-"), "spike": ("tab:pink", "-"), "skip": ("tab:orange", ":"),
                "resume": ("0.5", "--"), "time_limit": ("0.3", "-.")}


def superseded(records: list[dict]) -> list[bool]:
    """True for records a later rollback went back over (a later record has a smaller step)."""
    flags, later_min = [False] * len(records), float("inf")
    for i in range(len(records) - 1, -1, -1):
        step = records[i].get("step", 0)
        flags[i] = later_min < step
        later_min = min(later_min, step)
    return flags


def _series(records: list[dict], flags: list[bool], key: str, live: bool) -> tuple[list, list]:
    xs, ys = [], []
    for r, old in zip(records, flags, strict=True):
        if old != live and r.get(key) is not None:
            xs.append(r["step"])
            ys.append(r[key])
    return xs, ys


def _val_points(records: list[dict]) -> tuple[list, list]:
    xs, ys = [], []
    for r in records:
        for e in r.get("events") or []:
            if e.get("type") == "eval" and e.get("val_loss") is not None:
                xs.append(r["step"])
                ys.append(e["val_loss"])
    return xs, ys


def _mark_events(ax, records: list[dict]) -> None:
    for r in records:
        for e in r.get("events") or []:
            style = _EVENT_STYLE.get(e.get("type"))
            if style:
                ax.axvline(r["step"], color=style[0], linestyle=style[1], linewidth=0.9, alpha=0.8)


def _plot(ax, records, flags, key, label, color, log=False) -> None:
    xs, ys = _series(records, flags, key, live=True)
    ax.plot(xs, ys, color=color, linewidth=1.2, label=label)
    old_x, old_y = _series(records, flags, key, live=False)
    if old_x:
        ax.plot(old_x, old_y, ".", color=color, alpha=0.25, markersize=3, label=f"{label} (rolled back)")
    if log and ys and min(ys) > 0 and max(ys) / min(ys) > 20:  # log only when the range needs it
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title(label)
    ax.grid(alpha=0.3)


def _loss_axes(ax, records, flags) -> None:
    _plot(ax, records, flags, "loss", "train loss", "tab:blue")
    vx, vy = _val_points(records)
    if vx:
        ax.plot(vx, vy, "o-", color="tab:green", markersize=3, label="val loss")
    _mark_events(ax, records)
    ax.set_title("loss")
    ax.legend(loc="upper right", fontsize=8)


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    write_bytes_atomic(path, buf.getvalue())


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write the run's PNGs and return their paths."""
    from matplotlib.figure import Figure

    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise DataError(f"{run_dir} has no metrics.jsonl; pass a run directory written by `llmlab pretrain`")
    records = [r for r in read_metrics(path) if "step" in r]
    if not any(r.get("loss") is not None for r in records):
        raise DataError(f"{path} has no training steps yet; plot again once the run has logged a step")
    flags = superseded(records)
    out = run_dir / "plots"

    fig = Figure(figsize=(7, 4.5))
    _loss_axes(fig.add_subplot(1, 1, 1), records, flags)
    _save(fig, out / "loss.png")

    fig = Figure(figsize=(12, 8))
    axes = [fig.add_subplot(2, 2, i) for i in range(1, 5)]
    _loss_axes(axes[0], records, flags)
    _plot(axes[1], records, flags, "lr", "learning rate", "tab:purple")
    _plot(axes[2], records, flags, "grad_norm", "grad norm (pre-clip)", "tab:brown", log=True)
    clip = _grad_clip(run_dir)
    if clip:
        axes[2].axhline(clip, color="0.4", linestyle="--", linewidth=0.8, label=f"clip {clip:g}")
        axes[2].legend(loc="upper right", fontsize=8)
    _plot(axes[3], records, flags, "tokens_per_s", "throughput (tokens/s)", "tab:cyan")
    mx, my = _series(records, flags, "mfu", live=True)
    if mx:
        twin = axes[3].twinx()
        twin.plot(mx, [100 * v for v in my], color="tab:gray", linewidth=0.8, alpha=0.7)
        twin.set_ylabel("MFU %")
    for ax in axes[1:]:
        _mark_events(ax, records)
    fig.tight_layout()
    _save(fig, out / "training.png")
    return [out / "loss.png", out / "training.png"]


def _grad_clip(run_dir: Path) -> float | None:
    """optim.grad_clip from the run's config.toml, if there is one."""
    import tomllib

    try:
        return float(tomllib.loads((run_dir / "config.toml").read_text())["optim"]["grad_clip"]) or None
    except (OSError, KeyError, ValueError, TypeError, tomllib.TOMLDecodeError):
        return None
