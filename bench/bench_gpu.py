"""GPU benchmark, one GPU: GPT-2 124M at sequence 1024 in bf16, a plain PyTorch loop against llm-ds.

    make bench-gpu         # bench/gpu.sh: writes bench/results/gpu-<card>.json, prints a table

Variants, each a separate process on the same data, weights and micro-batch (the largest that
`llm-ds plan` fits with a 15% margin and transformers' loss), in order of value: plain PyTorch
(bench/plain_loop.py: bf16 autocast, fused AdamW, transformers' loss), llm-ds under DeepSpeed
ZeRO-1, the same with transformers' loss instead of the fused one, then the compiled ones (plain
torch.compile, llm-ds ``train.compile``) and ZeRO-2. Per variant: tokens/s (the median over log
intervals of 5 steps after 5 warm-up steps), MFU (6N + 12LdT over the card's dense bf16 peak),
peak allocated memory, seconds from process start to the end of the first step.

The results file is rewritten after every variant, so a run cut short keeps what it measured;
``--deadline`` skips the variants that cannot finish in the time left, and says so.

``--smoke`` runs the same machinery with the tiny recipe for a few steps (also on CPU), to check
the script before spending GPU time on it.

On a machine with two GPUs or more, three more variants run llm-ds on 2 GPUs with the same global batch
(twice the micro-batch): ``zero1_dp2`` (2 data-parallel ranks), ``zero1_tp2`` (``parallel.tensor=2``,
2 micro-batches accumulated) and ``zero1_pp2`` (``parallel.pipeline=2``, 4 half micro-batches through
the pipeline); with one GPU they are recorded as skipped (with ``--smoke`` they run on 2 CPU ranks).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine_info

from llm_ds import plan
from llm_ds.config import BUNDLED_TOKENIZER
from llm_ds.hardware import local_gpu, peak_tflops
from llm_ds.monitor.metrics import mfu, training_flops_per_token

ROOT = Path(__file__).resolve().parents[1]


def card_cluster() -> plan.Cluster | None:
    """This GPU as `llm-ds plan` sees it, from what the device reports (None on CPU)."""
    gpu = local_gpu()
    if gpu is None:
        return None
    name, memory, capability = gpu
    return plan.Cluster(1, 1, name, memory, 512 * plan.GiB, 0, 400.0, capability=capability)


def gpt2_124m(seq: int, fused_loss: bool) -> plan.ModelShape:
    return plan.ModelShape(12, 768, 12, 1024, 50257, seq, fused_loss=fused_loss)


def choose_micro_batch(cluster: plan.Cluster | None, seq: int) -> int:
    """The largest micro-batch that `llm-ds plan` fits on this card with ZeRO-1, 15% to spare, with
    transformers' loss (whole logits): the plain loop's, so that every variant runs the same batch."""
    if cluster is None:
        return 8
    template = json.loads((ROOT / "ds_configs" / "zero1.json").read_text())
    best = 1
    for micro in (1, 2, 4, 8, 16, 32, 64):
        cand = plan.Candidate(1, micro_batch=micro)
        est = plan.estimate(gpt2_124m(seq, False), cand, cluster, micro, "bf16", template)
        if est.device_total <= 0.85 * cluster.device_mem:
            best = micro
    return best


def planned_peak(cluster: plan.Cluster | None, seq: int, micro: int, name: str) -> int | None:
    """What `llm-ds plan` says an llm-ds variant allocates at its peak (torch's max_memory_allocated
    counts no CUDA context and no allocator slack, so neither does this)."""
    if cluster is None or not name.startswith("zero") or two_gpu_sets(name, micro):
        return None
    template = json.loads((ROOT / "ds_configs" / f"zero{name[4]}.json").read_text())
    shape = gpt2_124m(seq, "_transformers_loss" not in name)
    cand = plan.Candidate(int(name[4]), micro_batch=micro)
    return plan.estimate(shape, cand, cluster, micro, "bf16", template).peak_allocated()


WARMUP_STEPS = 5  # not timed: allocator growth, cuDNN/cuBLAS heuristics, compiled graphs' first calls
LOG_INTERVAL = 5
# Seconds a variant is expected to take before any has run (start-up dominates; compiling adds more).
FIRST_GUESS_S = {"eager": 60.0, "compile": 150.0}


def expected_seconds(name: str, done: dict[str, dict]) -> float:
    """How long ``name`` will take: the slowest finished variant of its kind (eager or compiled), else the
    slowest eager one times the first guesses' ratio, else the first guess."""
    kind = "compile" if name.endswith("_compile") else "eager"
    walls = {k: [r["wall_s"] for n, r in done.items() if "wall_s" in r and "error" not in r and
                 ("compile" if n.endswith("_compile") else "eager") == k] for k in FIRST_GUESS_S}  # fmt: skip
    if walls[kind]:
        return max(walls[kind])
    if walls["eager"]:
        return max(walls["eager"]) * FIRST_GUESS_S[kind] / FIRST_GUESS_S["eager"]
    return FIRST_GUESS_S[kind]


def steady_tokens_per_s(intervals: list[tuple[int, float]], interval: int) -> float | None:
    """Median tokens/s of the log intervals that start after the warm-up steps."""
    values = [v for step, v in intervals if step - interval >= WARMUP_STEPS]
    return statistics.median(values) if values else None


def common_sets(smoke: bool, micro: int, steps: int, cache: str, out: str) -> list[str]:
    sets = {
        "data.tokenizer": str(BUNDLED_TOKENIZER),
        "data.cache_dir": cache,
        "train.micro_batch_size": micro,
        "train.grad_accum_steps": 1,
        "train.max_steps": steps,
        "train.warmup_steps": 5,
        "train.eval_interval": 0,
        "train.eval_max_batches": 1,
        "train.output_dir": out,
        "logging.log_interval": LOG_INTERVAL,
        "logging.tensorboard": "false",
        "checkpoint.interval": 0,
        "checkpoint.save_final": "false",
        "checkpoint.resume": "never",
    }
    if not smoke:
        sets["train.precision"] = "bf16"
    return [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


def run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout, env=env)


def plain(config: str, sets: list[str], compiled: bool, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "plain.json"
        cmd = [sys.executable, str(ROOT / "bench" / "plain_loop.py"), "--config", config, *sets, "--out", str(result)]
        proc = run([*cmd, *(["--compile"] if compiled else [])], timeout)
        if proc.returncode:
            return {"error": (proc.stderr or proc.stdout)[-1500:]}
        r = json.loads(result.read_text())
    return {
        "tokens_per_s": steady_tokens_per_s(r["interval_tokens_per_s"], LOG_INTERVAL),
        "mean_tokens_per_s_after_step_1": r["tokens_per_s"],
        "peak_memory_bytes": r["peak_memory_bytes"],
        "seconds_to_first_step": r["seconds_to_first_step"],
        "final_loss": r["final_loss"],
    }


# 2-GPU variants: the split, and (micro-batch divisor, accumulation) for a global batch of 2 micro-batches.
TWO_GPUS = {"_dp2": ([], 1, 1), "_tp2": (["parallel.tensor=2"], 1, 2), "_pp2": (["parallel.pipeline=2"], 2, 4)}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_gpu_sets(name: str, micro: int) -> tuple[list[str], int] | None:
    """The ``--set`` arguments of a 2-GPU variant (None for a 1-GPU one), and its micro-batch."""
    suffix = next((k for k in TWO_GPUS if name.endswith(k)), None)
    if suffix is None:
        return None
    split, divisor, accum = TWO_GPUS[suffix]
    micro = max(1, micro // divisor)
    sets = [*split, f"train.micro_batch_size={micro}", f"train.grad_accum_steps={accum}"]
    return [a for x in sets for a in ("--set", x)], micro


def llm_ds(config: str, sets: list[str], name: str, out: str, timeout: float, micro: int = 1) -> dict:
    """``name``: zero<stage>[_transformers_loss][_compile] on one GPU, or zero1_dp2/_tp2/_pp2 on two."""
    two = two_gpu_sets(name, micro)
    runner = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port())]
    runner = runner if two else [sys.executable]
    cmd = [
        *runner,
        str(ROOT / "llm_ds" / "train.py"),
        "--config",
        config,
        "--ds_config",
        str(ROOT / "ds_configs" / f"zero{name[4]}.json"),
        *sets,
        *(["--set", "train.compile=true"] if name.endswith("_compile") else []),
        *(["--set", "model.fused_loss=false"] if "_transformers_loss" in name else []),
        *(two[0] if two else []),
    ]
    proc = run(cmd, timeout)
    if proc.returncode:
        return {"error": (proc.stderr or proc.stdout)[-1500:]}
    s = json.loads((Path(out) / "summary.json").read_text())
    records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    intervals = [(r["step"], r["perf/tokens_per_s"]) for r in records if "perf/tokens_per_s" in r]
    return {
        "tokens_per_s": steady_tokens_per_s(intervals, LOG_INTERVAL),
        "mean_tokens_per_s_after_step_1": s["tokens_per_s"],
        "skipped_steps": s.get("skipped_steps"),
        "peak_memory_bytes": s["peak_memory_bytes"],
        "seconds_to_first_step": s["seconds_to_first_step"],
        "final_loss": s["final_train_loss"],
        "mfu_reported": s["mfu"],
    }


VARIANTS = (
    "plain,zero1,zero1_transformers_loss,plain_compile,zero1_compile,zero2,zero2_compile,zero1_dp2,zero1_tp2,zero1_pp2"
)


def ratios(results: dict[str, dict]) -> dict[str, float | None]:
    def ratio(a: str, b: str) -> float | None:
        x, y = results.get(a, {}).get("tokens_per_s"), results.get(b, {}).get("tokens_per_s")
        return x / y if x and y else None

    return {
        "zero1_vs_plain": ratio("zero1", "plain"),
        "zero2_vs_plain": ratio("zero2", "plain"),
        "zero1_compile_vs_plain_compile": ratio("zero1_compile", "plain_compile"),
        "plain_compile_vs_plain": ratio("plain_compile", "plain"),
        # DeepSpeed and the driver alone, with the plain loop's loss; and what the fused loss adds.
        "zero1_transformers_loss_vs_plain": ratio("zero1_transformers_loss", "plain"),
        "fused_loss_vs_transformers_loss": ratio("zero1", "zero1_transformers_loss"),
        # 2 GPUs, the same global batch: splitting the model against replicating it.
        "tp2_vs_dp2": ratio("zero1_tp2", "zero1_dp2"),
        "pp2_vs_dp2": ratio("zero1_pp2", "zero1_dp2"),
    }


def print_table(results: dict[str, dict], report_ratios: dict[str, float | None]) -> None:
    print(f"\n{'variant':<26}{'tokens/s':>12}{'MFU':>8}{'peak GiB':>10}{'plan':>7}{'first step s':>14}")
    for name, r in results.items():
        if r.get("tokens_per_s"):
            mem = r["peak_memory_bytes"] / 2**30 if r.get("peak_memory_bytes") else float("nan")
            m = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
            err = f"{r['plan_peak_error']:+.0%}" if "plan_peak_error" in r else "-"
            print(f"{name:<26}{r['tokens_per_s']:>12,.0f}{m:>8}{mem:>10.1f}{err:>7}{r['seconds_to_first_step']:>14.1f}")
        else:
            print(f"{name:<26}  {'skipped' if 'skipped' in r else 'failed'}")
    for name, value in report_ratios.items():
        if value is not None:
            print(f"{name:<34}{value:>8.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for gpu-<card>.json")
    parser.add_argument("--steps", type=int, default=WARMUP_STEPS + 20, help="optimizer steps per variant")
    parser.add_argument("--smoke", action="store_true", help="tiny recipe, a few steps: check the script")
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds per variant at most")
    parser.add_argument(
        "--deadline",
        type=float,
        help="seconds for the whole benchmark, counted from $LLM_DS_BENCH_START (epoch seconds, set by "
        "bench/gpu.sh) or from this script's start; variants that cannot finish in time are skipped",
    )
    parser.add_argument("--variants", default=VARIANTS, help="in order of importance, should time run out")
    args = parser.parse_args()
    started = float(os.environ.get("LLM_DS_BENCH_START") or time.time())
    deadline_at = started + args.deadline if args.deadline else float("inf")

    import deepspeed
    import torch
    import transformers

    cluster = card_cluster()
    card = cluster.device if cluster else "cpu"
    config = str(ROOT / "llm_ds" / "configs" / ("tiny.yaml" if args.smoke else "gpt2-124m.yaml"))
    seq = 128 if args.smoke else 1024
    micro = 4 if args.smoke else choose_micro_batch(cluster, seq)
    steps = WARMUP_STEPS + 2 * LOG_INTERVAL if args.smoke else args.steps
    shape = (4, 128, 256, 8192) if args.smoke else (12, 768, 1024, 50257)
    n_layer, n_embd, n_positions, vocab = shape
    n_params = plan.ModelShape(n_layer, n_embd, 1, n_positions, vocab, seq).n_params
    flops = training_flops_per_token(n_params, n_positions * n_embd, n_layer, n_embd, seq)
    peak = peak_tflops(card, "bf16")

    work = Path(tempfile.mkdtemp(prefix="llm-ds-bench-gpu-"))
    cache = str(work / "cache")
    results: dict[str, dict] = {}
    report = {
        "card": card,
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine_info(),
        "versions": {
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "deepspeed": deepspeed.__version__,
            "transformers": transformers.__version__,
        },
        "setup": {
            "parameters": n_params,
            "sequence": seq,
            "micro_batch": micro,
            "steps": steps,
            "warmup_steps": WARMUP_STEPS,
            "log_interval": LOG_INTERVAL,
            "precision": "bf16" if not args.smoke else "auto",
            "flops_per_token": flops,
            "peak_tflops": peak,
            "smoke": args.smoke,
            "deadline_s": args.deadline,
        },
        "variants": results,
        "ratios": {},
        "complete": False,
    }
    slug = "".join(c if c.isalnum() else "-" for c in card.lower()).strip("-")
    path = Path(args.out) / f"gpu-{slug}{'-smoke' if args.smoke else ''}.json"
    path.parent.mkdir(parents=True, exist_ok=True)

    def write() -> None:
        report["ratios"] = ratios(results)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        tmp.replace(path)

    print(f"{card}: GPT-2 {n_params:,} parameters, sequence {seq}, micro-batch {micro}, {steps} steps", flush=True)
    gpus = torch.cuda.device_count()
    for name in args.variants.split(","):
        if two_gpu_sets(name, micro) and gpus < 2 and not args.smoke:  # --smoke: 2 CPU ranks check the script
            results[name] = {"skipped": f"needs 2 GPUs, this machine has {gpus}"}
            write()
            continue
        left, need = deadline_at - time.time(), expected_seconds(name, results)
        if left < need:
            results[name] = {"skipped": f"needs about {need:.0f} s, {max(left, 0):.0f} s left before --deadline"}
            print(f"  {name}: skipped ({results[name]['skipped']})", flush=True)
            write()
            continue
        out = str(work / name)
        sets = common_sets(args.smoke, micro, steps, cache, out)
        compiled = name.endswith("_compile")
        timeout = min(args.timeout, left)
        start = time.perf_counter()
        try:
            if name.startswith("plain"):
                r = plain(config, sets, compiled, timeout)
            else:
                r = llm_ds(config, sets, name, out, timeout, micro)
        except subprocess.TimeoutExpired:
            r = {"error": f"timed out after {timeout:.0f} s"}
        r["wall_s"] = time.perf_counter() - start
        if "tokens_per_s" in r and r["tokens_per_s"]:
            r["mfu"] = mfu(r["tokens_per_s"], flops, peak)
        planned = None if args.smoke else planned_peak(cluster, seq, micro, name)
        if planned and r.get("peak_memory_bytes"):
            r["plan_peak_allocated_bytes"] = planned
            r["plan_peak_error"] = planned / r["peak_memory_bytes"] - 1
        results[name] = r
        write()
        status = f"{r['tokens_per_s']:,.0f} tokens/s" if r.get("tokens_per_s") else r.get("error", "")[-200:]
        print(f"  {name}: {status} ({r['wall_s']:.0f} s)", flush=True)

    report["complete"] = True
    write()
    print_table(results, report["ratios"])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
