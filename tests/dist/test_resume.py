"""A run killed with SIGKILL and rerun ends exactly where an uninterrupted run does, for ZeRO 1, 2 and 3."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

from tests.conftest import DEEPSPEED, ROOT, free_port, run_driver

pytestmark = pytest.mark.dist


def args_for(stage: int, out, data_cache) -> list[str]:
    return ["--ds_config", f"ds_configs/zero{stage}.json", "--set", "data.block_size=64",
            "--set", "train.micro_batch_size=4", "--set", "train.max_steps=30", "--set", "train.warmup_steps=5",
            "--set", "train.eval_interval=0", "--set", "train.eval_max_batches=2", "--set", "logging.log_interval=5",
            "--set", "checkpoint.interval=10", "--set", "checkpoint.keep_last=0",
            "--set", f"train.output_dir={out}", "--set", f"data.cache_dir={data_cache}"]


def start_driver(args: list[str]) -> subprocess.Popen:
    cmd = [str(DEEPSPEED), "--num_gpus", "2", "--master_port", str(free_port()), str(ROOT / "llm_ds" / "train.py"),
           *args]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def rank_process(proc: subprocess.Popen, local_rank: int, timeout_s: float = 120) -> psutil.Process:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for child in psutil.Process(proc.pid).children(recursive=True):
            try:
                if f"--local_rank={local_rank}" in child.cmdline():
                    return child
            except psutil.NoSuchProcess:
                continue
        time.sleep(0.1)
    raise AssertionError(f"no rank {local_rank} process appeared")


def wait_for(path, proc, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert proc.poll() is None, f"the run ended before {path} appeared:\n{proc.stdout.read()[-3000:]}"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def losses(out) -> dict[int, float]:
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def final_weights(out) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints"), tag="global_step30")


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_sigkill_then_rerun_matches_uninterrupted(tmp_path, data_cache, stage):
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    proc = run_driver(args_for(stage, whole, data_cache), ranks=2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    killed = start_driver(args_for(stage, broken, data_cache))
    wait_for(broken / "checkpoints" / "global_step10" / "COMPLETE", killed)
    rank_process(killed, 1).send_signal(signal.SIGKILL)
    killed.wait(timeout=120)
    assert killed.returncode != 0
    assert not (broken / "checkpoints" / "global_step30" / "COMPLETE").exists()

    rerun = run_driver(args_for(stage, broken, data_cache), ranks=2)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "resuming from" in rerun.stdout
    resumed_at = json.loads((broken / "summary.json").read_text())["resumed_at_step"]
    assert resumed_at in (10, 20)

    reference, after = losses(whole), losses(broken)
    assert sorted(after) == sorted(reference)
    for step in reference:
        assert after[step] == reference[step], f"step {step}"  # bit for bit
    a, b = final_weights(whole), final_weights(broken)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_zero_to_fp32_script_works_on_our_checkpoints(tmp_path, data_cache):
    out = tmp_path / "run"
    args = args_for(3, out, data_cache) + ["--set", "train.max_steps=10"]
    proc = run_driver(args, ranks=2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    target = tmp_path / "fp32"
    script = subprocess.run([sys.executable, str(out / "checkpoints" / "zero_to_fp32.py"), str(out / "checkpoints"),
                             str(target)], capture_output=True, text=True, timeout=300)
    assert script.returncode == 0, script.stderr[-3000:]
    weights = {k: v for f in target.glob("*.bin") for k, v in torch.load(f, weights_only=True).items()}
    assert "transformer.wte.weight" in weights and weights["transformer.wte.weight"].shape == (8192, 128)
