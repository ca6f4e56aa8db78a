"""CPU and NVMe offload each run a few steps to a checkpoint (DeepSpeed ops compile once, then are reused)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_driver

pytestmark = [pytest.mark.dist, pytest.mark.offload]


@pytest.mark.parametrize("ds, stage", [("zero2_offload.json", 2), ("zero3_offload.json", 3)])
def test_offload_runs_to_a_checkpoint(tmp_path, data_cache, ds, stage):
    args = ["--ds_config", f"ds_configs/{ds}", "--set", "data.block_size=64", "--set", "train.micro_batch_size=4",
            "--set", "train.max_steps=4", "--set", "train.warmup_steps=1", "--set", "train.eval_max_batches=2",
            "--set", "logging.log_interval=1", "--set", "checkpoint.interval=2",
            "--set", f"train.output_dir={tmp_path}", "--set", f"data.cache_dir={data_cache}"]
    proc = run_driver(args, ranks=2, timeout=900)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["zero_stage"] == stage
    assert summary["final_train_loss"] < summary["first_train_loss"]
    for step in (2, 4):
        tag = tmp_path / "checkpoints" / f"global_step{step}"
        assert tag.is_dir() and any(tag.iterdir())
    ds_config = json.loads((tmp_path / "ds_config.json").read_text())
    if stage == 3:
        nvme = ds_config["zero_optimization"]["offload_param"]["nvme_path"]
        assert nvme == str(tmp_path / "nvme")
        assert any((tmp_path / "nvme").rglob("*")), "NVMe swap files were written"
    else:
        assert ds_config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
