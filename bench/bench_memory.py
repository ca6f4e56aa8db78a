"""Memory per rank under ZeRO 0-3 and offload, measured, against the model-state bytes and `llm-ds plan`.

    make bench-memory      # adds "memory" to bench/results/cpu.json and prints a table

Each variant is a real 2-rank `deepspeed` run of a 29.5M-parameter GPT-2 (8 layers, 512 wide) for
a few steps, fp32 on CPU. Every rank reports the host memory it had before the model was built and
its peak resident set from then on (Linux's VmHWM, reset at that point); the difference is what
the model, optimizer, activations and DeepSpeed's buffers cost that rank. It is set against:

- the model states as the ZeRO paper counts them for mixed precision: 16 bytes per parameter for
  ZeRO-0, 4 + 12/N for ZeRO-1, 2 + 14/N for ZeRO-2, 16/N for ZeRO-3 (N ranks);
- what `llm-ds plan --device cpu` predicts for the same run (model states as DeepSpeed allocates
  them in fp32, activations, logits, buckets), and the error of that prediction.

Memory does not vary with machine load the way time does, but repeats still report min/median/max.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import machine_info, spread

from llm_ds import plan
from llm_ds.config import load_run_config

ROOT = Path(__file__).resolve().parents[1]

OUT = ROOT / "bench" / "results" / "cpu.json"
REPEATS = int(os.environ.get("BENCH_REPEATS", 3))
RANKS = 2
PRECISION = "bf16"  # mixed precision, as the ZeRO paper counts it; DeepSpeed runs bf16 on CPU too
SHAPE = {"model.n_layer": 8, "model.n_embd": 512, "model.n_head": 8, "model.n_positions": 256}
VOCAB = 8192  # the bundled tokenizer's, already a multiple of 64

BUCKET = 5_000_000  # reduce/all-gather/prefetch bucket elements, sized to the model as HF's "auto" does (d^2 ~ 0.26M)
LEAN = {"reduce_bucket_size": BUCKET, "allgather_bucket_size": BUCKET}
LEAN3 = {
    "reduce_bucket_size": BUCKET,
    "stage3_prefetch_bucket_size": BUCKET,
    "stage3_max_live_parameters": BUCKET,
    "stage3_max_reuse_distance": BUCKET,
}
# name: (DeepSpeed template, zero_optimization changes, plan candidate, extra run-config settings)
VARIANTS = {
    "zero0": ("zero1.json", {"stage": 0}, plan.Candidate(0), {}),
    "zero1": ("zero1.json", LEAN, plan.Candidate(1), {}),
    "zero2": ("zero2.json", LEAN, plan.Candidate(2), {}),
    "zero3": ("zero3.json", LEAN3, plan.Candidate(3), {}),
    "zero2_offload_cpu": ("zero2_offload.json", LEAN, plan.Candidate(2, "cpu"), {}),
    "zero3_offload_cpu": (
        "zero3_offload.json",
        {**LEAN3, "offload_param": {"device": "cpu"}, "offload_optimizer": {"device": "cpu"}},
        plan.Candidate(3, "cpu", "cpu"),
        {},
    ),
    "zero3_offload_nvme": ("zero3_offload.json", LEAN3, plan.Candidate(3, "nvme", "nvme"), {}),
    # ds_configs/zero3.json as shipped: 50M-element buckets, all parameters kept live.
    "zero3_shipped": ("zero3.json", {}, plan.Candidate(3), {}),
    # Activation-heavy shapes, for the planner's activation and logits terms.
    "zero1_seq256_micro8": (
        "zero1.json",
        LEAN,
        plan.Candidate(1, micro_batch=8),
        {"data.block_size": 256, "train.micro_batch_size": 8},
    ),
    "zero1_seq256_micro8_ckpt": (
        "zero1.json",
        LEAN,
        plan.Candidate(1, activation_checkpointing=True, micro_batch=8),
        {"data.block_size": 256, "train.micro_batch_size": 8, "model.activation_checkpointing": "true"},
    ),
    # The loss: transformers' (whole logits) against the fused one in chunks (llm_ds/loss.py).
    "zero1_seq256_micro8_transformers_loss": (
        "zero1.json",
        LEAN,
        plan.Candidate(1, micro_batch=8),
        {"data.block_size": 256, "train.micro_batch_size": 8, "model.fused_loss": "false"},
    ),
    "zero1_seq256_micro8_chunk256": (
        "zero1.json",
        LEAN,
        plan.Candidate(1, micro_batch=8),
        {"data.block_size": 256, "train.micro_batch_size": 8, "model.loss_chunk_tokens": 256},
    ),
}


def ds_template(name: str, zero_changes: dict, folder: Path) -> Path:
    config = json.loads((ROOT / "ds_configs" / name).read_text())
    config["zero_optimization"].update(zero_changes)
    path = folder / f"{name}-{len(list(folder.glob('*.json')))}.json"
    path.write_text(json.dumps(config))
    return path


def settings(extra: dict) -> dict:
    return {
        **SHAPE,
        "data.block_size": 128,
        "train.micro_batch_size": 2,
        "train.max_steps": 3,
        "train.precision": PRECISION,
        **extra,
    }


def run(template: Path, extra: dict, cache: str) -> dict:
    """Both ranks' figures from one probe run; the larger rank's are reported."""
    with tempfile.TemporaryDirectory(prefix="llm-ds-bench-mem-") as out:
        sets = {**settings(extra), "train.output_dir": out, "data.cache_dir": cache}
        cmd = [
            str(Path(sys.executable).parent / "deepspeed"),
            "--num_gpus",
            str(RANKS),
            str(ROOT / "bench" / "memory_probe.py"),
            "--ds_config",
            str(template),
            *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")],
            "--out",
            f"{out}/probe",
        ]
        # Freed tensors leave the resident set at once, so its peak follows peak allocation.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
        if proc.returncode:  # once more: a rare abort at process exit is not a memory figure
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
        if proc.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        ranks = [json.loads(p.read_text()) for p in sorted(Path(out, "probe").glob("rank*.json"))]
    return {
        "parameters": ranks[0]["parameters"],
        "model_state_bytes": max(r["model_state_bytes"] for r in ranks),
        "peak_rss_growth_bytes": max(r["peak_allocated_growth_bytes"] for r in ranks),
    }


def predicted(cand: plan.Candidate, extra: dict, template: dict) -> dict:
    """What `llm-ds plan` says one rank of this run allocates: model states (with DeepSpeed's buckets),
    and everything at the peak (activations and logits too); offloaded states count, since on CPU
    ranks they share the same memory."""
    # The run's own config, read as the driver reads the same --set values.
    cfg = load_run_config(None, [f"{k}={v}" for k, v in settings(extra).items()])
    shape = plan.shape_from_config(cfg, VOCAB)
    cluster = plan.Cluster(1, RANKS, "cpu", 64 * plan.GiB, 128 * plan.GiB, 1e12, 0.1)
    est = plan.estimate(shape, cand, cluster, RANKS * cand.micro_batch, PRECISION, template)
    return {
        "model_states": est.model_state_bytes() + sum(est.host_states.values()),
        "peak": est.cpu_rank_bytes(),
        "parts": {**est.device, "framework": est.framework, **est.host_states},
    }


def main() -> None:
    import deepspeed
    import torch

    folder = Path(tempfile.mkdtemp(prefix="llm-ds-bench-mem-"))
    cache = str(folder / "cache")
    runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    templates = {name: ds_template(t, z, folder) for name, (t, z, _, _) in VARIANTS.items()}
    for _ in range(REPEATS):
        for name, (_, _, _, extra) in VARIANTS.items():
            runs[name].append(run(templates[name], extra, cache))
    figures = {}
    for name, (_, _, cand, extra) in VARIANTS.items():
        template = json.loads(templates[name].read_text())
        n_params = runs[name][0]["parameters"]
        states = spread(r["model_state_bytes"] for r in runs[name])
        peak = spread(r["peak_rss_growth_bytes"] for r in runs[name])
        pred = predicted(cand, extra, template)
        paper = {0: 16, 1: 4 + 12 / RANKS, 2: 2 + 14 / RANKS, 3: 16 / RANKS}[cand.stage] * n_params
        figures[name] = {
            "model_state_bytes_per_rank": states,
            "model_state_bytes_per_parameter": states["median"] / n_params,
            "zero_paper_model_state_bytes": paper,
            "peak_rss_growth_bytes_per_rank": peak,
            "plan_model_state_bytes": pred["model_states"],
            "plan_peak_bytes": pred["peak"],
            "plan_parts_bytes": pred["parts"],
            "plan_model_state_error": pred["model_states"] / states["median"] - 1,
            "plan_peak_error": pred["peak"] / peak["median"] - 1,
        }
    states = {n: f["model_state_bytes_per_rank"]["median"] for n, f in figures.items()}
    peaks = {n: f["peak_rss_growth_bytes_per_rank"]["median"] for n, f in figures.items()}
    memory = {
        "machine": machine_info(),
        "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__},
        "setup": f"GPT-2 {SHAPE}, vocab {VOCAB} ({runs['zero0'][0]['parameters']:,} parameters), {RANKS} ranks "
        f"on CPU, {PRECISION}, 3 steps; block 128, micro-batch 2 unless the variant says otherwise; DeepSpeed "
        f"buckets {BUCKET:,} elements. model_state: bytes of live tensors after the last backward (parameters, "
        "gradients, optimizer states, DeepSpeed's buffers), larger rank. peak_rss_growth: peak resident set "
        "after the model was built minus the resident set just before, less library pages first touched in training, "
        "larger rank, glibc mmap threshold 64 KiB.",
        "repeats": REPEATS,
        "variants": figures,
        "ratios": {
            "model_states_zero3_vs_zero0": states["zero3"] / states["zero0"],
            "model_states_zero2_vs_zero0": states["zero2"] / states["zero0"],
            "model_states_zero1_vs_zero0": states["zero1"] / states["zero0"],
            "peak_zero3_vs_zero0": peaks["zero3"] / peaks["zero0"],
            "peak_fused_loss_vs_transformers_loss": peaks["zero1_seq256_micro8"]
            / peaks["zero1_seq256_micro8_transformers_loss"],
            "peak_fused_loss_chunk256_vs_transformers_loss": peaks["zero1_seq256_micro8_chunk256"]
            / peaks["zero1_seq256_micro8_transformers_loss"],
        },
        "plan_max_abs_error": {
            "model_states": max(abs(f["plan_model_state_error"]) for f in figures.values()),
            "peak": max(abs(f["plan_peak_error"]) for f in figures.values()),
        },
    }
    result = json.loads(OUT.read_text()) if OUT.exists() else {}
    result["memory"] = memory
    result.pop("not_measured", None)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    mib = 2**20
    print(
        f"{'variant':<40}{'states MiB':>11}{'B/param':>8}{'paper':>7}{'plan':>7}{'err':>7}"
        f"{'peak MiB':>10}{'plan':>7}{'err':>7}"
    )
    for name, f in figures.items():
        print(
            f"{name:<40}{f['model_state_bytes_per_rank']['median'] / mib:>11,.0f}"
            f"{f['model_state_bytes_per_parameter']:>8.2f}{f['zero_paper_model_state_bytes'] / mib:>7,.0f}"
            f"{f['plan_model_state_bytes'] / mib:>7,.0f}{f['plan_model_state_error']:>+7.0%}"
            f"{f['peak_rss_growth_bytes_per_rank']['median'] / mib:>10,.0f}{f['plan_peak_bytes'] / mib:>7,.0f}"
            f"{f['plan_peak_error']:>+7.0%}"
        )
    for name, value in memory["ratios"].items():
        print(f"{name:<34}{value:>8.3f}")
    print(f"wrote {OUT} (memory)")


if __name__ == "__main__":
    main()
