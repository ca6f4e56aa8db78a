"""How a checkpoint's files reach the disk: DeepSpeed writes them, durably, in the foreground or behind training.

DeepSpeed's ``save_checkpoint`` hands every file it saves to its engine's checkpoint engine (its
``CheckpointEngine`` interface; ``torch.save``: DeepSpeed's own ``checkpoint.writer`` is refused, see
``ds_config.py``). ``FileEngine`` sits in front of that engine:

- in the foreground (``checkpoint.async: false``) it writes each file at once and fsyncs it;
- in the background (``checkpoint.async: true``) it copies each state dict into host memory kept from
  save to save (``Staging``; pinned where the tensors are on a device) and returns: the copies are
  written and fsynced by a thread while training goes on. Training waits only for the copy.

Either way a checkpoint becomes complete the same way: each rank counts itself done in the process
group's key-value store once its files are durable; rank 0, once every rank is, writes ``COMPLETE``
and moves ``latest`` (``checkpoint.commit_checkpoint``) and posts the result, which every rank reads at a step
boundary. A failed write anywhere posts that failure instead, and no ``COMPLETE`` is written.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

OK = "ok"
POLL_S = 0.01  # how often a wait asks the store
WRITE_TIMEOUT_S = 1800.0  # rank 0 waits this long for every rank's files (the process group's own timeout)


def fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """Every file under ``path``, then every folder (their entries), then ``path`` itself."""
    folders = [path]
    for item in sorted(path.rglob("*")):
        if item.is_dir():
            folders.append(item)
        elif item.is_file():
            fsync_file(item)
    for folder in reversed(folders):
        fsync_file(folder)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class Staging:
    """Host copies of state dicts, with their memory kept for the next save of the same file.

    Storages are copied whole, once each, and tensors rebuilt over the copies with their offsets and
    strides: tensors that shared memory still do, and ``torch.save`` writes the copy byte for byte as it
    would have written the original. Containers are rebuilt; other objects are deep-copied, so nothing
    the training loop changes afterwards reaches the file.
    """

    def __init__(self) -> None:
        self._kept: dict[str, list] = {}  # file name -> its storages' copies, in the order met
        self.bytes = 0  # host memory held for copies

    def copy(self, obj: Any, name: str) -> Any:
        import torch

        kept = self._kept.setdefault(name, [])
        copies: dict[tuple, Any] = {}
        on_device = False

        def storage(src):
            nonlocal on_device
            key = (src.data_ptr(), src.nbytes(), str(src.device))
            if key in copies:
                return copies[key]
            index = len(copies)
            if index < len(kept) and kept[index].nbytes() == src.nbytes():
                dst = kept[index]
            else:
                pin = src.device.type != "cpu" and torch.cuda.is_available()
                dst = torch.empty(src.nbytes(), dtype=torch.uint8, pin_memory=pin).untyped_storage()
                self.bytes += dst.nbytes() - (kept[index].nbytes() if index < len(kept) else 0)
                kept[index : index + 1] = [dst]
            on_device |= src.device.type != "cpu"
            dst.copy_(src, non_blocking=src.device.type != "cpu")
            copies[key] = dst
            return dst

        def rebuild(x: Any) -> Any:
            if isinstance(x, torch.Tensor):
                t = torch.empty(0, dtype=x.dtype).set_(
                    storage(x.untyped_storage()), x.storage_offset(), x.size(), x.stride()
                )
                return torch.nn.Parameter(t, requires_grad=x.requires_grad) if isinstance(x, torch.nn.Parameter) else t
            if isinstance(x, dict):
                out = copy.copy(x)
                for k, v in x.items():
                    out[k] = rebuild(v)
                return out
            if type(x) is list:
                return [rebuild(v) for v in x]
            if isinstance(x, tuple):
                items = [rebuild(v) for v in x]
                return type(x)(*items) if hasattr(x, "_fields") else type(x)(items)
            return copy.deepcopy(x)

        out = rebuild(obj)
        del kept[len(copies) :]  # a file that holds fewer storages than last time
        if on_device:
            from deepspeed.accelerator import get_accelerator

            get_accelerator().synchronize()  # the copies are in host memory before training writes again
        return out


class FileEngine:
    """DeepSpeed's checkpoint-engine interface in front of the engine DeepSpeed built: every file it is given
    is written and fsynced now (``staging=None``) or copied now and written by ``write_queued``."""

    def __init__(self, inner, staging: Staging | None):
        self.inner, self.staging = inner, staging
        self.name = f"llm_ds over {getattr(inner, 'name', type(inner).__name__)}"
        self.queued: list[tuple[Any, str]] = []
        self.error: str | None = None  # the first failed write of this save

    # ---- the interface DeepSpeed calls ------------------------------------------------------------

    def create(self, info) -> None:
        self.inner.create(info)

    def makedirs(self, path, exist_ok=False) -> None:
        try:
            self.inner.makedirs(path, exist_ok=exist_ok)
        except OSError as exc:  # on this rank only, inside DeepSpeed's barriers: it must not raise there
            self.fail(exc)

    def fail(self, exc: BaseException) -> None:
        """This save has failed on this rank (the first error is kept); every rank learns of it."""
        if self.error is None:
            self.error = first_line(exc)

    def save(self, state_dict, path: str) -> None:
        if self.staging is None:
            self._write(state_dict, path)
        elif self.error is None:
            try:
                self.queued.append((self.staging.copy(state_dict, os.path.basename(path)), path))
            except Exception as exc:  # host memory short for the copy: this save fails, on every rank
                self.error = f"copying {os.path.basename(path)} to host memory: {first_line(exc)}"

    def load(self, path: str, map_location=None):
        return self.inner.load(path, map_location=map_location)

    def commit(self, info) -> bool:
        return True  # complete once every rank's files are durable: ``checkpoint.commit``

    def is_data_parallel_writer(self, dp_rank) -> bool:
        return self.inner.is_data_parallel_writer(dp_rank)

    def is_decoupled(self) -> bool:
        return False

    def set_commit_info(self, info) -> None:
        pass

    def get_commit_info(self):
        return None

    def cleanup(self) -> None:
        self.inner.cleanup()

    def preserves_storage_sharing(self) -> bool:
        return self.inner.preserves_storage_sharing()

    # ---- ours -------------------------------------------------------------------------------------

    def _write(self, state_dict, path: str) -> None:
        if self.error is not None:
            return  # this save has failed already; DeepSpeed's collectives still run to their end
        try:
            self.inner.save(state_dict, path)
            fsync_file(path)
        except Exception as exc:  # a full disk is an OSError or a RuntimeError, depending on the writer
            self.fail(exc)  # every rank learns of it through the store, and none hangs

    def write_queued(self) -> None:
        queued, self.queued = self.queued, []
        for state_dict, path in queued:
            self._write(state_dict, path)

    def start(self) -> None:
        self.queued, self.error = [], None


class Writer:
    """One save's files on this rank, then its part in making the checkpoint complete (see the module)."""

    def __init__(self, store, prefix: str, rank: int, world_size: int, commit: Callable[[], float] | None):
        self.store, self.prefix, self.rank, self.world_size = store, prefix, rank, world_size
        self.commit = commit  # rank 0's: COMPLETE and latest; returns perf_counter once they are written
        self.committed_at: float | None = None  # perf_counter once COMPLETE and latest are written (rank 0)

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def run(self, engine: FileEngine, own_files: Callable[[], None]) -> None:
        """Write what ``engine`` holds and this rank's own files; count this rank done; on rank 0, commit."""
        engine.write_queued()
        if engine.error is None:
            try:
                own_files()
            except Exception as exc:
                engine.error = first_line(exc)
        if engine.error is not None:
            self.store.compare_set(self.key("failed"), "", f"failed on rank {self.rank} ({engine.error})")
        if self.store.add(self.key("done"), 1) == self.world_size:
            self.store.set(self.key("all"), "1")
        if self.commit is not None:
            if self.wait_for("all", WRITE_TIMEOUT_S):
                failure = self.read("failed")
            else:  # a rank died mid-write, or cannot write: no collective is left to notice it
                done = int(self.store.add(self.key("done"), 0))
                failure = (
                    f"failed: {self.world_size - done} of {self.world_size} rank(s) had not written their files "
                    f"after {WRITE_TIMEOUT_S:.0f} s"
                )
            if failure is None:
                try:
                    self.committed_at = self.commit()
                except Exception as exc:
                    failure = f"failed on rank {self.rank} ({first_line(exc)})"
            self.store.set(self.key("result"), failure or OK)

    def read(self, name: str) -> str | None:
        key = self.key(name)
        return self.store.get(key).decode() if self.store.check([key]) else None

    def wait_for(self, name: str, timeout_s: float | None = None) -> bool:
        """Whether ``name`` was posted (before ``timeout_s``)."""
        # Short requests, not the store's blocking wait: a client runs one request at a time, and the
        # training thread's requests (the step-boundary polls) must not queue behind a long wait.
        key = self.key(name)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self.store.check([key]):
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(POLL_S)
        return True

    def result(self, wait: bool) -> str | None:
        """``OK``, a failure (``failed on rank R (...)``), or None while the save is in flight (``wait=False``)."""
        if wait:
            self.wait_for("result")
        return self.read("result")

    def forget(self) -> None:
        """Rank 0, once every rank has read the result: this save's keys leave the store."""
        for name in ("failed", "done", "all", "result"):
            key = self.key(name)
            if self.store.check([key]):
                self.store.delete_key(key)
