import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from llm_ds.config import BUNDLED_CORPUS, BUNDLED_TOKENIZER, DataConfig
from llm_ds.data import cache
from llm_ds.data.loader import BlockDataset, ShardedSampler, build_splits, collate_blocks
from llm_ds.data.packing import pack_blocks, split_documents, tokenize_to_stream
from llm_ds.data.sources import DataError, expand_paths, iter_documents


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(BUNDLED_TOKENIZER))


def test_bundled_tokenizer_loads_with_autotokenizer(tokenizer):
    assert len(tokenizer) == 8192
    assert tokenizer.eos_token == "<|endoftext|>"
    text = "Packing concatenates documents, with an EOS token after each one."
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_bundled_corpus_is_a_few_mb_of_documents():
    docs = list(iter_documents([BUNDLED_CORPUS]))
    assert len(docs) > 1000
    assert 2_000_000 < sum(map(len, docs)) < 10_000_000


def test_packing_is_exact(tokenizer):
    docs = ["First document.", "A second, longer document with more words in it.", "Third!"]
    eos = tokenizer.eos_token_id
    stream = tokenize_to_stream(iter(docs), tokenizer, eos, np.dtype(np.uint16), batch_docs=2)
    expected = [t for d in docs for t in [*tokenizer(d)["input_ids"], eos]]
    assert stream.tolist() == expected
    for block_size in (2, 3, 5, len(expected)):
        blocks = pack_blocks(stream, block_size)
        n = len(expected) // block_size
        assert blocks.shape == (n, block_size)
        # Concatenating the blocks gives the stream in order; only the last partial block is dropped.
        assert blocks.reshape(-1).tolist() == expected[: n * block_size]
    assert pack_blocks(stream, len(expected) + 1).shape == (0, len(expected) + 1)


def test_document_split_is_disjoint_and_seeded():
    train, val = split_documents(100, 0.05, seed=1)
    assert len(val) == 5 and len(train) == 95
    assert set(train).isdisjoint(val) and set(train) | set(val) == set(range(100))
    assert np.array_equal(split_documents(100, 0.05, seed=1)[1], val)
    assert not np.array_equal(split_documents(100, 0.05, seed=2)[1], val)
    assert len(split_documents(3, 0.01, seed=0)[1]) == 1  # at least one validation document


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_sampler_shards_cover_each_epoch_without_overlap(world_size):
    n = 103
    shards = [ShardedSampler(n, r, world_size, seed=7).indices() for r in range(world_size)]
    together = np.concatenate(shards)
    assert len(together) == len(set(together.tolist())) == (n // world_size) * world_size
    for s in shards:
        assert len(s) == n // world_size


def test_global_batches_do_not_depend_on_world_size():
    n, micro = 64, 4
    one = ShardedSampler(n, 0, 1, seed=3).indices()
    two = [ShardedSampler(n, r, 2, seed=3).indices() for r in range(2)]
    for step in range(n // (2 * micro)):
        global_two = set(two[0][step * micro : (step + 1) * micro]) | set(two[1][step * micro : (step + 1) * micro])
        assert set(one[step * 2 * micro : (step + 1) * 2 * micro]) == global_two


def test_sampler_resumes_mid_epoch_and_reshuffles_per_epoch():
    s = ShardedSampler(50, 1, 2, seed=0)
    full = list(s)
    s.load_state_dict({"epoch": 0, "consumed": 7})
    assert list(s) == full[7:]
    s.set_epoch(1)
    assert list(s) != full and sorted(s) != []


def test_collate_labels_are_the_inputs():
    batch = collate_blocks([np_block(0), np_block(5)])
    assert batch["input_ids"].shape == (2, 4)
    assert batch["labels"].data_ptr() == batch["input_ids"].data_ptr()


def np_block(start):
    import torch

    return torch.arange(start, start + 4)


def test_cache_is_built_once_and_keyed_by_tokenizer(tmp_path, tokenizer):
    calls = []

    def build():
        calls.append(1)
        return {"train": np.arange(10, dtype=np.uint16), "val": np.arange(3, dtype=np.uint16)}

    a = cache.load_or_build(tmp_path, "k1", build, is_builder=True)
    b = cache.load_or_build(tmp_path, "k1", build, is_builder=True)
    assert len(calls) == 1
    assert a["train"].tolist() == b["train"].tolist() == list(range(10))
    assert isinstance(b["train"], np.memmap)
    files = [BUNDLED_CORPUS]
    key = cache.fingerprint(files, tokenizer, "text", 0.05, 1)
    assert key == cache.fingerprint(files, tokenizer, "text", 0.05, 1)
    assert key != cache.fingerprint(files, tokenizer, "text", 0.10, 1)
    other = AutoTokenizer.from_pretrained(str(BUNDLED_TOKENIZER))
    other.add_tokens(["<|extra|>"])
    assert key != cache.fingerprint(files, other, "text", 0.05, 1)


def test_waiting_rank_times_out_with_a_clear_message(tmp_path):
    with pytest.raises(TimeoutError, match="not built after"):
        cache.load_or_build(tmp_path, "never", lambda: {}, is_builder=False, timeout_s=0.3, poll_s=0.05)


def test_splits_from_local_files(tmp_path, tokenizer):
    docs = [f"Document number {i} says something about packing tokens." for i in range(40)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs[:20]))
    (tmp_path / "b.txt").write_text(docs[20])
    cfg = DataConfig(
        paths=[str(tmp_path / "*.jsonl"), str(tmp_path / "b.txt")],
        text_field="body",
        block_size=8,
        val_fraction=0.1,
        cache_dir=str(tmp_path / "cache"),
    )
    splits = build_splits(cfg, tokenizer, seed=0, local_rank=0)
    assert isinstance(splits.train, BlockDataset) and len(splits.train) > 0 and len(splits.val) > 0
    assert splits.train[0].shape == (8,)


def test_source_errors(tmp_path):
    with pytest.raises(DataError, match=r"'.*nothing.txt': no such file or directory"):
        expand_paths([str(tmp_path / "nothing.txt")])
    with pytest.raises(DataError, match=r"the glob .* matches no file"):
        expand_paths([str(tmp_path / "*.parquet")])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"content": "no text field"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: no field 'text' \(set data.text_field\)"):
        list(iter_documents([bad]))
    raw = tmp_path / "latin1.txt"
    raw.write_bytes("caf\xe9 au lait".encode("latin-1"))
    assert list(iter_documents([raw])) == ["caf\ufffd au lait"]


def test_too_little_data_says_what_to_change(tmp_path, tokenizer):
    (tmp_path / "tiny.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n{"text": "three"}\n')
    cfg = DataConfig(paths=[str(tmp_path / "tiny.jsonl")], block_size=64, cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError, match=r"less than one block of data.block_size=64; add data, lower"):
        build_splits(cfg, tokenizer, seed=0, local_rank=0)
