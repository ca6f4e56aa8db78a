"""Packed blocks as a dataset, a resumable per-rank sampler, and the loaders built from ``cfg.data``."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from llm_ds.config import DataConfig
from llm_ds.data import cache
from llm_ds.data.packing import n_blocks, split_documents, token_dtype, tokenize_to_stream
from llm_ds.data.sources import DataError, expand_paths, iter_documents

logger = logging.getLogger(__name__)


class BlockDataset(Dataset):
    """Block ``i`` is tokens ``[i * block_size, (i + 1) * block_size)`` of a 1-D token stream."""

    def __init__(self, stream: np.ndarray, block_size: int):
        self.stream = stream
        self.block_size = block_size

    def __len__(self) -> int:
        return n_blocks(len(self.stream), self.block_size)

    def __getitem__(self, i: int) -> torch.Tensor:
        start = i * self.block_size
        return torch.from_numpy(self.stream[start : start + self.block_size].astype(np.int64))


def collate_blocks(blocks: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stack blocks into a batch. Labels equal the inputs: the model shifts them by one itself."""
    input_ids = torch.stack(blocks)
    return {"input_ids": input_ids, "labels": input_ids}


class ShardedSampler(Sampler[int]):
    """Each rank's share of one seeded permutation per epoch, resumable mid-epoch.

    Rank ``r`` takes positions ``r, r + W, r + 2W, ...`` of the epoch's permutation, so the
    first ``B * W`` positions form the first global batch whatever ``W`` is: one rank with a
    global batch ``B * W`` sees the same samples per step as ``W`` ranks with ``B`` each.
    The tail that does not fill a whole round of ranks is dropped.
    """

    def __init__(self, n_samples: int, rank: int, world_size: int, seed: int, shuffle: bool = True):
        if n_samples < world_size:
            raise DataError(f"{n_samples} blocks cannot be shared among {world_size} ranks")
        self.n_samples, self.rank, self.world_size = n_samples, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch = 0
        # Samples of this epoch already trained on by this rank: iteration starts after them.
        # The trainer, not the iterator, advances it, since a loader prefetches ahead of training.
        self.consumed = 0

    def __len__(self) -> int:
        return self.n_samples // self.world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.consumed = epoch, 0

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


@dataclass
class Splits:
    train: BlockDataset
    val: BlockDataset


def build_splits(cfg: DataConfig, tokenizer, seed: int, local_rank: int) -> Splits:
    """Token streams for the train and validation splits, from the cache or built into it."""
    files = expand_paths(cfg.paths)
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise DataError(f"tokenizer {cfg.tokenizer!r} has no EOS token to separate documents")
    key = cache.fingerprint(files, tokenizer, cfg.text_field, cfg.val_fraction, seed)
    dtype = token_dtype(len(tokenizer))

    def build() -> dict[str, np.ndarray]:
        docs = list(iter_documents(files, cfg.text_field))
        if len(docs) < 2:
            raise DataError(
                f"data.paths: {len(docs)} non-empty document(s) in {len(files)} file(s); "
                f"need at least 2 to hold out a validation split"
            )
        train_idx, val_idx = split_documents(len(docs), cfg.val_fraction, seed)
        return {
            "train": tokenize_to_stream((docs[i] for i in train_idx), tokenizer, eos_id, dtype),
            "val": tokenize_to_stream((docs[i] for i in val_idx), tokenizer, eos_id, dtype),
        }

    root = Path(cfg.cache_dir) if cfg.cache_dir else cache.default_cache_dir()
    streams = cache.load_or_build(root / "tokens", key, build, is_builder=local_rank == 0)
    train, val = BlockDataset(streams["train"], cfg.block_size), BlockDataset(streams["val"], cfg.block_size)
    for name, ds, n_tok in (("train", train, len(streams["train"])), ("validation", val, len(streams["val"]))):
        if len(ds) == 0:
            raise DataError(
                f"the {name} split has {n_tok:,} tokens, less than one block of data.block_size="
                f"{cfg.block_size}; add data, lower data.block_size or change data.val_fraction"
            )
    return Splits(train=train, val=val)


def build_train_loader(
    ds: BlockDataset,
    micro_batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    sampler = ShardedSampler(len(ds), rank, world_size, seed, shuffle=True)
    return DataLoader(
        ds,
        batch_size=micro_batch_size,
        sampler=sampler,
        collate_fn=collate_blocks,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=True,
    )


def build_eval_loader(
    ds: BlockDataset, micro_batch_size: int, rank: int, world_size: int, pin_memory: bool = False
) -> DataLoader:
    """Validation blocks in order, an equal share per rank (ZeRO-3 needs every rank in every forward)."""
    sampler = ShardedSampler(len(ds), rank, world_size, seed=0, shuffle=False)
    return DataLoader(
        ds,
        batch_size=micro_batch_size,
        sampler=sampler,
        collate_fn=collate_blocks,
        pin_memory=pin_memory,
        drop_last=False,
    )
