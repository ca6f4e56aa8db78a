"""ZeRO-3 builds the model partitioned, inside ``deepspeed.zero.Init``: it must start from the very
weights a model built whole starts from, also in bf16, where ``zero.Init`` makes every tensor 16-bit."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from llm_ds.config import ModelConfig
from llm_ds.model import build_model
from tests.conftest import free_port

pytestmark = pytest.mark.dist

MODEL = ModelConfig(n_layer=2, n_embd=48, n_head=4, n_positions=32, vocab_multiple_of=1)
VOCAB, SEED = 101, 11


def _build_partitioned(rank: int, world_size: int, port: int, out: str) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    ds_config = {"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True}, "zero_optimization": {"stage": 3}}
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = build_model(MODEL, VOCAB, eos_token_id=0, seed=SEED)
    gathered = {}
    for name, param in model.named_parameters():
        assert param.ds_tensor.numel() < param.ds_numel  # really partitioned over the ranks
        with deepspeed.zero.GatheredParameters([param]):
            gathered[name] = param.data.clone()
    if rank == 0:
        torch.save(gathered, out)
    deepspeed.comm.barrier()
    torch.distributed.destroy_process_group()


def test_zero3_bf16_starts_from_the_whole_models_weights_bit_for_bit(tmp_path):
    out = tmp_path / "gathered.pt"
    mp.spawn(_build_partitioned, args=(2, free_port(), str(out)), nprocs=2, join=True)
    gathered = torch.load(out)
    # ZeRO-1 and ZeRO-2 cast the whole fp32 model to bf16 before training: the same rounding, once.
    whole = dict(build_model(MODEL, VOCAB, eos_token_id=0, seed=SEED).to(torch.bfloat16).named_parameters())
    assert sorted(gathered) == sorted(whole)
    for name, value in gathered.items():
        assert value.dtype == torch.bfloat16, name
        assert torch.equal(value, whole[name].data), name
