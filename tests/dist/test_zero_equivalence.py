"""ZeRO stages 1, 2 and 3 on 2 CPU ranks under the real ``deepspeed`` runner, and 1 rank, train the same model."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_driver

pytestmark = pytest.mark.dist

COMMON = [
    "--set", "data.block_size=64",
    "--set", "train.max_steps=30",
    "--set", "train.warmup_steps=5",
    "--set", "train.eval_interval=0",
    "--set", "train.eval_max_batches=4",
    "--set", "logging.log_interval=5",
    "--set", "checkpoint.interval=0",
    "--set", "model.dropout=0.0",
]
CHUNKED = ["--set", "model.loss_chunk_tokens=100"]  # 256 positions a micro-batch: chunks of 100, 100, 56
VARIANTS = {  # name: (ranks, DS template, micro batch, more): the global batch is 8 sequences in all
    "zero1": (2, "zero1.json", 4, []),
    "zero2": (2, "zero2.json", 4, []),
    "zero3": (2, "zero3.json", 4, CHUNKED),  # ZeRO-3 gathers the tied output weight for the fused loss
    "zero3_transformers_loss": (2, "zero3.json", 4, ["--set", "model.fused_loss=false"]),
    "one_rank": (None, "zero1.json", 8, []),
    # 2 micro-batches of 4 accumulated: DeepSpeed scales each loss by 1/2 before backward.
    # Evaluation reads eval_max_batches micro-batches per rank: 8 of 4 make the others' 32 sequences.
    "one_rank_accumulating": (None, "zero1.json", 4, ["--set", "train.grad_accum_steps=2",
                                                      "--set", "train.eval_max_batches=8"]),
}


def read_losses(run_dir) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_cache):
    out = {}
    for name, (ranks, ds, micro, more) in VARIANTS.items():
        run_dir = tmp_path_factory.mktemp(name)
        args = ["--ds_config", f"ds_configs/{ds}", *COMMON, *more, "--set", f"train.micro_batch_size={micro}",
                "--set", f"train.output_dir={run_dir}", "--set", f"data.cache_dir={data_cache}"]
        proc = run_driver(args, ranks)
        assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        out[name] = (run_dir, proc)
    return out


@pytest.mark.parametrize("name", list(VARIANTS))
def test_run_completes_and_loss_falls(runs, name):
    run_dir, proc = runs[name]
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("steps", "world_size", "tokens_seen", "first_train_loss", "final_train_loss", "final_eval_loss",
                "eval_perplexity", "tokens_per_s", "wall_s"):
        assert summary[key] is not None, key
    assert summary["steps"] == 30
    assert summary["world_size"] == (1 if name.startswith("one_rank") else 2)
    assert summary["tokens_seen"] == 30 * 8 * 64
    assert summary["final_eval_loss"] < summary["first_train_loss"] - 1.0
    assert summary["final_train_loss"] < summary["first_train_loss"] - 1.0
    assert (run_dir / "checkpoints" / "global_step30").is_dir()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "global_step30"
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert json.loads((run_dir / "ds_config.json").read_text())["train_batch_size"] == 8
    # The console line shape, from rank 0 only.
    lines = [line for line in proc.stdout.splitlines() if line.startswith("| epoch")]
    assert len(lines) == 7  # steps 1, 5, 10, ..., 30
    assert all(" | lr " in x and " | ms/step " in x and " | tokens/s " in x and " | loss " in x for x in lines)
    assert "| step 30/30 |" in lines[-1]


@pytest.mark.parametrize("name", ["zero2", "zero3", "zero3_transformers_loss", "one_rank", "one_rank_accumulating"])
def test_same_losses_as_zero1(runs, name):
    reference = read_losses(runs["zero1"][0])
    losses = read_losses(runs[name][0])
    assert sorted(losses) == sorted(reference) == [1, 5, 10, 15, 20, 25, 30]
    for step, ref in reference.items():
        assert losses[step] == pytest.approx(ref, rel=1e-4), f"step {step}"
    ref_eval = json.loads((runs["zero1"][0] / "summary.json").read_text())["final_eval_loss"]
    eval_loss = json.loads((runs[name][0] / "summary.json").read_text())["final_eval_loss"]
    assert eval_loss == pytest.approx(ref_eval, rel=1e-4)
