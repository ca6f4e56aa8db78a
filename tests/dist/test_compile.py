"""``train.compile``: the DeepSpeed engine's torch.compile path trains to the eager run's losses."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_driver

pytestmark = pytest.mark.dist


def test_compiled_run_matches_eager(tmp_path, data_cache):
    losses = {}
    for compiled in (False, True):
        out = tmp_path / f"compile-{compiled}"
        args = ["--ds_config", "ds_configs/zero1.json", "--set", "train.max_steps=6", "--set", "logging.log_interval=1",
                "--set", "train.eval_interval=0", "--set", "train.eval_max_batches=1", "--set", "checkpoint.interval=0",
                "--set", "checkpoint.save_final=false", "--set", f"data.cache_dir={data_cache}",
                "--set", f"train.output_dir={out}", "--set", f"train.compile={str(compiled).lower()}"]  # fmt: skip
        proc = run_driver(args, ranks=None)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        losses[compiled] = [r["train/loss"] for r in records if "train/loss" in r]
        assert json.loads((out / "summary.json").read_text())["seconds_to_first_step"] > 0
    assert len(losses[True]) == 6
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)
    assert losses[True][-1] < losses[True][0]
