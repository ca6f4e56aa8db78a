"""Step time: compute, communication and offload traffic, an estimate for ranking candidates."""

from __future__ import annotations

import json
from pathlib import Path

from llm_ds.plan.memory import bytes_per_value
from llm_ds.plan.shapes import CPU_ADAM_PARAMS_PER_S, HALF_EFFICIENCY_TOKENS, Candidate, Cluster, ModelShape, PlanError


def step_time(shape: ModelShape, cand: Candidate, cluster: Cluster, global_batch: int, precision: str) -> dict:
    """Seconds per optimizer step, by part: compute, communication, offload."""
    n = cluster.world
    e = bytes_per_value(precision)
    accum = global_batch // (n * cand.micro_batch)
    tokens_per_rank = global_batch // n * shape.seq
    flops = shape.flops_per_token() * tokens_per_rank * (4 / 3 if cand.activation_checkpointing else 1.0)
    micro_tokens = cand.micro_batch * shape.seq
    half = HALF_EFFICIENCY_TOKENS["cpu" if cluster.is_cpu else "gpu"]
    compute = flops / (cluster.tflops * 1e12 * micro_tokens / (micro_tokens + half))
    bw = (cluster.inter_gbs if cluster.nodes > 1 else cluster.intra_gbs) * 1e9
    ring = (n - 1) / n * shape.n_params * e  # bytes one rank sends for one reduce-scatter or all-gather
    if n == 1:
        volume = 0.0
    elif cand.stage <= 1:
        volume = 2 * ring  # one all-reduce of the gradients per step
    elif cand.stage == 2:
        volume = accum * ring + ring  # reduce-scatter per micro-batch, all-gather of the new weights
    else:
        volume = accum * 3 * ring  # all-gather in forward and backward, reduce-scatter per micro-batch
    parts = {"compute": compute, "communication": volume / bw, "offload": 0.0}
    p_rank = shape.n_params / n
    if cand.offload_optimizer != "none":
        # Gradients down and weights up over PCIe; Adam on the node's cores, shared by its ranks.
        parts["offload"] += (4 + e) * p_rank / (cluster.pcie_gbs * 1e9)
        parts["offload"] += shape.n_params * cluster.ranks_per_node / n / CPU_ADAM_PARAMS_PER_S
        if cand.offload_optimizer == "nvme":
            parts["offload"] += 2 * 12 * p_rank * cluster.ranks_per_node / (cluster.nvme_gbs * 1e9)
    if cand.offload_param != "none":
        traffic = accum * 2 * e * p_rank  # each rank's partition up for forward and backward
        parts["offload"] += traffic / (cluster.pcie_gbs * 1e9)
        if cand.offload_param == "nvme":
            parts["offload"] += traffic * cluster.ranks_per_node / (cluster.nvme_gbs * 1e9)
    return parts


def measured_tflops(run_dir: str) -> float:
    """Sustained TFLOP/s per device of a finished run: its tokens/s per rank times its FLOPs per token."""
    import yaml

    folder = Path(run_dir)
    summary_path, config_path = folder / "summary.json", folder / "config.yaml"
    if not summary_path.is_file() or not config_path.is_file():
        raise PlanError(f"--from-run {run_dir}: no summary.json and config.yaml there (a finished run's folder)")
    summary = json.loads(summary_path.read_text())
    model = yaml.safe_load(config_path.read_text())["model"]
    if not summary.get("tokens_per_s"):
        raise PlanError(f"--from-run {run_dir}: summary.json has no tokens_per_s (the run trained a single step)")
    d, layers, positions = model["n_embd"], model["n_layer"], model["n_positions"]
    # The token table's rows (padded vocabulary), solved from the parameter count.
    vocab = (summary["parameters"] - positions * d - layers * (12 * d * d + 13 * d) - 2 * d) // d
    shape = ModelShape(layers, d, model["n_head"], positions, vocab, summary["block_size"])
    return summary["tokens_per_s"] / summary["world_size"] * shape.flops_per_token() / 1e12
