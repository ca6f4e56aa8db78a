"""The per-step cost of logging: the same 1-rank run with log_interval 1 and 100, alternated.

    make bench-logging     # writes bench/results/logging.json and prints a table

Tokens/s is tokens trained over the training loop's wall time (summary.json's fit_wall_s, which
includes the log points themselves); medians of alternated repeats in one run, so the two
settings see the same machine load.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine_info, spread

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "logging.json"
REPEATS = int(os.environ.get("BENCH_REPEATS", 5))
STEPS = 200


def run(log_interval: int, cache: str) -> float:
    with tempfile.TemporaryDirectory(prefix="llm-ds-bench-") as out:
        cmd = [
            sys.executable,
            str(ROOT / "llm_ds" / "train.py"),
            "--set",
            f"train.max_steps={STEPS}",
            "--set",
            f"logging.log_interval={log_interval}",
            "--set",
            "train.eval_interval=0",
            "--set",
            "train.eval_max_batches=1",
            "--set",
            "checkpoint.interval=0",
            "--set",
            "checkpoint.save_final=false",
            "--set",
            f"train.output_dir={out}",
            "--set",
            f"data.cache_dir={cache}",
            "--set",
            "model.n_layer=2",
            "--set",
            "data.block_size=64",
            "--set",
            "train.micro_batch_size=4",
        ]
        subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
        summary = json.loads((Path(out) / "summary.json").read_text())
        # The whole loop's wall time: step time as the trainer measures it leaves the log points out.
        return summary["tokens_seen"] / summary["fit_wall_s"]


def main() -> None:
    import torch

    cache = tempfile.mkdtemp(prefix="llm-ds-bench-cache-")
    results: dict[int, list[float]] = {1: [], 100: []}
    for _ in range(REPEATS):
        for interval in (1, 100):
            results[interval].append(run(interval, cache))
    med = {k: statistics.median(v) for k, v in results.items()}
    overhead = 1.0 - med[1] / med[100]
    step_ms = {k: 1000 * 4 * 64 / v for k, v in med.items()}  # tokens per step / tokens per s
    out = {
        "machine": machine_info(),
        "versions": {"torch": torch.__version__},
        "date": time.strftime("%Y-%m-%d"),
        "setup": f"1 rank, ZeRO-1, 2 layers x 128, block 64, micro-batch 4, {STEPS} steps, CPU",
        "tokens_per_s": {str(k): spread(v) for k, v in results.items()},
        "overhead_fraction_log_every_step": overhead,
        "overhead_ms_per_logged_step": step_ms[1] - step_ms[100],
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(out, indent=2) + "\n")
    print(f"tokens/s, log every step:      {med[1]:>10,.0f}")
    print(f"tokens/s, log every 100 steps: {med[100]:>10,.0f}")
    print(f"overhead of logging every step: {100 * overhead:.1f}% ({step_ms[1] - step_ms[100]:.2f} ms per step)")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
