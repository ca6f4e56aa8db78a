import json

import pytest

from llm_ds.checkpoint import (
    COMPLETE,
    CheckpointError,
    find_resume_point,
    list_checkpoints,
    rng_state,
    set_rng_state,
    verify,
)
from llm_ds.config import load_run_config


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
