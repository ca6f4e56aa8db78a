"""Checkpoints that are complete or ignored, resume exactly, and describe themselves.

A checkpoint is ``<checkpoint.dir>/global_step<N>/``: DeepSpeed's sharded files plus ours under
``llm_ds/`` (training state and data position as JSON, each rank's RNG states as JSON, the
resolved configs, the tokenizer, a manifest). After every rank has written its shards, rank 0
writes ``COMPLETE`` (the list of files and their sizes) and only then moves the ``latest``
pointer, atomically. A folder without ``COMPLETE`` is never resumed from. Loading reads JSON and
DeepSpeed's own files; nothing of ours is unpickled.

A checkpoint resumes on another number of ranks with the same global batch (``fit_world_size``).
DeepSpeed's ZeRO shards are per rank: they are converted once, by DeepSpeed's ``ds_to_universal``,
into its universal form (per-parameter fp32 weights and optimizer states) under ``<tag>/universal/``,
which any number of ranks loads (``"checkpoint": {"load_universal": true}``).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from llm_ds.checkpoint_writer import OK
from llm_ds.config import ConfigError, RunConfig, UserError, dump_run_config
from llm_ds.monitor.metrics import redact

logger = logging.getLogger("llm_ds")
COMPLETE = "COMPLETE"
LATEST = "latest"
OURS = "llm_ds"
UNIVERSAL = "universal"  # DeepSpeed's universal form of a checkpoint, inside it
_TAG = re.compile(r"^global_step(\d+)$")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be resumed from; the message names the file and what to do."""


def tag_for(step: int) -> str:
    return f"global_step{step}"


def step_of(path: Path) -> int:
    return int(_TAG.match(path.name).group(1))


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file()


def list_checkpoints(ckpt_dir: Path) -> tuple[list[Path], list[Path]]:
    """``(complete, incomplete)`` checkpoint folders, each sorted by step."""
    if not ckpt_dir.is_dir():
        return [], []
    tags = sorted((p for p in ckpt_dir.iterdir() if p.is_dir() and _TAG.match(p.name)), key=step_of)
    return [p for p in tags if is_complete(p)], [p for p in tags if not is_complete(p)]


# ---- RNG state as JSON -------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    import numpy as np
    import torch
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    np_state = np.random.get_state()
    state = {
        "python": _to_json(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state().tolist(),
    }
    if accel.device_name() != "cpu":
        state["accelerator"] = accel.get_rng_state().tolist()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch
    from deepspeed.accelerator import get_accelerator

    random.setstate(_from_json(state["python"]))
    np.random.set_state((state["numpy"][0], np.asarray(state["numpy"][1], dtype=np.uint32), *state["numpy"][2:]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "accelerator" in state:
        get_accelerator().set_rng_state(torch.tensor(state["accelerator"], dtype=torch.uint8))


def seed_rng(seed: int) -> None:
    """Python's, NumPy's and torch's generators (every device's too) from one seed."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _to_json(value):
    return [_to_json(v) for v in value] if isinstance(value, tuple) else value


def _from_json(value):
    return tuple(_from_json(v) for v in value) if isinstance(value, list) else value


# ---- manifest and fingerprints -----------------------------------------------------------------


def tokenizer_fingerprint(tokenizer) -> str | None:
    """A hash of the tokenizer's vocabulary and rules (None without a tokenizer: the user's own data)."""
    if tokenizer is None:
        return None
    from llm_ds.data.cache import tokenizer_text

    return hashlib.sha256(tokenizer_text(tokenizer).encode()).hexdigest()[:16]


def _git(args: list[str]) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], capture_output=True, text=True, timeout=5, cwd=Path(__file__).resolve().parent
        )
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def build_manifest(world_size: int, start_time: float, tokenizer) -> dict[str, Any]:
    import deepspeed
    import torch
    import transformers

    dirty = _git(["status", "--porcelain", "--untracked-files=no"])
    return {
        "git_commit": _git(["rev-parse", "HEAD"]),
        "git_dirty": bool(dirty) if dirty is not None else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "transformers": transformers.__version__,
        "hostfile": os.environ.get("LLM_DS_HOSTFILE"),
        "hosts": sorted({os.environ.get("HOSTNAME", platform.node())}),
        "world_size": world_size,
        "start_time": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(start_time)),
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
    }


# ---- save --------------------------------------------------------------------------------------


@dataclass
class Save:
    """One checkpoint's save, from the request to its result."""

    step: int
    path: Path
    started: float  # perf_counter at the request
    writer: Any  # checkpoint_writer.Writer
    thread: threading.Thread | None  # the background write; None once joined, or in the foreground
    stall_s: float = 0.0  # what training waited: the wait for the save before, the copies, the small files
    wait_s: float = 0.0  # of which the wait for the save before
    bytes: int = 0  # the whole checkpoint, every rank's files (rank 0 knows it)
    write_s: float = 0.0  # from the start (after any wait) until every rank's files were durable and COMPLETE written
    result: str | None = None  # checkpoint_writer.OK, or the failure
    write_started: float = 0.0  # perf_counter once the save before was out of the way
    thread_started: bool = False  # written behind training
    waited_out: bool = False  # written behind training, then waited for to the end (the run's last save)

    @property
    def failed(self) -> bool:
        return self.result is not None and self.result != OK

    def record(self) -> dict[str, Any]:
        """The metrics of a complete save."""
        return {
            "step": self.step,
            "ckpt/save_s": self.stall_s,
            "ckpt/wait_s": self.wait_s,
            "ckpt/bytes": self.bytes,
            "ckpt/write_gbs": self.bytes / self.write_s / 1e9 if self.write_s > 0 else 0.0,
        }


class Checkpointer:
    """A run's saves: the foreground, or the background with at most one save in flight.

    Every rank calls ``save`` at the same step (it is a collective) and ``poll`` at every step boundary
    while a save is in flight; a save's result reaches every rank at a boundary (not necessarily the
    same one). ``save`` and ``finish`` wait for a save in flight and raise its failure, on every rank.
    """

    _runs = itertools.count()  # each run in this process has keys of its own in the store

    def __init__(self, engine, cfg: RunConfig, rank: int, local_rank: int, world_size: int, background: bool):
        import torch.distributed.distributed_c10d as c10d

        from llm_ds.checkpoint_writer import FileEngine, Staging

        self.engine, self.cfg = engine, cfg
        self.rank, self.local_rank, self.world_size = rank, local_rank, world_size
        self.background = background
        self.store = c10d._get_default_store()
        self.prefix = f"llm_ds/{next(self._runs)}/ckpt"
        self.files = FileEngine(engine.checkpoint_engine, Staging() if background else None)
        engine.checkpoint_engine = self.files
        copy_script = getattr(engine, "_copy_recovery_script", None)
        if copy_script is not None:  # rank 0 copies zero_to_fp32.py inside DeepSpeed's barriers: it must not raise

            def copy_recovery_script(save_path, _copy=copy_script):
                try:
                    _copy(save_path)
                except OSError as exc:
                    self.files.fail(exc)

            engine._copy_recovery_script = copy_recovery_script
        self.pending: Save | None = None
        self._forget: Save | None = None  # a finished save whose keys rank 0 deletes at the next save

    def save(
        self, step: int, state: dict[str, Any], manifest: dict[str, Any], ds_config: dict[str, Any], tokenizer
    ) -> tuple[Save | None, Save | None]:
        """Start a checkpoint of ``step`` (finished before returning in the foreground); returns it and the
        save in flight before it, which this one waited for (and None for this one if that one failed)."""
        import deepspeed.comm as dist

        from llm_ds.checkpoint_writer import Writer

        started = time.perf_counter()
        before = self._finish(charge=False)
        if before is not None and before.failed:
            return None, before  # every rank read the same result: none saves again
        waited = time.perf_counter() - started if before is not None else 0.0
        ckpt_dir = self.cfg.checkpoint_dir
        path = ckpt_dir / tag_for(step)
        if self.rank == 0 and path.exists():
            shutil.rmtree(path)  # a partial save of this step from a crashed run
        dist.barrier()
        self.files.start()
        self.engine.save_checkpoint(str(ckpt_dir), tag=path.name, client_state={"llm_ds_step": step}, save_latest=False)
        if self.rank == 0 and self._forget is not None:
            self._forget.writer.forget()  # every rank has read its result: each waited for it, then met here
            self._forget = None
        own = _own_files(path / OURS, self.cfg, self.rank, state, manifest, ds_config, tokenizer, self.engine)
        commit = (lambda: commit_checkpoint(path, step, manifest["world_size"], self.cfg)) if self.rank == 0 else None
        writer = Writer(self.store, f"{self.prefix}/{step}", self.rank, self.world_size, commit)
        save = Save(step, path, started, writer, None, wait_s=waited, write_started=started + waited)
        self.pending = save
        if self.background:
            save.thread = threading.Thread(
                target=writer.run, args=(self.files, own), name=f"llm_ds checkpoint {step}", daemon=True
            )
            save.thread.start()
            save.thread_started = True
            save.stall_s = time.perf_counter() - started
        else:
            writer.run(self.files, own)
            self._finish(charge=False)
            save.stall_s = time.perf_counter() - started
        return save, before

    def poll(self) -> Save | None:
        """The save in flight once its result is in (complete or failed), else None; never waits."""
        if self.pending is None or self.pending.writer.result(wait=False) is None:
            return None
        return self._settle()

    def finish(self) -> Save | None:
        """Wait for the save in flight (training waits: the time counts in its ``stall_s``); the save (complete
        or failed: every rank gets the same), or None if there was none."""
        return self._finish(charge=True)

    def _finish(self, charge: bool) -> Save | None:
        if self.pending is None:
            return None
        start = time.perf_counter()
        self.pending.writer.result(wait=True)
        save = self._settle()
        if charge:
            save.stall_s += time.perf_counter() - start
            save.waited_out = save.thread_started
        return save

    def _settle(self) -> Save:
        save, self.pending = self.pending, None
        if save.thread is not None:
            save.thread.join()
            save.thread = None
        save.result = save.writer.read("result")
        self._forget = save
        if save.result == OK:
            if self.rank == 0:
                save.bytes = sum(json.loads((save.path / COMPLETE).read_text())["files"].values())
                save.write_s = save.writer.committed_at - save.write_started
            elif self.local_rank == 0:
                prune(self.cfg)  # another node's view of a shared folder, or its own folder
        return save

    def failure_message(self, save: Save) -> str:
        pointer = self.cfg.checkpoint_dir / LATEST
        kept = pointer.read_text().strip() if pointer.is_file() else None
        return (
            f"saving checkpoint {save.path} {save.result}; the latest pointer still names "
            f"{kept or 'no checkpoint'}, which is intact"
        )

    @property
    def staged_bytes(self) -> int:
        """Host memory kept for the background's copies."""
        return self.files.staging.bytes if self.files.staging else 0


def _own_files(ours: Path, cfg: RunConfig, rank: int, state, manifest, ds_config, tokenizer, engine):
    """A function that writes (and fsyncs) this rank's files of ours; what they hold is taken now."""
    rng = rng_state()
    model_config = getattr(engine.module, "config", None) if rank == 0 else None
    config_text = redact(dump_run_config(cfg)) if rank == 0 else None
    ds_text = redact(ds_config) if rank == 0 else None
    state, manifest = json.loads(json.dumps(state)), json.loads(json.dumps(manifest))

    def write() -> None:
        from llm_ds.checkpoint_writer import fsync_tree

        offloaded = ours.parent / "offloaded_tensors"  # DeepSpeed's copy of NVMe-offloaded states, each rank's
        if offloaded.is_dir():
            fsync_tree(offloaded)
        ours.mkdir(parents=True, exist_ok=True)
        _write_json(ours / f"rng_rank{rank}.json", rng)
        if rank != 0:
            return
        _write_json(ours / "state.json", state)
        _write_json(ours / "manifest.json", manifest)
        _write_json(ours / "ds_config.json", ds_text)
        _write_text(ours / "config.yaml", config_text)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(ours / "tokenizer"))
        if hasattr(model_config, "save_pretrained"):
            model_config.save_pretrained(str(ours / "hf_config"))  # the model's shape, for export

    return write


def path_sizes(path: Path) -> dict[str, int]:
    return {str(f.relative_to(path)): f.stat().st_size for f in sorted(path.rglob("*")) if f.is_file()}


def commit_checkpoint(path: Path, step: int, world_size: int, cfg: RunConfig) -> float:
    """Rank 0, once every rank's files are durable: ``COMPLETE`` (the files and their sizes), then the
    ``latest`` pointer, atomically; then checkpoints beyond ``keep_last`` go. Returns perf_counter at the
    moment the checkpoint was complete (before the pruning)."""
    from llm_ds.checkpoint_writer import fsync_file, fsync_tree

    fsync_tree(path)  # files written here outside the engine (DeepSpeed's zero_to_fp32.py), and the folders
    files = path_sizes(path)
    _write_json(path / COMPLETE, {"step": step, "world_size": world_size, "files": files, "time": time.time()})
    fsync_file(path)
    ckpt_dir = path.parent
    _write_text(ckpt_dir / LATEST, path.name)
    fsync_file(ckpt_dir)
    done = time.perf_counter()
    prune(cfg)
    return done


def prune(cfg: RunConfig) -> None:
    """Complete checkpoints beyond ``checkpoint.keep_last`` go, oldest first; the newest always stays."""
    if not cfg.checkpoint.keep_last:
        return
    complete, _ = list_checkpoints(cfg.checkpoint_dir)
    for old in complete[: -cfg.checkpoint.keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def _write_text(path: Path, text: str) -> None:
    """``text`` to ``path`` whole or not at all: a temporary file, fsynced, renamed over it."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_json(path: Path, obj: Any) -> None:
    _write_text(path, json.dumps(obj))


# ---- resume ------------------------------------------------------------------------------------


def find_resume_point(cfg: RunConfig) -> Path | None:
    """The checkpoint to resume from per ``checkpoint.resume``: auto, never, or a path."""
    mode = cfg.checkpoint.resume
    if mode == "never":
        return None
    if mode != "auto":
        path = Path(mode)
        if not path.is_dir():
            raise CheckpointError(f"checkpoint.resume={mode}: no such checkpoint folder")
        if not is_complete(path):
            raise CheckpointError(f"checkpoint.resume={mode}: incomplete checkpoint (no {COMPLETE} mark)")
        return path
    ckpt_dir = cfg.checkpoint_dir
    complete, incomplete = list_checkpoints(ckpt_dir)
    for partial in incomplete:
        logger.warning("ignoring incomplete checkpoint %s (no %s mark: its save did not finish)", partial, COMPLETE)
    pointer = ckpt_dir / LATEST
    if pointer.is_file():
        latest = ckpt_dir / pointer.read_text().strip()
        if is_complete(latest):
            return latest
    return complete[-1] if complete else None


def verify(path: Path, previous: Path | None) -> dict[str, Any]:
    """Check every file ``COMPLETE`` lists is there with its size; return the mark's contents."""
    mark = json.loads((path / COMPLETE).read_text())
    hint = f"; resume from the previous complete checkpoint with --set checkpoint.resume={previous}" if previous else ""
    for name, size in mark["files"].items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path}: {name} is missing{hint}")
        if f.stat().st_size != size:
            raise CheckpointError(
                f"checkpoint {path}: {name} is {f.stat().st_size} bytes, {size} when saved (truncated or altered){hint}"
            )
    return mark


def check_compatible(path: Path, cfg: RunConfig, tokenizer) -> None:
    """Refuse a checkpoint of another model shape, tokenizer or block size, naming what differs."""
    ours = path / OURS
    import yaml

    saved = yaml.safe_load((ours / "config.yaml").read_text())
    keys = ("n_layer", "n_embd", "n_head", "n_positions", "vocab_size", "vocab_multiple_of", "init_from")
    now = {k: getattr(cfg.model, k) for k in keys}
    diffs = [
        f"model.{k}: {saved['model'].get(k)!r} in the checkpoint, {now[k]!r} now"
        for k in keys
        if saved["model"].get(k) != now[k]
    ]
    if saved["data"].get("block_size") != cfg.data.block_size:
        diffs.append(
            f"data.block_size: {saved['data'].get('block_size')!r} in the checkpoint, {cfg.data.block_size!r} now"
        )
    manifest = json.loads((ours / "manifest.json").read_text())
    if manifest["tokenizer_fingerprint"] != tokenizer_fingerprint(tokenizer):
        diffs.append(
            f"tokenizer: {saved['data'].get('tokenizer')!r} (fingerprint "
            f"{manifest['tokenizer_fingerprint']}) in the checkpoint, {cfg.data.tokenizer!r} "
            f"({tokenizer_fingerprint(tokenizer)}) now"
        )
    if diffs:
        raise ConfigError(f"checkpoint {path} does not match this run: {'; '.join(diffs)}")


def load(engine, path: Path, rank: int, seed: int = 0) -> dict[str, Any]:
    """Load DeepSpeed's state (its universal form when ``path`` was written by another number of ranks) and
    this rank's RNG state; return our saved training state, its data position for this world size.

    A rank the checkpoint has no RNG state for (more ranks than it was written by) seeds its own from
    ``seed``, its rank and the step: nothing draws from it without dropout."""
    import torch.distributed as dist

    world_size, saved = dist.get_world_size(), saved_world_size(path)
    load_dir, tag = (path, UNIVERSAL) if needs_universal(path, world_size) else (path.parent, path.name)
    load_path, _ = engine.load_checkpoint(
        str(load_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if load_path is None:
        raise CheckpointError(f"checkpoint {path}: DeepSpeed could not load it")
    if tag == UNIVERSAL and engine.zero_optimization_stage() == 3:
        _complete_zero3_universal_load(engine.optimizer, path / UNIVERSAL / "zero" / "optimizer_state.pt")
    ours = path / OURS
    state = json.loads((ours / "state.json").read_text())
    if rank < saved:
        set_rng_state(json.loads((ours / f"rng_rank{rank}.json").read_text()))
    else:
        seed_rng(hash((seed, rank, state["step"])) % 2**32)
    data, replica = state["data"], saved_model_parallel(path)  # ranks of one replica read the same data
    samples = int(data["consumed"]) * (saved // replica)  # of this epoch, all data-parallel ranks together
    if samples % (world_size // replica):
        raise CheckpointError(
            f"checkpoint {path}: its data position ({samples} samples into epoch {data['epoch']}) cannot be "
            f"shared by {world_size} rank(s)"
        )
    state["data"] = {**data, "consumed": samples // (world_size // replica)}
    return state


def _complete_zero3_universal_load(optimizer, saved: Path) -> None:
    """What DeepSpeed's ZeRO-3 universal load gets wrong: it gives every parameter group the first group's
    settings (weight decay on biases and norms too) and one shared Adam step counter, which the optimizer
    then advances once per group each step (the second group's bias correction runs ahead)."""
    import torch

    groups = torch.load(saved, map_location="cpu", weights_only=False)["optimizer_state_dict"]["param_groups"]
    if len(groups) != len(optimizer.optimizer.param_groups):
        raise CheckpointError(
            f"checkpoint {saved.parent.parent.parent}: {len(groups)} optimizer parameter groups, this run has "
            f"{len(optimizer.optimizer.param_groups)}"
        )
    for group, kept in zip(optimizer.optimizer.param_groups, groups, strict=True):
        group.update({k: v for k, v in kept.items() if k != "params"})
    for flat in optimizer.fp32_partitioned_groups_flat:
        state = optimizer.optimizer.state[flat]
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


# ---- another world size ------------------------------------------------------------------------


def saved_world_size(path: Path) -> int:
    return int(_saved_value(path / COMPLETE, "world_size"))


def saved_parallel(path: Path) -> dict[str, int]:
    """The ``parallel`` section of the run that wrote ``path`` (none before it existed: 1 and 1)."""
    import yaml

    try:
        saved = yaml.safe_load((path / OURS / "config.yaml").read_text()).get("parallel") or {}
    except (OSError, yaml.YAMLError, AttributeError) as exc:
        raise CheckpointError(f"checkpoint {path}: {OURS}/config.yaml is not readable ({exc!r})") from None
    return {"tensor": int(saved.get("tensor", 1)), "pipeline": int(saved.get("pipeline", 1))}


def saved_model_parallel(path: Path) -> int:
    """Ranks that held one replica of the model in the run that wrote ``path``."""
    saved = saved_parallel(path)
    return saved["tensor"] * saved["pipeline"]


def saved_global_batch(path: Path) -> int:
    """Sequences per optimizer step of the run that wrote ``path``."""
    return int(_saved_value(path / OURS / "ds_config.json", "train_batch_size"))


def _saved_value(file: Path, key: str):
    try:
        return json.loads(file.read_text())[key]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {file.parent}: {file.name} has no readable {key} ({exc!r})") from None


def fit_world_size(path: Path, cfg: RunConfig, world_size: int) -> tuple[RunConfig, str | None]:
    """The run config that resumes ``path`` on ``world_size`` ranks with the checkpoint's global batch, and a
    line saying what changed (None: nothing).

    ``train.grad_accum_steps`` becomes global batch / (``train.micro_batch_size`` x ranks), also on the
    checkpoint's own world size (a run restarted on fewer ranks and then resumed again keeps its batch);
    where that does not divide, ``ConfigError`` gives the numbers and a setting that works.
    """
    saved = saved_world_size(path)
    layout, now = saved_parallel(path), {"tensor": cfg.parallel.tensor, "pipeline": cfg.parallel.pipeline}
    export = f"or start a new run from its weights: llm-ds export {path} OUT and --set model.init_from=OUT"
    if layout != now:
        keys = " ".join(f"--set parallel.{k}={v}" for k, v in layout.items())
        raise ConfigError(
            f"checkpoint {path} was written with {_describe_parallel(layout)} and this run has "
            f"{_describe_parallel(now)}: resume it with {keys}, {export}"
        )
    if saved != world_size and cfg.parallel.model_parallel > 1:
        raise ConfigError(
            f"checkpoint {path} was written by {saved} rank(s) and this run has {world_size}: a checkpoint with "
            f"{_describe_parallel(layout)} resumes on its own {saved} rank(s), {export}"
        )
    where = (
        f"checkpoint {path} was written by {saved} rank(s) and this run has {world_size}"
        if saved != world_size
        else f"checkpoint {path}"
    )
    if cfg.data.streaming and saved != world_size:
        raise ConfigError(
            f"{where}: data.streaming deals documents to ranks, so a streamed run resumes only on {saved} "
            f"rank(s); {export}"
        )
    batch, micro = saved_global_batch(path), cfg.train.micro_batch_size
    per_rank, rest = divmod(batch, world_size // cfg.parallel.model_parallel)
    if rest:
        fits = ", ".join(str(n) for n in range(1, batch + 1) if batch % n == 0)
        raise ConfigError(
            f"{where}: its global batch of {batch} sequences cannot be shared by {world_size} rank(s); "
            f"resume on a number of ranks that divides {batch} ({fits})"
        )
    accum, rest = divmod(per_rank, micro)
    if rest:
        fits = max(n for n in range(1, micro + 1) if per_rank % n == 0)
        raise ConfigError(
            f"{where}: its global batch of {batch} sequences is {per_rank} per rank, which "
            f"train.micro_batch_size={micro} does not divide; resume with --set train.micro_batch_size={fits} "
            f"(train.grad_accum_steps becomes {per_rank // fits})"
        )
    before = cfg.train.grad_accum_steps
    if accum == before and saved == world_size:
        return cfg, None
    fitted = replace(cfg, train=replace(cfg.train, grad_accum_steps=accum))
    ranks = f"on {world_size} rank(s) (was {saved})" if saved != world_size else f"on {world_size} rank(s)"
    return fitted, f"{ranks}: grad_accum_steps {before} -> {accum}, global batch {batch} kept"


def _describe_parallel(layout: dict[str, int]) -> str:
    return f"parallel.tensor={layout['tensor']}, parallel.pipeline={layout['pipeline']}"


def config_for_resume(cfg: RunConfig, world_size: int) -> RunConfig:
    """``cfg`` as the job runs it on ``world_size`` ranks: with the global batch of the checkpoint it resumes,
    if it resumes one (``fit_world_size``; its refusals are raised here)."""
    point = find_resume_point(cfg)
    return fit_world_size(point, cfg, world_size)[0] if point is not None else cfg


def needs_universal(path: Path, world_size: int) -> bool:
    """Whether ``path`` holds ZeRO shards of another number of ranks (without ZeRO, the optimizer state is whole
    and loads on any number of ranks)."""
    return saved_world_size(path) != world_size and any(path.glob("*_optim_states.pt"))


CONVERSION_WAIT_S = 6 * 3600  # the longest the other ranks wait for rank 0's conversion


def universal_for(path: Path, rank: int) -> Path:
    """``path``'s universal form, made by rank 0 while the other ranks wait for it on the (shared) file system:
    a conversion may take longer than a collective's timeout. A failure on rank 0 is every rank's error."""
    from llm_ds.distributed import barrier

    failed = path / f".{UNIVERSAL}.failed"
    if rank == 0:
        failed.unlink(missing_ok=True)  # from an earlier attempt
    barrier()
    if rank == 0:
        try:
            return make_universal(path)
        except CheckpointError as exc:
            failed.write_text(str(exc))
            raise
    deadline = time.monotonic() + CONVERSION_WAIT_S
    while not (path / UNIVERSAL / COMPLETE).is_file():
        if failed.is_file():
            raise CheckpointError(failed.read_text())
        if time.monotonic() > deadline:
            raise CheckpointError(f"checkpoint {path}: rank 0 did not convert it within {CONVERSION_WAIT_S} s")
        time.sleep(0.5)
    return path / UNIVERSAL


def make_universal(path: Path) -> Path:
    """DeepSpeed's universal form of checkpoint ``path``, made once (by one process) in ``path/universal``."""
    target = path / UNIVERSAL
    if (target / COMPLETE).is_file():
        return target
    tmp = path / f".{UNIVERSAL}.tmp"
    for old in (tmp, target):
        shutil.rmtree(old, ignore_errors=True)
    workers = str(max(1, min(4, os.cpu_count() or 1)))
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(path),
           "--output_folder", str(tmp), "--inject_missing_state",
           "--num_extract_workers", workers, "--num_merge_workers", workers]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    (path / "latest_universal").unlink(missing_ok=True)  # the converter's pointer; we name the folder
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        lines = [x for x in (proc.stderr + proc.stdout).splitlines() if x.strip()]
        raise CheckpointError(
            f"checkpoint {path}: DeepSpeed's ds_to_universal could not convert it for another world size "
            f"({lines[-1] if lines else f'exit status {proc.returncode}'})"
        )
    _write_json(tmp / COMPLETE, {"source": path.name, "seconds": time.perf_counter() - start})
    os.replace(tmp, target)
    return target
