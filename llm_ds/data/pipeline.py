"""From ``cfg.data`` to documents per split, and to the cached token arrays.

Sources are read and mixed, cleaned, then split: each document of the mixed, cleaned stream goes
to validation by a seeded hash of its position (unless ``val_sources`` are given), so no document
is in both splits and streaming and in-memory runs split alike.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from llm_ds.config import DataConfig
from llm_ds.data import cache
from llm_ds.data.packing import is_validation, iter_token_ids, token_dtype
from llm_ds.data.preprocess import Preprocessor
from llm_ds.data.sources import DataError, ReadStats, hub_commit, iter_source, mix_sources, source_files

logger = logging.getLogger("llm_ds")
SPLITS = ("train", "val")


def iter_split(
    cfg: DataConfig, split: str, seed: int, stats: ReadStats, pre: Preprocessor, streaming: bool = False
) -> Iterator[str]:
    """The documents of one split, in their fixed order."""
    explicit_val = bool(cfg.val_sources)
    sources = cfg.val_sources if split == "val" and explicit_val else cfg.train_sources()
    iterators = [iter_source(s, cfg.text_field, stats, streaming) for s in sources]
    docs = pre(mix_sources(iterators, [s.weight for s in sources], cfg.mix, seed))
    if explicit_val:
        yield from docs
        return
    want_val = split == "val"
    for i, doc in enumerate(docs):
        if is_validation(i, seed, cfg.val_fraction) == want_val:
            yield doc


def local_files(cfg: DataConfig) -> list[Path]:
    """Every local file the sources depend on: their own files, and the files of a ``hub:`` source that is
    a local dataset folder (``datasets.load_dataset`` reads it; editing it must change the cache key)."""
    files = []
    for source in (*cfg.train_sources(), *cfg.val_sources):
        files += source_files(source)
        if source.hub and Path(source.hub).is_dir():
            files += sorted(p for p in Path(source.hub).rglob("*") if p.is_file())
    return files


def has_hub_sources(cfg: DataConfig) -> bool:
    return any(s.hub for s in (*cfg.sources, *cfg.val_sources))


def pin_hub_commits(cfg: DataConfig) -> DataConfig:
    """``cfg`` with every hub dataset name's revision replaced by the commit it stands for now, so that the
    cache key and the load both name that one commit: a new commit on the hub makes a new cache. Local
    files and local dataset folders stay as they are (their files key the cache)."""

    def pinned(sources):
        out = []
        for source in sources:
            if not source.hub or Path(source.hub).is_dir():
                out.append(source)
                continue
            commit = hub_commit(source)
            if commit is None:
                logger.warning(
                    "data source %s: its commit is unknown (hub unreachable, nothing in the local hub cache); "
                    "the token cache cannot tell a newer revision from this one",
                    source.describe(),
                )
            out.append(dataclasses.replace(source, revision=commit) if commit else source)
        return out

    if not has_hub_sources(cfg):
        return cfg
    return dataclasses.replace(cfg, sources=pinned(cfg.sources), val_sources=pinned(cfg.val_sources))


def cache_key(cfg: DataConfig, tokenizer, seed: int) -> str:
    spec = {
        "sources": [dataclasses.asdict(s) for s in cfg.train_sources()],
        "val_sources": [dataclasses.asdict(s) for s in cfg.val_sources],
        "text_field": cfg.text_field,
        "mix": cfg.mix,
        "val_fraction": cfg.val_fraction,
        "seed": seed,
        "preprocess": [cfg.normalize_nfkc, cfg.strip_control, cfg.replace_urls, cfg.min_chars, cfg.dedup],
        "block_size": cfg.block_size,
        "packing": cfg.packing,
    }
    return cache.fingerprint(spec, local_files(cfg), tokenizer)


def cache_root(cfg: DataConfig) -> Path:
    return (Path(cfg.cache_dir) if cfg.cache_dir else cache.default_cache_dir()) / "tokens"


def iter_routed(cfg: DataConfig, seed: int, stats: ReadStats, pre: Preprocessor) -> Iterator[tuple[str, str]]:
    """``(split, document)`` for every document, reading each source once."""
    if cfg.val_sources:
        for split in SPLITS:
            yield from ((split, doc) for doc in iter_split(cfg, split, seed, stats, pre))
        return
    sources = cfg.train_sources()
    iterators = [iter_source(s, cfg.text_field, stats) for s in sources]
    for i, doc in enumerate(pre(mix_sources(iterators, [s.weight for s in sources], cfg.mix, seed))):
        yield ("val" if is_validation(i, seed, cfg.val_fraction) else "train"), doc


def write_arrays(cfg: DataConfig, tokenizer, seed: int, writer: cache.CacheWriter) -> dict:
    """Read, clean, split and tokenize everything into ``writer`` as it goes: per split, the packed stream
    (``train``, ``val``), or in padding mode the rows end to end and their lengths (``train_lengths``...).
    Returns the build's info (documents, tokens, what preprocessing changed)."""
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise DataError(f"tokenizer {cfg.tokenizer!r} has no EOS token to separate documents")
    dtype = token_dtype(len(tokenizer))
    stats, pre = ReadStats(), Preprocessor(cfg)
    labels: deque[str] = deque()  # the split of each document handed to the tokenizer, in order
    for split in SPLITS:
        writer.add(split, dtype)
        if not cfg.packing:
            writer.add(f"{split}_lengths", np.uint32)

    def docs() -> Iterator[str]:
        for split, doc in iter_routed(cfg, seed, stats, pre):
            labels.append(split)
            yield doc

    start = time.perf_counter()
    n_docs = dict.fromkeys(SPLITS, 0)
    for ids in iter_token_ids(docs(), tokenizer, cfg.num_proc):
        split = labels.popleft()
        n_docs[split] += 1
        ids.append(eos_id)
        if not cfg.packing:
            ids = ids[: cfg.block_size]
            if len(ids) < 2:  # a 1-token row predicts nothing
                continue
            writer.append(f"{split}_lengths", [len(ids)])
        writer.append(split, ids)
    info: dict = {
        "read": dataclasses.asdict(stats),
        "preprocess": dataclasses.asdict(pre.stats),
        "seconds": time.perf_counter() - start,
    }
    for split in SPLITS:
        info[f"{split}_docs"], info[f"{split}_tokens"] = n_docs[split], writer.counts[split]
    if info["train_docs"] == 0:
        raise DataError(f"the data sources hold no usable training document ({describe(info)})")
    return info


def build_arrays(cfg: DataConfig, tokenizer, seed: int) -> cache.Built:
    """``write_arrays`` into memory, past any cache: for inspection, tests and benchmarks."""
    with tempfile.TemporaryDirectory(prefix="llm-ds-build-") as tmp:
        writer = cache.CacheWriter(Path(tmp))
        info = write_arrays(cfg, tokenizer, seed, writer)
        return cache.read_arrays(Path(tmp), writer.close(), mmap=False), info


def load_or_build_arrays(cfg: DataConfig, tokenizer, seed: int, is_builder: bool) -> cache.Built:
    """The cached arrays for this config, built by ``is_builder`` on a miss while the others wait."""
    key = cache_key(cfg, tokenizer, seed)
    build = functools.partial(write_arrays, cfg, tokenizer, seed)
    arrays, info = cache.load_or_build(cache_root(cfg), key, build, is_builder)
    info["cache_dir"] = str(cache_root(cfg) / key)
    return arrays, info


def describe(info: dict) -> str:
    """One line on what the data build read and changed."""
    read = info.get("read", {})
    parts = [
        f"{info['train_docs']:,} train / {info['val_docs']:,} validation documents",
        f"{info['train_tokens']:,} / {info['val_tokens']:,} tokens",
    ]
    if read.get("bad_utf8_chars"):
        parts.append(f"{read['bad_utf8_chars']:,} undecodable bytes replaced (U+FFFD)")
    pre = {k: v for k, v in info.get("preprocess", {}).items() if v}
    if pre:
        parts.append("preprocessing: " + ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in pre.items()))
    return "; ".join(parts)
