"""Token streams built once per (sources, tokenizer, split) and reused, memory-mapped from disk.

One process per node (local rank 0) builds the cache; the others on that node wait for its
completion mark by polling the file system, so a long build never runs into a collective's
timeout. Tokens go to the files as they are made (``CacheWriter``), so a corpus larger than memory
builds in a bounded amount of it. Writes go to a temporary folder renamed into place, so a crash
leaves no half cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from llm_ds.config import CACHE_ENV, DEFAULT_CACHE

logger = logging.getLogger(__name__)
DONE_MARK = "meta.json"
CACHE_FORMAT = 2
BUFFER_ITEMS = 1 << 20  # values held per array before they go to its file


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def fingerprint(spec: dict, files: list[Path], tokenizer) -> str:
    """A key that changes with the spec (sources, preprocessing, split, block size, layout), the files
    (path, size, mtime) and the tokenizer's full serialisation."""
    h = hashlib.sha256()
    h.update(json.dumps({"format": CACHE_FORMAT, **spec}, sort_keys=True, default=str).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    # The tokenizer's full serialisation, so a retrained tokenizer under the same name never matches.
    h.update(tokenizer_text(tokenizer).encode())
    return h.hexdigest()[:20]


def tokenizer_text(tokenizer) -> str:
    """A tokenizer's full serialisation (vocabulary, merges, rules): what its fingerprints hash."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))


Built = tuple[dict[str, np.ndarray], dict]


class CacheWriter:
    """Appends values to one ``<name>.bin`` file per array in ``folder`` as they are made, holding at most
    ``buffer_items`` of each array in memory."""

    def __init__(self, folder: Path, buffer_items: int | None = None):
        self.folder = Path(folder)
        self.buffer_items = buffer_items or BUFFER_ITEMS
        self.dtypes: dict[str, np.dtype] = {}
        self.counts: dict[str, int] = {}
        self.pending: dict[str, list[np.ndarray]] = {}
        self.pending_items: dict[str, int] = {}

    def add(self, name: str, dtype) -> None:
        """Declare an array (it exists in the cache even if nothing is appended to it)."""
        self.dtypes[name] = np.dtype(dtype)
        self.counts[name], self.pending[name], self.pending_items[name] = 0, [], 0
        (self.folder / f"{name}.bin").write_bytes(b"")

    def append(self, name: str, values) -> None:
        values = np.asarray(values, dtype=self.dtypes[name])
        self.pending[name].append(values)
        self.pending_items[name] += len(values)
        self.counts[name] += len(values)
        if self.pending_items[name] >= self.buffer_items:
            self._flush(name)

    def _flush(self, name: str) -> None:
        if self.pending[name]:
            with open(self.folder / f"{name}.bin", "ab") as f:
                np.concatenate(self.pending[name]).tofile(f)
        self.pending[name], self.pending_items[name] = [], 0

    def close(self) -> dict[str, list]:
        """Write what is held; returns each array's ``[dtype, length]`` for the completion mark."""
        for name in self.dtypes:
            self._flush(name)
        return {name: [dtype.str, self.counts[name]] for name, dtype in self.dtypes.items()}


def read_arrays(folder: Path, layout: dict[str, list], mmap: bool = True) -> dict[str, np.ndarray]:
    """The arrays a ``CacheWriter`` wrote, memory-mapped (or read into memory)."""
    arrays = {}
    for name, (dtype, n) in layout.items():
        path = folder / f"{name}.bin"
        if not n:
            arrays[name] = np.zeros(0, dtype=dtype)
        elif mmap:
            arrays[name] = np.memmap(path, dtype=dtype, mode="r", shape=(n,))
        else:
            arrays[name] = np.fromfile(path, dtype=dtype, count=n)
    return arrays


def load_or_build(
    cache_root: Path,
    key: str,
    build: Callable[[CacheWriter], dict],
    is_builder: bool,
    timeout_s: float = 24 * 3600,
    poll_s: float = 0.2,
) -> Built:
    """Return the cached arrays and info under ``cache_root/key``, building them first if needed.

    Args:
        build: writes the arrays through the ``CacheWriter`` it is given and returns the info; called only
            by the builder, only on a miss.
        is_builder: this process builds on a miss (local rank 0); others wait for it.
    """
    folder = cache_root / key
    if not (folder / DONE_MARK).exists():
        if is_builder:
            _build_atomically(folder, build)
        else:
            deadline = time.monotonic() + timeout_s
            while not (folder / DONE_MARK).exists():
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"data cache {folder} not built after {timeout_s:.0f} s by local rank 0; "
                        f"build it ahead with `llm-ds prepare`"
                    )
                time.sleep(poll_s)
    meta = json.loads((folder / DONE_MARK).read_text())
    return read_arrays(folder, meta["arrays"]), meta["info"]


def cache_size_bytes(cache_root: Path, key: str) -> int:
    return sum(f.stat().st_size for f in (cache_root / key).iterdir())


def _build_atomically(folder: Path, build: Callable[[CacheWriter], dict]) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        writer = CacheWriter(tmp)
        info = build(writer)
        meta = {"arrays": writer.close(), "info": info}
        (tmp / DONE_MARK).write_text(json.dumps(meta))  # the completion mark, written last
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / DONE_MARK).exists():  # not a concurrent builder's finished copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("built data cache %s in %.1f s", folder, time.perf_counter() - start)
