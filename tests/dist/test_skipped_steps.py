"""bf16 skips an optimizer step whose gradients hold inf or nan, as fp16 does: the count must be reported."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_driver

pytestmark = pytest.mark.dist


def test_bf16_reports_skipped_steps(tmp_path, data_cache):
    # A learning rate of 1e30 sends the weights to inf after the first update; every later gradient
    # is non-finite and DeepSpeed drops the step.
    args = ["--set", "train.precision=bf16", "--set", "train.lr=1e30", "--set", "train.warmup_steps=1",
            "--set", "train.max_steps=6", "--set", "logging.log_interval=2", "--set", "train.eval_interval=0",
            "--set", "checkpoint.interval=0", "--set", "checkpoint.save_final=false", "--set", "data.block_size=64",
            "--set", f"train.output_dir={tmp_path}", "--set", f"data.cache_dir={data_cache}"]  # fmt: skip
    proc = run_driver(args, ranks=None, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in logged] == [1, 2, 4, 6]
    skipped = [r["train/skipped_steps"] for r in logged]
    assert skipped[0] == 0 and skipped[-1] > 0 and skipped == sorted(skipped)
    assert "train/loss_scale" not in logged[-1]  # bf16 has no loss scale
    assert json.loads((tmp_path / "summary.json").read_text())["skipped_steps"] == skipped[-1]
