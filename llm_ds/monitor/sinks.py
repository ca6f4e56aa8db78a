"""Sinks for metric records. Only rank 0 builds any; a failing sink warns once and is dropped.

A record is a flat dict: ``step`` plus tag -> number, tags like ``train/loss`` and ``eval/loss``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from llm_ds.config import LoggingConfig
from llm_ds.monitor.metrics import redact

logger = logging.getLogger("llm_ds")


def format_console_line(r: dict[str, Any], total_steps: int) -> str:
    """The seed's line shape, extended: ``| epoch | step/total | lr | ms/step | tokens/s | [mfu] | loss | [gnorm]``."""
    width = len(str(total_steps))
    mfu = f" | mfu {100 * r['perf/mfu']:4.1f}%" if "perf/mfu" in r else ""
    gnorm = f" | gnorm {r['train/grad_norm']:.2f}" if "train/grad_norm" in r else ""
    return (
        f"| epoch {r['train/epoch']:3d} | step {r['step']:{width}d}/{total_steps} | lr {r['train/lr']:.2e} "
        f"| ms/step {r['perf/ms_per_step']:8.1f} | tokens/s {r['perf/tokens_per_s']:>9,.0f}{mfu} "
        f"| loss {r['train/loss']:.4f}{gnorm}"
    )


class Sink:
    name = "sink"

    def write(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class JsonlSink(Sink):
    """``metrics.jsonl``: one JSON object per record, flushed each time (readable while training)."""

    name = "metrics.jsonl"

    def __init__(self, path: Path, resume_step: int = 0):
        # A resumed run keeps the history up to its checkpoint and drops what a crashed run logged after it.
        kept = []
        if resume_step and path.exists():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= resume_step]
        self.file = open(path, "w", encoding="utf-8")
        self.file.writelines(line + "\n" for line in kept)
        self.file.flush()

    def write(self, record):
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self):
        self.file.close()


class TensorBoardSink(Sink):
    name = "tensorboard"

    def __init__(self, log_dir: Path, texts: dict[str, str], resume_step: int = 0, hparams: dict | None = None):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step hides what a crashed run logged after the checkpoint being resumed.
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=resume_step + 1 if resume_step else None)
        for tag, text in texts.items():
            self.writer.add_text(tag, f"```\n{text}\n```", 0)
        if hparams:
            self._add_hparams(hparams)

    def _add_hparams(self, hparams: dict) -> None:
        """The run's hyperparameters for TensorBoard's HParams tab, in this run's own event file, with
        ``eval/loss`` as the metric (the tab shows its last value: the final evaluation)."""
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        flat = {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v) for k, v in flatten(hparams).items()}
        writer = self.writer._get_file_writer()
        for summary in hparams_summaries(flat, {"eval/loss": None}):
            writer.add_summary(summary)

    def write(self, record):
        step = record["step"]
        for tag, value in record.items():
            if tag != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(tag, value, step)

    def close(self):
        self.writer.close()


class WandbSink(Sink):
    """Online where ``WANDB_API_KEY`` is set, offline otherwise (``wandb sync`` the run folder later)."""

    name = "wandb"

    def __init__(self, project: str, run_name: str, out_dir: Path, config: dict[str, Any], run_id: str | None):
        import wandb

        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        # A resumed run continues the same W&B run.
        self.run = wandb.init(
            project=project,
            name=run_name,
            dir=str(out_dir),
            config=config,
            mode=mode,
            id=run_id,
            resume="allow" if run_id else None,
        )

    def write(self, record):
        # W&B drops a step below one it has seen: a background checkpoint's figures, which arrive a few steps
        # after the step they belong to, go to the latest step (TensorBoard and metrics.jsonl keep theirs).
        self.step = max(record["step"], getattr(self, "step", 0))
        self.run.log({k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}, step=self.step)

    def close(self):
        self.run.finish()


class ProgressSink(Sink):
    """A progress bar with ETA on rank 0's terminal (stderr), advanced at each log point."""

    name = "progress"

    def __init__(self, total_steps: int, initial: int = 0, stream=None):
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=total_steps, initial=initial, unit="step", dynamic_ncols=True, file=stream or sys.stderr, leave=True
        )

    def write(self, record):
        if "train/loss" in record:
            self.bar.update(record["step"] - self.bar.n)
            self.bar.set_postfix(loss=f"{record['train/loss']:.4f}", refresh=False)

    def close(self):
        self.bar.close()


def is_terminal(stream) -> bool:
    return hasattr(stream, "isatty") and stream.isatty()


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}``; lists and other leaves kept as they are."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class Monitor:
    """Fans records out to sinks; a sink that raises is reported once and dropped, never fatal."""

    def __init__(self, sinks: list[Sink], total_steps: int):
        self.sinks = sinks
        self.total_steps = total_steps

    def wandb_run_id(self) -> str | None:
        return next((s.run.id for s in self.sinks if isinstance(s, WandbSink)), None)

    def log_train(self, record: dict[str, Any]) -> None:
        logger.info(format_console_line(record, self.total_steps))
        self._write(record)

    def log_eval(self, record: dict[str, Any]) -> None:
        logger.info(
            "| eval at step %d | loss %.4f | perplexity %.2f",
            record["step"],
            record["eval/loss"],
            record["eval/perplexity"],
        )
        self._write(record)

    def write(self, record: dict[str, Any]) -> None:
        """A record for every sink but the console (which the caller tells in its own words)."""
        self._write(record)

    def _write(self, record):
        for sink in list(self.sinks):
            try:
                sink.write(record)
            except Exception as exc:  # a sink must never kill a training run
                logger.warning("metrics sink %s failed and is switched off: %s", sink.name, exc)
                self.sinks.remove(sink)

    def close(self) -> None:
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as exc:
                logger.warning("metrics sink %s failed to close: %s", sink.name, exc)


def build_monitor(
    cfg: LoggingConfig,
    out_dir: Path,
    run_name: str,
    total_steps: int,
    is_rank_zero: bool,
    texts: dict[str, str],
    hparams: dict[str, Any],
    resume_step: int = 0,
    wandb_run_id: str | None = None,
) -> Monitor:
    """Rank 0 gets every configured sink; other ranks get a monitor that writes nowhere.

    Config texts and hyperparameters are redacted: no secret from the environment reaches a sink.
    """
    if not is_rank_zero:
        return Monitor([], total_steps)
    texts, hparams = redact(texts), redact(hparams)
    sinks: list[Sink] = [JsonlSink(out_dir / "metrics.jsonl", resume_step)]
    factories = []
    if cfg.tensorboard:
        factories.append(("tensorboard", lambda: TensorBoardSink(out_dir / "tensorboard", texts, resume_step, hparams)))
    if is_terminal(sys.stderr):  # plain lines only where the output is a log file (CI, schedulers)
        factories.append(("progress", lambda: ProgressSink(total_steps, resume_step)))
    if cfg.wandb:
        factories.append(("wandb", lambda: WandbSink(cfg.wandb_project, run_name, out_dir, hparams, wandb_run_id)))
    for name, make in factories:
        try:
            sinks.append(make())
        except Exception as exc:
            logger.warning("metrics sink %s could not start and is switched off: %s", name, exc)
    return Monitor(sinks, total_steps)
