"""`llm-ds plan` against real runs: its written config trains, and its memory figures match what two
CPU ranks of a real DeepSpeed engine hold."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from llm_ds import plan
from tests.conftest import DEEPSPEED, ROOT, free_port, run_driver

pytestmark = pytest.mark.dist


def test_the_written_config_and_run_values_train(tmp_path, data_cache):
    planned = tmp_path / "planned.json"
    proc = subprocess.run(
        [sys.executable, "-m", "llm_ds.cli", "plan", "--device", "cpu", "--num_gpus", "2", "--cpu-mem-gb", "8",
         "--global-batch", "16", "--write", str(planned), "--json"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["recommended"]["fits"] and planned.is_file()
    sets = [a for k, v in result["run_config"].items() for a in ("--set", f"{k}={v}")]
    out = tmp_path / "run"
    args = ["--ds_config", str(planned), *sets, "--set", "train.max_steps=3", "--set", "train.eval_interval=0",
            "--set", "train.eval_max_batches=1", "--set", "checkpoint.interval=0",
            "--set", "checkpoint.save_final=false", "--set", f"data.cache_dir={data_cache}",
            "--set", f"train.output_dir={out}"]  # fmt: skip
    run = run_driver(args, ranks=2)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["global_batch_size"] == 16 and summary["zero_stage"] == result["recommended"]["stage"]


SHAPE = {"model.n_layer": 4, "model.n_embd": 256, "model.n_head": 4, "model.n_positions": 256}


@pytest.mark.parametrize(
    "name,template,candidate,extra",
    [
        ("zero1_activations", "zero1.json", plan.Candidate(1, micro_batch=8), {"data.block_size": 256}),
        ("zero3_activations", "zero3.json", plan.Candidate(3, micro_batch=8), {"data.block_size": 256}),
    ],
)
def test_plan_matches_measured_memory(tmp_path, data_cache, name, template, candidate, extra):
    """Model states within 10% and the peak within 20% of two bf16 CPU ranks' measured figures
    (bench/memory_probe.py: live tensors, and peak resident set with glibc's mmap threshold low),
    for activation-heavy shapes, where the planner's activation and logits terms decide the peak."""
    ds = json.loads((ROOT / "ds_configs" / template).read_text())
    # Buckets sized to this 3.2M-parameter model, not ds_configs/' 50M elements.
    keys = ("reduce_bucket_size", "allgather_bucket_size")
    if candidate.stage == 3:
        keys = ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_max_live_parameters",
                "stage3_max_reuse_distance")  # fmt: skip
    ds["zero_optimization"].update(dict.fromkeys(keys, 2_000_000))
    ds_path = tmp_path / "ds.json"
    ds_path.write_text(json.dumps(ds))
    sets = {**SHAPE, **extra, "train.micro_batch_size": candidate.micro_batch, "train.max_steps": 3,
            "train.precision": "bf16", "data.cache_dir": data_cache, "train.output_dir": tmp_path / "run"}  # fmt: skip
    cmd = [str(DEEPSPEED), "--num_gpus", "2", "--master_port", str(free_port()), str(ROOT / "bench" / "memory_probe.py"),
           "--ds_config", str(ds_path), *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")],
           "--out", str(tmp_path / "probe")]  # fmt: skip
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    ranks = [json.loads(p.read_text()) for p in sorted((tmp_path / "probe").glob("rank*.json"))]
    states = max(r["model_state_bytes"] for r in ranks)
    peak = max(r["peak_allocated_growth_bytes"] for r in ranks)

    shape = plan.ModelShape(4, 256, 4, 256, 8192, extra["data.block_size"])
    assert shape.n_params == ranks[0]["parameters"]
    cluster = plan.Cluster(1, 2, "cpu", 16 * plan.GiB, 32 * plan.GiB, 0, 0.1)
    est = plan.estimate(shape, candidate, cluster, 2 * candidate.micro_batch, "bf16", ds)
    predicted_states = est.model_state_bytes()
    predicted_peak = est.cpu_rank_bytes()
    assert predicted_states == pytest.approx(states, rel=0.10), (predicted_states, states)
    assert predicted_peak == pytest.approx(peak, rel=0.20), (predicted_peak, peak, est.device)
