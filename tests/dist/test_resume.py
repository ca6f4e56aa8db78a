"""A run killed with SIGKILL and rerun ends exactly where an uninterrupted run does, for ZeRO 1, 2 and 3; with
ZeRO 2 and 3 the kill comes while a background save is being written, and the checkpoints of both runs hold
the same tensors."""

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


ASYNC = ["--set", "checkpoint.async=true", "--set", "checkpoint.interval=1", "--set", "checkpoint.keep_last=3"]


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


def being_written(ckpts, name: str):
    """A checkpoint folder without COMPLETE in which ``name`` exists: a background write under way (the
    main thread only makes the folders; the files appear as the writing thread opens them)."""
    for folder in ckpts.glob("global_step*"):
        if (folder / name).exists() and not (folder / "COMPLETE").exists():
            return folder
    return None


def load_tree(path):
    return {f.name: torch.load(f, weights_only=False) for f in sorted(path.glob("*.pt"))}


def assert_same(a, b, where=""):
    """Tensors equal bit for bit (dtype, shape, values); everything else equal."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif hasattr(a, "__dict__"):  # DeepSpeed's loss scaler: no __eq__ of its own
        assert type(a) is type(b), where
        assert_same(vars(a), vars(b), where)
    else:
        assert a == b, (where, a, b)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_sigkill_then_rerun_matches_uninterrupted(tmp_path, data_cache, stage):
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    proc = run_driver(args_for(stage, whole, data_cache), ranks=2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    background = stage > 1  # ZeRO 2 and 3: saved at every step behind training, killed mid-write
    extra = ASYNC if background else []
    killed = start_driver(args_for(stage, broken, data_cache) + extra)
    ckpts = broken / "checkpoints"
    wait_for(ckpts / "global_step10" / "COMPLETE", killed)
    rank1 = rank_process(killed, 1)
    if background:
        shard = "zero_pp_rank_1_mp_rank_00_optim_states.pt"  # rank 1's own file
        deadline = time.monotonic() + 120
        while (cut := being_written(ckpts, shard)) is None:
            assert killed.poll() is None and time.monotonic() < deadline, "no background write was seen"
            time.sleep(0.001)
    rank1.send_signal(signal.SIGKILL)
    killed.wait(timeout=120)
    assert killed.returncode != 0
    assert not (ckpts / "global_step30" / "COMPLETE").exists()
    if background:
        assert not (cut / "COMPLETE").exists(), f"{cut} was completed: the kill came after its write"

    rerun = run_driver(args_for(stage, broken, data_cache) + extra, ranks=2)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "resuming from" in rerun.stdout
    resumed_at = json.loads((broken / "summary.json").read_text())["resumed_at_step"]
    if background:
        assert f"ignoring incomplete checkpoint {cut}" in rerun.stdout + rerun.stderr
        assert 10 <= resumed_at < int(cut.name.removeprefix("global_step"))
    else:
        assert resumed_at in (10, 20)

    reference, after = losses(whole), losses(broken)
    assert sorted(after) == sorted(reference)
    for step in reference:
        assert after[step] == reference[step], f"step {step}"  # bit for bit
    a, b = final_weights(whole), final_weights(broken)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    if background:  # the same step saved in the foreground (whole) and in the background (broken)
        sync, written_behind = load_tree(whole / "checkpoints" / "global_step30"), load_tree(ckpts / "global_step30")
        assert sync.keys() == written_behind.keys() and len(sync) >= 3
        assert_same(sync, written_behind)


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
