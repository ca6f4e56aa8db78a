"""Token streams built once per (sources, tokenizer, split) and reused, memory-mapped from disk.

One process per node (local rank 0) builds the cache; the others on that node wait for its
completion mark by polling the file system, so a long build never runs into a collective's
timeout. Writes go to a temporary folder renamed into place, so a crash leaves no half cache.
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

logger = logging.getLogger(__name__)
DONE_MARK = "meta.json"
CACHE_FORMAT = 1


def default_cache_dir() -> Path:
    return Path(os.environ.get("LLM_DS_CACHE", Path.home() / ".cache" / "llm_ds"))


def fingerprint(spec: dict, files: list[Path], tokenizer) -> str:
    """A key that changes with the spec (sources, preprocessing, split, block size, layout), the files
    (path, size, mtime) and the tokenizer's full serialisation."""
    h = hashlib.sha256()
    h.update(json.dumps({"format": CACHE_FORMAT, **spec}, sort_keys=True, default=str).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    # The tokenizer's full serialisation, so a retrained tokenizer under the same name never matches.
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else repr(sorted(tokenizer.get_vocab().items())).encode())
    return h.hexdigest()[:20]


Built = tuple[dict[str, np.ndarray], dict]


def load_or_build(
    cache_root: Path,
    key: str,
    build: Callable[[], Built],
    is_builder: bool,
    timeout_s: float = 24 * 3600,
    poll_s: float = 0.2,
) -> Built:
    """Return the cached arrays and info under ``cache_root/key``, building them first if needed.

    Args:
        build: makes ``({name: 1-D array}, info)``; called only by the builder, only on a miss.
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
    arrays = {}
    for name, (dtype, n) in meta["arrays"].items():
        arrays[name] = (
            np.memmap(folder / f"{name}.bin", dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype=dtype)
        )
    return arrays, meta["info"]


def cache_size_bytes(cache_root: Path, key: str) -> int:
    return sum(f.stat().st_size for f in (cache_root / key).iterdir())


def _build_atomically(folder: Path, build: Callable[[], Built]) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    arrays, info = build()
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        for name, array in arrays.items():
            array.tofile(tmp / f"{name}.bin")
        meta = {"arrays": {n: [a.dtype.str, int(len(a))] for n, a in arrays.items()}, "info": info}
        (tmp / DONE_MARK).write_text(json.dumps(meta))  # the completion mark, written last
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / DONE_MARK).exists():  # not a concurrent builder's finished copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("built data cache %s in %.1f s", folder, time.perf_counter() - start)
