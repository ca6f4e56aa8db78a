import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from llm_ds.config import BUNDLED_TOKENIZER, DataConfig, SourceConfig
from llm_ds.data import cache
from llm_ds.data.loader import BlockDataset, PaddedDataset, build_loaders, collate
from llm_ds.data.packing import is_validation, pack_blocks, tokenize_to_stream
from llm_ds.data.pipeline import build_arrays, cache_key, load_or_build_arrays
from llm_ds.data.sources import DataError


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(BUNDLED_TOKENIZER))


def corpus(folder, n=60, words=12):
    docs = [" ".join(f"word{(i * 7 + j) % 50}" for j in range(words + i % 5)) + f" doc{i}." for i in range(n)]
    (folder / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return docs


def test_bundled_tokenizer_loads_with_autotokenizer(tokenizer):
    assert len(tokenizer) == 8192 and tokenizer.eos_token == "<|endoftext|>"
    text = "Packing concatenates documents, with an EOS token after each one."
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_packing_is_exact(tokenizer):
    docs = ["First document.", "A second, longer document with more words in it.", "Third!"]
    eos = tokenizer.eos_token_id
    stream = tokenize_to_stream(iter(docs), tokenizer, eos, np.dtype(np.uint16))
    expected = [t for d in docs for t in [*tokenizer(d)["input_ids"], eos]]
    assert stream.tolist() == expected
    for block_size in (2, 3, 5, len(expected)):
        blocks = pack_blocks(stream, block_size)
        n = len(expected) // block_size
        # Concatenating the blocks gives the stream in order; only the last partial block is dropped.
        assert blocks.shape == (n, block_size) and blocks.reshape(-1).tolist() == expected[: n * block_size]
    assert pack_blocks(stream, len(expected) + 1).shape == (0, len(expected) + 1)


def test_parallel_tokenization_gives_the_same_stream(tokenizer):
    docs = [f"Document {i} has some words in it, number {i * 3}." for i in range(600)]
    one = tokenize_to_stream(iter(docs), tokenizer, 0, np.dtype(np.uint16), num_proc=1)
    two = tokenize_to_stream(iter(docs), tokenizer, 0, np.dtype(np.uint16), num_proc=2)
    assert np.array_equal(one, two)


def test_validation_split_is_seeded_and_near_its_fraction():
    picks = [is_validation(i, 7, 0.1) for i in range(20000)]
    assert np.mean(picks) == pytest.approx(0.1, abs=0.01)
    assert picks == [is_validation(i, 7, 0.1) for i in range(20000)]
    assert picks != [is_validation(i, 8, 0.1) for i in range(20000)]


def test_split_routes_each_document_once(tmp_path, tokenizer):
    docs = corpus(tmp_path)
    cfg = DataConfig(paths=[str(tmp_path / "docs.jsonl")], val_fraction=0.2, block_size=16)
    arrays, info = build_arrays(cfg, tokenizer, seed=3)
    eos = tokenizer.eos_token_id
    val_docs = [d for i, d in enumerate(docs) if is_validation(i, 3, 0.2)]
    train_docs = [d for i, d in enumerate(docs) if not is_validation(i, 3, 0.2)]
    assert info["train_docs"] == len(train_docs) and info["val_docs"] == len(val_docs) > 0
    for split, split_docs in (("train", train_docs), ("val", val_docs)):
        expected = [t for d in split_docs for t in [*tokenizer(d)["input_ids"], eos]]
        assert arrays[split].tolist() == expected


def test_explicit_validation_source(tmp_path, tokenizer):
    corpus(tmp_path)
    (tmp_path / "val.txt").write_text("A validation text of its own.")
    cfg = DataConfig(paths=[str(tmp_path / "docs.jsonl")], val_sources=[SourceConfig(path=str(tmp_path / "val.txt"))])
    arrays, info = build_arrays(cfg, tokenizer, seed=0)
    assert info["train_docs"] == 60 and info["val_docs"] == 1
    assert tokenizer.decode(arrays["val"].tolist()) == "A validation text of its own.<|endoftext|>"


def test_padding_mode_rows_masks_and_real_token_fraction(tmp_path, tokenizer):
    corpus(tmp_path)
    cfg = DataConfig(paths=[str(tmp_path / "docs.jsonl")], packing=False, block_size=48, val_fraction=0.2)
    arrays, info = build_arrays(cfg, tokenizer, seed=0)
    ds = PaddedDataset(arrays["train"], arrays["train_lengths"], 48, tokenizer.eos_token_id)
    assert len(ds) == info["train_docs"]
    batch = collate([ds[0], ds[1]])
    mask = batch["attention_mask"]
    assert batch["input_ids"].shape == mask.shape == (2, 48)
    assert (batch["labels"][mask == 0] == -100).all() and (
        batch["labels"][mask == 1] == batch["input_ids"][mask == 1]
    ).all()
    assert 0 < ds.real_token_fraction() < 1
    assert ds.real_token_fraction() == pytest.approx(arrays["train_lengths"].sum() / (len(ds) * 48))


def test_cache_built_once_and_keyed(tmp_path, tokenizer):
    corpus(tmp_path)
    cfg = DataConfig(paths=[str(tmp_path / "docs.jsonl")], block_size=16, cache_dir=str(tmp_path / "cache"))
    first, info = load_or_build_arrays(cfg, tokenizer, seed=0, is_builder=True)
    folder = tmp_path / "cache" / "tokens" / cache_key(cfg, tokenizer, 0)
    stamp = (folder / "meta.json").stat().st_mtime_ns
    again, _ = load_or_build_arrays(cfg, tokenizer, seed=0, is_builder=False)
    assert isinstance(again["train"], np.memmap) and np.array_equal(first["train"], again["train"])
    assert (folder / "meta.json").stat().st_mtime_ns == stamp
    key = cache_key(cfg, tokenizer, 0)
    other_tok = AutoTokenizer.from_pretrained(str(BUNDLED_TOKENIZER))
    other_tok.add_tokens(["<|extra|>"])
    changed = [
        cache_key(DataConfig(**{**cfg.__dict__, "block_size": 32}), tokenizer, 0),
        cache_key(DataConfig(**{**cfg.__dict__, "dedup": True}), tokenizer, 0),
        cache_key(DataConfig(**{**cfg.__dict__, "packing": False}), tokenizer, 0),
        cache_key(cfg, tokenizer, 1),
        cache_key(cfg, other_tok, 0),
    ]
    assert key not in changed and len(set(changed)) == len(changed)
    (tmp_path / "docs.jsonl").write_text((tmp_path / "docs.jsonl").read_text() + '{"text": "one more"}\n')
    assert cache_key(cfg, tokenizer, 0) != key  # an edited file is a new cache


def test_waiting_rank_times_out_with_a_clear_message(tmp_path):
    with pytest.raises(TimeoutError, match="not built after"):
        cache.load_or_build(tmp_path, "never", lambda: ({}, {}), is_builder=False, timeout_s=0.3, poll_s=0.05)


def test_too_little_data_says_what_to_change(tmp_path, tokenizer):
    (tmp_path / "tiny.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n{"text": "three"}\n')
    cfg = DataConfig(paths=[str(tmp_path / "tiny.jsonl")], block_size=64, cache_dir=str(tmp_path / "c"))
    with pytest.raises(
        DataError,
        match=r"the train split has \d+ tokens in \d+ documents: 0 blocks of "
        r"data.block_size=64, fewer than one global batch",
    ):
        build_loaders(cfg, tokenizer, 4, 0, 1, 0, seed=0, eval_max_batches=None)


def test_validation_without_a_full_block_gives_counts(tmp_path, tokenizer):
    corpus(tmp_path, n=200)
    cfg = DataConfig(
        paths=[str(tmp_path / "docs.jsonl")], block_size=64, val_fraction=0.005, cache_dir=str(tmp_path / "c")
    )
    with pytest.raises(
        DataError,
        match=r"the validation split has \d+ tokens in \d+ documents: 0 blocks .* raise "
        r"data.val_fraction, give data.val_sources",
    ):
        build_loaders(cfg, tokenizer, 2, 0, 1, 0, seed=0, eval_max_batches=None)


def test_in_memory_blocks_are_the_packed_stream(tmp_path, tokenizer):
    corpus(tmp_path)
    cfg = DataConfig(paths=[str(tmp_path / "docs.jsonl")], block_size=16, cache_dir=str(tmp_path / "c"))
    loaders = build_loaders(cfg, tokenizer, 2, 0, 1, 0, seed=0, eval_max_batches=None)
    ds = loaders.train.loader.dataset
    assert isinstance(ds, BlockDataset)
    assert (
        np.concatenate([ds[i]["input_ids"].numpy() for i in range(len(ds))]).tolist()
        == ds.stream[: len(ds) * 16].tolist()
    )


def test_editing_a_local_hub_dataset_folder_changes_the_cache_key(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "mydataset" / "data"
    folder.mkdir(parents=True)
    pq.write_table(pa.table({"text": ["one document", "another"]}), folder / "train-00000-of-00001.parquet")
    cfg = DataConfig(sources=[SourceConfig(hub=str(tmp_path / "mydataset"))], cache_dir=str(tmp_path / "cache"))
    key = cache_key(cfg, tokenizer, 0)
    assert cache_key(cfg, tokenizer, 0) == key
    pq.write_table(pa.table({"text": ["one document, edited", "another"]}), folder / "train-00000-of-00001.parquet")
    assert cache_key(cfg, tokenizer, 0) != key  # stale tokens are not reused


HUB_KEYS = """
import sys
from transformers import AutoTokenizer
from llm_ds.config import BUNDLED_TOKENIZER, DataConfig, SourceConfig
from llm_ds.data.pipeline import cache_key, pin_hub_commits
tokenizer = AutoTokenizer.from_pretrained(str(BUNDLED_TOKENIZER))
for revision in sys.argv[1:]:
    cfg = DataConfig(sources=[SourceConfig(hub="org/corpus", revision=None if revision == "-" else revision)])
    pinned = pin_hub_commits(cfg)
    print(pinned.sources[0].revision, cache_key(pinned, tokenizer, 0))
"""


def test_a_hub_dataset_name_is_keyed_on_the_commit_its_revision_stands_for(tmp_path):
    """Offline, the commit comes from the local hub cache, read by huggingface_hub's own snapshot_download:
    a new commit on the branch (a later download) is a new cache; an unknown name keeps its revision."""
    import os
    import subprocess
    import sys

    repo = tmp_path / "hub" / "datasets--org--corpus"
    commits = ["a" * 40, "b" * 40]
    for commit in commits:
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "train.jsonl").write_text('{"text": "x"}\n')
    (repo / "refs").mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}

    def keys(*revisions):
        proc = subprocess.run([sys.executable, "-c", HUB_KEYS, *revisions], env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return [line.split() for line in proc.stdout.splitlines()]

    (repo / "refs" / "main").write_text(commits[0])
    (repo / "refs" / "v1").write_text(commits[0])
    (main_a, key_a), (v1, key_v1), (pinned, key_pinned) = keys("-", "v1", commits[0])
    assert main_a == v1 == pinned == commits[0] and key_a == key_v1 == key_pinned  # one commit, one cache
    (repo / "refs" / "main").write_text(commits[1])  # the branch moved on
    ((main_b, key_b),) = keys("-")
    assert main_b == commits[1] and key_b != key_a
    ((unknown, key_unknown),) = keys("v2")  # no such ref in the cache: left as asked, with a warning
    assert unknown == "v2" and key_unknown not in (key_a, key_b)


def test_the_cache_build_holds_a_bounded_share_of_the_corpus(tmp_path, tokenizer, monkeypatch):
    """Tokens go to the cache files as they are made: four times the corpus, the same peak memory (the
    arrays held the whole corpus twice over before, 3.0 MB -> 8.3 MB here)."""
    import tracemalloc

    monkeypatch.setattr(cache, "BUFFER_ITEMS", 4096)
    peaks, tokens = [], []
    for n in (1, 4):
        path = tmp_path / f"corpus{n}.jsonl"
        docs = (f"Document {i}: " + " ".join(f"w{(i * j) % 997}" for j in range(60)) for i in range(2500 * n))
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        cfg = DataConfig(paths=[str(path)], cache_dir=str(tmp_path / "cache"))
        tracemalloc.start()
        try:
            arrays, info = load_or_build_arrays(cfg, tokenizer, 0, is_builder=True)
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
        tokens.append(info["train_tokens"])
        assert isinstance(arrays["train"], np.memmap) and len(arrays["train"]) == info["train_tokens"]
        assert np.array_equal(arrays["train"], build_arrays(cfg, tokenizer, 0)[0]["train"])
    assert tokens[1] > 3.9 * tokens[0] and tokens[0] > 400_000
    assert peaks[1] < 1.25 * peaks[0], peaks


def test_parallel_tokenization_reads_only_a_few_batches_ahead(tokenizer):
    """With worker processes, documents are read as the tokens are taken (Pool.imap read them all first)."""
    import time

    from llm_ds.data.packing import TOKENIZE_BATCH_DOCS, iter_token_ids

    read = 0

    def docs():
        nonlocal read
        for i in range(100 * TOKENIZE_BATCH_DOCS):
            read += 1
            yield f"document {i}"

    ids = iter_token_ids(docs(), tokenizer, num_proc=2)
    first = next(ids)
    time.sleep(0.5)  # room for a reader thread to run ahead, if there is one
    assert first == tokenizer("document 0", add_special_tokens=False)["input_ids"]
    assert read <= 5 * TOKENIZE_BATCH_DOCS, read
    assert sum(1 for _ in ids) == 100 * TOKENIZE_BATCH_DOCS - 1
