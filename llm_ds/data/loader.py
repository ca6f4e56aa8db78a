"""Datasets over the token arrays, a resumable per-rank sampler, streaming blocks, and the loaders.

``TrainLoader`` yields micro-batches forever, epoch after epoch, and knows its position
(epoch, samples this rank has consumed in it): ``state_dict()`` after any number of batches and
``load_state_dict()`` on a fresh loader give exactly the batches an uninterrupted loader would
have given next.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info

from llm_ds.config import IGNORE_INDEX, DataConfig
from llm_ds.data.packing import iter_token_ids, n_blocks, real_token_fraction
from llm_ds.data.pipeline import describe, has_hub_sources, iter_split, load_or_build_arrays, pin_hub_commits
from llm_ds.data.preprocess import Preprocessor
from llm_ds.data.sources import DataError, ReadStats

logger = logging.getLogger("llm_ds")
HUB_COMMITS_KEY = "llm_ds/hub_commits"


class BlockDataset(Dataset):
    """Block ``i`` is tokens ``[i * block_size, (i + 1) * block_size)`` of a 1-D token stream."""

    def __init__(self, stream: np.ndarray, block_size: int):
        self.stream, self.block_size = stream, block_size

    def __len__(self) -> int:
        return n_blocks(len(self.stream), self.block_size)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        start = i * self.block_size
        return {"input_ids": torch.from_numpy(self.stream[start : start + self.block_size].astype(np.int64))}


class PaddedDataset(Dataset):
    """Padding mode: row ``i`` is one document, padded to ``max_length`` with an attention mask."""

    def __init__(self, tokens: np.ndarray, lengths: np.ndarray, max_length: int, pad_id: int):
        self.tokens, self.lengths, self.max_length, self.pad_id = tokens, lengths, max_length, pad_id
        self.offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = self.tokens[self.offsets[i] : self.offsets[i + 1]].astype(np.int64)
        ids = torch.full((self.max_length,), self.pad_id, dtype=torch.int64)
        ids[: len(row)] = torch.from_numpy(row)
        mask = torch.zeros(self.max_length, dtype=torch.int64)
        mask[: len(row)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def real_token_fraction(self) -> float:
        return real_token_fraction(self.lengths, self.max_length)


BATCH_KEYS = ("input_ids", "attention_mask", "labels")  # what a sample may give the model; other fields stay out


def collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    """Stack samples (tensors, arrays or lists). Without ``labels``, the labels are the inputs (the model
    shifts them by one itself), pads not scored."""
    try:
        batch = {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in BATCH_KEYS if k in samples[0]}
    except RuntimeError as exc:  # rows of different lengths
        lengths = sorted({len(s["input_ids"]) for s in samples})
        raise DataError(
            f"a batch's samples have {lengths} tokens: every sample of a dataset needs data.block_size tokens "
            f"(pad with an attention_mask, or pack documents into blocks) ({str(exc).splitlines()[0]})"
        ) from None
    if "labels" not in batch:
        mask = batch.get("attention_mask")
        batch["labels"] = (
            batch["input_ids"] if mask is None else batch["input_ids"].masked_fill(mask == 0, IGNORE_INDEX)
        )
    return batch


def collate_blocks(blocks: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Packed blocks given as tensors, stacked as ``collate`` does."""
    return collate([{"input_ids": b} for b in blocks])


class ShardedSampler(Sampler[int]):
    """Each rank's share of one seeded permutation per epoch, resumable mid-epoch.

    Rank ``r`` takes positions ``r, r + W, r + 2W, ...`` of the epoch's permutation, so the
    first ``G`` positions form the first global batch of ``G`` sequences whatever ``W`` is: one
    rank accumulating ``G`` sequences sees the same samples per step as ``W`` ranks with ``G / W``
    each. The tail that does not fill a whole round (``round_size``: the global batch; default
    one sample per rank) is dropped, so an epoch holds the same whole steps on any world size.
    """

    def __init__(
        self,
        n_samples: int,
        rank: int,
        world_size: int,
        seed: int,
        shuffle: bool = True,
        round_size: int | None = None,
    ):
        round_size = round_size or world_size
        if round_size % world_size:
            raise ValueError(f"round_size={round_size} is not a multiple of world_size={world_size}")
        if n_samples < round_size:
            raise DataError(f"{n_samples} samples are fewer than one round of {round_size} across {world_size} ranks")
        self.n_samples, self.rank, self.world_size = n_samples, rank, world_size
        self.seed, self.shuffle, self.round_size = seed, shuffle, round_size
        self.epoch = 0
        self.consumed = 0  # iteration starts after this many samples of the epoch

    def __len__(self) -> int:
        return self.n_samples // self.round_size * self.round_size // self.world_size

    def indices(self) -> np.ndarray:
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n_samples)
        else:
            order = np.arange(self.n_samples)
        return order[: len(self) * self.world_size][self.rank :: self.world_size]

    def __iter__(self):
        return iter(self.indices()[self.consumed :].tolist())

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])


class StreamingBlocks(IterableDataset):
    """Blocks packed on the fly from a document stream, sharded by document across ranks and workers.

    Shard ``s`` of ``S = world_size * num_workers`` takes documents ``s, s + S, ...`` and packs
    them into blocks; with one shard the blocks equal the in-memory path's. The position is the
    number of blocks this rank has consumed in the epoch: on resume each worker skips its share.
    With several loader workers, resuming is exact until the first worker runs out of documents
    at the end of an epoch (the loader then no longer alternates between workers strictly).
    """

    def __init__(
        self,
        docs: Callable[[], Iterator[str]],
        tokenizer,
        block_size: int,
        rank: int,
        world_size: int,
        micro_batch_size: int,
        num_proc: int = 1,
    ):
        self.docs, self.tokenizer, self.block_size = docs, tokenizer, block_size
        self.rank, self.world_size, self.micro_batch_size, self.num_proc = rank, world_size, micro_batch_size, num_proc
        self.eos_id = tokenizer.eos_token_id
        self.consumed = 0

    def _worker(self) -> tuple[int, int]:
        info = get_worker_info()
        return (info.id, info.num_workers) if info else (0, 1)

    def blocks(self, worker: int | None = None) -> Iterator[np.ndarray]:
        """This shard's blocks; ``worker`` overrides the loader worker's id (see ``__iter__``)."""
        info_worker, n_workers = self._worker()
        worker = info_worker if worker is None else worker
        shard, n_shards = self.rank * n_workers + worker, self.world_size * n_workers
        mine = (doc for i, doc in enumerate(self.docs()) if i % n_shards == shard)
        buffer: list[int] = []
        for ids in iter_token_ids(mine, self.tokenizer, self.num_proc):
            buffer.extend(ids)
            buffer.append(self.eos_id)
            while len(buffer) >= self.block_size:
                yield np.asarray(buffer[: self.block_size], dtype=np.int64)
                del buffer[: self.block_size]

    def __iter__(self):
        worker, n_workers = self._worker()
        # A DataLoader takes whole batches from its workers in turn, always starting with worker 0:
        # batch b came from worker b % W. After ``done`` batches, the next comes from worker done % W,
        # so worker w of the new loader continues the shard of worker (w + done) % W, minus what it gave.
        done = self.consumed // self.micro_batch_size
        shard_worker = (worker + done) % n_workers
        skip = max(0, -(-(done - shard_worker) // n_workers)) * self.micro_batch_size
        for i, block in enumerate(self.blocks(shard_worker)):
            if i >= skip:
                yield {"input_ids": torch.from_numpy(block)}


class TrainLoader:
    """Micro-batches forever, epoch after epoch, with a resumable position."""

    def __init__(self, loader: DataLoader, micro_batch_size: int):
        self.loader, self.micro_batch_size = loader, micro_batch_size
        self.epoch, self.consumed = 0, 0
        self.real_token_fraction = getattr(loader.dataset, "real_token_fraction", lambda: 1.0)()

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            position = {"epoch": self.epoch, "consumed": self.consumed}
            if isinstance(self.loader.dataset, StreamingBlocks):
                self.loader.dataset.consumed = self.consumed
            else:
                self.loader.sampler.load_state_dict(position)
            for batch in self.loader:
                self.consumed += self.micro_batch_size
                yield batch
            self.epoch, self.consumed = self.epoch + 1, 0

    def batches_per_epoch(self) -> int | None:
        return None if isinstance(self.loader.dataset, StreamingBlocks) else len(self.loader)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])


@dataclass
class Loaders:
    train: TrainLoader
    eval: DataLoader | None  # None: no evaluation data
    n_train_samples: int | None  # None when streaming
    info: dict


def build_loaders(
    cfg: DataConfig,
    tokenizer,
    micro_batch_size: int,
    rank: int,
    world_size: int,
    local_rank: int,
    seed: int,
    eval_max_batches: int | None,
    pin_memory: bool = False,
    grad_accum_steps: int = 1,
) -> Loaders:
    """The train and validation loaders for this rank; an epoch is a whole number of global batches of
    ``micro_batch_size * grad_accum_steps * world_size`` sequences. ``rank`` and ``world_size`` count the
    ranks that split the data (data-parallel ranks: a tensor group reads one share)."""
    common = {"collate_fn": collate, "pin_memory": pin_memory, "num_workers": cfg.num_workers}
    if cfg.num_workers:
        common["persistent_workers"] = False
    cfg = _agreed_hub_commits(cfg)
    if cfg.streaming:
        return _build_streaming(cfg, tokenizer, micro_batch_size, rank, world_size, seed, eval_max_batches, common)
    arrays, info = load_or_build_arrays(cfg, tokenizer, seed, is_builder=local_rank == 0)
    logger.info("data: %s (cache %s)", describe(info), info["cache_dir"])
    if cfg.packing:
        train, val = (BlockDataset(arrays[s], cfg.block_size) for s in ("train", "val"))
    else:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        train, val = (
            PaddedDataset(arrays[s], arrays[f"{s}_lengths"], cfg.block_size, pad_id) for s in ("train", "val")
        )
    global_batch = micro_batch_size * grad_accum_steps * world_size
    _check_sizes(cfg, info, len(train), len(val), world_size, global_batch)
    train_loader = DataLoader(
        train,
        batch_size=micro_batch_size,
        drop_last=True,
        sampler=ShardedSampler(len(train), rank, world_size, seed, round_size=global_batch),
        **common,
    )
    eval_loader = ordered_loader(val, micro_batch_size, rank, world_size, common)
    return Loaders(TrainLoader(train_loader, micro_batch_size), eval_loader, len(train), info)


def build_dataset_loaders(
    train_dataset,
    eval_dataset,
    block_size: int,
    micro_batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    num_workers: int = 0,
    pin_memory: bool = False,
    grad_accum_steps: int = 1,
) -> Loaders:
    """Loaders over the user's datasets: any map-style dataset (a torch ``Dataset``, a ``datasets.Dataset``)
    whose items are dicts with ``input_ids`` of ``block_size`` tokens and optionally ``labels`` and
    ``attention_mask``.

    The train loader samples as for the run config's data (``ShardedSampler``), so resuming is exact;
    ``eval_dataset`` may be None (no evaluation).
    """
    common = {"collate_fn": collate, "pin_memory": pin_memory, "num_workers": num_workers}
    _check_dataset(train_dataset, "train_dataset", block_size)
    global_batch = micro_batch_size * grad_accum_steps * world_size
    if len(train_dataset) < global_batch:
        raise DataError(
            f"train_dataset has {len(train_dataset)} samples, fewer than one global batch of {global_batch} "
            f"({world_size} ranks x {micro_batch_size} x {grad_accum_steps} accumulated); add data or lower "
            f"train.micro_batch_size or train.grad_accum_steps"
        )
    train = DataLoader(
        train_dataset,
        batch_size=micro_batch_size,
        drop_last=True,
        sampler=ShardedSampler(len(train_dataset), rank, world_size, seed, round_size=global_batch),
        **common,
    )
    evaluation = None
    if eval_dataset is not None:
        evaluation = build_eval_loader(eval_dataset, block_size, micro_batch_size, rank, world_size, common)
    return Loaders(TrainLoader(train, micro_batch_size), evaluation, len(train_dataset), {"user_datasets": True})


def build_eval_loader(
    eval_dataset, block_size: int, micro_batch_size: int, rank: int, world_size: int, loader_args: dict
) -> DataLoader:
    """A loader over a user's validation dataset: each rank an equal share, in order."""
    _check_dataset(eval_dataset, "eval_dataset", block_size)
    if len(eval_dataset) < world_size:
        raise DataError(f"eval_dataset has {len(eval_dataset)} samples, fewer than the {world_size} rank(s)")
    return ordered_loader(eval_dataset, micro_batch_size, rank, world_size, loader_args)


def ordered_loader(dataset, micro_batch_size: int, rank: int, world_size: int, loader_args: dict) -> DataLoader:
    """Validation batches: each rank an equal share of ``dataset``, in order, the last batch possibly short."""
    sampler = ShardedSampler(len(dataset), rank, world_size, seed=0, shuffle=False)
    return DataLoader(dataset, batch_size=micro_batch_size, sampler=sampler, **loader_args)


def _check_dataset(dataset, name: str, block_size: int) -> None:
    """One line naming what is wrong with a user's dataset, before any batch is drawn."""
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise DataError(f"{name}: a map-style dataset (with __len__ and __getitem__) is needed, got {type(dataset)}")
    if len(dataset) == 0:
        raise DataError(f"{name} is empty")
    sample = dataset[0]
    if not isinstance(sample, dict) or "input_ids" not in sample:
        got = sorted(sample) if isinstance(sample, dict) else type(sample).__name__
        raise DataError(
            f"{name}[0] must be a dict with `input_ids` (and optionally `labels`, `attention_mask`), got {got}"
        )
    if len(sample["input_ids"]) != block_size:
        raise DataError(
            f"{name}[0] has {len(sample['input_ids'])} tokens and data.block_size is {block_size}: set "
            f"data.block_size={len(sample['input_ids'])} (tokens/s, MFU and the summary count by it)"
        )


_hub_agreements = itertools.count()  # one store key per agreement: a second run in this process waits anew


def _agreed_hub_commits(cfg: DataConfig) -> DataConfig:
    """``pin_hub_commits`` on rank 0, its answer handed to every rank through the process group's store, so
    that all ranks key and load one commit even if the hub moves on meanwhile."""
    if not has_hub_sources(cfg):
        return cfg
    if not torch.distributed.is_initialized():
        return pin_hub_commits(cfg)
    store = torch.distributed.distributed_c10d._get_default_store()
    key = f"{HUB_COMMITS_KEY}/{next(_hub_agreements)}"
    if torch.distributed.get_rank() == 0:
        pinned = pin_hub_commits(cfg)
        revisions = [[s.revision for s in pinned.sources], [s.revision for s in pinned.val_sources]]
        store.set(key, json.dumps(revisions))
        return pinned
    train, val = json.loads(store.get(key))
    return dataclasses.replace(
        cfg,
        sources=[dataclasses.replace(s, revision=r) for s, r in zip(cfg.sources, train, strict=True)],
        val_sources=[dataclasses.replace(s, revision=r) for s, r in zip(cfg.val_sources, val, strict=True)],
    )


def _check_sizes(cfg: DataConfig, info: dict, n_train: int, n_val: int, world_size: int, global_batch: int) -> None:
    unit = "blocks of data.block_size" if cfg.packing else "documents of at least 2 tokens"
    if n_train < global_batch:
        raise DataError(
            f"the train split has {info['train_tokens']:,} tokens in {info['train_docs']:,} documents: "
            f"{n_train} {unit}={cfg.block_size}, fewer than one global batch of {global_batch} ({world_size} "
            f"rank(s)); add data or lower data.block_size, train.micro_batch_size or train.grad_accum_steps"
        )
    if n_val < world_size:
        raise DataError(
            f"the validation split has {info['val_tokens']:,} tokens in {info['val_docs']:,} documents: "
            f"{n_val} {unit}={cfg.block_size}, fewer than the {world_size} rank(s); raise "
            f"data.val_fraction, give data.val_sources or lower data.block_size"
        )


def _build_streaming(cfg, tokenizer, micro, rank, world_size, seed, eval_max_batches, common) -> Loaders:
    def train_docs() -> Iterator[str]:
        return iter_split(cfg, "train", seed, ReadStats(), Preprocessor(cfg), streaming=True)

    train = StreamingBlocks(train_docs, tokenizer, cfg.block_size, rank, world_size, micro, num_proc=1)
    # Validation: the first blocks of the validation stream, held in memory, an equal share per rank.
    limit = (eval_max_batches or 50) * micro * world_size
    val_all = StreamingBlocks(
        lambda: iter_split(cfg, "val", seed, ReadStats(), Preprocessor(cfg), streaming=True),
        tokenizer,
        cfg.block_size,
        0,
        1,
        micro,
    )
    blocks = list(itertools.islice(val_all.blocks(), limit))
    if len(blocks) < world_size:
        raise DataError(
            f"the validation stream gave {len(blocks)} blocks of data.block_size={cfg.block_size}, fewer "
            f"than the {world_size} rank(s); raise data.val_fraction or give data.val_sources"
        )
    val = BlockDataset(np.concatenate(blocks), cfg.block_size)
    train_loader = DataLoader(train, batch_size=micro, drop_last=True, **common)
    eval_loader = ordered_loader(val, micro, rank, world_size, common)
    logger.info(
        "data: streaming from %d source(s); %d validation blocks held in memory", len(cfg.train_sources()), len(val)
    )
    return Loaders(TrainLoader(train_loader, micro), eval_loader, None, {"streaming": True})
