"""The metrics of a log point, from every rank's numbers: throughput, MFU, memory, stragglers.

The trainer hands over what it measured (losses, elapsed time); this class counts real tokens and
data-loader waits between log points, gathers every rank's figures in one all-gather (the only
host sync of a log point) and turns them into one ``metrics.jsonl`` record.
"""

from __future__ import annotations

import logging
from typing import Any

import psutil
import torch

from llm_ds.monitor.metrics import StragglerWatch, mfu, peak_rss_bytes, straggler, training_flops_per_token

logger = logging.getLogger("llm_ds")
STRAGGLER_LAG = 0.2  # a rank this much slower than the median, three log points running, is named


def model_flops_per_token(model: torch.nn.Module, n_params: int, block_size: int) -> int | None:
    """Training FLOPs per token of a transformers causal LM (from its config); None for a model without one."""
    mc = getattr(model, "config", None)
    n_embd = getattr(mc, "n_embd", None) or getattr(mc, "hidden_size", None)
    n_layer = getattr(mc, "n_layer", None) or getattr(mc, "num_hidden_layers", None)
    if not (n_embd and n_layer):
        return None
    n_positions = getattr(mc, "n_positions", 0) or 0  # GPT-2's learned position table (not in rotary models)
    return training_flops_per_token(n_params, n_positions * n_embd, n_layer, n_embd, block_size)


class StepMetrics:
    """Between log points: this rank's real tokens and data waits. At a log point: the record.

    Also the per-rank memory high-water marks that the summary reports.
    """

    def __init__(
        self,
        engine,
        world_size: int,
        block_size: int,
        tokens_per_step: int,
        flops_per_token: int | None,
        peak_tflops: float | None,
        rss_before_model: int,
        counts_tokens: bool = True,
    ):
        self.engine, self.world_size, self.block_size = engine, world_size, block_size
        self.tokens_per_step, self.flops_per_token, self.peak_tflops = tokens_per_step, flops_per_token, peak_tflops
        self.rss_before_model = rss_before_model
        self.counts_tokens = counts_tokens  # one rank of a replica (a tensor group, a pipeline) counts its tokens
        self.data_wait_s = 0.0  # this rank's time waiting for batches since the last log point
        self._real_tokens = torch.zeros((), device=engine.device, dtype=torch.float64)
        self._stragglers = StragglerWatch(STRAGGLER_LAG, points=3)
        # Per rank, the most seen at any log point: [rss before model, peak rss, device max allocated].
        self.rank_memory = [[0, 0, 0] for _ in range(world_size)]

    def count_batch(self, batch: dict[str, torch.Tensor], wait_s: float) -> None:
        """A micro-batch on the device, and how long this rank waited for it. No host sync."""
        self.data_wait_s += wait_s
        if not self.counts_tokens:
            return
        mask = batch.get("attention_mask")
        self._real_tokens += mask.sum() if mask is not None else batch["input_ids"].numel()

    def _gather_ranks(self, values: list[torch.Tensor | float]) -> list[list[float]]:
        """Every rank's values, on every rank: one all-gather."""
        import deepspeed.comm as dist

        device = self.engine.device
        row = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).reshape(()) for v in values])
        rows = [torch.zeros_like(row) for _ in range(self.world_size)]
        dist.all_gather(rows, row)
        return [r.tolist() for r in rows]

    def log_point(
        self, step: int, interval_steps: int, elapsed_s: float, interval_loss: torch.Tensor, tokens_seen: int, loader
    ) -> tuple[dict[str, Any], int]:
        """The record of a log point (see README, Observability), and the real tokens all ranks trained on
        since the last one."""
        from deepspeed.accelerator import get_accelerator

        accel, engine = get_accelerator(), self.engine
        rows = self._gather_ranks(
            [
                interval_loss / interval_steps,
                self._real_tokens,
                elapsed_s,
                self.data_wait_s,
                accel.max_memory_allocated(),
                accel.max_memory_reserved(),
                psutil.Process().memory_info().rss,
                peak_rss_bytes(),
                self.rss_before_model,
            ]
        )
        self._real_tokens.zero_()
        self.data_wait_s = 0.0
        losses, real, times, waits, alloc, reserved, rsses, peaks, befores = (
            list(col) for col in zip(*rows, strict=True)
        )
        for mem, before, peak, allocated in zip(self.rank_memory, befores, peaks, alloc, strict=True):
            mem[:] = [int(before), max(mem[1], int(peak)), max(mem[2], int(allocated))]
        tokens = interval_steps * self.tokens_per_step
        tokens_per_s = tokens / max(times)  # the job moves at the pace of its slowest rank
        record = {
            "step": step,
            "train/epoch": loader.epoch + 1,
            # The global mean weighted by each rank's real tokens (equal weights when packed).
            "train/loss": sum(loss * n for loss, n in zip(losses, real, strict=True)) / sum(real),
            "train/rank_losses": losses,
            "train/lr": float(engine.get_lr()[0]),
            "train/tokens_seen": tokens_seen,
            "perf/ms_per_step": 1000 * max(times) / interval_steps,
            "perf/tokens_per_s": tokens_per_s,
            "perf/samples_per_s": tokens_per_s / self.block_size,
            "data/real_token_fraction": sum(real) / tokens,
            "data/samples_consumed": loader.consumed,
            "data/wait_fraction": max(w / t for w, t in zip(waits, times, strict=True) if t > 0),
            "mem/max_allocated_bytes": max(alloc),
            "mem/max_reserved_bytes": max(reserved),
            "mem/host_rss_bytes": max(rsses),
            "mem/host_peak_rss_bytes": max(peaks),
        }
        grad_norm = engine.get_global_grad_norm()
        if grad_norm is not None:
            record["train/grad_norm"] = float(grad_norm)
        if engine.fp16_enabled():
            record["train/loss_scale"] = float(getattr(engine.optimizer, "cur_scale", 0.0))
        if engine.fp16_enabled() or engine.bfloat16_enabled():
            # Both skip a step whose gradients hold inf or nan (bf16: DeepSpeed's check_grad_overflow).
            record["train/skipped_steps"] = int(engine.skipped_steps)
        if self.flops_per_token:
            per_device = tokens_per_s / self.world_size
            record["perf/tflops_per_device"] = per_device * self.flops_per_token / 1e12
            value = mfu(per_device, self.flops_per_token, self.peak_tflops)
            if value is not None:
                record["perf/mfu"] = value
        if self.world_size > 1:
            self._watch_stragglers(record, [1000 * t / interval_steps for t in times])
        return record, int(sum(real))

    def _watch_stragglers(self, record: dict[str, Any], step_ms: list[float]) -> None:
        slowest, lag = straggler(step_ms)
        record["perf/slowest_rank"], record["perf/straggler_lag"] = slowest, lag
        named = self._stragglers.update(slowest, lag)
        if named is not None and self.engine.global_rank == 0:
            logger.warning(
                "rank %d has been the slowest for 3 log points running, %.0f%% behind the median rank "
                "(perf/slowest_rank, perf/straggler_lag follow it)",
                named,
                100 * lag,
            )

    def run_mfu(self, tokens_per_s: float | None) -> float | None:
        """MFU over a whole run's timed steps."""
        if not tokens_per_s or not self.flops_per_token:
            return None
        return mfu(tokens_per_s / self.world_size, self.flops_per_token, self.peak_tflops)
