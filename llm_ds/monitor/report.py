"""``llm-ds report RUN_DIR``: loss, learning rate and throughput against step, as a PNG, from metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

from llm_ds.config import UserError, missing_extra


class ReportError(UserError, ValueError):
    """A run directory that cannot be plotted."""


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ReportError(f"{path}: no such file (is {run_dir} a run directory?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Plot a run's curves into ``out`` (default ``RUN_DIR/report.png``); returns the PNG's path."""
    install = missing_extra("matplotlib", "report")
    if install:
        raise ReportError(f"llm-ds report draws with matplotlib, not installed here: {install}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    train = [r for r in records if "train/loss" in r]
    evals = [r for r in records if "eval/loss" in r]
    if not train:
        raise ReportError(f"{run_dir / 'metrics.jsonl'} holds no training records yet")
    fig, axes = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    axes[0].plot([r["step"] for r in train], [r["train/loss"] for r in train], label="train loss")
    if evals:
        axes[0].plot([r["step"] for r in evals], [r["eval/loss"] for r in evals], "o-", label="eval loss")
    axes[0].set_ylabel("loss")
    axes[0].legend()
    axes[1].plot([r["step"] for r in train], [r["train/lr"] for r in train], color="tab:green")
    axes[1].set_ylabel("learning rate")
    timed = train[1:] or train  # the first step carries one-off warm-up costs
    axes[2].plot([r["step"] for r in timed], [r["perf/tokens_per_s"] for r in timed], color="tab:red")
    axes[2].set_ylabel("tokens/s")
    axes[2].set_xlabel("step")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(
        f"{run_dir.name}: {train[-1]['step']} steps, train loss {train[-1]['train/loss']:.3f}"
        + (f", eval loss {evals[-1]['eval/loss']:.3f}" if evals else "")
    )
    fig.tight_layout()
    out = Path(out) if out else run_dir / "report.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
