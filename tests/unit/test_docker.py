"""What can be checked of the GPU image without a Docker engine: its inputs, pins and entrypoint."""

import configparser
import os
import re
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"


def test_every_copied_path_exists():
    copies = re.findall(r"^COPY\s+(.+)$", DOCKERFILE.read_text(), re.MULTILINE)
    sources = [src for line in copies for src in line.split()[:-1]]
    assert "docker/entrypoint.sh" in sources and "llm_ds" in sources
    for src in sources:
        assert (ROOT / src).exists(), src
    assert os.access(ENTRYPOINT, os.X_OK)


def test_pinned_torch_matches_setup_cfg_and_the_makefile():
    pinned = re.search(r"ARG TORCH_VERSION=(\S+)", DOCKERFILE.read_text()).group(1)
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    requires = [Requirement(r) for r in cfg["options"]["install_requires"].split("\n") if r.strip()]
    torch_req = next(r for r in requires if r.name == "torch")
    assert pinned in torch_req.specifier
    assert f"TORCH ?= torch=={pinned}" in (ROOT / "Makefile").read_text()


def entrypoint(*args, env=None):
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"  # llm-ds from this environment
    return subprocess.run(
        ["bash", str(ENTRYPOINT), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PATH": path, **(env or {})},
        cwd=ROOT,
    )


def test_head_runs_llm_ds_launch():
    proc = entrypoint("head", "--hostfile", "hostfiles/cluster", "--ds_config", "ds_configs/zero2.json", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert " -m deepspeed.launcher.runner --hostfile " in proc.stdout and "# 16 rank(s)" in proc.stdout


def test_worker_without_a_key_refuses(tmp_path):
    proc = entrypoint(
        "worker", env={"LLM_DS_AUTHORIZED_KEYS": str(tmp_path / "none"), "LLM_DS_SSH_DIR": str(tmp_path / "ssh")}
    )
    assert proc.returncode == 2 and "needs the head node's public key" in proc.stderr
    assert not (tmp_path / "ssh").exists()


def test_other_commands_and_help():
    assert entrypoint("help").stdout.startswith("usage: entrypoint.sh worker | head")
    proc = entrypoint("llm-ds", "config", "--world_size", "8")
    assert proc.returncode == 0 and '"train_batch_size": 64' in proc.stdout


def test_the_image_installs_what_setup_cfg_requires():
    """The image's dependency layer comes from setup.cfg alone (before the code is copied)."""
    proc = subprocess.run([sys.executable, str(ROOT / "docker" / "requirements.py"), str(ROOT / "setup.cfg"), "hub",
                           "wandb"], capture_output=True, text=True, check=True)  # fmt: skip
    listed = {Requirement(line).name: str(Requirement(line).specifier) for line in proc.stdout.splitlines()}
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    extras = cfg["options.extras_require"]
    lines = cfg["options"]["install_requires"].splitlines() + extras["hub"].splitlines() + extras["wandb"].splitlines()
    expected = {Requirement(r).name: str(Requirement(r).specifier) for r in lines if r.strip()}
    assert listed == expected and "torch" in listed and "datasets" in listed and "matplotlib" not in listed


def test_the_op_check_names_what_the_shipped_configs_need_and_the_accelerator():
    """Read from DeepSpeed's own install record: nothing is prebuilt in this environment, for the CPU."""
    check = [sys.executable, str(ROOT / "docker" / "check_ops.py")]
    proc = subprocess.run([*check, "cpu", str(ROOT / "ds_configs")], capture_output=True, text=True)
    assert proc.returncode == 1
    assert "op async_io (used by zero3_offload.json) is not prebuilt" in proc.stderr
    assert "op cpu_adam (used by zero2_offload.json, zero3_offload.json) is not prebuilt" in proc.stderr
    assert "op fused_adam (used by zero1.json, zero2.json, zero3.json) is not prebuilt" in proc.stderr
    assert "built for the" not in proc.stderr
    proc = subprocess.run([*check, "cuda", str(ROOT / "ds_configs")], capture_output=True, text=True)
    assert proc.returncode == 1 and "built for the 'cpu' accelerator, not 'cuda'" in proc.stderr
