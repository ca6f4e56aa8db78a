"""The training loop around a DeepSpeed engine: steps, periodic logging, evaluation, checkpoints.

Host syncs (``.item()``, ``.tolist()``, collectives) happen only at log, eval and save points:
between them the loss is accumulated on the device.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import deepspeed.comm as dist
import psutil
import torch
from deepspeed.accelerator import get_accelerator

from llm_ds.config import RunConfig
from llm_ds.monitor import Monitor
from llm_ds.monitor.metrics import StragglerWatch, mfu, peak_rss_bytes, straggler

logger = logging.getLogger("llm_ds")
STRAGGLER_LAG = 0.2  # a rank this much slower than the median, three log points running, is named


@dataclass
class TrainState:
    """Counters saved with every checkpoint (the data position is the loader's own state)."""

    step: int = 0  # optimizer steps done
    tokens_seen: int = 0  # positions trained on, all ranks
    real_tokens_seen: int = 0  # of which real tokens (not padding), all ranks


def forward_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy of a batch; the model shifts ``labels`` by one itself."""
    return model(**batch).loss


class Trainer:
    def __init__(
        self,
        cfg: RunConfig,
        engine,
        train_loader,
        eval_loader,
        monitor: Monitor,
        total_steps: int,
        world_size: int,
        n_params: int,
        saver: Callable[[int, dict[str, Any]], Path] | None = None,
        control=None,
        first_loss: float | None = None,
        flops_per_token: int | None = None,
        peak_tflops: float | None = None,
        rss_before_model: int = 0,
    ):
        """``saver(step, state)`` writes a checkpoint; ``control`` (``llm_ds.control.Control``) turns
        signals and the save trigger into saves and a clean stop; ``first_loss`` is step 1's loss of
        a run being resumed; ``rss_before_model`` is this rank's host memory before the model was
        built, the base of the per-rank memory figures in the summary."""
        self.cfg, self.engine, self.monitor = cfg, engine, monitor
        self.saver, self.control, self.first_loss = saver, control, first_loss
        self.flops_per_token, self.peak_tflops = flops_per_token, peak_tflops
        self._data_wait_s = 0.0  # this rank's time waiting for batches since the last log point
        self._stragglers = StragglerWatch(STRAGGLER_LAG, points=3)
        self.first_step_at: float | None = None  # wall-clock time the first step of this process finished
        self.rss_before_model = rss_before_model
        # Per rank, the most seen at any log point: [rss before model, peak rss, device max allocated].
        self.rank_memory = [[0, 0, 0] for _ in range(world_size)]
        self.train_loader, self.eval_loader = train_loader, eval_loader
        self.total_steps, self.world_size, self.n_params = total_steps, world_size, n_params
        self.state = TrainState()
        self.device = engine.device
        self.tokens_per_step = (
            cfg.train.micro_batch_size * cfg.train.grad_accum_steps * world_size * cfg.data.block_size
        )
        self._batches = iter(train_loader)
        self._real_tokens = torch.zeros((), device=self.device, dtype=torch.float64)  # this rank, since the last log

    def _next_batch(self) -> dict[str, torch.Tensor]:
        start = time.perf_counter()
        host_batch = next(self._batches)
        self._data_wait_s += time.perf_counter() - start
        batch = {k: v.to(self.device, non_blocking=True) for k, v in host_batch.items()}
        mask = batch.get("attention_mask")
        self._real_tokens += mask.sum() if mask is not None else batch["input_ids"].numel()
        return batch

    def train_step(self) -> torch.Tensor:
        """One optimizer step over ``grad_accum_steps`` micro-batches; returns the mean loss, on device."""
        loss_sum = torch.zeros((), device=self.device)
        for _ in range(self.cfg.train.grad_accum_steps):
            loss = forward_loss(self.engine, self._next_batch())
            self.engine.backward(loss)
            self.engine.step()
            loss_sum += loss.detach().float()
        self.state.step += 1
        self.state.tokens_seen += self.tokens_per_step
        return loss_sum / self.cfg.train.grad_accum_steps

    @torch.no_grad()
    def evaluate(self) -> float:
        """Token-weighted mean loss over the validation split, all ranks together."""
        self.engine.eval()
        sums = torch.zeros(2, device=self.device, dtype=torch.float64)
        limit = self.cfg.train.eval_max_batches
        for i, batch in enumerate(self.eval_loader):
            if limit is not None and i >= limit:
                break
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            n_targets = (batch["labels"][:, 1:] != -100).sum()
            sums[0] += forward_loss(self.engine, batch).double() * n_targets
            sums[1] += n_targets
        dist.all_reduce(sums)
        self.engine.train()
        return (sums[0] / sums[1]).item()

    def training_state(self) -> dict[str, Any]:
        """What a checkpoint must hold to continue exactly: counters and the data position."""
        return {**asdict(self.state), "data": self.train_loader.state_dict()}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint's ``training_state()``."""
        self.state = TrainState(**{k: state[k] for k in ("step", "tokens_seen", "real_tokens_seen")})
        self.train_loader.load_state_dict(state["data"])
        self._batches = iter(self.train_loader)

    def save_checkpoint(self) -> Path | None:
        if self.saver is None:
            return None
        path = self.saver(self.state.step, self.training_state())
        logger.info("saved checkpoint %s", path)
        return path

    def _gather_ranks(self, values: list[torch.Tensor | float]) -> list[list[float]]:
        """Every rank's values, on every rank: one all-gather, the only host sync of a log point."""
        row = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=self.device).reshape(()) for v in values])
        rows = [torch.zeros_like(row) for _ in range(self.world_size)]
        dist.all_gather(rows, row)
        return [r.tolist() for r in rows]

    def _log_record(self, step: int, interval_steps: int, elapsed: float, interval_loss: torch.Tensor) -> dict:
        """The metrics of one log point, from every rank's numbers (see README, Observability)."""
        accel = get_accelerator()
        rss = psutil.Process().memory_info().rss
        rows = self._gather_ranks(
            [
                interval_loss / interval_steps,
                self._real_tokens,
                elapsed,
                self._data_wait_s,
                accel.max_memory_allocated(),
                accel.max_memory_reserved(),
                rss,
                peak_rss_bytes(),
                self.rss_before_model,
            ]
        )
        self._real_tokens.zero_()
        self._data_wait_s = 0.0
        losses, real, times, waits, alloc, reserved, rsses, peaks, befores = (
            list(col) for col in zip(*rows, strict=True)
        )
        for mem, before, peak, allocated in zip(self.rank_memory, befores, peaks, alloc, strict=True):
            mem[:] = [int(before), max(mem[1], int(peak)), max(mem[2], int(allocated))]
        tokens = interval_steps * self.tokens_per_step
        self.state.real_tokens_seen += int(sum(real))
        tokens_per_s = tokens / max(times)  # the job moves at the pace of its slowest rank
        record = {
            "step": step,
            "train/epoch": self.train_loader.epoch + 1,
            # The global mean weighted by each rank's real tokens (equal weights when packed).
            "train/loss": sum(loss * n for loss, n in zip(losses, real, strict=True)) / sum(real),
            "train/rank_losses": losses,
            "train/lr": float(self.engine.get_lr()[0]),
            "train/tokens_seen": self.state.tokens_seen,
            "perf/ms_per_step": 1000 * max(times) / interval_steps,
            "perf/tokens_per_s": tokens_per_s,
            "perf/samples_per_s": tokens_per_s / self.cfg.data.block_size,
            "data/real_token_fraction": sum(real) / tokens,
            "data/samples_consumed": self.train_loader.consumed,
            "data/wait_fraction": max(w / t for w, t in zip(waits, times, strict=True) if t > 0),
            "mem/max_allocated_bytes": max(alloc),
            "mem/max_reserved_bytes": max(reserved),
            "mem/host_rss_bytes": max(rsses),
            "mem/host_peak_rss_bytes": max(peaks),
        }
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:
            record["train/grad_norm"] = float(grad_norm)
        if self.engine.fp16_enabled():
            record["train/loss_scale"] = float(getattr(self.engine.optimizer, "cur_scale", 0.0))
        if self.engine.fp16_enabled() or self.engine.bfloat16_enabled():
            # Both skip a step whose gradients hold inf or nan (bf16: DeepSpeed's check_grad_overflow).
            record["train/skipped_steps"] = int(self.engine.skipped_steps)
        if self.flops_per_token:
            per_device = tokens_per_s / self.world_size
            record["perf/tflops_per_device"] = per_device * self.flops_per_token / 1e12
            value = mfu(per_device, self.flops_per_token, self.peak_tflops)
            if value is not None:
                record["perf/mfu"] = value
        if self.world_size > 1:
            slowest, lag = straggler([1000 * t / interval_steps for t in times])
            record["perf/slowest_rank"], record["perf/straggler_lag"] = slowest, lag
            named = self._stragglers.update(slowest, lag)
            if named is not None and self.engine.global_rank == 0:
                logger.warning(
                    "rank %d has been the slowest for 3 log points running, %.0f%% behind the median rank "
                    "(perf/slowest_rank, perf/straggler_lag follow it)",
                    named,
                    100 * lag,
                )
        return record

    def _epochs(self) -> float | None:
        per_epoch = self.train_loader.batches_per_epoch()
        if not per_epoch:
            return None
        return self.train_loader.epoch + self.train_loader.consumed / (per_epoch * self.cfg.train.micro_batch_size)

    def fit(self) -> dict[str, Any]:
        """Train to ``total_steps``; evaluate and save on schedule and at the end; return the summary."""
        cfg, t = self.cfg, self.cfg.train
        log_every, ckpt_every = cfg.logging.log_interval, cfg.checkpoint.interval
        self.engine.train()
        fit_start = time.perf_counter()
        interval_loss = torch.zeros((), device=self.device, dtype=torch.float64)
        interval_steps, interval_start = 0, time.perf_counter()
        train_time_s, timed_tokens = 0.0, 0
        first_loss, last_loss, eval_loss, stopped_by = self.first_loss, None, None, None
        while self.state.step < self.total_steps:
            interval_loss += self.train_step()
            interval_steps += 1
            step = self.state.step
            if step == 1 or step % log_every == 0 or step == self.total_steps:
                get_accelerator().synchronize()  # queued device work belongs to this interval's time
                if self.first_step_at is None:
                    self.first_step_at = time.time()
                elapsed = time.perf_counter() - interval_start
                record = self._log_record(step, interval_steps, elapsed, interval_loss)
                last_loss = record["train/loss"]
                first_loss = last_loss if first_loss is None else first_loss
                if step > 1:  # the first step carries one-off warm-up costs
                    train_time_s += elapsed
                    timed_tokens += interval_steps * self.tokens_per_step
                self.monitor.log_train(record)
                interval_loss.zero_()
                interval_steps, interval_start = 0, time.perf_counter()
            pause_start = time.perf_counter()
            if (t.eval_interval and step % t.eval_interval == 0) or step == self.total_steps:
                eval_loss = self.evaluate()
                self.monitor.log_eval(
                    {"step": step, "eval/loss": eval_loss, "eval/perplexity": math.exp(min(eval_loss, 50.0))}
                )
            save_now, stop_now = self.control.poll(step) if self.control else (False, False)
            scheduled = (ckpt_every and step % ckpt_every == 0) or (
                step == self.total_steps and cfg.checkpoint.save_final
            )
            if scheduled or save_now:
                self.save_checkpoint()
            # Evaluation and checkpoint time does not count as step time.
            interval_start += time.perf_counter() - pause_start
            if stop_now:
                from llm_ds.control import stop_reason

                stopped_by = stop_reason(self.control) or "another rank's signal"
                logger.info("stopped after step %d (%s), checkpoint saved", step, stopped_by)
                break
        return {
            "steps": self.state.step,
            "world_size": self.world_size,
            "tokens_seen": self.state.tokens_seen,
            "first_train_loss": first_loss,
            "final_train_loss": last_loss,
            "final_eval_loss": eval_loss,
            "eval_perplexity": math.exp(min(eval_loss, 50.0)) if eval_loss is not None else None,
            "tokens_per_s": timed_tokens / train_time_s if train_time_s > 0 else None,
            "train_time_s": train_time_s,
            "fit_wall_s": time.perf_counter() - fit_start,
            "parameters": self.n_params,
            "global_batch_size": self.tokens_per_step // cfg.data.block_size,
            "block_size": cfg.data.block_size,
            "epochs": self._epochs(),
            "real_token_fraction": self.state.real_tokens_seen / max(1, self.state.tokens_seen),
            "stopped_by": stopped_by,
            "skipped_steps": int(self.engine.skipped_steps),  # optimizer steps dropped for inf/nan gradients
            "mfu": mfu(timed_tokens / train_time_s / self.world_size, self.flops_per_token, self.peak_tflops)
            if train_time_s > 0 and self.flops_per_token
            else None,
            "peak_memory_bytes": max(m[2] for m in self.rank_memory),
            # Per rank, in rank order: host memory before the model was built, the host's peak from
            # then on (model, optimizer, activations, buffers), the device's most allocated.
            "host_rss_before_model_bytes": [m[0] for m in self.rank_memory],
            "host_peak_rss_bytes": [m[1] for m in self.rank_memory],
            "device_max_allocated_bytes": [m[2] for m in self.rank_memory],
        }


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    path.write_text(json.dumps(summary, indent=2) + "\n")
