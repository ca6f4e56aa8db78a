"""Process setup and the assembly of one run: distributed init, seeds, data, model, engine."""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llm_ds.checkpoint import check_compatible, find_resume_point, list_checkpoints, step_of, verify
from llm_ds.config import ConfigError, RunConfig, dump_run_config
from llm_ds.ds_config import resolve_ds_config, resolve_precision, zero_stage

logger = logging.getLogger("llm_ds")


def dist_env() -> tuple[int, int, int]:
    """``(rank, local_rank, world_size)`` from the launcher's environment (1 process without one)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def setup_logging(rank: int) -> None:
    """Rank 0 prints our lines plainly; other ranks only warnings, tagged with their rank."""
    handler = logging.StreamHandler(sys.stdout)
    handler.addFilter(_RedactSecrets())
    handler.setFormatter(logging.Formatter("%(message)s" if rank == 0 else f"[rank {rank}] %(levelname)s %(message)s"))
    for name in ("llm_ds", "llm_ds.data.cache"):
        log = logging.getLogger(name)
        log.handlers[:] = [handler] if name == "llm_ds" else []
        log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
        log.propagate = name != "llm_ds"
    # DeepSpeed's own INFO lines repeat per rank; LLM_DS_DEEPSPEED_LOG=info brings them back.
    logging.getLogger("DeepSpeed").setLevel(os.environ.get("LLM_DS_DEEPSPEED_LOG", "WARNING").upper())


class _RedactSecrets(logging.Filter):
    """Mask the values of secret environment variables (``*_TOKEN``, ``*_KEY``, ...) in every line."""

    def filter(self, record: logging.LogRecord) -> bool:
        from llm_ds.monitor.metrics import redact

        record.msg, record.args = redact(record.getMessage()), None
        return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> None:
    """Join the process group the launcher describes, or make a group of one for a plain ``python`` run."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ:
        os.environ.update(
            RANK="0",
            LOCAL_RANK="0",
            WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())),
        )
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    if get_accelerator().device_name() == "cpu":  # the segments belong to DeepSpeed's CPU backend alone
        unlink_shm_buffers()


SHM_DIR = Path("/dev/shm")


def unlink_shm_buffers() -> None:
    """Remove the names of DeepSpeed's CPU shared-memory all-reduce buffers once every rank has mapped them.

    On CPU, DeepSpeed's communication backend creates a 69 MB ``/dev/shm`` segment per rank when all
    ranks share a machine and never unlinks it: each run would leave its segments in memory until
    reboot. The mappings stay valid after the names go, and a killed run leaves nothing behind.
    """
    import deepspeed.comm as dist

    addr, port, rank = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT"), os.environ.get("RANK")
    if not (addr and port and rank is not None and SHM_DIR.is_dir()):
        return
    dist.barrier()  # every rank has opened its peers' segments
    for path in SHM_DIR.glob(f"deepspeed_allreduce_buffer_*_{addr}_{port}_{rank}"):
        path.unlink(missing_ok=True)


def device_precisions() -> tuple[str, bool, bool]:
    """The accelerator's name, and whether it has native bf16 and fp16: what ``precision: auto`` picks from.

    On CUDA, bf16 needs compute capability 8.0 (Ampere) or newer: DeepSpeed's ``is_bf16_supported``
    also says yes on V100 and T4, whose bf16 is emulated and slower than fp16.
    """
    from deepspeed.accelerator import get_accelerator

    from llm_ds.hardware import has_native_bf16, local_gpu

    accel = get_accelerator()
    device, has_bf16 = accel.device_name(), accel.is_bf16_supported()
    if device == "cuda":
        gpu = local_gpu()
        has_bf16 = has_bf16 and gpu is not None and has_native_bf16(gpu[2])
    return device, has_bf16, accel.is_fp16_supported()


def set_matmul_precision(device: str, tf32: bool) -> None:
    """On a GPU, let fp32 matmuls use TF32 tensor cores (``train.tf32``), or keep them full fp32."""
    import torch

    if device == "cuda":
        torch.set_float32_matmul_precision("high" if tf32 else "highest")


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Run:
    engine: Any
    train_loader: Any
    eval_loader: Any
    total_steps: int
    n_params: int
    ds_config: dict[str, Any]
    precision: str
    tokenizer: Any
    resume_from: Any  # the checkpoint folder to continue from, or None
    rss_before_model: int = 0  # this rank's host memory before the model was built, in bytes


def compute_total_steps(cfg: RunConfig, n_train_samples: int | None, world_size: int) -> int:
    """``train.max_steps``, or ``train.epochs`` worth of optimizer steps over the train split."""
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    if n_train_samples is None:
        raise ConfigError("data.streaming has no known length: set train.max_steps instead of train.epochs")
    per_rank_batches = (n_train_samples // world_size) // cfg.train.micro_batch_size
    steps_per_epoch = per_rank_batches // cfg.train.grad_accum_steps
    if steps_per_epoch == 0:
        raise ConfigError(
            f"one epoch of {n_train_samples} samples is less than one global batch; "
            f"lower train.micro_batch_size or train.grad_accum_steps"
        )
    return max(1, int(cfg.train.epochs * steps_per_epoch))


def build_run(cfg: RunConfig, ds_template: dict[str, Any], ds_source: str) -> Run:
    """Tokenizer, data, model and DeepSpeed engine for this rank, after ``init_distributed``."""
    import deepspeed
    import psutil
    from deepspeed.accelerator import get_accelerator

    from llm_ds.data.loader import build_loaders
    from llm_ds.model import build_model, build_tokenizer, count_parameters, param_groups, resolve_vocab_size
    from llm_ds.monitor.metrics import reset_peak_rss

    rank, local_rank, world_size = dist_env()
    accel = get_accelerator()
    is_cuda = accel.device_name() != "cpu"
    seed_everything(cfg.train.seed)

    tokenizer = build_tokenizer(cfg.data.tokenizer)
    loaders = build_loaders(
        cfg.data,
        tokenizer,
        cfg.train.micro_batch_size,
        rank,
        world_size,
        local_rank,
        cfg.train.seed,
        cfg.train.eval_max_batches,
        pin_memory=is_cuda,
    )
    total_steps = compute_total_steps(cfg, loaders.n_train_samples, world_size)

    precision = resolve_precision(cfg.train.precision, ds_template, *device_precisions())
    set_matmul_precision(accel.device_name(), cfg.train.tf32)
    ds_config = resolve_ds_config(ds_template, cfg, world_size, precision, total_steps, ds_source)
    if rank == 0:
        from llm_ds.monitor.metrics import redact

        out = cfg.output_dir
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(redact(dump_run_config(cfg)))
        (out / "ds_config.json").write_text(redact(json.dumps(ds_config, indent=2)) + "\n")
    n_train = f"{loaders.n_train_samples:,}" if loaders.n_train_samples is not None else "streamed"
    logger.info(
        "data: %s train and %s validation samples of %d tokens; %d steps of %d sequences",
        n_train,
        f"{len(loaders.eval.dataset):,}",
        cfg.data.block_size,
        total_steps,
        ds_config["train_batch_size"],
    )

    vocab_size = resolve_vocab_size(cfg.model, len(tokenizer))
    # What the model, optimizer and training add to host memory is measured from here.
    rss_before_model = psutil.Process().memory_info().rss
    reset_peak_rss()
    # ZeRO-3 partitions the model as it is built, so no rank ever holds all of it.
    with deepspeed.zero.Init(config_dict_or_path=ds_config, enabled=zero_stage(ds_config) == 3):
        model = build_model(cfg.model, vocab_size, tokenizer.eos_token_id, seed=cfg.train.seed)
    n_positions = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    if n_positions is not None and cfg.data.block_size > n_positions:
        raise ConfigError(
            f"data.block_size={cfg.data.block_size} is longer than the model's {n_positions} positions"
            f"{f' (model.init_from={cfg.model.init_from})' if cfg.model.init_from else ''}"
        )
    n_params = count_parameters(model)
    uses_tf32 = precision == "fp32" and is_cuda and cfg.train.tf32
    logger.info(
        "Model parameters: %s (%d layers, %d wide, %d heads, vocab %d); "
        "precision %s%s, ZeRO stage %d, %d rank(s) on %s",
        f"{n_params:,}",
        cfg.model.n_layer,
        cfg.model.n_embd,
        cfg.model.n_head,
        vocab_size,
        precision,
        " (TF32 matmuls; train.tf32=false for full fp32)" if uses_tf32 else "",
        zero_stage(ds_config),
        world_size,
        accel.device_name(),
    )

    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, cfg.train.weight_decay), config=ds_config
    )
    if cfg.train.compile:
        engine.compile()  # compiled lazily, on the first forward
    resume_from = find_resume_point(cfg)
    if resume_from is not None:
        complete, _ = list_checkpoints(resume_from.parent)
        earlier = [c for c in complete if step_of(c) < step_of(resume_from)]
        verify(resume_from, earlier[-1] if earlier else None)
        check_compatible(resume_from, cfg, world_size, tokenizer)
    return Run(
        engine,
        loaders.train,
        loaders.eval,
        total_steps,
        n_params,
        ds_config,
        precision,
        tokenizer,
        resume_from,
        rss_before_model,
    )


def perf_model(cfg: RunConfig, run: Run) -> tuple[int, float | None]:
    """Training FLOPs per token of this model, and the device's peak TFLOP/s (None where unknown)."""
    import torch

    from llm_ds.hardware import peak_tflops
    from llm_ds.monitor.metrics import training_flops_per_token

    mc = run.engine.module.config
    n_embd = getattr(mc, "n_embd", None) or mc.hidden_size
    n_layer = getattr(mc, "n_layer", None) or mc.num_hidden_layers
    n_positions = getattr(mc, "n_positions", 0)  # GPT-2's learned position table (not in rotary models)
    flops = training_flops_per_token(run.n_params, n_positions * n_embd, n_layer, n_embd, cfg.data.block_size)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return flops, peak_tflops(device, run.precision, cfg.logging.peak_tflops, tf32=cfg.train.tf32)


def fit_and_report(cfg: RunConfig, run: Run, start_time: float) -> int:
    """Resume if there is a checkpoint, train, then (rank 0) write ``summary.json`` and say where everything went."""

    from llm_ds import checkpoint
    from llm_ds.control import Control
    from llm_ds.monitor import build_monitor
    from llm_ds.monitor.metrics import redact
    from llm_ds.trainer import Trainer, write_summary

    rank, local_rank, world_size = dist_env()
    out = cfg.output_dir
    manifest = checkpoint.build_manifest(world_size, start_time, run.tokenizer)

    def saver(step: int, state: dict[str, Any]):
        state = {**state, "wandb_run_id": monitor.wandb_run_id()}
        return checkpoint.save(run.engine, cfg, step, state, rank, local_rank, manifest, run.ds_config, run.tokenizer)

    resumed = checkpoint.load(run.engine, run.resume_from, rank) if run.resume_from else None
    resume_step = resumed["step"] if resumed else 0
    if resumed and resume_step >= run.total_steps:
        # Nothing left to train: the finished run's outputs, summary.json included, stay as they are.
        logger.info(
            "%s is already at step %d of %d: nothing to train (--set checkpoint.resume=never starts over)",
            run.resume_from,
            resume_step,
            run.total_steps,
        )
        _finish()
        return 0
    if resumed:
        logger.info("resuming from %s at step %d of %d", run.resume_from, resume_step, run.total_steps)
    texts = {"config/run": dump_run_config(cfg), "config/deepspeed": json.dumps(run.ds_config, indent=2)}
    monitor = build_monitor(
        cfg.logging,
        out,
        cfg.run_name,
        run.total_steps,
        rank == 0,
        texts,
        hparams={**cfg.to_dict(), "deepspeed": run.ds_config},
        resume_step=resume_step,
        wandb_run_id=resumed.get("wandb_run_id") if resumed else None,
    )
    control = Control(rank, cfg.checkpoint.save_trigger)
    flops, peak = perf_model(cfg, run)
    trainer = Trainer(
        cfg,
        run.engine,
        run.train_loader,
        run.eval_loader,
        monitor,
        run.total_steps,
        world_size,
        run.n_params,
        saver=saver,
        control=control,
        first_loss=monitor.first_train_loss(),
        flops_per_token=flops,
        peak_tflops=peak,
        rss_before_model=run.rss_before_model,
    )
    if resumed:
        trainer.restore(resumed)
    try:
        summary = trainer.fit()
    finally:
        control.close()
        monitor.close()
    summary.update(
        precision=run.precision,
        zero_stage=zero_stage(run.ds_config),
        wall_s=time.time() - start_time,
        seconds_to_first_step=trainer.first_step_at - start_time if trainer.first_step_at else None,
        resumed_from=str(run.resume_from) if run.resume_from else None,
        resumed_at_step=resume_step,
    )
    if rank == 0:
        write_summary(out / "summary.json", redact(summary))
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
            out / "summary.json",
            cfg.checkpoint_dir,
            out / "tensorboard",
        )
    _finish()
    return 0


def _finish() -> None:
    """Wait for every rank, then tear the process group down before the interpreter does, so no
    communication thread outlives it."""
    import deepspeed.comm as dist
    import torch.distributed

    dist.barrier()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
