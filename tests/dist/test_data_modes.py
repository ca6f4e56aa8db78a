"""Streaming and padding modes train end to end on 2 ranks under the deepspeed runner."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_driver

pytestmark = pytest.mark.dist


@pytest.mark.parametrize("mode", ["streaming", "padding"])
def test_data_mode_trains_on_two_ranks(tmp_path, data_cache, mode):
    extra = {"streaming": ["--set", "data.streaming=true"],
             "padding": ["--set", "data.packing=false", "--set", "data.block_size=256"]}[mode]
    args = ["--ds_config", "ds_configs/zero2.json", "--set", "train.max_steps=12", "--set", "train.warmup_steps=2",
            "--set", "train.micro_batch_size=4", "--set", "train.eval_max_batches=2", "--set", "logging.log_interval=4",
            "--set", "checkpoint.interval=0", "--set", f"train.output_dir={tmp_path}",
            "--set", f"data.cache_dir={data_cache}", *extra]
    proc = run_driver(args, ranks=2)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["world_size"] == 2
    assert summary["final_train_loss"] < summary["first_train_loss"]
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    fractions = [r["data/real_token_fraction"] for r in records if "data/real_token_fraction" in r]
    assert len(fractions) == 4  # steps 1, 4, 8, 12
    if mode == "padding":
        assert all(0 < f < 1 for f in fractions) and 0 < summary["real_token_fraction"] < 1
    else:
        assert all(f == 1.0 for f in fractions) and summary["epochs"] is None


def test_no_shared_memory_left_behind(tmp_path, data_cache):
    """DeepSpeed's CPU all-reduce segments (69 MB per rank) must not outlive the run in /dev/shm."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.conftest import DEEPSPEED, ROOT, free_port

    port = free_port()
    cmd = [str(DEEPSPEED), "--num_gpus", "2", "--master_port", str(port), str(ROOT / "llm_ds" / "train.py"),
           "--set", "train.max_steps=2", "--set", "train.eval_max_batches=1", "--set", "model.n_layer=1",
           "--set", f"train.output_dir={tmp_path}", "--set", f"data.cache_dir={data_cache}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-2000:] + sys.executable
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
