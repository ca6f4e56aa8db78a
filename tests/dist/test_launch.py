"""``llm-ds launch`` starts the real deepspeed runner; a hostfile of this node alone needs no ssh."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

from tests.conftest import ROOT, free_port

pytestmark = pytest.mark.dist


def test_launch_with_the_localhost_hostfile(tmp_path, data_cache):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "llm_ds.cli", "launch", "--hostfile", "hostfiles/localhost",
           "--master_port", str(free_port()), "--env", "LLM_DS_TEST_VAR", "--ds_config", "ds_configs/zero2.json",
           "--set", "model.n_layer=2", "--set", "train.max_steps=6", "--set", "logging.log_interval=3",
           "--set", "train.eval_max_batches=2", "--set", f"train.output_dir={out}",
           "--set", f"data.cache_dir={data_cache}"]
    env = {**os.environ, "NCCL_DEBUG": "WARN", "LLM_DS_TEST_VAR": "42", "HF_TOKEN": "hf_planted_secret_1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 6
    env_file = out / ".deepspeed_env"
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    lines = env_file.read_text().splitlines()
    assert "NCCL_DEBUG=WARN" in lines and "LLM_DS_TEST_VAR=42" in lines
    assert not any(line.startswith("HF_TOKEN=") for line in lines)  # a secret stays unless named with --env
    assert "not propagated: HF_TOKEN" in proc.stderr
    manifest = json.loads((out / "checkpoints" / "global_step6" / "llm_ds" / "manifest.json").read_text())
    assert manifest["hostfile"].endswith("hostfiles/localhost") and manifest["world_size"] == 2


def test_sigterm_to_llm_ds_launch_alone_saves_stops_every_process_and_exits_0(tmp_path, data_cache):
    """A supervisor, a container's PID 1 or Ctrl-C in some shells signals the launch process only: the
    ranks must still save and stop, nothing may be left running, and a clean stop is status 0."""
    import signal
    import time

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "llm_ds.cli", "launch", "--hostfile", "hostfiles/localhost",
           "--master_port", str(free_port()), "--ds_config", "ds_configs/zero2.json",
           "--set", "model.n_layer=2", "--set", "train.max_steps=5000", "--set", "logging.log_interval=1",
           "--set", "train.eval_interval=0", "--set", "train.eval_max_batches=2", "--set", "checkpoint.interval=0",
           "--set", f"train.output_dir={out}", "--set", f"data.cache_dir={data_cache}"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)  # to llm-ds launch alone
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_by"] and summary["steps"] < 5000
    assert (out / "checkpoints" / f"global_step{summary['steps']}").is_dir()
    assert "stopped on SIGTERM, checkpoint saved" in stderr
    left = [p for p in os.listdir("/proc") if p.isdigit() and _cmdline_mentions(p, str(out))]
    assert left == []  # no runner, launcher or rank still running


def _cmdline_mentions(pid: str, text: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return text.encode() in f.read()
    except OSError:
        return False
