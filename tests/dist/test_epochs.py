"""``train.epochs`` runs whole passes over the packed train split, reshuffled each epoch."""

from __future__ import annotations

import json

import pytest

from llm_ds.config import BUNDLED_CORPUS
from tests.conftest import run_driver

pytestmark = pytest.mark.dist


def test_two_epochs_over_a_small_corpus(tmp_path):
    corpus = tmp_path / "small.jsonl"
    corpus.write_text("".join(BUNDLED_CORPUS.read_text().splitlines(keepends=True)[:40]))
    out = tmp_path / "run"
    args = ["--set", f"data.paths=[{corpus}]", "--set", "data.block_size=32", "--set", "data.val_fraction=0.1",
            "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", "train.max_steps=null",
            "--set", "train.epochs=2", "--set", "train.micro_batch_size=16", "--set", "train.warmup_steps=2",
            "--set", "logging.log_interval=1", "--set", "checkpoint.interval=0", "--set", f"train.output_dir={out}"]
    proc = run_driver(args, ranks=None, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train/loss" in r]
    # "data: N train and M validation samples ..." is printed by rank 0; one epoch is N // 16 steps.
    line = next(x for x in proc.stdout.splitlines() if x.startswith("data: ") and " train and " in x)
    n_blocks = int(line.split()[1].replace(",", ""))
    steps_per_epoch = n_blocks // 16
    assert summary["steps"] == 2 * steps_per_epoch
    assert summary["epochs"] == pytest.approx(2.0)
    assert [r["train/epoch"] for r in train].count(1) == steps_per_epoch
    assert train[-1]["train/epoch"] == 2
    assert summary["final_train_loss"] < summary["first_train_loss"]
