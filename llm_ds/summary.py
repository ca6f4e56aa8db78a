"""A run's summary: what ``Trainer.fit`` returns and rank 0 writes as ``summary.json``, key for key."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger("llm_ds")


@dataclass
class RunSummary:
    steps: int  # optimizer steps done, this process and any it resumed from
    world_size: int
    tokens_seen: int  # positions trained on, all ranks
    first_train_loss: float | None  # step 1's loss, also after a resume
    final_train_loss: float | None
    final_eval_loss: float | None
    eval_perplexity: float | None
    tokens_per_s: float | None  # over this process's timed steps (step 1 and pauses excluded)
    train_time_s: float
    fit_wall_s: float
    parameters: int
    global_batch_size: int
    block_size: int
    epochs: float | None
    real_token_fraction: float
    stopped_by: str | None  # a signal's name, or what else stopped the run early
    skipped_steps: int  # optimizer steps dropped for inf/nan gradients
    mfu: float | None
    peak_memory_bytes: int
    # Per rank, in rank order: host memory before the model was built, the host's peak from then on
    # (model, optimizer, activations, buffers), the device's most allocated.
    host_rss_before_model_bytes: list[int]
    host_peak_rss_bytes: list[int]
    device_max_allocated_bytes: list[int]
    precision: str
    zero_stage: int
    wall_s: float  # from the process's start (the driver) or the Trainer's construction
    seconds_to_first_step: float | None
    resumed_from: str | None
    resumed_at_step: int
    resumed_from_world_size: int | None  # the ranks that wrote the checkpoint resumed from
    grad_accum_steps: int  # this process's: a resume on another world size changes it, the global batch stays
    tensor_parallel: int = 1  # ranks that split each replica's layers (parallel.tensor)
    pipeline_parallel: int = 1  # stages each replica's layers are split into (parallel.pipeline)
    data_parallel_size: int | None = None  # replicas that read their own share of each batch
    checkpoints_saved: int = 0  # complete checkpoints this process wrote
    checkpoint_stall_s: float = 0.0  # seconds training waited for them, in all
    checkpoint_wait_s: float = 0.0  # of which waiting for a background save before the next could start
    checkpoint_async: bool = False  # checkpoint.async
    checkpoint_host_bytes: int = 0  # host memory kept for background saves' copies, on this rank

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def perplexity(loss: float | None) -> float | None:
    return math.exp(min(loss, 50.0)) if loss is not None else None


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    path.write_text(json.dumps(summary, indent=2) + "\n")


def log_summary(summary: dict[str, Any], out_dir: Path, checkpoint_dir: Path) -> None:
    """The run's last two console lines: its losses, and where everything went."""
    if summary["final_eval_loss"] is not None and summary["first_train_loss"] is not None:
        logger.info(
            "done: %d steps, train loss %.4f -> %.4f, eval loss %.4f (perplexity %.2f)",
            summary["steps"],
            summary["first_train_loss"],
            summary["final_train_loss"] or float("nan"),
            summary["final_eval_loss"],
            summary["eval_perplexity"],
        )
    else:
        logger.info("done: %d steps", summary["steps"])
    logger.info(
        "summary: %s | checkpoints: %s | tensorboard: %s",
        out_dir / "summary.json",
        checkpoint_dir if checkpoint_dir.is_dir() else "none saved",
        out_dir / "tensorboard" if (out_dir / "tensorboard").is_dir() else "off",
    )
