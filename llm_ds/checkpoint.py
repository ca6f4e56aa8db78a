"""Checkpoints that are complete or ignored, resume exactly, and describe themselves.

A checkpoint is ``<checkpoint.dir>/global_step<N>/``: DeepSpeed's sharded files plus ours under
``llm_ds/`` (training state and data position as JSON, each rank's RNG states as JSON, the
resolved configs, the tokenizer, a manifest). After every rank has written its shards, rank 0
writes ``COMPLETE`` (the list of files and their sizes) and only then moves the ``latest``
pointer, atomically. A folder without ``COMPLETE`` is never resumed from. Loading reads JSON and
DeepSpeed's own files; nothing of ours is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import random
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from llm_ds.config import ConfigError, RunConfig, UserError, dump_run_config
from llm_ds.monitor.metrics import redact

logger = logging.getLogger("llm_ds")
COMPLETE = "COMPLETE"
LATEST = "latest"
OURS = "llm_ds"
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


def save(
    engine,
    cfg: RunConfig,
    step: int,
    state: dict[str, Any],
    rank: int,
    local_rank: int,
    manifest: dict[str, Any],
    ds_config: dict[str, Any],
    tokenizer,
) -> Path:
    """Save a complete checkpoint for ``step`` on every rank; returns its folder.

    The ``latest`` pointer moves only after every rank has finished, and older checkpoints
    beyond ``checkpoint.keep_last`` are deleted only after this one is complete.
    """
    import deepspeed.comm as dist

    ckpt_dir = cfg.checkpoint_dir
    tag = tag_for(step)
    path = ckpt_dir / tag
    if rank == 0 and path.exists():
        shutil.rmtree(path)  # a partial save of this step from a crashed run
    dist.barrier()
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"llm_ds_step": step}, save_latest=False)
        ours = path / OURS
        ours.mkdir(parents=True, exist_ok=True)
        _write_json(ours / f"rng_rank{rank}.json", rng_state())
        if rank == 0:
            _write_json(ours / "state.json", state)
            _write_json(ours / "manifest.json", manifest)
            _write_json(ours / "ds_config.json", redact(ds_config))
            (ours / "config.yaml").write_text(redact(dump_run_config(cfg)))
            if tokenizer is not None:
                tokenizer.save_pretrained(str(ours / "tokenizer"))
            if hasattr(getattr(engine.module, "config", None), "save_pretrained"):
                engine.module.config.save_pretrained(str(ours / "hf_config"))  # the model's shape, for export
    except (OSError, RuntimeError) as exc:  # a full disk surfaces as either, depending on the writer
        pointer = ckpt_dir / LATEST
        kept = pointer.read_text().strip() if pointer.is_file() else None
        raise CheckpointError(
            f"saving checkpoint {path} failed on rank {rank} ({str(exc).splitlines()[0]}); "
            f"the latest pointer still names {kept or 'no checkpoint'}, which is intact"
        ) from None
    dist.barrier()  # every rank's shards and RNG states are on disk
    if rank == 0:
        files = {str(f.relative_to(path)): f.stat().st_size for f in sorted(path.rglob("*")) if f.is_file()}
        _write_json(
            path / COMPLETE, {"step": step, "world_size": manifest["world_size"], "files": files, "time": time.time()}
        )
        tmp = ckpt_dir / f".{LATEST}.tmp"
        tmp.write_text(tag)
        os.replace(tmp, ckpt_dir / LATEST)
    if local_rank == 0 and cfg.checkpoint.keep_last:
        complete, _ = list_checkpoints(ckpt_dir)
        for old in complete[: -cfg.checkpoint.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return path


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


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


def check_compatible(path: Path, cfg: RunConfig, world_size: int, tokenizer) -> None:
    """Refuse a checkpoint of another model shape, tokenizer or world size, naming what differs."""
    ours = path / OURS
    mark = json.loads((path / COMPLETE).read_text())
    if mark["world_size"] != world_size:
        raise ConfigError(
            f"checkpoint {path} was written by {mark['world_size']} rank(s) and this run has {world_size}; "
            f"resume with {mark['world_size']} rank(s) (the data position and optimizer shards are per rank), "
            f"or start a new run from its weights: llm-ds export {path} OUT and --set model.init_from=OUT"
        )
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


def load(engine, path: Path, rank: int) -> dict[str, Any]:
    """Load DeepSpeed's shards and this rank's RNG state; return our saved training state."""
    load_path, _ = engine.load_checkpoint(
        str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if load_path is None:
        raise CheckpointError(f"checkpoint {path}: DeepSpeed could not load it")
    ours = path / OURS
    set_rng_state(json.loads((ours / f"rng_rank{rank}.json").read_text()))
    return json.loads((ours / "state.json").read_text())
