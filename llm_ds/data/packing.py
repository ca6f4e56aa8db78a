"""Tokenize documents and lay the tokens out for training: packed blocks or padded rows.

Packing (as nanoGPT and Hugging Face's ``run_clm`` do) concatenates documents with an EOS
token after each one and cuts the stream into blocks of ``block_size`` tokens, so no position
is padding. The last partial block is dropped: at most ``block_size - 1`` tokens per split.
Padding (the seed chapter's way, kept for comparison) puts one document per row, EOS appended,
truncated to ``block_size`` and padded; pad positions are masked out of attention and loss.
Labels are the inputs themselves: Hugging Face causal LMs shift them inside the model.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
from collections import deque
from collections.abc import Iterable, Iterator

import numpy as np

from llm_ds.data.sources import batched

TOKENIZE_BATCH_DOCS = 256


def is_validation(index: int, seed: int, fraction: float) -> bool:
    """Whether document ``index`` of the stream is held out: a seeded hash, so it needs no total count.

    Streaming and in-memory runs hold out the same documents, and no document is in both splits.
    """
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") < fraction * 2**64


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


_worker_tokenizer = None


def _init_worker(tokenizer) -> None:
    global _worker_tokenizer
    # Processes are the parallelism here: one tokenizer thread each, no oversubscribed cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tokenizer = tokenizer


def _encode(batch: list[str]) -> list[list[int]]:
    return _worker_tokenizer(batch, add_special_tokens=False)["input_ids"]


def iter_token_ids(docs: Iterable[str], tokenizer, num_proc: int = 1) -> Iterator[list[int]]:
    """Token ids of each document, in order; ``num_proc`` > 1 tokenizes batches in worker processes."""
    batches = batched(docs, TOKENIZE_BATCH_DOCS)
    if num_proc <= 1:
        for batch in batches:
            yield from tokenizer(batch, add_special_tokens=False)["input_ids"]
        return
    ctx = multiprocessing.get_context("fork")
    # At most two batches per worker in flight, in order: Pool.imap would read the whole corpus ahead.
    with ctx.Pool(num_proc, initializer=_init_worker, initargs=(tokenizer,)) as pool:
        pending: deque = deque()
        for batch in batches:
            pending.append(pool.apply_async(_encode, (batch,)))
            if len(pending) >= 2 * num_proc:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()


def tokenize_to_stream(docs: Iterable[str], tokenizer, eos_id: int, dtype: np.dtype, num_proc: int = 1) -> np.ndarray:
    """All documents' tokens concatenated, each document followed by ``eos_id``."""
    chunks = [np.asarray([*ids, eos_id], dtype=dtype) for ids in iter_token_ids(docs, tokenizer, num_proc)]
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=dtype)


def n_blocks(n_tokens: int, block_size: int) -> int:
    return n_tokens // block_size


def pack_blocks(stream: np.ndarray, block_size: int) -> np.ndarray:
    """A ``(n_blocks, block_size)`` view of the stream; the trailing partial block is dropped."""
    n = n_blocks(len(stream), block_size)
    return stream[: n * block_size].reshape(n, block_size)


def real_token_fraction(lengths: np.ndarray, max_length: int) -> float:
    """Padding mode: the share of positions that hold a real token."""
    return float(lengths.sum()) / (len(lengths) * max_length) if len(lengths) else 0.0
