"""Shared fixtures: the repository root, the venv's deepspeed runner, a token cache per session."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEEPSPEED = Path(sys.executable).parent / "deepspeed"


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """One token cache for the whole session, as users share ~/.cache/llm_ds."""
    return tmp_path_factory.mktemp("token-cache")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_driver(args: list[str], ranks: int | None, timeout: float = 600, env: dict | None = None, cwd=ROOT):
    """Run ``llm_ds/train.py`` under the real ``deepspeed`` runner (``ranks`` CPU ranks) or plain python."""
    if ranks is None:
        cmd = [sys.executable, str(ROOT / "llm_ds" / "train.py"), *args]
    else:
        cmd = [
            str(DEEPSPEED),
            "--num_gpus",
            str(ranks),
            "--master_port",
            str(free_port()),
            str(ROOT / "llm_ds" / "train.py"),
            *args,
        ]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd)
