"""CPU benchmark, side by side: a plain PyTorch loop and Hugging Face's Trainer against llm-ds under DeepSpeed,
and packing against padding.

    make bench             # writes bench/results/cpu.json and prints a table

Every variant trains the same model on the same data with the same global batch, steps and seed,
as a separate process; variants are alternated and repeated, and medians reported. Ratios, not
absolute times, are what to compare: the machine is shared and noisy. ``process_s`` is each
process's whole wall time, start-up and data included.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine_info, spread

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "cpu.json"
REPEATS = int(os.environ.get("BENCH_REPEATS", 3))
STEPS = int(os.environ.get("BENCH_STEPS", 60))
COMMON = [
    "--set",
    f"train.max_steps={STEPS}",
    "--set",
    "train.warmup_steps=10",
    "--set",
    "train.eval_interval=0",
    "--set",
    "train.eval_max_batches=1",
    "--set",
    "logging.log_interval=10",
    "--set",
    "checkpoint.interval=0",
    "--set",
    "checkpoint.save_final=false",
    "--set",
    "checkpoint.resume=never",
]
UNFUSED = ["--set", "model.fused_loss=false"]
PIPELINE = ["--set", "parallel.pipeline=2", "--set", "train.micro_batch_size=4", "--set", "train.grad_accum_steps=2"]
PADDING = [
    "--set",
    "data.block_size=1024",
    "--set",
    "model.n_positions=1024",
    "--set",
    "train.micro_batch_size=2",
    "--set",
    f"train.max_steps={max(6, STEPS // 10)}",
]


def ds_template(stage: int, folder: Path) -> str:
    config = json.loads((ROOT / "ds_configs" / "zero1.json").read_text())
    config["zero_optimization"] = {"stage": stage}
    path = folder / f"zero{stage}.json"
    path.write_text(json.dumps(config))
    return str(path)


def run_llm_ds(ds: str, ranks: int, extra: list[str], cache: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="llm-ds-bench-") as out:
        args = [
            "--ds_config",
            ds,
            *COMMON,
            "--set",
            f"train.output_dir={out}",
            "--set",
            f"data.cache_dir={cache}",
            *extra,
        ]
        if ranks == 1:
            cmd = [sys.executable, str(ROOT / "llm_ds" / "train.py"), *args]
        else:
            cmd = [
                str(Path(sys.executable).parent / "deepspeed"),
                "--num_gpus",
                str(ranks),
                str(ROOT / "llm_ds" / "train.py"),
                *args,
            ]
        process_s = timed_run(cmd)
        summary = json.loads((Path(out) / "summary.json").read_text())
    return {
        "tokens_per_s": summary["tokens_per_s"],
        "real_tokens_per_s": summary["tokens_per_s"] * summary["real_token_fraction"],
        "final_train_loss": summary["final_train_loss"],
        "process_s": process_s,
    }


def timed_run(cmd: list[str]) -> float:
    """Run a benchmark process to the end; its whole wall time."""
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
    return time.perf_counter() - start


def run_script(script: str, extra: list[str], cache: str) -> dict:
    """A one-process baseline (``plain_loop.py``, ``hf_trainer.py``) on the same run config."""
    with tempfile.TemporaryDirectory(prefix="llm-ds-bench-") as out:
        result = Path(out) / "result.json"
        cmd = [
            sys.executable,
            str(ROOT / "bench" / script),
            *COMMON,
            "--set",
            f"data.cache_dir={cache}",
            *extra,
            "--out",
            str(result),
        ]
        process_s = timed_run(cmd)
        figures = json.loads(result.read_text())
    return {
        "tokens_per_s": figures["tokens_per_s"],
        "real_tokens_per_s": figures["tokens_per_s"],
        "final_train_loss": figures["final_loss"],
        "process_s": process_s,
    }


def main() -> None:
    import deepspeed
    import torch

    folder = Path(tempfile.mkdtemp(prefix="llm-ds-bench-ds-"))
    cache = str(folder / "cache")
    variants = {
        "a_plain_pytorch_1rank": lambda: run_script("plain_loop.py", [], cache),
        "a_hf_trainer_1rank": lambda: run_script("hf_trainer.py", [], cache),
        "b_llm_ds_zero0_1rank": lambda: run_llm_ds(ds_template(0, folder), 1, [], cache),
        "b_llm_ds_zero1_1rank": lambda: run_llm_ds(ds_template(1, folder), 1, [], cache),
        "b_llm_ds_zero1_1rank_transformers_loss": lambda: run_llm_ds(ds_template(1, folder), 1, UNFUSED, cache),
        "b_llm_ds_zero2_1rank": lambda: run_llm_ds(ds_template(2, folder), 1, [], cache),
        "b_llm_ds_zero3_1rank": lambda: run_llm_ds(ds_template(3, folder), 1, [], cache),
        "c_llm_ds_zero1_2ranks": lambda: run_llm_ds(
            ds_template(1, folder), 2, ["--set", "train.micro_batch_size=4"], cache
        ),
        "c_llm_ds_zero3_2ranks": lambda: run_llm_ds(
            ds_template(3, folder), 2, ["--set", "train.micro_batch_size=4"], cache
        ),
        # The model split over the 2 ranks instead of replicated: each layer (tensor), or the layers (pipeline,
        # 2 micro-batches of 4 in flight).
        "c_llm_ds_tp2_2ranks": lambda: run_llm_ds(ds_template(1, folder), 2, ["--set", "parallel.tensor=2"], cache),
        "c_llm_ds_pp2_2ranks": lambda: run_llm_ds(ds_template(1, folder), 2, PIPELINE, cache),
        "d_packed_1024": lambda: run_llm_ds(ds_template(1, folder), 1, PADDING, cache),
        "d_padded_1024": lambda: run_llm_ds(
            ds_template(1, folder), 1, [*PADDING, "--set", "data.packing=false"], cache
        ),
    }
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for _ in range(REPEATS):
        for name, run in variants.items():
            runs[name].append(run())
    figures = {}
    for name, results in runs.items():
        figures[name] = {key: spread(r[key] for r in results) for key in results[0]}
    med = {name: f["tokens_per_s"]["median"] for name, f in figures.items()}
    ratios = {
        "llm_ds_zero1_vs_plain": med["b_llm_ds_zero1_1rank"] / med["a_plain_pytorch_1rank"],
        "llm_ds_zero0_vs_plain": med["b_llm_ds_zero0_1rank"] / med["a_plain_pytorch_1rank"],
        # The same loss as the plain loop: what DeepSpeed and the driver cost, alone.
        "llm_ds_zero1_transformers_loss_vs_plain": med["b_llm_ds_zero1_1rank_transformers_loss"]
        / med["a_plain_pytorch_1rank"],
        "fused_loss_vs_transformers_loss": med["b_llm_ds_zero1_1rank"] / med["b_llm_ds_zero1_1rank_transformers_loss"],
        # Hugging Face's Trainer on the same model, blocks, batch, optimizer and schedule: tokens/s, and the
        # whole process (start-up, data, training) as its time over llm-ds's (above 1: llm-ds is faster).
        "llm_ds_zero1_vs_hf_trainer": med["b_llm_ds_zero1_1rank"] / med["a_hf_trainer_1rank"],
        "llm_ds_zero1_vs_hf_trainer_process": figures["a_hf_trainer_1rank"]["process_s"]["median"]
        / figures["b_llm_ds_zero1_1rank"]["process_s"]["median"],
        # 2 CPU ranks, the same global batch: the model split (tensor, pipeline) against replicated (ZeRO-1).
        "tp2_vs_dp2": med["c_llm_ds_tp2_2ranks"] / med["c_llm_ds_zero1_2ranks"],
        "pp2_vs_dp2": med["c_llm_ds_pp2_2ranks"] / med["c_llm_ds_zero1_2ranks"],
        "packed_vs_padded_real_tokens": figures["d_packed_1024"]["real_tokens_per_s"]["median"]
        / figures["d_padded_1024"]["real_tokens_per_s"]["median"],
    }
    previous = json.loads(OUT.read_text()) if OUT.exists() else {}
    result = {
        "machine": machine_info(),
        "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__},
        "date": time.strftime("%Y-%m-%d"),
        "setup": f"tiny recipe (1.9M parameters), block 128, global batch 8, {STEPS} steps, fp32, CPU; padding "
        f"rows: block 1024, batch 2, {max(6, STEPS // 10)} steps",
        "repeats": REPEATS,
        "variants": figures,
        "ratios": ratios,
        **({"memory": previous["memory"]} if "memory" in previous else {}),  # bench_memory.py's part
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'variant':<40}{'tokens/s median':>16}{'min':>10}{'max':>10}{'process s':>11}")
    for name, f in figures.items():
        tps = f["tokens_per_s"]
        print(
            f"{name:<40}{tps['median']:>16,.0f}{tps['min']:>10,.0f}{tps['max']:>10,.0f}"
            f"{f['process_s']['median']:>11.1f}"
        )
    for name, value in ratios.items():
        print(f"{name:<44}{value:>8.3f}")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
