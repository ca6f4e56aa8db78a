"""``llm-ds plan``: check a job as `llm-ds launch` does, then plan it (llm_ds.plan) and print or write the plan."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from llm_ds.config import RunConfig
from llm_ds.hardware import CARDS, find_card, has_native_bf16, local_gpu, peak_tflops
from llm_ds.plan.render import breakdown, ds_config_for, table, write_plan
from llm_ds.plan.search import describe_fewer_nodes, plan, shrink_to, what_would_fit
from llm_ds.plan.shapes import (
    DEFAULT_EFFICIENCY,
    Cluster,
    Estimate,
    GiB,
    PlanError,
    fmt_bytes,
    shape_from_config,
)
from llm_ds.plan.timing import measured_tflops


def plan_command_parser(subparsers) -> None:
    from launcher.cli import add_job_arguments

    parser = subparsers.add_parser(
        "plan",
        help="choose ZeRO stage, offload and micro-batch for a cluster before launching",
        description="Estimate per-device memory (parameters, gradients, optimizer states, activations, logits, "
        "buffers), host and NVMe memory per node, and step time for every ZeRO stage, offload, activation "
        "checkpointing and micro-batch; recommend the fastest that fits and optionally write its DeepSpeed config.",
    )
    add_job_arguments(parser)
    parser.add_argument("--gpu", help="GPU name, e.g. H100, A100-40GB (default: this machine's GPU)")
    parser.add_argument("--device", choices=("gpu", "cpu"), default="gpu", help="plan GPU ranks or CPU ranks")
    parser.add_argument("--gpu-mem-gb", type=float, help="memory per GPU in GiB (default: by --gpu's name)")
    parser.add_argument("--cpu-mem-gb", type=float, help="host memory per node in GiB (default: this machine's)")
    parser.add_argument("--nvme-gb", type=float, default=0.0, help="NVMe space per node in GB (default 0: none)")
    parser.add_argument("--tflops", type=float, help="sustained TFLOP/s per device (default: 40%% of peak)")
    parser.add_argument(
        "--from-run", metavar="RUN_DIR", help="take the sustained TFLOP/s per device from a finished run's summary.json"
    )
    parser.add_argument("--global-batch", type=int, help="sequences per optimizer step (default: the run config's)")
    parser.add_argument("--intra-node-gbs", type=float, default=150.0, help="GB/s per rank within a node")
    parser.add_argument("--inter-node-gbs", type=float, default=25.0, help="GB/s per rank between nodes")
    parser.add_argument("--pcie-gbs", type=float, default=25.0, help="GB/s host <-> device")
    parser.add_argument("--nvme-gbs", type=float, default=3.0, help="GB/s NVMe per node")
    parser.add_argument(
        "--disk-gbs",
        type=float,
        default=1.0,
        help="GB/s each node writes checkpoints at (default 1.0), for the time one save takes",
    )
    parser.add_argument(
        "--min-nodes",
        type=int,
        metavar="M",
        help="also say whether the recommended setup fits, and how fast it runs, on M of the nodes with the same "
        "global batch: whether the job can shrink to M nodes (llm-ds launch --min-nodes)",
    )
    parser.add_argument("--write", metavar="PATH", help="write the recommended DeepSpeed config here")
    parser.add_argument("--json", action="store_true", help="print everything as JSON")
    parser.add_argument("--top", type=int, default=12, help="table rows (default 12)")
    parser.set_defaults(func=plan_command)


def _positive(args, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(args, name.replace("-", "_"))
        if value is not None and not value > 0:
            raise PlanError(f"--{name} must be > 0, got {value:g}")


def detect_gpu(args) -> tuple[str, float | None, tuple[int, int] | None]:
    """The GPU planned for: name, memory per device in bytes and compute capability (None where unknown).

    ``--gpu`` names it and the table of cards fills in the rest; without it, this machine's GPU as
    it reports itself.
    """
    if args.gpu is not None:
        card = find_card(args.gpu)
        return args.gpu, (card.memory_bytes if card else None), (card.capability if card else None)
    gpu = local_gpu()
    if gpu is not None:
        return gpu
    if args.gpu_mem_gb:
        return "GPU", None, None
    raise PlanError("no GPU here to plan for: name one with --gpu (e.g. --gpu H100) or give --gpu-mem-gb")


def build_cluster(args, world: int, nodes: int, precision: str, gpu: tuple | None = None) -> Cluster:
    """The cluster for the plan; ``gpu`` is ``detect_gpu``'s answer (unused for CPU ranks)."""
    import psutil

    if args.from_run:
        args.tflops = measured_tflops(args.from_run)
    _positive(
        args,
        ("gpu-mem-gb", "cpu-mem-gb", "tflops", "intra-node-gbs", "inter-node-gbs", "pcie-gbs", "nvme-gbs", "disk-gbs"),
    )
    if args.nvme_gb is not None and args.nvme_gb < 0:
        raise PlanError(f"--nvme-gb must be >= 0, got {args.nvme_gb:g}")
    cpu_mem = args.cpu_mem_gb * GiB if args.cpu_mem_gb else float(psutil.virtual_memory().total)
    per_node = world // nodes
    capability, nvls = (9, 0), False
    if args.device == "cpu":
        device, device_mem = "cpu", cpu_mem / per_node
        tflops = args.tflops or 0.05  # what a rank of 2 CPU cores sustained here; --from-run measures yours
    else:
        device, known_mem, known_capability = gpu or detect_gpu(args)
        device_mem = args.gpu_mem_gb * GiB if args.gpu_mem_gb else known_mem
        if device_mem is None:
            known = ", ".join(c.label for c in CARDS)
            raise PlanError(f"--gpu {device!r}: unknown memory size; give --gpu-mem-gb (known: {known})")
        peak = peak_tflops(device, precision)
        if args.tflops is None and peak is None:
            raise PlanError(f"--gpu {device!r}: unknown peak throughput; give --tflops (sustained TFLOP/s per GPU)")
        tflops = args.tflops or DEFAULT_EFFICIENCY * peak
        capability = known_capability or capability
        card = find_card(device)
        nvls = bool(card and card.nvls)
    return Cluster(
        nodes,
        per_node,
        device,
        device_mem,
        cpu_mem,
        args.nvme_gb * 1e9,
        tflops,
        args.intra_node_gbs,
        args.inter_node_gbs,
        args.pcie_gbs,
        args.nvme_gbs,
        capability,
        nvls,
    )


def plan_command(args) -> int:
    import argparse
    import sys

    from launcher.cli import validate
    from launcher.command import selected_slots
    from llm_ds.ds_config import global_batch_size, resolve_precision

    # The hostfile, run config and DeepSpeed template pass the same checks as `llm-ds launch`.
    launch_args = argparse.Namespace(
        **vars(args), launcher="pdsh", master_addr=None, master_port=None, node_rank=None, env_names=[]
    )
    spec, cfg, template, world = validate(launch_args, resuming=False)
    ranks_per_host = {h: n for h, n in (selected_slots(spec) if spec.hosts else {"this node": world}).items() if n}
    if len(set(ranks_per_host.values())) > 1:
        slots = ", ".join(f"{host}: {n}" for host, n in ranks_per_host.items())
        raise PlanError(f"plan assumes the same number of ranks on every node; the hostfile selects {slots}")
    nodes = len(ranks_per_host)
    gpu = None
    if args.device == "cpu":
        precision = resolve_precision(cfg.train.precision, template, "cpu", False, False)
    else:
        # The GPU first (this machine's where --gpu is not given), then the precision it has.
        gpu = detect_gpu(args)
        has_bf16 = gpu[2] is None or has_native_bf16(gpu[2])
        precision = resolve_precision(cfg.train.precision, template, "cuda", has_bf16, True)
    cluster = build_cluster(args, world, nodes, precision, gpu)
    vocab = _vocab_size(cfg)
    shape = shape_from_config(cfg, vocab)
    global_batch = args.global_batch or global_batch_size(cfg, world)
    if global_batch <= 0:
        raise PlanError(f"--global-batch must be > 0, got {global_batch}")
    estimates = plan(shape, cluster, global_batch, precision, template)
    best = estimates[0] if estimates and estimates[0].fits else None
    hints = [] if best else what_would_fit(shape, cluster, global_batch, precision, template)
    run_values = _run_values(best) if best else {}
    shrunk = None
    if best and args.min_nodes is not None:
        shrunk = shrink_to(shape, cluster, global_batch, precision, template, best, args.min_nodes)
    saves = checkpoint_cost(shape, precision, best, cluster, args.disk_gbs) if best else None
    written = None
    if best and args.write:
        written = Path(args.write)
        write_plan(written, ds_config_for(best, template))
    if args.json:
        print(
            json.dumps(
                {
                    "model": {**asdict(shape), "parameters": shape.n_params},
                    "cluster": asdict(cluster),
                    "precision": precision,
                    "global_batch": global_batch,
                    "recommended": best.to_dict() if best else None,
                    "run_config": run_values,
                    "written": str(written) if written else None,
                    "hints": hints,
                    "min_nodes": shrunk,
                    "checkpoint": saves,
                    "candidates": [e.to_dict() for e in estimates],
                },
                indent=2,
            )
        )
        return 0 if best else 1
    print(
        f"model: {shape.n_params:,} parameters ({shape.n_layer} layers, {shape.n_embd} wide, vocab {shape.vocab}), "
        f"sequence {shape.seq}, {precision}; global batch {global_batch} sequences"
    )
    device_desc = "CPU ranks" if cluster.is_cpu else f"{cluster.device}, {fmt_bytes(cluster.device_mem)}"
    print(
        f"cluster: {cluster.nodes} node(s) x {cluster.ranks_per_node} rank(s) ({device_desc}), "
        f"host {fmt_bytes(cluster.cpu_mem)}/node, NVMe {cluster.nvme / 1e9:.0f} GB/node, {cluster.tflops:g} TFLOP/s "
        "sustained per device"
    )
    print()
    # Nothing fits: the nearest misses first.
    print(table(estimates if best else sorted(estimates, key=lambda e: e.device_total), args.top))
    print()
    if best is None:
        print("nothing fits.", file=sys.stderr)
        for hint in hints:
            print(f"would fit: {hint}", file=sys.stderr)
        return 1
    print(
        f"recommended: {best.candidate.label()}, micro-batch {best.candidate.micro_batch}, "
        f"{best.step_s:.3f} s/step (estimate), device margin {best.margin['device']:.0%}"
    )
    print(breakdown(best))
    print("run config: " + " ".join(f"--set {k}={v}" for k, v in run_values.items()))
    print(describe_checkpoint(saves))
    if shrunk:
        print(describe_fewer_nodes(shrunk))
    if written:
        print(f"wrote {written}")
    return 0


def checkpoint_cost(shape, precision: str, best: Estimate, cluster: Cluster, disk_gbs: float) -> dict[str, float]:
    """One checkpoint of the recommended setup: bytes in all and from the busiest node, and the seconds that
    node takes to write them at ``disk_gbs``."""
    from llm_ds.plan.memory import checkpoint_bytes

    size = checkpoint_bytes(shape.n_params, precision, best.candidate, cluster.nodes)
    return {
        "bytes": size["total"],
        "busiest_node_bytes": size["busiest_node"],
        "disk_gbs": disk_gbs,
        "write_s": size["busiest_node"] / (disk_gbs * 1e9),
    }


def describe_checkpoint(saves: dict[str, float]) -> str:
    return (
        f"checkpoint: {fmt_bytes(saves['bytes'])} in all, {fmt_bytes(saves['busiest_node_bytes'])} from the busiest "
        f"node: {saves['write_s']:.1f} s to write at {saves['disk_gbs']:g} GB/s per node (--disk-gbs); training "
        f"waits that long at every save, or, with checkpoint.async: true, only while the states are copied to host "
        f"memory (as much again per node, kept between saves)"
    )


def _run_values(best: Estimate) -> dict[str, Any]:
    c = best.candidate
    return {
        "train.micro_batch_size": c.micro_batch,
        "train.grad_accum_steps": best.grad_accum,
        "model.activation_checkpointing": str(c.activation_checkpointing).lower(),
        "parallel.tensor": c.tensor,
        "parallel.pipeline": c.pipeline,
    }


def _vocab_size(cfg: RunConfig) -> int:
    from llm_ds.model import build_tokenizer, resolve_vocab_size

    if cfg.model.vocab_size is not None:
        return resolve_vocab_size(cfg.model, None)
    return resolve_vocab_size(cfg.model, len(build_tokenizer(cfg.data.tokenizer)))
