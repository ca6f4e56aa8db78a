"""The README's user script, as a user runs it: under the real ``deepspeed`` runner with 2 CPU ranks. Its
ZeRO-1 and ZeRO-3 runs agree as the driver's do."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import DEEPSPEED, ROOT, free_port

pytestmark = pytest.mark.dist

SMALL = ["data.block_size=64", "train.micro_batch_size=4", "train.grad_accum_steps=1", "train.max_steps=20",
         "train.warmup_steps=5", "train.eval_interval=0", "train.eval_max_batches=4", "logging.log_interval=5",
         "checkpoint.interval=0"]


def readme_block(marker: str) -> str:
    """The README's python block that contains ``marker``."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    (block,) = [b for b in blocks if marker in b]
    return block


def losses(run_dir) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_cache):
    folder = tmp_path_factory.mktemp("user")
    script = folder / "chapter_pipeline.py"
    script.write_text(readme_block("# chapter_pipeline.py"))
    out = {}
    for stage in (1, 3):
        run_dir = folder / f"zero{stage}"
        sets = [*SMALL, f"train.output_dir={run_dir}", f"data.cache_dir={data_cache}"]
        cmd = [str(DEEPSPEED), "--num_gpus", "2", "--master_port", str(free_port()), str(script),
               "--ds_config", f"ds_configs/zero{stage}.json", *[a for s in sets for a in ("--set", s)]]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
        assert proc.returncode == 0, f"zero{stage}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        out[stage] = (run_dir, proc)
    return out


def test_the_readme_script_runs_under_the_runner_on_two_ranks(runs):
    run_dir, proc = runs[1]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 20 and summary["zero_stage"] == 1
    assert summary["final_eval_loss"] < summary["first_train_loss"] - 1.0
    printed = [line for line in proc.stdout.splitlines() if "eval loss" in line and "after 20 steps" in line]
    assert len(printed) == 1  # rank 0 alone prints
    assert f"{summary['final_eval_loss']:.3f}" in printed[0]


def test_zero1_and_zero3_losses_agree(runs):
    zero1, zero3 = losses(runs[1][0]), losses(runs[3][0])
    assert sorted(zero1) == sorted(zero3) == [1, 5, 10, 15, 20]
    for step, loss in zero1.items():
        assert zero3[step] == pytest.approx(loss, rel=1e-4), step
    evals = [json.loads((runs[s][0] / "summary.json").read_text())["final_eval_loss"] for s in (1, 3)]
    assert evals[1] == pytest.approx(evals[0], rel=1e-4)


def test_the_readme_script_runs_as_one_plain_process(tmp_path, data_cache):
    script = tmp_path / "chapter_pipeline.py"
    script.write_text(readme_block("# chapter_pipeline.py"))
    sets = [*SMALL, "train.max_steps=3", f"train.output_dir={tmp_path / 'run'}", f"data.cache_dir={data_cache}"]
    proc = subprocess.run([sys.executable, str(script), *[a for s in sets for a in ("--set", s)]], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "after 3 steps" in proc.stdout


ONE_RANK_FAILS = """
import os, sys
from llm_ds import RunConfig, Trainer, TrainerCallback

class FailOnRank1(TrainerCallback):
    def on_step_end(self, trainer, step):
        if trainer.rank == 1 and step == 3:
            raise RuntimeError("rank 1's callback failed")

cfg = RunConfig.from_dict({}, overrides=[a for a in sys.argv[1:] if not a.startswith("--local_rank")])
Trainer(cfg, callbacks=[FailOnRank1()]).fit()
"""


def test_a_callback_failing_on_one_rank_stops_every_rank_after_a_save(tmp_path, data_cache):
    script = tmp_path / "fails.py"
    script.write_text(ONE_RANK_FAILS)
    run_dir = tmp_path / "run"
    sets = [*SMALL, f"train.output_dir={run_dir}", f"data.cache_dir={data_cache}"]
    cmd = [str(DEEPSPEED), "--num_gpus", "2", "--master_port", str(free_port()), str(script), *sets]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "rank 1's callback failed" in proc.stdout + proc.stderr
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("global_step*")) == ["global_step5"]
    assert (run_dir / "checkpoints" / "global_step5" / "COMPLETE").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())  # rank 0's, which did not raise
    assert summary["steps"] == 5 and summary["stopped_by"] == "RuntimeError in FailOnRank1.on_step_end"
