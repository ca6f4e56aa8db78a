"""``Trainer``: one training run around a DeepSpeed engine, built from a run config or from the user's
model and datasets; ``fit`` trains, evaluates and saves on schedule and returns the summary.

Host syncs (``.item()``, ``.tolist()``, collectives) happen only at log, eval and save points:
between them the loss is accumulated on the device.
"""

from __future__ import annotations

import contextlib
import json
import logging
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from llm_ds.checkpoint import CheckpointError
from llm_ds.config import IGNORE_INDEX, ConfigError, RunConfig, dump_run_config
from llm_ds.ds_config import (
    check_job,
    ds_config_source,
    global_batch_size,
    load_ds_template,
    resolve_ds_config,
    resolve_precision,
    zero_stage,
)
from llm_ds.summary import RunSummary, log_summary, perplexity, write_summary

logger = logging.getLogger("llm_ds")


class TrainerCallback:
    """Hooks into ``Trainer.fit``; override the ones you need (each is a no-op here).

    Called on every rank, in this order after each optimizer step: ``on_step_end``, then ``on_log`` at a
    log point, ``on_log`` and ``on_evaluate`` at an evaluation, ``on_save`` after a checkpoint. A callback
    that raises stops the run with that error, after a checkpoint is saved where possible.
    """

    def on_step_end(self, trainer: Trainer, step: int) -> None:
        """After optimizer step ``step`` (1-based)."""

    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        """``record`` is the dict written as one ``metrics.jsonl`` line (training or evaluation)."""

    def on_evaluate(self, trainer: Trainer, eval_loss: float) -> None:
        """After an evaluation: the token-weighted mean loss over the validation data, all ranks together."""

    def on_save(self, trainer: Trainer, checkpoint_dir: Path) -> None:
        """After a complete checkpoint was written to ``checkpoint_dir``. With ``checkpoint.async``, at the step
        boundary where this rank learns of it, which can differ between ranks: no collectives here."""


@dataclass
class TrainState:
    """Counters saved with every checkpoint (the data position is the loader's own state)."""

    step: int = 0  # optimizer steps done
    tokens_seen: int = 0  # positions trained on, all ranks
    real_tokens_seen: int = 0  # of which real tokens (not padding), all ranks
    first_train_loss: float | None = None  # step 1's loss, kept across resumes


def _check_padding_at_the_end(batch: dict[str, torch.Tensor]) -> None:
    """Pipelines pass no attention mask between stages: padding may only follow a row's tokens."""
    mask = batch.get("attention_mask")
    if mask is not None and bool((mask[:, 1:] > mask[:, :-1]).any()):
        raise ConfigError(
            "`parallel.pipeline`: a batch's attention_mask has padding before tokens; pipelines take packed "
            "blocks, or rows padded at the end"
        )


def _whole_gpt2(config) -> torch.nn.Module:
    """A GPT-2 of ``config`` without memory (on the meta device): for its parameter count and description."""
    from transformers import GPT2LMHeadModel

    with torch.device("meta"):
        return GPT2LMHeadModel(config)


def compute_total_steps(cfg: RunConfig, n_train_samples: int | None, world_size: int) -> int:
    """``train.max_steps``, or ``train.epochs`` worth of optimizer steps over the train split."""
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    if n_train_samples is None:
        raise ConfigError("data.streaming has no known length: set train.max_steps instead of train.epochs")
    steps_per_epoch = n_train_samples // global_batch_size(cfg, world_size)
    if steps_per_epoch == 0:
        raise ConfigError(
            f"one epoch of {n_train_samples} samples is less than one global batch; "
            f"lower train.micro_batch_size or train.grad_accum_steps"
        )
    return max(1, int(cfg.train.epochs * steps_per_epoch))


class Trainer:
    """One training run: data, model and DeepSpeed engine are built here, ``fit()`` trains.

    Args:
        cfg: the run config (``load_run_config``, ``RunConfig.from_dict`` or built in code; checked here).
        ds_config: a DeepSpeed JSON template: a path, a dict, or None for ``ds_configs/zero1.json``.
        model: a module whose forward, given a batch (``input_ids``, ``labels``, maybe ``attention_mask``),
            returns an output with ``.loss``; or a function of no arguments that builds one (called inside
            ``deepspeed.zero.Init`` under ZeRO-3, so no rank holds the whole model). None: GPT-2 from
            ``cfg.model``.
        tokenizer: None builds ``cfg.data.tokenizer`` where it is needed (data or vocabulary from the config).
        train_dataset, eval_dataset: map-style datasets of dicts with ``input_ids`` (and optionally ``labels``,
            ``attention_mask``). None for ``train_dataset``: both built from ``cfg.data`` (an ``eval_dataset``
            given replaces the validation split). With a ``train_dataset`` and no ``eval_dataset``, nothing is
            evaluated.
        callbacks: ``TrainerCallback`` instances.
        handle_signals: SIGTERM and SIGINT mean "save at a step boundary and stop" during ``fit()``. The
            driver sets it; in a notebook leave it off, so an interrupt stays an interrupt.
        started_at: the ``time.time()`` the run's clock starts from (``wall_s``); default: now.
    """

    def __init__(
        self,
        cfg: RunConfig,
        ds_config: str | Path | dict | None = None,
        model: torch.nn.Module | Callable[[], torch.nn.Module] | None = None,
        tokenizer=None,
        train_dataset=None,
        eval_dataset=None,
        callbacks: Sequence[TrainerCallback] = (),
        handle_signals: bool = False,
        started_at: float | None = None,
    ):
        from llm_ds.checkpoint import find_resume_point, fit_world_size, saved_world_size, seed_rng
        from llm_ds.distributed import dist_env, init_distributed, ranks_per_node
        from llm_ds.monitor.logs import setup_logging
        from llm_ds.parallel import Layout, claim_split

        self.started_at = started_at if started_at is not None else time.time()
        if not isinstance(cfg, RunConfig):
            raise ConfigError(f"Trainer: cfg must be a RunConfig (load_run_config, RunConfig.from_dict), got {cfg!r}")
        cfg.check()  # fields may have changed since it was made
        if cfg.parallel.pipeline > 1 and type(self).compute_loss is not Trainer.compute_loss:
            raise ConfigError(
                f"{type(self).__name__}.compute_loss: a pipeline computes its loss on its last stage, from the "
                f"model's loss function; it runs with parallel.pipeline=1 (parallel.tensor takes it)"
            )
        self.cfg, self.callbacks, self.handle_signals = cfg, list(callbacks), handle_signals
        self.ds_source = ds_config_source(ds_config)
        template = load_ds_template(ds_config)
        _, self.local_rank, _ = dist_env()
        init_distributed()
        self.rank, self.world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        setup_logging(self.rank)
        self.resume_from = find_resume_point(cfg)
        self.resize_note = None  # what resuming with the checkpoint's global batch changed
        self.resumed_from_world_size = None
        if self.resume_from is not None:
            self.cfg, self.resize_note = fit_world_size(self.resume_from, cfg, self.world_size)
            self.resumed_from_world_size = saved_world_size(self.resume_from)
            if self.resize_note and self.resumed_from_world_size == self.world_size:
                logger.warning(
                    "train.grad_accum_steps=%d is not the resumed checkpoint's: %s (a run keeps its global batch; "
                    "for another, start a new run from its weights with model.init_from)",
                    cfg.train.grad_accum_steps,
                    self.resize_note,
                )
        check_job(self.cfg, template, self.world_size, self.ds_source)  # before any data or model work
        self.cfg.check_ranks_per_node({platform.node(): ranks_per_node(self.world_size)})
        claim_split(self.cfg.parallel.tensor, self.cfg.parallel.pipeline)
        self.layout = Layout(self.rank, self.world_size, self.cfg.parallel.tensor, self.cfg.parallel.pipeline)
        seed_rng(cfg.train.seed)
        self._build(template, model, tokenizer, train_dataset, eval_dataset)

    # ---- assembly ------------------------------------------------------------------------------

    def _build(self, template: dict, model, tokenizer, train_dataset, eval_dataset) -> None:
        import deepspeed
        import psutil
        from deepspeed.accelerator import get_accelerator

        from llm_ds.hardware import device_precisions, peak_tflops, set_matmul_precision
        from llm_ds.model import build_tokenizer, count_parameters, param_groups
        from llm_ds.monitor.metrics import redact, reset_peak_rss
        from llm_ds.monitor.step import StepMetrics, model_flops_per_token

        cfg, accel = self.cfg, get_accelerator()
        needs_tokenizer = train_dataset is None or (model is None and cfg.model.vocab_size is None)
        if tokenizer is None and needs_tokenizer:
            tokenizer = build_tokenizer(cfg.data.tokenizer)
        self.tokenizer = tokenizer
        if self.resume_from is not None:
            self._check_resume_point()
        loaders = self._build_loaders(train_dataset, eval_dataset, pin_memory=accel.device_name() != "cpu")
        self.train_loader, self.eval_loader = loaders.train, loaders.eval
        self.total_steps = compute_total_steps(cfg, loaders.n_train_samples, self.world_size)

        self.precision = resolve_precision(cfg.train.precision, template, *device_precisions())
        set_matmul_precision(accel.device_name(), cfg.train.tf32)
        self.ds_config = resolve_ds_config(
            template, cfg, self.world_size, self.precision, self.total_steps, self.ds_source
        )
        if self.rank == 0:
            out = cfg.output_dir
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.yaml").write_text(redact(dump_run_config(cfg)))
            (out / "ds_config.json").write_text(redact(json.dumps(self.ds_config, indent=2)) + "\n")
        if cfg.train.warmup_steps > self.total_steps:
            logger.warning(
                "train.warmup_steps=%d is more than the run's %d steps: the learning rate never reaches "
                "train.lr=%g and never decays (lower train.warmup_steps)",
                cfg.train.warmup_steps,
                self.total_steps,
                cfg.train.lr,
            )
        n_train = f"{loaders.n_train_samples:,}" if loaders.n_train_samples is not None else "streamed"
        n_eval = f"{len(self.eval_loader.dataset):,}" if self.eval_loader is not None else "no"
        logger.info(
            "data: %s train and %s validation samples of %d tokens; %d steps of %d sequences",
            n_train,
            n_eval,
            cfg.data.block_size,
            self.total_steps,
            self.ds_config["train_batch_size"],
        )

        # What the model, optimizer and training add to host memory is measured from here.
        rss_before_model = psutil.Process().memory_info().rss
        reset_peak_rss()
        module = self._build_model(model)
        # A pipeline stage holds a part of the model: the whole one's count comes from its config.
        self.n_params = count_parameters(module if cfg.parallel.pipeline == 1 else _whole_gpt2(module.config))
        engine_config, mpu = self._engine_config(), None
        self.transposed: list[str] = []  # GPT-2 weights held as Linear ([out, in]) for tensor parallelism
        if cfg.parallel.tensor > 1:
            from llm_ds.parallel import tensor

            section, self.transposed = tensor.prepare(module, cfg.parallel.tensor)
            engine_config = {**engine_config, "tensor_parallel": {**engine_config["tensor_parallel"], **section}}
            mpu = tensor.init_groups(cfg.parallel.tensor)
        self.engine, _, _, _ = deepspeed.initialize(
            model=module,
            model_parameters=param_groups(module, cfg.train.weight_decay),
            config=engine_config,
            mpu=mpu,
        )
        if cfg.parallel.tensor > 1:
            tensor.finish(self.engine.module)
        if cfg.train.compile:
            self.engine.compile()  # compiled lazily, on the first forward
        from llm_ds.checkpoint import Checkpointer

        self.checkpointer = Checkpointer(
            self.engine, cfg, self.rank, self.local_rank, self.world_size, background=cfg.checkpoint.async_
        )
        self._saves: list = []  # this process's complete saves (checkpoint.Save)

        self.state = TrainState()
        self.tokens_per_step = self.ds_config["train_batch_size"] * cfg.data.block_size
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        self.metrics = StepMetrics(
            self.engine,
            self.world_size,
            cfg.data.block_size,
            self.tokens_per_step,
            model_flops_per_token(module, self.n_params, cfg.data.block_size),
            peak_tflops(device, self.precision, cfg.logging.peak_tflops, tf32=cfg.train.tf32),
            rss_before_model,
            counts_tokens=self.layout.counts_tokens,
        )
        self.first_step_at: float | None = None  # wall-clock time the first step of this process finished
        self.monitor, self.control, self._manifest = None, None, None
        self._error: Exception | None = None  # the first callback error of this run, or a failed save
        self._checkpoint_failed = False
        self._fitted = False

    def _build_loaders(self, train_dataset, eval_dataset, pin_memory: bool):
        from llm_ds.data.loader import build_dataset_loaders, build_eval_loader, build_loaders, collate

        cfg = self.cfg
        micro, seed = cfg.train.micro_batch_size, cfg.train.seed
        # The ranks of one tensor group read the same batches: only data-parallel ranks split the data.
        rank, ranks = self.layout.data_rank, self.layout.data_size
        if train_dataset is not None:
            return build_dataset_loaders(
                train_dataset,
                eval_dataset,
                cfg.data.block_size,
                micro,
                rank,
                ranks,
                seed,
                cfg.data.num_workers,
                pin_memory,
                grad_accum_steps=cfg.train.grad_accum_steps,
            )
        loaders = build_loaders(
            cfg.data,
            self.tokenizer,
            micro,
            rank,
            ranks,
            self.local_rank,
            seed,
            cfg.train.eval_max_batches,
            pin_memory=pin_memory,
            grad_accum_steps=cfg.train.grad_accum_steps,
        )
        if eval_dataset is not None:
            loader_args = {"collate_fn": collate, "num_workers": cfg.data.num_workers, "pin_memory": pin_memory}
            loaders.eval = build_eval_loader(eval_dataset, cfg.data.block_size, micro, rank, ranks, loader_args)
        return loaders

    def _build_model(self, model) -> torch.nn.Module:
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        from llm_ds.model import build_model, describe_model, resolve_vocab_size

        cfg = self.cfg
        if cfg.parallel.pipeline > 1:
            model = self._build_pipeline(model)
        elif isinstance(model, torch.nn.Module):
            if zero_stage(self.ds_config) == 3:
                logger.info("ZeRO-3 with a model built before the Trainer: every rank held all of it once")
        else:
            # ZeRO-3 partitions the model as it is built, so no rank ever holds all of it; with tensor parallelism
            # each rank builds it whole, once, and keeps its share.
            partitioned = zero_stage(self.ds_config) == 3 and cfg.parallel.tensor == 1
            with deepspeed.zero.Init(config_dict_or_path=self.ds_config) if partitioned else contextlib.nullcontext():
                if model is not None:
                    model = model()
                else:
                    size = len(self.tokenizer) if self.tokenizer is not None else None
                    eos = self.tokenizer.eos_token_id if self.tokenizer is not None else None
                    model = build_model(cfg.model, resolve_vocab_size(cfg.model, size), eos, seed=cfg.train.seed)
            if not isinstance(model, torch.nn.Module):
                raise ConfigError(f"Trainer: model() must return a torch.nn.Module, got {type(model).__name__}")
        mc = getattr(model, "config", None)
        n_positions = getattr(mc, "n_positions", None) or getattr(mc, "max_position_embeddings", None)
        if n_positions is not None and cfg.data.block_size > n_positions:
            raise ConfigError(
                f"data.block_size={cfg.data.block_size} is longer than the model's {n_positions} positions"
                f"{f' (model.init_from={cfg.model.init_from})' if cfg.model.init_from else ''}"
            )
        logger.info(
            "Model parameters: %s; precision %s%s, ZeRO stage %d, %d rank(s)%s on %s",
            describe_model(model if cfg.parallel.pipeline == 1 else _whole_gpt2(model.config)),
            self.precision,
            " (TF32 matmuls; train.tf32=false for full fp32)" if self._uses_tf32() else "",
            zero_stage(self.ds_config),
            self.world_size,
            self._describe_split(),
            get_accelerator().device_name(),
        )
        return model

    def _describe_split(self) -> str:
        p = self.cfg.parallel
        if p.tensor > 1:
            return f" (tensor-parallel {p.tensor} x data-parallel {self.layout.data_size})"
        if p.pipeline > 1:
            return f" (pipeline {p.pipeline} stages x data-parallel {self.layout.data_size})"
        return ""

    def _build_pipeline(self, model) -> torch.nn.Module:
        """GPT-2 of the model section (fresh, or ``model.init_from``'s weights) as a pipeline: this rank builds
        its own stage's layers only (a pretrained model is read whole first)."""
        from llm_ds.model import build_gpt2_config, build_model, resolve_vocab_size
        from llm_ds.parallel import pipeline

        cfg = self.cfg
        if model is not None:
            raise ConfigError(
                "`parallel.pipeline` splits the GPT-2 that the model section describes; a model given to the "
                "Trainer runs with parallel.pipeline=1 (parallel.tensor splits such models)"
            )
        size = len(self.tokenizer) if self.tokenizer is not None else None
        eos = self.tokenizer.eos_token_id if self.tokenizer is not None else None
        vocab = resolve_vocab_size(cfg.model, size)
        pretrained = build_model(cfg.model, vocab, eos, seed=cfg.train.seed) if cfg.model.init_from else None
        if pretrained is not None and getattr(pretrained.config, "model_type", None) != "gpt2":
            raise ConfigError(
                f"model.init_from={cfg.model.init_from} is a {pretrained.config.model_type} model: "
                f"`parallel.pipeline` splits GPT-2 models (parallel.tensor splits others)"
            )
        if pretrained is not None and not getattr(pretrained.config, "tie_word_embeddings", True):
            raise ConfigError(
                f"model.init_from={cfg.model.init_from} has an output head of its own (tie_word_embeddings: "
                f"false): `parallel.pipeline` splits GPT-2 with the head tied to the token table"
            )
        config = pretrained.config if pretrained is not None else build_gpt2_config(cfg.model, vocab, eos)
        if cfg.parallel.pipeline > config.n_layer:
            raise ConfigError(
                f"`parallel.pipeline` must be <= the model's {config.n_layer} layers, got {cfg.parallel.pipeline}"
            )
        module = pipeline.build_pipeline(
            config,
            cfg.parallel.pipeline,
            cfg.train.seed,
            fused_loss=cfg.model.fused_loss,
            chunk_tokens=cfg.model.loss_chunk_tokens,
            activation_checkpointing=cfg.model.activation_checkpointing,
            seq=cfg.data.block_size,
        )
        logger.info(
            "pipeline: %s blocks on stages 0-%d (the last also runs the output head and the loss)",
            " + ".join(str(n) for n in module.stage_blocks),
            cfg.parallel.pipeline - 1,
        )
        stages, micro_batches = cfg.parallel.pipeline, cfg.train.grad_accum_steps
        if micro_batches < 2 * stages:
            logger.warning(
                "pipeline: %d micro-batch(es) per step through %d stages leave each stage idle %.0f%% of the step "
                "(the bubble, (stages - 1) / (micro-batches + stages - 1)); raise train.grad_accum_steps (and "
                "lower train.micro_batch_size to keep the batch)",
                micro_batches,
                stages,
                100 * (stages - 1) / (micro_batches + stages - 1),
            )
        if pretrained is not None:
            pipeline.load_gpt2_weights(module, pretrained.state_dict())
        return module

    def _uses_tf32(self) -> bool:
        return self.precision == "fp32" and torch.cuda.is_available() and self.cfg.train.tf32

    def _check_resume_point(self) -> None:
        from llm_ds.checkpoint import check_compatible, list_checkpoints, step_of, verify

        complete, _ = list_checkpoints(self.resume_from.parent)
        earlier = [c for c in complete if step_of(c) < step_of(self.resume_from)]
        verify(self.resume_from, earlier[-1] if earlier else None)
        check_compatible(self.resume_from, self.cfg, self.tokenizer)

    def _engine_config(self) -> dict[str, Any]:
        """The DeepSpeed config the engine is built with: ours, plus ``load_universal`` where the checkpoint
        resumed from holds another world size's ZeRO shards (converted here, once, by rank 0)."""
        from llm_ds.checkpoint import needs_universal, universal_for

        if self.resume_from is None or not needs_universal(self.resume_from, self.world_size):
            return self.ds_config
        start = time.perf_counter()
        universal = universal_for(self.resume_from, self.rank)
        logger.info(
            "%s: ZeRO-%d shards of another world size, loaded through DeepSpeed's universal checkpoint (%s, %.1f s)",
            self.resume_from,
            zero_stage(self.ds_config),
            universal,
            time.perf_counter() - start,
        )
        return {**self.ds_config, "checkpoint": {**self.ds_config.get("checkpoint", {}), "load_universal": True}}

    # ---- the step, the loss, evaluation ----------------------------------------------------------

    def compute_loss(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The scalar loss of a micro-batch, for training and evaluation alike: override it to change the
        loss. ``batch`` holds ``input_ids`` and ``labels`` (unshifted: the model shifts them by one itself,
        ``-100`` where a position is not scored), and ``attention_mask`` where there is padding."""
        return model(**batch).loss

    def _next_batch(self) -> dict[str, torch.Tensor]:
        start = time.perf_counter()
        host_batch = next(self._batches)
        wait_s = time.perf_counter() - start
        if self.cfg.parallel.pipeline > 1:
            _check_padding_at_the_end(host_batch)
        batch = {k: v.to(self.engine.device, non_blocking=True) for k, v in host_batch.items()}
        self.metrics.count_batch(batch, wait_s)
        return batch

    def train_step(self) -> torch.Tensor:
        """One optimizer step over ``grad_accum_steps`` micro-batches; returns the mean loss, on device.

        A pipeline runs its own schedule over the micro-batches (``engine.train_batch``): its first and last
        stages draw them, and the last stage's loss function is the model's (``compute_loss`` is not called)."""
        if self.cfg.parallel.pipeline > 1:
            mean = self.engine.train_batch(self._pipeline_feed).detach().float()
        else:
            loss_sum = torch.zeros((), device=self.engine.device)
            accum = self.cfg.train.grad_accum_steps
            for _ in range(accum):
                loss = self.compute_loss(self.engine, self._next_batch())
                self.engine.backward(loss)
                self.engine.step()
                loss_sum += loss.detach().float()
            mean = loss_sum / accum
        self.state.step += 1
        self.state.tokens_seen += self.tokens_per_step
        return mean

    def _pipeline_batches(self, batches) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Micro-batches as a pipeline takes them: (inputs for the first stage, labels for the last). A causal
        model needs no attention mask where padding only ever follows the tokens (as ``data.packing: false``
        pads): no real token attends to a later position."""
        for batch in batches:
            yield batch["input_ids"], batch["labels"]

    @torch.no_grad()
    def evaluate(self) -> float:
        """Token-weighted mean loss over the validation data, all ranks together (the same on every rank)."""
        import deepspeed.comm as dist

        if self.eval_loader is None:
            raise ConfigError("Trainer.evaluate: there is no evaluation data (pass eval_dataset=...)")
        device = self.engine.device
        self.engine.eval()
        sums = torch.zeros(2, device=device, dtype=torch.float64)
        limit = self.cfg.train.eval_max_batches
        shape = None  # a pipeline's stages exchange buffers of the last batch's shape: renewed when it changes
        for i, batch in enumerate(self.eval_loader):
            if limit is not None and i >= limit:
                break
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            n_targets = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
            if self.cfg.parallel.pipeline > 1:  # every stage of a pipeline gets its last stage's loss
                if batch["input_ids"].shape != shape:
                    shape = batch["input_ids"].shape
                    self.engine.reset_activation_shape()
                _check_padding_at_the_end(batch)
                # The last stage's loss function sums over the scored targets, and the engine averages that
                # over the data-parallel ranks: n_targets weighs each pipeline's batch exactly.
                with self.engine.module.loss_fn.summed():
                    total = self.engine.eval_batch(self._pipeline_batches([batch]), num_micro_batches=1)
                sums[0] += total.double().reshape(())
            else:
                sums[0] += self.compute_loss(self.engine, batch).double() * n_targets
            sums[1] += n_targets
        if shape is not None:
            self.engine.reset_activation_shape()  # training's shape again
        dist.all_reduce(sums)
        self.engine.train()
        return (sums[0] / sums[1]).item()

    # ---- checkpoints -----------------------------------------------------------------------------

    def training_state(self) -> dict[str, Any]:
        """What a checkpoint must hold to continue exactly: counters and the data position."""
        return {**asdict(self.state), "data": self.train_loader.state_dict()}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint's ``training_state()``."""
        self.state = TrainState(**{k: state[k] for k in ("step", "tokens_seen", "real_tokens_seen")})
        self.state.first_train_loss = state.get("first_train_loss")
        self.train_loader.load_state_dict(state["data"])

    def save_checkpoint(self, wait: bool = True) -> Path | None:
        """Save a checkpoint of this step (a collective: every rank calls it); returns its folder.

        ``wait=False`` with ``checkpoint.async: true``: return once the states are copied; the files are
        written behind the next steps (the result comes at a step boundary in ``fit``, or ``finish_saves()``).
        A save asked for while one is in flight waits for it first. A failed save (on any rank) reaches every
        rank: in ``fit`` the run stops a step or two later on all of them and ``fit`` raises it; outside
        ``fit`` this raises it, a ``CheckpointError`` naming the checkpoint that stays the latest (and returns
        None where the save in flight before this one failed).
        """
        from llm_ds import checkpoint

        if self._manifest is None:
            self._manifest = checkpoint.build_manifest(self.world_size, self.started_at, self.tokenizer)
            self._manifest["transposed"] = self.transposed
        state = {**self.training_state(), "wandb_run_id": self.monitor.wandb_run_id() if self.monitor else None}
        save, before = self.checkpointer.save(self.state.step, state, self._manifest, self.ds_config, self.tokenizer)
        if before is not None:
            self._saved(before)
        if save is None:
            return None  # the save before failed: the run stops (fit), or the caller has the error
        if self.checkpointer.pending is None:
            self._saved(save)
        elif wait:
            self.finish_saves()
        return save.path

    def finish_saves(self) -> None:
        """Wait for a save in flight (a collective); outside ``fit``, raises its failure."""
        save = self.checkpointer.finish()
        if save is not None:
            self._saved(save)

    def _saved(self, save) -> None:
        """A save's result is in: report it (console, metrics), run ``on_save``; or stop the run if it failed."""
        if save.failed:
            error = CheckpointError(self.checkpointer.failure_message(save))
            logger.error("%s", error)
            if self.control is None:
                raise error
            if self._error is None:
                self._error = error
            self._checkpoint_failed = True
            self.control.request_stop("checkpoint failed")
            return
        self._saves.append(save)
        if self.rank == 0:
            if save.waited_out:
                background = f"; training waited {save.stall_s:.2f} s for it (the run's last save)"
            elif save.thread_started:
                background = f" in the background; training waited {save.stall_s:.2f} s"
            else:
                background = ""
            logger.info(
                "saved checkpoint %s in %.1f s (%.2f GB, %.2f GB/s)%s",
                save.path,
                save.write_s,
                save.bytes / 1e9,
                save.record()["ckpt/write_gbs"],
                background,
            )
            if self.monitor is not None:
                self.monitor.write(save.record())
        self._callback("on_save", save.path)

    # ---- callbacks -------------------------------------------------------------------------------

    def _callback(self, hook: str, *args) -> None:
        """Run ``hook`` of every callback. The first error asks every rank to save and stop; ``fit`` raises
        it once the run has stopped."""
        for cb in self.callbacks:
            try:
                getattr(cb, hook)(self, *args)
            except Exception as exc:
                if self.control is None:  # not in fit(): nothing to stop, the caller gets it
                    raise
                if self._error is None:
                    self._error = exc
                    logger.error("%s.%s raised %r: saving, then stopping", type(cb).__name__, hook, exc)
                    self.control.request_stop(f"{type(exc).__name__} in {type(cb).__name__}.{hook}")

    # ---- the run ---------------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        """Resume from the latest checkpoint if there is one, train to the last step, evaluating and saving
        on schedule; return the summary (rank 0 also writes it to ``summary.json``).

        The process group stays up: another ``Trainer`` may follow in this process.
        """
        from llm_ds import checkpoint

        if self._fitted:
            raise RuntimeError("Trainer.fit() runs once per Trainer: make a new Trainer for another run")
        self._fitted = True
        resumed = (
            checkpoint.load(self.engine, self.resume_from, self.rank, self.cfg.train.seed) if self.resume_from else None
        )
        if resumed:
            self.restore(resumed)
            if self.state.step >= self.total_steps:
                return self._finished_already()
            logger.info(
                "resuming from %s at step %d of %d%s",
                self.resume_from,
                self.state.step,
                self.total_steps,
                f" {self.resize_note}" if self.resize_note else "",
            )
        self._open(resumed)
        control = self.control
        try:
            summary = self._loop(resume_step=self.state.step)
        finally:
            control.close()
            self.monitor.close()
            self.control = None
        if self.rank == 0:
            from llm_ds.monitor.metrics import redact

            write_summary(self.cfg.output_dir / "summary.json", redact(summary))
            log_summary(summary, self.cfg.output_dir, self.cfg.checkpoint_dir)
        from llm_ds.distributed import barrier

        barrier()
        control.forget()  # not before: a rank that did not see the signal reads why the run stopped from the store
        if self._error is not None:
            raise self._error
        return summary

    def _open(self, resumed: dict[str, Any] | None) -> None:
        """The monitor (sinks on rank 0) and the control of this run."""
        from llm_ds.control import Control
        from llm_ds.monitor import build_monitor

        cfg = self.cfg
        texts = {"config/run": dump_run_config(cfg), "config/deepspeed": json.dumps(self.ds_config, indent=2)}
        self.monitor = build_monitor(
            cfg.logging,
            cfg.output_dir,
            cfg.run_name,
            self.total_steps,
            self.rank == 0,
            texts,
            hparams={**cfg.to_dict(), "deepspeed": self.ds_config},
            resume_step=self.state.step,
            wandb_run_id=resumed.get("wandb_run_id") if resumed else None,
        )
        self.control = Control(self.rank, cfg.checkpoint.save_trigger, self.handle_signals)

    def _finished_already(self) -> dict[str, Any]:
        """A run resumed at its last step: nothing to train; its outputs, summary.json included, stay."""
        logger.info(
            "%s is already at step %d of %d: nothing to train (--set checkpoint.resume=never starts over)",
            self.resume_from,
            self.state.step,
            self.total_steps,
        )
        path = self.cfg.output_dir / "summary.json"
        return json.loads(path.read_text()) if path.is_file() else {"steps": self.state.step}

    def _loop(self, resume_step: int) -> dict[str, Any]:
        cfg, state = self.cfg, self.state
        log_every, eval_every, ckpt_every = cfg.logging.log_interval, cfg.train.eval_interval, cfg.checkpoint.interval
        self.engine.train()
        self._batches = iter(self.train_loader)
        self._pipeline_feed = self._pipeline_batches(iter(self._next_batch, None))
        fit_start = time.perf_counter()
        interval_loss = torch.zeros((), device=self.engine.device, dtype=torch.float64)
        interval_steps, interval_start = 0, time.perf_counter()
        train_time_s, timed_tokens = 0.0, 0
        last_loss, eval_loss, stopped_by = None, None, None
        while state.step < self.total_steps:
            interval_loss += self.train_step()
            interval_steps += 1
            step = state.step
            self._callback("on_step_end", step)
            if self.checkpointer.pending is not None:
                done = self.checkpointer.poll()
                if done is not None:
                    self._saved(done)
            if step == 1 or step % log_every == 0 or step == self.total_steps:
                from deepspeed.accelerator import get_accelerator

                get_accelerator().synchronize()  # queued device work belongs to this interval's time
                if self.first_step_at is None:
                    self.first_step_at = time.time()
                elapsed = time.perf_counter() - interval_start
                record, real_tokens = self.metrics.log_point(
                    step, interval_steps, elapsed, interval_loss, state.tokens_seen, self.train_loader
                )
                state.real_tokens_seen += real_tokens
                last_loss = record["train/loss"]
                if state.first_train_loss is None:
                    state.first_train_loss = last_loss
                if step > 1:  # the first step carries one-off warm-up costs
                    train_time_s += elapsed
                    timed_tokens += interval_steps * self.tokens_per_step
                self.monitor.log_train(record)
                self._callback("on_log", record)
                interval_loss.zero_()
                interval_steps, interval_start = 0, time.perf_counter()
            pause_start = time.perf_counter()
            if self.eval_loader is not None and ((eval_every and step % eval_every == 0) or step == self.total_steps):
                eval_loss = self.evaluate()
                record = {"step": step, "eval/loss": eval_loss, "eval/perplexity": perplexity(eval_loss)}
                self.monitor.log_eval(record)
                self._callback("on_log", record)
                self._callback("on_evaluate", eval_loss)
            save_now, stop_now = self.control.poll(step)
            last = step == self.total_steps
            background = not (last or stop_now)  # the run's last save is complete before it ends
            if self._checkpoint_failed:
                pass  # a save failed: the run stops at the step every rank agreed on, without saving again
            elif (ckpt_every and step % ckpt_every == 0) or (last and cfg.checkpoint.save_final) or save_now:
                self.save_checkpoint(wait=not background)
            elif last and self._stop_pending():
                self.save_checkpoint()  # a stop was asked for too late to take effect: keep the last state
            # Evaluation and checkpoint time does not count as step time.
            interval_start += time.perf_counter() - pause_start
            if stop_now:
                stopped_by = self.control.stop_reason()
                saved = "" if self._checkpoint_failed else ", checkpoint saved"
                logger.info("stopped after step %d (%s)%s", step, stopped_by, saved)
                break
        if stopped_by is None and self._stop_pending():
            stopped_by = self.control.stop_reason()
        self.finish_saves()  # the last save is complete, or its failure known, on every rank alike
        tokens_per_s = timed_tokens / train_time_s if train_time_s > 0 else None
        memory = self.metrics.rank_memory
        return RunSummary(
            steps=state.step,
            world_size=self.world_size,
            tokens_seen=state.tokens_seen,
            first_train_loss=state.first_train_loss,
            final_train_loss=last_loss,
            final_eval_loss=eval_loss,
            eval_perplexity=perplexity(eval_loss),
            tokens_per_s=tokens_per_s,
            train_time_s=train_time_s,
            fit_wall_s=time.perf_counter() - fit_start,
            parameters=self.n_params,
            global_batch_size=self.ds_config["train_batch_size"],
            block_size=cfg.data.block_size,
            epochs=self._epochs(),
            real_token_fraction=state.real_tokens_seen / max(1, state.tokens_seen),
            stopped_by=stopped_by,
            skipped_steps=int(self.engine.skipped_steps),
            mfu=self.metrics.run_mfu(tokens_per_s),
            peak_memory_bytes=max(m[2] for m in memory),
            host_rss_before_model_bytes=[m[0] for m in memory],
            host_peak_rss_bytes=[m[1] for m in memory],
            device_max_allocated_bytes=[m[2] for m in memory],
            precision=self.precision,
            zero_stage=zero_stage(self.ds_config),
            wall_s=time.time() - self.started_at,
            seconds_to_first_step=self.first_step_at - self.started_at if self.first_step_at else None,
            resumed_from=str(self.resume_from) if self.resume_from else None,
            resumed_at_step=resume_step,
            resumed_from_world_size=self.resumed_from_world_size,
            grad_accum_steps=cfg.train.grad_accum_steps,
            tensor_parallel=cfg.parallel.tensor,
            pipeline_parallel=cfg.parallel.pipeline,
            data_parallel_size=self.layout.data_size,
            checkpoints_saved=len(self._saves),
            checkpoint_stall_s=sum(s.stall_s for s in self._saves),
            checkpoint_wait_s=sum(s.wait_s for s in self._saves),
            checkpoint_async=cfg.checkpoint.async_,
            checkpoint_host_bytes=self.checkpointer.staged_bytes,
        ).to_dict()

    def _stop_pending(self) -> bool:
        """Whether any rank has asked to stop (an error, a signal): one all-reduce, the same answer on every rank."""
        import deepspeed.comm as dist

        flag = torch.tensor(float(self.control.reason is not None), device=self.engine.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _epochs(self) -> float | None:
        per_epoch = self.train_loader.batches_per_epoch()
        if not per_epoch:
            return None
        loader = self.train_loader
        return loader.epoch + loader.consumed / (per_epoch * self.cfg.train.micro_batch_size)
