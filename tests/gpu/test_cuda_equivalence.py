"""On a CUDA machine: the driver's ZeRO-1, 2 and 3 runs in bf16 train the same model, as the CPU runs do.

ZeRO-3 builds the model partitioned inside ``deepspeed.zero.Init``, whose tensor constructors put
every new tensor on the GPU in bf16: the runs must start from the same weights (step 1's loss) and
follow each other within bf16's rounding after that.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import run_driver

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

COMMON = ["--set", "train.precision=bf16", "--set", "data.block_size=64", "--set", "train.max_steps=30",
          "--set", "train.warmup_steps=5", "--set", "train.lr=1e-3", "--set", "train.eval_interval=0",
          "--set", "train.eval_max_batches=4", "--set", "logging.log_interval=5", "--set", "checkpoint.interval=0",
          "--set", "checkpoint.save_final=false", "--set", "model.dropout=0.0",
          "--set", "train.micro_batch_size=8"]  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_cache):
    out = {}
    for stage in (1, 2, 3):
        run_dir = tmp_path_factory.mktemp(f"zero{stage}")
        args = ["--ds_config", f"ds_configs/zero{stage}.json", *COMMON,
                "--set", f"train.output_dir={run_dir}", "--set", f"data.cache_dir={data_cache}"]  # fmt: skip
        proc = run_driver(args, ranks=None, timeout=300)
        assert proc.returncode == 0, f"zero{stage}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        losses = {r["step"]: r["train/loss"] for r in records if "train/loss" in r}
        out[stage] = (losses, json.loads((run_dir / "summary.json").read_text()))
    return out


@pytest.mark.parametrize("stage", [2, 3])
def test_bf16_zero_stages_match_zero1(runs, stage):
    reference, ref_summary = runs[1]
    losses, summary = runs[stage]
    assert summary["precision"] == "bf16" and summary["zero_stage"] == stage
    assert summary["skipped_steps"] == 0
    assert sorted(losses) == sorted(reference) == [1, 5, 10, 15, 20, 25, 30]
    assert losses[1] == pytest.approx(reference[1], rel=1e-3)  # the same initial weights
    for step, ref in reference.items():
        assert losses[step] == pytest.approx(ref, rel=2e-2), f"step {step}"
    assert summary["final_eval_loss"] == pytest.approx(ref_summary["final_eval_loss"], rel=3e-2)
    assert summary["final_eval_loss"] < summary["first_train_loss"] - 1.0
