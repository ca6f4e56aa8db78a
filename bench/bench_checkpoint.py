"""What a checkpoint costs training: no checkpoints, foreground saves and background saves (checkpoint.async).

    make bench-checkpoint     # writes bench/results/checkpoint.json and prints a table (also part of make bench)

A GPT-2 of tens of millions of parameters (fp32, ZeRO-1, 1 rank: every byte of a checkpoint written by one
process), a save every few steps. Per run: the stall of each save (ckpt/save_s: what training waited) and
the ckpt/bytes and ckpt/write_gbs of each, from metrics.jsonl; and training tokens/s between saves (tokens
over step time, save pauses left out, so what a background write takes from the steps themselves shows).
Medians of alternated repeats in one run, so the variants see the same machine load.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import machine_info, spread

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "checkpoint.json"
REPEATS = int(os.environ.get("BENCH_REPEATS", 3))
STEPS, INTERVAL = 26, 6  # saves at 6, 12, 18, 24; step 24's is not the run's last, so it is timed like the others
MODEL = ["model.n_layer=6", "model.n_embd=512", "model.n_head=8", "data.block_size=128", "train.micro_batch_size=4"]
VARIANTS = {
    "none": ["checkpoint.interval=0", "checkpoint.save_final=false"],
    "sync": [f"checkpoint.interval={INTERVAL}", "checkpoint.save_final=false"],
    "async": [f"checkpoint.interval={INTERVAL}", "checkpoint.save_final=false", "checkpoint.async=true"],
}


def run(variant: str, cache: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="llm-ds-bench-", dir=os.environ.get("BENCH_DIR")) as out:
        sets = [
            *MODEL,
            *VARIANTS[variant],
            f"train.max_steps={STEPS}",
            "train.warmup_steps=2",
            "train.eval_interval=0",
            "train.eval_max_batches=1",
            "logging.log_interval=1",
            "checkpoint.keep_last=2",
            f"train.output_dir={out}",
            f"data.cache_dir={cache}",
        ]
        cmd = [sys.executable, str(ROOT / "llm_ds" / "train.py"), "--ds_config", "ds_configs/zero1.json"]
        for s in sets:
            cmd += ["--set", s]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode:
            raise SystemExit(f"{variant}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
        records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
        summary = json.loads((Path(out) / "summary.json").read_text())
    steps = [r for r in records if "perf/tokens_per_s" in r and r["step"] > 1]
    seconds = sum(r["perf/ms_per_step"] / 1000 for r in steps)
    tokens = len(steps) * summary["global_batch_size"] * summary["block_size"]
    saves = [r for r in records if "ckpt/save_s" in r]
    return {
        "tokens_per_s": tokens / seconds,
        "stall_s": [r["ckpt/save_s"] for r in saves],
        "wait_s": [r["ckpt/wait_s"] for r in saves],
        "bytes": saves[0]["ckpt/bytes"] if saves else 0,
        "write_gbs": [r["ckpt/write_gbs"] for r in saves],
        "parameters": summary["parameters"],
        "host_copy_bytes": summary["checkpoint_host_bytes"],
    }


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="llm-ds-bench-cache-") as cache:
        runs = {v: [] for v in VARIANTS}
        for repeat in range(REPEATS):
            for variant in VARIANTS:
                runs[variant].append(run(variant, cache))
                print(f"repeat {repeat + 1}/{REPEATS} {variant}: {json.dumps(runs[variant][-1])}", flush=True)
    per_save = {v: [s for r in runs[v] for s in r["stall_s"]] for v in ("sync", "async")}
    stall = {v: statistics.median(per_save[v]) for v in per_save}
    tokens = {v: statistics.median(r["tokens_per_s"] for r in runs[v]) for v in runs}
    write = {v: statistics.median(g for r in runs[v] for g in r["write_gbs"]) for v in ("sync", "async")}
    result = {
        "machine": machine_info(),
        "setup": {
            "model": MODEL,
            "parameters": runs["none"][0]["parameters"],
            "checkpoint_bytes": runs["sync"][0]["bytes"],
            "steps": STEPS,
            "interval": INTERVAL,
            "ranks": 1,
            "precision": "fp32",
            "zero_stage": 1,
            "repeats": REPEATS,
        },
        "stall_per_save_s": {v: spread(per_save[v]) for v in per_save},
        "tokens_per_s": {v: spread(r["tokens_per_s"] for r in runs[v]) for v in runs},
        "write_gbs": {v: spread(g for r in runs[v] for g in r["write_gbs"]) for v in ("sync", "async")},
        "async_wait_for_previous_s": spread(w for r in runs["async"] for w in r["wait_s"]),
        "host_copy_bytes": runs["async"][0]["host_copy_bytes"],
        "async_stall_over_sync": stall["async"] / stall["sync"],
        "async_tokens_per_s_over_none": tokens["async"] / tokens["none"],
        "sync_tokens_per_s_over_none": tokens["sync"] / tokens["none"],
        "runs": runs,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    size = result["setup"]["checkpoint_bytes"] / 1e9
    print(f"\n{result['setup']['parameters']:,} parameters, checkpoint {size:.2f} GB, medians of {REPEATS} alternated")
    print(f"{'':8}{'stall/save s':>14}{'write GB/s':>12}{'tokens/s':>10}")
    for v in VARIANTS:
        s = f"{stall[v]:14.3f}{write[v]:12.2f}" if v in stall else f"{'-':>14}{'-':>12}"
        print(f"{v:8}{s}{tokens[v]:10,.0f}")
    print(
        f"async stall {result['async_stall_over_sync']:.3f}x sync; tokens/s between saves, against no checkpoints: "
        f"async {result['async_tokens_per_s_over_none']:.3f}x, sync {result['sync_tokens_per_s_over_none']:.3f}x"
    )
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
