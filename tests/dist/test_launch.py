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
