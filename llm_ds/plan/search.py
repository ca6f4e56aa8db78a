"""Every candidate estimated, ranked, and what would fit when nothing does."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from llm_ds.plan.memory import (
    activation_bytes,
    bucket_bytes,
    cublas_workspace_bytes,
    model_states,
    nvme_buffer_bytes,
    optimizer_temp_bytes,
)
from llm_ds.plan.shapes import (
    ALLOCATOR_SLACK,
    CPU_ZERO_RUNTIME_BYTES,
    CUDA_CONTEXT_BYTES,
    NCCL_NVLS_BYTES,
    NVLS_MIN_RANKS_PER_NODE,
    Candidate,
    Cluster,
    Estimate,
    ModelShape,
    PlanError,
    fmt_bytes,
)
from llm_ds.plan.timing import step_time


def estimate(
    shape: ModelShape,
    cand: Candidate,
    cluster: Cluster,
    global_batch: int,
    precision: str,
    template: dict[str, Any] | None = None,
) -> Estimate:
    """Memory per rank and node, and step time, of one candidate under a DeepSpeed template (its
    ``zero_optimization`` buckets and limits, its optimizer); ``fits`` and ``margin`` filled in.

    The device's peak is the larger of two moments: the end of forward / start of backward (16-bit
    states, activations, logits) and the optimizer step (fp32 gradients and the optimizer's scratch).
    """
    n = cluster.world
    dp = n // cand.model_parallel  # ZeRO partitions over the data-parallel ranks
    template = template or {}
    zero = template.get("zero_optimization") or {}
    p_dev = shape.params_per_device(cand.tensor, cand.pipeline)
    states = model_states(p_dev, shape.largest_layer_per_device(cand.tensor), cand.stage, dp, precision, cand, zero)
    accum = global_batch // (dp * cand.micro_batch)
    in_flight = min(cand.pipeline, accum) if cand.pipeline > 1 else 1
    acts = activation_bytes(
        shape,
        cand.micro_batch,
        precision,
        cand.activation_checkpointing,
        not cluster.is_cpu,
        cand.tensor,
        cand.pipeline,
        in_flight,
    )
    d = states["device"]
    device = {
        "model_params": int(d["params"]),
        "live_params": int(d["live_params"]),
        "model_grads": int(d["grads"]),
        "model_optimizer": int(d["optimizer"]),
        "buckets": int(bucket_bytes(zero, cand.stage, precision, p_dev, cluster.is_cpu)),
        "workspaces": 0 if cluster.is_cpu else cublas_workspace_bytes(cluster.capability),
        "activations": int(acts["activations"]),
        "logits": int(acts["logits"]),
        "fp32_grads": int(d["fp32_grads"]),
        "optimizer_scratch": int(
            optimizer_temp_bytes(
                template, cand.offload_optimizer == "none", states["optimizer_partition"], cluster.is_cpu
            )
        ),
    }
    r = cluster.ranks_per_node
    host_parts = {
        **states["host"],
        "nvme_buffers": nvme_buffer_bytes(zero, cand, p_dev, dp, precision),
    }
    offloaded = sum(states["host"].values())
    # Before ZeRO-3's partitioned construction, every rank builds the whole model in fp32 on the host
    # (on CPU ranks, that model is the device's own parameters).
    # With tensor parallelism every rank builds the whole model before AutoTP keeps its share (zero.Init too).
    whole = shape.n_params if cand.tensor > 1 else p_dev
    load = 0.0 if (cand.stage == 3 and cand.tensor == 1) or cluster.is_cpu else 4 * whole
    # DeepSpeed's estimators' additional_buffer_factor covers the offload path's staging; NVMe swap
    # buffers are sized exactly.
    host = int(r * (max(offloaded, load) * 1.5 + host_parts["nvme_buffers"]))
    nvme = int(r * states["nvme"])
    parts = step_time(shape, cand, cluster, global_batch, precision)
    est = Estimate(cand, accum, device, host, nvme, sum(parts.values()), parts)
    est.host_states = host_parts
    if cluster.is_cpu:
        fixed = CPU_ZERO_RUNTIME_BYTES if cand.stage > 0 else 0
    else:
        fixed = CUDA_CONTEXT_BYTES
        if cluster.nvls and r >= NVLS_MIN_RANKS_PER_NODE:
            fixed += NCCL_NVLS_BYTES
    # A GPU's caching allocator fragments; on CPU freed tensors go back to the system.
    est.framework = int(est.peak_allocated() * (0 if cluster.is_cpu else ALLOCATOR_SLACK) + fixed)
    device_need = est.device_total * (r if cluster.is_cpu else 1)
    device_cap = cluster.device_mem * (r if cluster.is_cpu else 1)
    host_need = host + (device_need if cluster.is_cpu else 0)
    checks = {"device": (device_need, device_cap), "host": (host_need, cluster.cpu_mem)}
    if nvme:
        checks["nvme"] = (nvme, cluster.nvme)
    for name, (need, cap) in checks.items():
        est.margin[name] = 1.0 - need / cap if cap > 0 else float("-inf")
        if need > cap:
            est.limits.append(f"{name} needs {fmt_bytes(need)} of {fmt_bytes(cap)}")
    est.fits = not est.limits
    return est


def candidates(stages=(0, 1, 2, 3), micro_batches=(1, 2, 4, 8, 16, 32, 64), allow_nvme: bool = True):
    """Every combination DeepSpeed supports without model parallelism: optimizer offload from ZeRO-1 on,
    parameter offload and NVMe only with ZeRO-3."""
    for stage in stages:
        offloads = [("none", "none")]
        if stage in (1, 2):
            offloads.append(("cpu", "none"))
        if stage == 3:
            offloads += [("cpu", "none"), ("cpu", "cpu")]
            if allow_nvme:
                offloads += [("nvme", "none"), ("nvme", "cpu"), ("nvme", "nvme")]
        for opt, param in offloads:
            for ckpt in (False, True):
                for mb in micro_batches:
                    yield Candidate(stage, opt, param, ckpt, mb)


def splits(shape: ModelShape, cluster: Cluster) -> list[tuple[int, int]]:
    """(tensor, pipeline) splits llm-ds runs on the cluster: tensor groups of 2, 4 or 8 within a node that
    divide the heads; 2 to 16 pipeline stages, at most one per layer; not both at once."""
    world, per_node = cluster.world, cluster.ranks_per_node
    tensor = [(t, 1) for t in (2, 4, 8) if per_node % t == 0 and shape.n_head % t == 0]
    pipeline = [(1, p) for p in (2, 4, 8, 16) if world % p == 0 and p <= shape.n_layer]
    return tensor + pipeline


def split_candidates(shape: ModelShape, cluster: Cluster, global_batch: int):
    """Tensor-parallel candidates (ZeRO 0-3) and pipelines (ZeRO 0-1), without offload, with every
    micro-batch that divides the batch of a data-parallel rank."""
    for tensor, pipeline in splits(shape, cluster):
        dp = cluster.world // (tensor * pipeline)
        if global_batch % dp:
            continue
        for stage in (0, 1, 2, 3) if pipeline == 1 else (0, 1):
            for ckpt in (False, True):
                for mb in (m for m in (1, 2, 4, 8, 16, 32, 64, 128) if (global_batch // dp) % m == 0):
                    yield Candidate(stage, activation_checkpointing=ckpt, micro_batch=mb, tensor=tensor,
                                    pipeline=pipeline)  # fmt: skip


def plan(
    shape: ModelShape, cluster: Cluster, global_batch: int, precision: str, template: dict[str, Any] | None = None
) -> list[Estimate]:
    """Every candidate whose micro-batch divides the batch of a data-parallel rank, with and without tensor or
    pipeline parallelism, fastest first (less device memory on ties)."""
    per_rank, rest = divmod(global_batch, cluster.world)
    sizes = [m for m in (1, 2, 4, 8, 16, 32, 64, 128) if per_rank % m == 0] if not rest else []
    every = [
        *candidates(micro_batches=sizes, allow_nvme=cluster.nvme > 0),
        *split_candidates(shape, cluster, global_batch),
    ]
    if not every:
        raise PlanError(f"global batch {global_batch} is not divisible by the {cluster.world} ranks of the hostfile")
    out = [estimate(shape, c, cluster, global_batch, precision, template) for c in every]
    return sorted(out, key=lambda e: (not e.fits, round(e.step_s, 6), e.device_total))


def what_would_fit(shape: ModelShape, cluster: Cluster, global_batch: int, precision: str, template: dict) -> list[str]:
    """When nothing fits: the nearest changes that do (more nodes, NVMe offload, a shorter sequence), with numbers."""
    hints = []
    for factor in (2, 4, 8, 16, 32, 64):
        more = Cluster(**{**asdict(cluster), "nodes": cluster.nodes * factor})
        batch = max(global_batch, more.world)
        batch -= batch % more.world
        fits = [e for e in plan(shape, more, batch, precision, template) if e.fits]
        if fits:
            hints.append(f"{more.nodes} nodes ({more.world} ranks): {_brief(fits[0])}")
            break
    if cluster.nvme == 0:
        more = Cluster(**{**asdict(cluster), "nvme": 1e15})
        fits = [e for e in plan(shape, more, global_batch, precision, template) if e.fits]
        if fits:
            need = fits[0].nvme_per_node
            hints.append(f"NVMe offload with --nvme-gb {max(1, round(need / 1e9 + 0.5))} or more: {_brief(fits[0])}")
    seq = shape.seq
    while seq > 128:
        seq //= 2
        fits = [
            e for e in plan(ModelShape(**{**asdict(shape), "seq": seq}), cluster, global_batch, precision, template)
        ]
        fits = [e for e in fits if e.fits]
        if fits:
            hints.append(f"data.block_size={seq}: {_brief(fits[0])}")
            break
    return hints


def _brief(e: Estimate) -> str:
    c = e.candidate
    return f"{c.label()}, micro-batch {c.micro_batch}, {fmt_bytes(e.device_total)} per device, {e.step_s:.2f} s/step"


def shrink_to(
    shape: ModelShape,
    cluster: Cluster,
    global_batch: int,
    precision: str,
    template: dict[str, Any] | None,
    best: Estimate,
    min_nodes: int,
) -> dict[str, Any]:
    """The recommended setup ``best`` on ``min_nodes`` of the cluster's nodes with the same global batch, as a job
    restarted after losing nodes runs it: whether it fits, its step time against the whole cluster's, and where
    it does not fit, the fastest setup that does there. Every count between it and the whole cluster, which a
    job that loses nodes one at a time passes through, is checked too: ``first_failure`` is the largest count
    it cannot run on (None: all fit), and ``batch_for_all`` a global batch every count from ``min_nodes`` up
    can share."""
    import math

    def on(nodes: int) -> dict[str, Any]:
        small = Cluster(**{**asdict(cluster), "nodes": nodes})
        out: dict[str, Any] = {"nodes": nodes, "world_size": small.world, "fits": False}
        dp, split = divmod(small.world, best.candidate.model_parallel)
        per_rank, rest = divmod(global_batch, dp) if not split else (0, 1)
        if rest or per_rank % best.candidate.micro_batch:
            out["limits"] = [
                f"the global batch of {global_batch} at micro-batch {best.candidate.micro_batch} cannot be shared "
                f"by {small.world} ranks"
            ]
            return out
        same = estimate(shape, best.candidate, small, global_batch, precision, template)
        out.update(
            fits=same.fits,
            step_s=same.step_s,
            slowdown=same.step_s / best.step_s,
            grad_accum=same.grad_accum,
            device_margin=same.margin.get("device"),
            limits=same.limits,
        )
        if not same.fits:
            fits = [e for e in plan(shape, small, global_batch, precision, template) if e.fits]
            out["instead"] = _brief(fits[0]) if fits else None
        return out

    counts = range(cluster.nodes - 1, min_nodes - 1, -1)
    results = {n: on(n) for n in counts}
    out = results.get(min_nodes) or on(min_nodes)
    out["first_failure"] = next((results[n] for n in counts if not results[n]["fits"]), None)
    unit = math.lcm(
        *(
            max(1, n * cluster.ranks_per_node // best.candidate.model_parallel) * best.candidate.micro_batch
            for n in range(min_nodes, cluster.nodes + 1)
        )
    )
    out["batch_for_all"] = -(-global_batch // unit) * unit
    return out


def describe_fewer_nodes(result: dict[str, Any]) -> str:
    """One line for ``shrink_to``'s answer."""
    where = f"on {result['nodes']} node(s) ({result['world_size']} ranks, the same global batch)"
    first = result.get("first_failure")
    if result["fits"] and first is None:
        return (
            f"{where}: fits, device margin {result['device_margin']:.0%}, {result['step_s']:.3f} s/step "
            f"({result['slowdown']:.2f}x), train.grad_accum_steps {result['grad_accum']}: the job can shrink to it"
        )
    failing = first or result
    why = "; ".join(failing.get("limits") or ["does not fit"])
    head = (
        f"{where}: the job cannot shrink to it: on {failing['nodes']} node(s)"
        if failing is not result
        else f"{where}: the job cannot shrink to it"
    )
    if "step_s" not in failing:
        batch = result.get("batch_for_all")
        fix = f"; a global batch of {batch} can be shared on every count down to it" if batch else ""
        return f"{head}, the global batch cannot be shared ({why}){fix}"
    instead = failing.get("instead")
    return f"{head}, the recommended setup does not fit ({why}); " + (
        f"fastest that fits there (as the starting config): {instead}" if instead else "nothing fits there"
    )
