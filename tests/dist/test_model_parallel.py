"""Tensor parallelism (DeepSpeed's AutoTP over GPT-2) and pipeline parallelism (GPT-2 as a PipelineModule) under
the real ``deepspeed`` runner on CPU ranks, fp32, dropout 0, gradient clipping on: the same training as one rank
with the same global batch at every logged step, exact resume after a SIGKILL, and an export that joins the
shards and stages into one Hugging Face model."""

from __future__ import annotations

import json
import signal

import pytest
import torch

from tests.conftest import ROOT, run_driver
from tests.dist.test_resume import rank_process, start_driver, wait_for

pytestmark = pytest.mark.dist

STEPS = 20
COMMON = ["--set", "data.block_size=64", "--set", f"train.max_steps={STEPS}", "--set", "train.warmup_steps=5",
          "--set", "train.eval_interval=0", "--set", "logging.log_interval=5", "--set", "checkpoint.interval=10",
          "--set", "checkpoint.keep_last=0", "--set", "model.dropout=0.0", "--set", "train.grad_clip=1.0",
          "--set", "train.micro_batch_size=4"]
# name: (ranks, DS template, tensor, pipeline, accumulation, evaluation batches per rank). The global batch is 8
# sequences in all, and evaluation reads the same 16 validation sequences.
VARIANTS = {
    "one_rank": (None, "zero1.json", 1, 1, 2, 4),
    "tp2": (2, "zero1.json", 2, 1, 2, 4),
    "tp2_zero3": (2, "zero3.json", 2, 1, 2, 4),  # each rank builds the model whole, then keeps its share
    "tp2_dp2": (4, "zero1.json", 2, 1, 1, 2),  # ZeRO-1 partitions over the 2 data-parallel ranks
    "pp2": (2, "zero1.json", 1, 2, 2, 4),
    "pp2_zero0": (2, "zero0.json", 1, 2, 2, 4),  # DeepSpeed's own clipping path, whose norm llm-ds corrects
    "pp2_dp2": (4, "zero1.json", 1, 2, 1, 2),  # and activation checkpointing: the blocks recomputed
}
MORE = {"pp2_dp2": ["--set", "model.activation_checkpointing=true"]}
SPLIT = {"tp2": "tensor-parallel 2 x data-parallel 1", "tp2_zero3": "tensor-parallel 2 x data-parallel 1",
         "tp2_dp2": "tensor-parallel 2 x data-parallel 2", "pp2": "pipeline 2 stages x data-parallel 1",
         "pp2_zero0": "pipeline 2 stages x data-parallel 1", "pp2_dp2": "pipeline 2 stages x data-parallel 2"}


def args_for(name: str, out, data_cache) -> list[str]:
    _, ds, tensor, pipeline, accum, evals = VARIANTS[name]
    template = str(out.parent / ds) if ds == "zero0.json" else f"ds_configs/{ds}"
    return ["--ds_config", template, *COMMON, "--set", f"parallel.tensor={tensor}",
            "--set", f"parallel.pipeline={pipeline}", "--set", f"train.grad_accum_steps={accum}",
            "--set", f"train.eval_max_batches={evals}", "--set", f"train.output_dir={out}",
            "--set", f"data.cache_dir={data_cache}", *MORE.get(name, [])]


def records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in records(out) if "train/loss" in r}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_cache):
    out = {}
    for name, (ranks, *_) in VARIANTS.items():
        run_dir = tmp_path_factory.mktemp(name) / "run"
        zero0 = json.loads((ROOT / "ds_configs" / "zero1.json").read_text())
        zero0["zero_optimization"] = {"stage": 0}
        (run_dir.parent / "zero0.json").write_text(json.dumps(zero0))
        proc = run_driver(args_for(name, run_dir, data_cache), ranks)
        assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        out[name] = (run_dir, proc)
    return out


@pytest.mark.parametrize("name", list(SPLIT))
def test_same_training_as_one_rank(runs, name):
    reference, (run_dir, proc) = runs["one_rank"][0], runs[name]
    expected, got = losses(reference), losses(run_dir)
    assert sorted(got) == sorted(expected) == [1, 5, 10, 15, 20]
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, rel=1e-4), f"step {step}"
    ref_summary, summary = (json.loads((d / "summary.json").read_text()) for d in (reference, run_dir))
    assert summary["final_eval_loss"] == pytest.approx(ref_summary["final_eval_loss"], rel=1e-4)
    assert summary["global_batch_size"] == 8 and summary["tokens_seen"] == ref_summary["tokens_seen"]
    assert summary["parameters"] == ref_summary["parameters"]  # the whole model's, on every split
    assert summary["real_token_fraction"] == 1.0  # a replica's shared batch is counted once
    assert all(r["data/real_token_fraction"] == 1.0 for r in records(run_dir) if "train/loss" in r)
    ranks, _, tensor, pipeline, *_ = VARIANTS[name]
    assert (summary["world_size"], summary["tensor_parallel"], summary["pipeline_parallel"]) == (
        ranks, tensor, pipeline)
    assert summary["data_parallel_size"] == ranks // (tensor * pipeline)
    assert f"{ranks} rank(s) ({SPLIT[name]})" in proc.stdout


def test_clipping_is_active_in_these_runs(runs):
    """The runs compare clipped steps: the first steps' gradient norms are above train.grad_clip (DeepSpeed
    reports the norm under ZeRO; every run trains the same)."""
    norms = [r["train/grad_norm"] for r in records(runs["one_rank"][0]) if "train/grad_norm" in r]
    assert norms and norms[0] > 1.0


def test_export_joins_the_shards_and_stages(runs, tmp_path):
    """``llm-ds export`` of a tensor-parallel or pipeline checkpoint: one Hugging Face model, whose logits are
    the one-rank run's."""
    from transformers import AutoModelForCausalLM

    from llm_ds.export import export_checkpoint

    tokens = torch.randint(0, 8000, (2, 64), generator=torch.Generator().manual_seed(0))

    def logits(name):
        folder = export_checkpoint(runs[name][0] / "checkpoints", tmp_path / name)
        with torch.no_grad():
            return AutoModelForCausalLM.from_pretrained(str(folder))(tokens).logits

    expected = logits("one_rank")
    for name in SPLIT:
        torch.testing.assert_close(logits(name), expected, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize("name", ["tp2", "pp2"])
def test_sigkill_then_rerun_matches_uninterrupted(runs, tmp_path, data_cache, name):
    broken = tmp_path / "broken"
    killed = start_driver(args_for(name, broken, data_cache))
    wait_for(broken / "checkpoints" / "global_step10" / "COMPLETE", killed)
    rank_process(killed, 1).send_signal(signal.SIGKILL)
    killed.wait(timeout=120)
    assert killed.returncode != 0
    rerun = run_driver(args_for(name, broken, data_cache), ranks=2)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert json.loads((broken / "summary.json").read_text())["resumed_at_step"] in (10, 20)
    expected, got = losses(runs[name][0]), losses(broken)
    assert sorted(got) == sorted(expected)
    for step in expected:
        assert got[step] == expected[step], f"step {step}"  # bit for bit


def test_resuming_with_another_split_is_refused(runs, data_cache):
    run_dir = runs["pp2"][0]
    proc = run_driver([*args_for("pp2", run_dir, data_cache), "--set", "parallel.pipeline=1",
                       "--set", "parallel.tensor=2", "--set", f"train.max_steps={STEPS + 10}"], ranks=2)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert errors and "was written with parallel.tensor=1, parallel.pipeline=2 and this run has " in errors[0]
    assert "--set parallel.tensor=1 --set parallel.pipeline=2" in errors[0]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"global_step{STEPS}"  # nothing written
