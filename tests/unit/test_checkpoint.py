import json

import pytest

from llm_ds.checkpoint import (
    COMPLETE,
    CheckpointError,
    find_resume_point,
    fit_world_size,
    list_checkpoints,
    rng_state,
    set_rng_state,
    verify,
)
from llm_ds.config import ConfigError, dump_run_config, load_run_config


def fake_checkpoint(ckpt_dir, step, complete=True, files=None):
    tag = ckpt_dir / f"global_step{step}"
    tag.mkdir(parents=True)
    files = files or {"shard.pt": b"x" * 100}
    for name, data in files.items():
        (tag / name).write_bytes(data)
    if complete:
        sizes = {name: len(data) for name, data in files.items()}
        (tag / COMPLETE).write_text(json.dumps({"step": step, "world_size": 2, "files": sizes}))
    return tag


def cfg_for(tmp_path, resume="auto"):
    return load_run_config(None, [f"checkpoint.dir={tmp_path / 'ckpt'}", f"checkpoint.resume={resume}"])


def test_nothing_to_resume(tmp_path):
    assert find_resume_point(cfg_for(tmp_path)) is None


def test_latest_pointer_wins_and_partial_checkpoints_are_skipped(tmp_path):
    ckpt = tmp_path / "ckpt"
    fake_checkpoint(ckpt, 10)
    fake_checkpoint(ckpt, 20)
    fake_checkpoint(ckpt, 30, complete=False)  # a save that never finished
    assert [p.name for p in list_checkpoints(ckpt)[1]] == ["global_step30"]
    assert find_resume_point(cfg_for(tmp_path)).name == "global_step20"
    (ckpt / "latest").write_text("global_step10")
    assert find_resume_point(cfg_for(tmp_path)).name == "global_step10"
    (ckpt / "latest").write_text("global_step30")  # a pointer to an incomplete save is not followed
    assert find_resume_point(cfg_for(tmp_path)).name == "global_step20"


def test_resume_never_and_explicit_path(tmp_path):
    ckpt = tmp_path / "ckpt"
    fake_checkpoint(ckpt, 10)
    partial = fake_checkpoint(ckpt, 20, complete=False)
    assert find_resume_point(cfg_for(tmp_path, "never")) is None
    assert find_resume_point(cfg_for(tmp_path, str(ckpt / "global_step10"))).name == "global_step10"
    with pytest.raises(CheckpointError, match="incomplete checkpoint"):
        find_resume_point(cfg_for(tmp_path, str(partial)))
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        find_resume_point(cfg_for(tmp_path, str(ckpt / "global_step99")))


def test_verify_names_a_missing_or_truncated_shard_and_the_previous_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt"
    previous = fake_checkpoint(ckpt, 10)
    latest = fake_checkpoint(ckpt, 20, files={"a.pt": b"a" * 50, "b.pt": b"b" * 70})
    assert verify(latest, previous)["step"] == 20
    (latest / "b.pt").write_bytes(b"b" * 10)
    with pytest.raises(CheckpointError, match=r"b.pt is 10 bytes, 70 when saved .*checkpoint.resume=.*global_step10"):
        verify(latest, previous)
    (latest / "a.pt").unlink()
    with pytest.raises(CheckpointError, match=r"a.pt is missing"):
        verify(latest, previous)


def test_rng_state_round_trips_through_json():
    import random

    import numpy as np
    import torch

    state = json.loads(json.dumps(rng_state()))
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def resized(tmp_path, world_size, *overrides, saved_ranks=2, global_batch=8, saved_tensor=1):
    tag = fake_checkpoint(tmp_path / "ckpt", 10)
    (tag / COMPLETE).write_text(json.dumps({"step": 10, "world_size": saved_ranks, "files": {}}))
    (tag / "llm_ds").mkdir()
    (tag / "llm_ds" / "ds_config.json").write_text(json.dumps({"train_batch_size": global_batch}))
    saved = load_run_config(None, [f"parallel.tensor={saved_tensor}"])
    (tag / "llm_ds" / "config.yaml").write_text(dump_run_config(saved))
    cfg = load_run_config(None, ["train.micro_batch_size=4", "train.grad_accum_steps=1", *overrides])
    return fit_world_size(tag, cfg, world_size)


@pytest.mark.parametrize(
    "world_size, overrides, accum, expected",
    [
        (1, [], 2, "on 1 rank(s) (was 2): grad_accum_steps 1 -> 2, global batch 8 kept"),
        (2, [], 1, None),  # the checkpoint's own world size and batch: nothing changes
        # A run restarted on fewer ranks and resumed again on as many keeps its batch, whatever --set says.
        (2, ["train.grad_accum_steps=2"], 1, "on 2 rank(s): grad_accum_steps 2 -> 1, global batch 8 kept"),
        (4, ["train.micro_batch_size=1"], 2, "on 4 rank(s) (was 2): grad_accum_steps 1 -> 2, global batch 8 kept"),
    ],
)
def test_the_checkpoints_global_batch_is_kept(tmp_path, world_size, overrides, accum, expected):
    cfg, note = resized(tmp_path, world_size, *overrides)
    assert (cfg.train.grad_accum_steps, note) == (accum, expected)


@pytest.mark.parametrize(
    "world_size, overrides, expected",
    [
        (3, [], "its global batch of 8 sequences cannot be shared by 3 rank(s); resume on a number of ranks "
                "that divides 8 (1, 2, 4, 8)"),
        (4, [], "is 2 per rank, which train.micro_batch_size=4 does not divide; resume with --set "
                "train.micro_batch_size=2 (train.grad_accum_steps becomes 1)"),
        (1, ["data.streaming=true"], "data.streaming deals documents to ranks, so a streamed run resumes only on 2"),
    ],
)  # fmt: skip
def test_a_world_size_the_global_batch_does_not_fit_is_refused_with_what_works(
    tmp_path, world_size, overrides, expected
):
    with pytest.raises(ConfigError) as err:
        resized(tmp_path, world_size, *overrides)
    assert f"was written by 2 rank(s) and this run has {world_size}" in str(err.value)
    assert expected in str(err.value)


@pytest.mark.parametrize(
    "world_size, saved_tensor, overrides, expected",
    [
        (2, 2, [], "was written with parallel.tensor=2, parallel.pipeline=1 and this run has parallel.tensor=1, "
                   "parallel.pipeline=1: resume it with --set parallel.tensor=2 --set parallel.pipeline=1, or start "
                   "a new run from its weights: llm-ds export"),
        (4, 2, ["parallel.tensor=2"], "was written by 2 rank(s) and this run has 4: a checkpoint with "
                                      "parallel.tensor=2, parallel.pipeline=1 resumes on its own 2 rank(s)"),
    ],
)  # fmt: skip
def test_a_tensor_parallel_checkpoint_resumes_with_its_own_split(
    tmp_path, world_size, saved_tensor, overrides, expected
):
    with pytest.raises(ConfigError, match=None) as err:
        resized(tmp_path, world_size, *overrides, saved_tensor=saved_tensor)
    assert expected in str(err.value)


def test_tensor_parallel_ranks_share_the_global_batch_as_one(tmp_path):
    # 4 ranks, tensor groups of 2: 2 data-parallel ranks of 4 sequences make the global batch of 8.
    cfg, note = resized(tmp_path, 4, "parallel.tensor=2", saved_ranks=4, saved_tensor=2)
    assert (cfg.train.grad_accum_steps, note) == (1, None)


def test_staging_copies_are_whole_storages_shared_as_before_and_reused():
    """What a background save writes: torch.save of the copy holds what torch.save of the original would."""
    import collections
    import io

    import torch

    from llm_ds.checkpoint_writer import Staging

    flat = torch.arange(12.0)
    weight = torch.nn.Parameter(torch.randn(3, 4), requires_grad=False)
    state = {
        "module": collections.OrderedDict(wte=weight.detach(), head=weight.detach(), bias=flat[2:5]),
        "optimizer": {"state": [flat.view(3, 4)], "param_groups": [{"lr": 0.1, "betas": (0.9, 0.95)}]},
        "shapes": [torch.Size([3, 4])],
        "step": 7,
    }
    staging = Staging()
    copy = staging.copy(state, "model_states.pt")
    # Values, views and sharing as they were; the copy's memory is its own.
    assert torch.equal(copy["module"]["wte"], weight) and torch.equal(copy["module"]["bias"], flat[2:5])

    def ptr(t):
        return t.untyped_storage().data_ptr()

    module = copy["module"]
    assert ptr(module["wte"]) == ptr(module["head"]) and ptr(module["bias"]) == ptr(copy["optimizer"]["state"][0])
    assert module["bias"].storage_offset() == 2 and module["bias"].untyped_storage().nbytes() == 48
    assert ptr(module["wte"]) != ptr(weight)
    assert type(copy["module"]) is collections.OrderedDict and type(copy["shapes"][0]) is torch.Size
    # Training goes on: nothing it changes reaches the copy.
    original = {"flat": flat.clone(), "weight": weight.detach().clone()}
    flat.add_(1.0)
    weight.data.mul_(2.0)
    state["optimizer"]["param_groups"][0]["lr"] = 0.2
    assert torch.equal(copy["optimizer"]["state"][0].flatten(), original["flat"])
    assert torch.equal(copy["module"]["head"], original["weight"])
    assert copy["optimizer"]["param_groups"][0]["lr"] == 0.1
    # The file torch.save writes from the copy is the one it would have written from the original.
    before = io.BytesIO()
    torch.save({**state, "module": state["module"], "optimizer": state["optimizer"]}, before)
    again = staging.copy(state, "model_states.pt")
    after = io.BytesIO()
    torch.save(again, after)
    assert before.getvalue() == after.getvalue()
    # The next save of the same file reuses the memory.
    assert ptr(again["module"]["wte"]) == ptr(module["wte"])
    assert staging.bytes == 48 * 2
