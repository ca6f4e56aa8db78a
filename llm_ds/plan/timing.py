"""Step time: compute, communication and offload traffic, an estimate for ranking candidates."""

from __future__ import annotations

import json
from pathlib import Path

from llm_ds.plan.memory import bytes_per_value
from llm_ds.plan.shapes import CPU_ADAM_PARAMS_PER_S, HALF_EFFICIENCY_TOKENS, Candidate, Cluster, ModelShape, PlanError


def step_time(shape: ModelShape, cand: Candidate, cluster: Cluster, global_batch: int, precision: str) -> dict:
    """Seconds per optimizer step, by part: compute, communication (the data-parallel collectives), offload,
    and with model parallelism the pipeline bubble, tensor-parallel all-reduces and stage-to-stage traffic.

    Each rank computes its share of its replica's work, the busiest one setting the pace (a pipeline's last
    stage, with the output head; every rank of a tensor group repeats the head). A pipeline of S stages over
    M micro-batches idles (S - 1) / (M + S - 1) of the step. A
    tensor group all-reduces a micro-batch's activations twice per layer in forward and twice in backward,
    within the node; consecutive stages pass a micro-batch's activations forward and their gradients back,
    across nodes where the stages span nodes."""
    n = cluster.world
    dp = n // cand.model_parallel  # data-parallel ranks
    e = bytes_per_value(precision)
    accum = global_batch // (dp * cand.micro_batch)
    tokens_per_replica = global_batch * shape.seq / dp
    per_token = shape.busiest_rank_flops_per_token(cand.tensor, cand.pipeline)
    flops = per_token * tokens_per_replica * (4 / 3 if cand.activation_checkpointing else 1.0)
    micro_tokens = cand.micro_batch * shape.seq
    half = HALF_EFFICIENCY_TOKENS["cpu" if cluster.is_cpu else "gpu"]
    compute = flops / (cluster.tflops * 1e12 * micro_tokens / (micro_tokens + half))
    # A data-parallel group stays in a node only where a pipeline's stage fits in one (stage-major layout).
    local = cluster.nodes == 1 or (cand.pipeline > 1 and dp <= cluster.ranks_per_node)
    bw = (cluster.intra_gbs if local else cluster.inter_gbs) * 1e9
    p_dev = shape.params_per_device(cand.tensor, cand.pipeline)
    ring = (dp - 1) / dp * p_dev * e  # bytes one rank sends for one reduce-scatter or all-gather
    if dp == 1:
        volume = 0.0
    elif cand.stage <= 1:
        volume = 2 * ring  # one all-reduce of the gradients per step
    elif cand.stage == 2:
        volume = accum * ring + ring  # reduce-scatter per micro-batch, all-gather of the new weights
    else:
        volume = accum * 3 * ring  # all-gather in forward and backward, reduce-scatter per micro-batch
    parts = {"compute": compute, "communication": volume / bw, "offload": 0.0}
    activations = micro_tokens * shape.n_embd * e  # one micro-batch's hidden states
    if cand.tensor > 1:
        t = cand.tensor
        passes = 6 if cand.activation_checkpointing else 4  # all-reduces per layer (recomputed forward: 2 more)
        per_micro = passes * shape.n_layer * 2 * (t - 1) / t * activations
        parts["tensor_parallel"] = accum * per_micro / (cluster.intra_gbs * 1e9)
    if cand.pipeline > 1:
        s = cand.pipeline
        parts["pipeline_bubble"] = compute * (s - 1) / accum
        link = cluster.inter_gbs if cluster.nodes > 1 else cluster.intra_gbs
        parts["pipeline_transfer"] = accum * 2 * activations / (link * 1e9)
    p_rank = p_dev / dp
    if cand.offload_optimizer != "none":
        # Gradients down and weights up over PCIe; Adam on the node's cores, shared by its ranks.
        parts["offload"] += (4 + e) * p_rank / (cluster.pcie_gbs * 1e9)
        parts["offload"] += p_dev * cluster.ranks_per_node / dp / CPU_ADAM_PARAMS_PER_S
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
