"""Tokenize documents into one token stream and cut it into fixed-length blocks.

Packing (as nanoGPT and Hugging Face's ``run_clm`` do) concatenates documents with an EOS
token after each one and cuts the stream into blocks of ``block_size`` tokens, so no position
is padding. The last partial block is dropped: at most ``block_size - 1`` tokens per split.
Labels are the inputs themselves: Hugging Face causal LMs shift them inside the model.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


def split_documents(n_docs: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hold out whole documents for validation, before packing, so none appears in both splits.

    Returns:
        Sorted train and validation document indices; validation gets at least one document.
    """
    if n_docs < 2:
        raise ValueError(f"need at least 2 documents to hold out a validation split, got {n_docs}")
    n_val = min(max(1, round(n_docs * val_fraction)), n_docs - 1)
    order = np.random.default_rng(seed).permutation(n_docs)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


def tokenize_to_stream(
    docs: Iterable[str], tokenizer, eos_id: int, dtype: np.dtype, batch_docs: int = 256
) -> np.ndarray:
    """Tokenize documents in batches and concatenate them, each followed by ``eos_id``."""
    chunks: list[np.ndarray] = []
    batch: list[str] = []

    def flush() -> None:
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            chunks.append(np.asarray([*ids, eos_id], dtype=dtype))
        batch.clear()

    for doc in docs:
        batch.append(doc)
        if len(batch) == batch_docs:
            flush()
    if batch:
        flush()
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=dtype)


def n_blocks(n_tokens: int, block_size: int) -> int:
    return n_tokens // block_size


def pack_blocks(stream: np.ndarray, block_size: int) -> np.ndarray:
    """A ``(n_blocks, block_size)`` view of the stream; the trailing partial block is dropped."""
    n = n_blocks(len(stream), block_size)
    return stream[: n * block_size].reshape(n, block_size)


def take_documents(docs: Sequence[str], indices: np.ndarray) -> list[str]:
    return [docs[i] for i in indices]
