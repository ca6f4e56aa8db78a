"""Checkpoint behaviour with real runs: export, signals, the save trigger, keep_last, and refusals."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import ROOT, run_driver
from tests.dist.test_resume import rank_process, start_driver

pytestmark = pytest.mark.dist


def base_args(out, data_cache, stage=1, steps=30) -> list[str]:
    return ["--ds_config", f"ds_configs/zero{stage}.json", "--set", "data.block_size=64",
            "--set", "train.micro_batch_size=4", "--set", f"train.max_steps={steps}", "--set", "train.warmup_steps=5",
            "--set", "train.eval_interval=0", "--set", "train.eval_max_batches=2", "--set", "logging.log_interval=5",
            "--set", "checkpoint.interval=10", "--set", f"train.output_dir={out}", "--set", f"data.cache_dir={data_cache}"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data_cache):
    """A 2-rank ZeRO-1 run of 30 steps, checkpoints at 10, 20, 30 (keep_last 2 keeps 20 and 30)."""
    out = tmp_path_factory.mktemp("finished")
    proc = run_driver(base_args(out, data_cache) + ["--set", "checkpoint.keep_last=2"], ranks=2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_keep_last_and_the_manifest(finished):
    ckpts = finished / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("global_step*")) == ["global_step20", "global_step30"]
    assert (ckpts / "latest").read_text() == "global_step30"
    ours = ckpts / "global_step30" / "llm_ds"
    manifest = json.loads((ours / "manifest.json").read_text())
    for key in ("git_commit", "git_dirty", "python", "torch", "deepspeed", "transformers", "world_size",
                "start_time", "tokenizer_fingerprint"):
        assert key in manifest
    assert manifest["world_size"] == 2
    state = json.loads((ours / "state.json").read_text())
    assert state["step"] == 30 and state["data"] == {"epoch": 0, "consumed": 30 * 4}
    assert {p.name for p in ours.glob("rng_rank*.json")} == {"rng_rank0.json", "rng_rank1.json"}
    assert (ours / "tokenizer" / "tokenizer.json").is_file() and (ours / "config.yaml").is_file()
    # Every save reported; in the foreground training waits for all of it.
    saves = [r for r in map(json.loads, (finished / "metrics.jsonl").read_text().splitlines()) if "ckpt/bytes" in r]
    assert [r["step"] for r in saves] == [10, 20, 30]
    complete = json.loads((ckpts / "global_step30" / "COMPLETE").read_text())
    assert saves[-1]["ckpt/bytes"] == sum(complete["files"].values()) > 20e6
    # What `llm-ds plan` predicts for it: 16 bytes per parameter in fp32 (weights, master copy, two moments).
    from llm_ds.plan.memory import checkpoint_bytes
    from llm_ds.plan.shapes import Candidate

    params = json.loads((finished / "summary.json").read_text())["parameters"]
    predicted = checkpoint_bytes(params, "fp32", Candidate(1), nodes=1)["total"]
    assert predicted == pytest.approx(saves[-1]["ckpt/bytes"], rel=0.05)
    assert all(r["ckpt/wait_s"] == 0 and r["ckpt/save_s"] > 0 and r["ckpt/write_gbs"] > 0 for r in saves)
    summary = json.loads((finished / "summary.json").read_text())
    assert summary["checkpoints_saved"] == 3 and summary["checkpoint_async"] is False
    assert summary["checkpoint_stall_s"] == pytest.approx(sum(r["ckpt/save_s"] for r in saves), rel=1e-9)


def test_export_loads_and_matches_the_training_weights(finished, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "hf"
    proc = subprocess.run([sys.executable, "-m", "llm_ds.cli", "export", str(finished / "checkpoints"), str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (out / name).is_file(), name
    exported = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    # ZeRO-1 keeps the whole module in mp_rank_00_model_states.pt: the engine's own weights (DeepSpeed's file).
    module = torch.load(finished / "checkpoints" / "global_step30" / "mp_rank_00_model_states.pt",
                        weights_only=False)["module"]
    trained = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    trained.load_state_dict(module, strict=False)
    trained.tie_weights()
    ids = torch.randint(0, 8192, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(exported(input_ids=ids).logits, trained(input_ids=ids).logits)

    gen = [sys.executable, "-m", "llm_ds.cli", "generate", "--prompt", "The tutorial", "--max-new-tokens", "12",
           "--seed", "3"]
    from_export = subprocess.run(gen[:4] + [str(out)] + gen[4:], capture_output=True, text=True, cwd=ROOT)
    from_ckpt = subprocess.run(gen[:4] + [str(finished / "checkpoints" / "global_step30")] + gen[4:],
                               capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert from_export.returncode == 0 and from_ckpt.returncode == 0, from_ckpt.stderr[-2000:]
    assert from_export.stdout.startswith("The tutorial") and from_export.stdout == from_ckpt.stdout


def test_sigterm_and_save_trigger(tmp_path, data_cache):
    """With background saves: the triggered one completes behind training; SIGTERM's is complete before exit."""
    out, trigger = tmp_path / "run", tmp_path / "save-now"
    args = base_args(out, data_cache, steps=400) + ["--set", "checkpoint.interval=0", "--set", "checkpoint.async=true",
                                                    "--set", f"checkpoint.save_trigger={trigger}"]
    proc = start_driver(args)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and '"step": 5,' in metrics.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    trigger.touch()
    while not list((out / "checkpoints").glob("global_step*/COMPLETE")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    assert not trigger.exists()
    triggered = json.loads(next((out / "checkpoints").glob("global_step*/COMPLETE")).read_text())["step"]
    # Rank 0 only, as where one node of a job is preempted: rank 1 learns of the stop, and its reason, through
    # the store (which must outlive rank 0's last use of it).
    rank_process(proc, 0).send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_by"] == "SIGTERM" and triggered < summary["steps"] < 400
    assert (out / "checkpoints" / "latest").read_text() == f"global_step{summary['steps']}"
    assert (out / "checkpoints" / f"global_step{summary['steps']}" / "COMPLETE").is_file()


def test_truncated_shard_is_named_and_the_previous_checkpoint_still_works(finished, tmp_path, data_cache):
    out = copy_run(finished, tmp_path / "run")
    shard = out / "checkpoints" / "global_step30" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[:1000])
    args = base_args(out, data_cache, steps=40) + ["--set", "checkpoint.keep_last=2"]
    proc = run_driver(args, ranks=2)
    assert proc.returncode != 0 and "| epoch" not in proc.stdout
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt is 1000 bytes" in proc.stderr
    previous = out / "checkpoints" / "global_step20"
    assert f"checkpoint.resume={previous}" in proc.stderr
    proc = run_driver(args + ["--set", f"checkpoint.resume={previous}"], ranks=2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"resuming from {previous} at step 20" in proc.stdout


@pytest.mark.parametrize(
    "change, ranks, expected",
    [
        (["--set", "train.micro_batch_size=3"], None, "was written by 2 rank(s) and this run has 1: its global "
         "batch of 8 sequences is 8 per rank, which train.micro_batch_size=3 does not divide; resume with "
         "--set train.micro_batch_size=2 (train.grad_accum_steps becomes 4)"),
        (["--set", "model.n_layer=2"], 2, "model.n_layer: 4 in the checkpoint, 2 now"),
        (["--set", "data.block_size=32"], 2, "data.block_size: 64 in the checkpoint, 32 now"),
    ],
)
def test_mismatched_resume_is_refused(finished, tmp_path, data_cache, change, ranks, expected):
    out = copy_run(finished, tmp_path / "run")
    proc = run_driver(base_args(out, data_cache, steps=40) + change, ranks=ranks)
    assert proc.returncode != 0 and "| epoch" not in proc.stdout
    assert expected in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("background", [False, True], ids=["foreground", "background"])
def test_a_full_disk_during_save_keeps_the_previous_checkpoint(finished, tmp_path, data_cache, background):
    """In the background the save at step 40 fails while training goes on: every rank stops a few steps later,
    at the same step, without saving again."""
    import os
    import resource

    from llm_ds.checkpoint import verify
    from tests.conftest import DEEPSPEED, free_port

    out = copy_run(finished, tmp_path / "run")
    steps = 60 if background else 40
    extra = ["--set", "checkpoint.async=true"] if background else []
    cmd = [str(DEEPSPEED), "--num_gpus", "2", "--master_port", str(free_port()), str(ROOT / "llm_ds" / "train.py"),
           *base_args(out, data_cache, steps=steps), *extra]
    limit = 4 << 20  # files may grow to 4 MB: the log files can, the 7-11 MB shards cannot

    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ},
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert proc.returncode != 0
    assert "saving checkpoint" in proc.stderr and "the latest pointer still names global_step30" in proc.stderr
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text() == "global_step30"
    assert not (ckpts / "global_step40" / "COMPLETE").exists()
    if background:
        assert not (ckpts / "global_step50").exists()
        stopped = re.search(r"stopped after step (\d+) \(checkpoint failed\)\n", proc.stdout)
        assert stopped and 40 < int(stopped.group(1)) < 50, proc.stdout[-3000:]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["stopped_by"] == "checkpoint failed" and summary["steps"] == int(stopped.group(1))
    verify(ckpts / "global_step30", None)  # every file as it was saved
    if not background:  # one rerun shows the kept checkpoint resumes
        rerun = run_driver(base_args(out, data_cache, steps=40), ranks=2)
        assert rerun.returncode == 0 and "at step 30" in rerun.stdout, rerun.stderr[-2000:]


def test_rerunning_a_finished_run_changes_nothing(finished, tmp_path, data_cache):
    out = copy_run(finished, tmp_path / "run")
    before = {p: p.read_bytes() for p in (out / "summary.json", out / "metrics.jsonl")}
    proc = run_driver(base_args(out, data_cache) + ["--set", "checkpoint.keep_last=2"], ranks=2)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "is already at step 30 of 30: nothing to train" in proc.stdout and "| epoch" not in proc.stdout
    assert all(p.read_bytes() == data for p, data in before.items())
