import itertools
import json

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from llm_ds.config import BUNDLED_TOKENIZER, DataConfig
from llm_ds.data.loader import ShardedSampler, StreamingBlocks, build_loaders, collate_blocks
from llm_ds.data.pipeline import build_arrays, iter_split
from llm_ds.data.preprocess import Preprocessor
from llm_ds.data.sources import ReadStats


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(BUNDLED_TOKENIZER))


@pytest.fixture()
def data_cfg(tmp_path):
    docs = [" ".join(f"w{(i * 13 + j) % 97}" for j in range(20 + i % 9)) for i in range(150)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return DataConfig(
        paths=[str(tmp_path / "docs.jsonl")], block_size=16, val_fraction=0.1, cache_dir=str(tmp_path / "cache")
    )


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_sampler_shards_cover_each_epoch_without_overlap(world_size):
    shards = [ShardedSampler(103, r, world_size, seed=7).indices() for r in range(world_size)]
    together = np.concatenate(shards)
    assert len(together) == len(set(together.tolist())) == (103 // world_size) * world_size


def test_global_batches_do_not_depend_on_world_size():
    n, micro = 64, 4
    one = ShardedSampler(n, 0, 1, seed=3).indices()
    two = [ShardedSampler(n, r, 2, seed=3).indices() for r in range(2)]
    for step in range(n // (2 * micro)):
        global_two = set(two[0][step * micro : (step + 1) * micro]) | set(two[1][step * micro : (step + 1) * micro])
        assert set(one[step * 2 * micro : (step + 1) * 2 * micro]) == global_two


@pytest.mark.parametrize("n", [100, 103, 111])
def test_an_epoch_is_whole_global_batches_on_any_world_size(n):
    """Epochs end on the same sample on 1, 2 or 4 ranks with one global batch of 8, so a resume on another
    world size continues across epoch ends exactly."""
    epochs = {}
    for world_size in (1, 2, 4):
        for epoch in (0, 1):
            shards = []
            for r in range(world_size):
                sampler = ShardedSampler(n, r, world_size, seed=3, round_size=8)
                sampler.epoch = epoch
                shards.append(sampler.indices())
            steps = [sorted(np.concatenate([s[i : i + 8 // world_size] for s in shards]).tolist())
                     for i in range(0, len(shards[0]), 8 // world_size)]  # fmt: skip
            epochs.setdefault(epoch, []).append(steps)
    for steps in epochs.values():
        assert steps[0] == steps[1] == steps[2]
        assert len(steps[0]) == n // 8 and all(len(s) == 8 for s in steps[0])


def test_collate_labels_are_the_inputs():
    batch = collate_blocks([torch.arange(4), torch.arange(5, 9)])
    assert batch["input_ids"].shape == (2, 4) and torch.equal(batch["labels"], batch["input_ids"])


def take(loader, n):
    return [b["input_ids"].clone() for b in itertools.islice(iter(loader), n)]


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("stop", [0, 1, 7, 13, 26])  # 13 batches an epoch per rank at world size 1: across epochs
def test_train_loader_resumes_exactly(data_cfg, tokenizer, world_size, stop):
    def loaders(rank):
        return build_loaders(data_cfg, tokenizer, 4, rank, world_size, 0, seed=5, eval_max_batches=None).train

    for rank in range(world_size):
        reference = take(loaders(rank), stop + 12)
        interrupted = loaders(rank)
        seen = take(interrupted, stop)
        state = interrupted.state_dict()
        resumed = loaders(rank)
        resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON round trip
        rest = take(resumed, 12)
        assert all(torch.equal(a, b) for a, b in zip(seen + rest, reference, strict=True))


def test_epochs_reshuffle_and_count(data_cfg, tokenizer):
    train = build_loaders(data_cfg, tokenizer, 4, 0, 1, 0, seed=5, eval_max_batches=None).train
    per_epoch = train.batches_per_epoch()
    batches = take(train, 2 * per_epoch)
    assert train.state_dict() == {"epoch": 1, "consumed": per_epoch * 4}
    first, second = torch.cat(batches[:per_epoch]), torch.cat(batches[per_epoch:])
    assert not torch.equal(first, second)
    assert sorted(map(tuple, first.tolist())) == sorted(map(tuple, second.tolist()))  # same blocks, new order


def streaming_cfg(data_cfg):
    return DataConfig(**{**data_cfg.__dict__, "streaming": True})


def test_streaming_gives_the_in_memory_blocks(data_cfg, tokenizer):
    arrays, _ = build_arrays(data_cfg, tokenizer, seed=5)
    cfg = streaming_cfg(data_cfg)
    stream = StreamingBlocks(
        lambda: iter_split(cfg, "train", 5, ReadStats(), Preprocessor(cfg), streaming=True),
        tokenizer,
        16,
        rank=0,
        world_size=1,
        micro_batch_size=4,
    )
    blocks = np.stack(list(stream.blocks()))
    n = len(arrays["train"]) // 16
    assert blocks.shape == (n, 16)
    assert np.array_equal(blocks.reshape(-1), arrays["train"][: n * 16])


def test_streaming_shards_share_documents_without_duplicates(data_cfg, tokenizer):
    cfg = streaming_cfg(data_cfg)

    def docs():
        return iter_split(cfg, "train", 5, ReadStats(), Preprocessor(cfg), streaming=True)

    all_docs = list(docs())
    seen = []
    for rank in range(2):
        ds = StreamingBlocks(docs, tokenizer, 16, rank=rank, world_size=2, micro_batch_size=4)
        loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)
        tokens = torch.cat([b["input_ids"].reshape(-1) for b in loader]).tolist()
        seen.append(tokens)
    # 4 shards (2 ranks x 2 workers); shard s packs documents s, s+4, ...: every document's tokens appear once.
    total = sum(len(tokenizer(d)["input_ids"]) + 1 for d in all_docs)
    assert total - 4 * 16 < len(seen[0]) + len(seen[1]) <= total
    eos = tokenizer.eos_token_id
    assert sum(t == eos for s in seen for t in s) >= len(all_docs) - 4 * 16


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("stop", [0, 3, 10])
def test_streaming_loader_resumes_exactly(data_cfg, tokenizer, num_workers, stop):
    cfg = DataConfig(**{**streaming_cfg(data_cfg).__dict__, "num_workers": num_workers})

    def train():
        return build_loaders(cfg, tokenizer, 4, 1, 2, 0, seed=5, eval_max_batches=2).train

    reference = take(train(), stop + 8)
    interrupted = train()
    seen = take(interrupted, stop)
    resumed = train()
    resumed.load_state_dict(interrupted.state_dict())
    rest = take(resumed, 8)
    assert all(torch.equal(a, b) for a, b in zip(seen + rest, reference, strict=True))


def test_samples_of_different_lengths_are_a_data_error_naming_the_lengths():
    import pytest
    import torch

    from llm_ds.data.loader import collate
    from llm_ds.data.sources import DataError

    samples = [{"input_ids": torch.arange(4)}, {"input_ids": torch.arange(6)}]
    with pytest.raises(DataError, match=r"a batch's samples have \[4, 6\] tokens"):
        collate(samples)
    batch = collate([{"input_ids": [1, 2, 3], "attention_mask": [1, 1, 0], "text": "left out"}] * 2)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["labels"].tolist() == [[1, 2, -100]] * 2
