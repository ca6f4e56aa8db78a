"""On a CUDA machine: the same driver trains on one GPU with the precision the hardware has."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import run_driver

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("ds", ["zero1.json", "zero3.json"])
def test_one_gpu_trains_with_auto_precision(tmp_path, data_cache, ds):
    args = [
        "--ds_config",
        f"ds_configs/{ds}",
        "--set",
        "train.max_steps=40",
        "--set",
        "train.warmup_steps=5",
        "--set",
        "logging.log_interval=10",
        "--set",
        "checkpoint.interval=0",
        "--set",
        f"train.output_dir={tmp_path}",
        "--set",
        f"data.cache_dir={data_cache}",
    ]
    proc = run_driver(args, ranks=None, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    expected = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    assert summary["precision"] == expected
    assert summary["final_eval_loss"] < summary["first_train_loss"] - 1.0
