"""``llm-ds plan``: memory and step time for every ZeRO stage, offload and micro-batch, before a launch.

The memory model counts what DeepSpeed actually allocates, per rank:

- model states, following DeepSpeed's implementation (and its own estimators where those apply):
  ZeRO-0 keeps 16-bit parameters and gradients and an fp32 master copy with Adam's two moments
  (2 + 2 + 12 bytes per parameter, the ZeRO paper's count); ZeRO-1 partitions the 12 bytes of
  optimizer state over the ranks (with bf16, DeepSpeed accumulates gradients in fp32, 4 bytes);
  ZeRO-2 also partitions gradients, which DeepSpeed keeps as a 16-bit and an fp32 partition
  (2 + 18/N bytes, ``estimate_zero2_model_states_mem_needs``); ZeRO-3 also partitions the 16-bit
  parameters and holds the largest layer's gathered parameters and gradients (18/N + 4 bytes per
  parameter of that layer, ``estimate_zero3_model_states_mem_needs``). In fp32, parameters and
  gradients take 4 bytes and DeepSpeed's ZeRO optimizers still clone an fp32 master partition.
  Offload moves the optimizer's share (and ZeRO-3's parameter partition) to host memory or NVMe.
- activations saved for backward by a GPT-2 block with SDPA attention and no dropout: 17 tensors'
  worth of ``micro_batch x seq x n_embd`` per layer (LayerNorm inputs, QKV, attention output and
  its contiguous copy, the MLP's 4x-wide input and GELU output); with activation checkpointing,
  one block input per layer plus one block recomputed;
- logits and loss: with the fused loss (``model.fused_loss``, llm_ds/loss.py) one chunk's fp32
  logits and 16-bit gradient (on a GPU also logsumexp's fp32 temporary of the chunk), the hidden
  states' gradient and the output weight's fp32 gradient; with transformers' loss three fp32
  tensors of ``micro_batch x seq x vocab`` on a GPU (log-softmax's saved output, the incoming
  gradient and its result, at once in backward: 12 bytes per logit), 10 bytes per logit in bf16
  on CPU ranks (measured);
- framework: DeepSpeed's communication buckets; on a GPU cuBLAS's workspaces (inside torch's
  allocator, so in ``torch.cuda.max_memory_allocated``), and outside it the CUDA context and
  NCCL's buffers, with NCCL's NVLS buffers on NVSwitch nodes of 4 or more GPUs.

Step time is compute (training FLOPs over the device's sustained throughput; activation
checkpointing repeats the forward) plus communication (ring volumes per ZeRO stage over the
slowest link) plus offload traffic; it is an estimate for ranking candidates, stated as such.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llm_ds.config import ConfigError, ModelConfig, RunConfig, auto_chunk_tokens
from llm_ds.hardware import CARDS, find_card, has_native_bf16, local_gpu, peak_tflops
from llm_ds.monitor.metrics import training_flops_per_token

GiB = 1024**3
CUDA_CONTEXT_BYTES = int(1.0 * GiB)  # CUDA context, cuDNN, NCCL's ring buffers: not in torch's allocator
# NCCL's NVLink SHARP buffers on NVSwitch nodes (H100/H200 SXM boards), outside torch's allocator: an
# estimate (NCCL_NVLS_ENABLE=0 removes them, at some all-reduce bandwidth).
NCCL_NVLS_BYTES = int(2.0 * GiB)
NVLS_MIN_RANKS_PER_NODE = 4
# On CPU ranks, a ZeRO engine holds this much host memory that is in no tensor (measured: 65-70 MiB
# per rank for 5M- and 30M-parameter models alike, ZeRO 1-3; bench/bench_memory.py).
CPU_ZERO_RUNTIME_BYTES = 64 * 2**20
ALLOCATOR_SLACK = 0.05  # fragmentation of the caching allocator, as a fraction of what is allocated
DEFAULT_EFFICIENCY = 0.40  # sustained fraction of peak FLOP/s when no --tflops is measured
CPU_ADAM_PARAMS_PER_S = 1.0e9  # DeepSpeed's CPUAdam (AVX-512), per node
DEFAULT_BUCKET = 50_000_000  # the bucket sizes in ds_configs/
# Small micro-batches leave a device's matmul units idle: sustained throughput is taken as
# tflops x tokens / (tokens + this) for a micro-batch of that many tokens (half at this size).
HALF_EFFICIENCY_TOKENS = {"gpu": 1024, "cpu": 32}


class PlanError(ConfigError):
    """Input to ``llm-ds plan`` that cannot be used; one line naming it."""


@dataclass(frozen=True)
class ModelShape:
    n_layer: int
    n_embd: int
    n_head: int
    n_positions: int
    vocab: int
    seq: int
    activation: str = ModelConfig.activation_function
    fused_loss: bool = ModelConfig.fused_loss
    loss_chunk_tokens: int | None = ModelConfig.loss_chunk_tokens

    @property
    def n_params(self) -> int:
        """GPT-2 with tied embeddings: token and position tables, 12d² + 13d per block, the final LayerNorm."""
        d = self.n_embd
        return self.vocab * d + self.n_positions * d + self.n_layer * (12 * d * d + 13 * d) + 2 * d

    @property
    def largest_layer_params(self) -> int:
        """The most parameters one module holds at once: the token embedding or the MLP's up-projection."""
        d = self.n_embd
        return max(self.vocab * d, 4 * d * d + 4 * d)

    def flops_per_token(self) -> int:
        return training_flops_per_token(
            self.n_params, self.n_positions * self.n_embd, self.n_layer, self.n_embd, self.seq
        )


@dataclass(frozen=True)
class Cluster:
    nodes: int
    ranks_per_node: int
    device: str  # "cpu", or the GPU's name
    device_mem: float  # bytes per rank's device; on CPU, the node's memory shared by its ranks
    cpu_mem: float  # bytes per node
    nvme: float  # bytes per node (0: none)
    tflops: float  # sustained TFLOP/s per device
    intra_gbs: float = 150.0  # GB/s per rank within a node (NVLink bus bandwidth)
    inter_gbs: float = 25.0  # GB/s per rank between nodes (one 200 Gb/s NIC per GPU)
    pcie_gbs: float = 25.0  # host <-> device
    nvme_gbs: float = 3.0  # per node
    capability: tuple[int, int] = (9, 0)  # the GPU's compute capability (sizes cuBLAS's workspaces)
    nvls: bool = False  # NVSwitch boards where NCCL allocates NVLink SHARP buffers

    @property
    def world(self) -> int:
        return self.nodes * self.ranks_per_node

    @property
    def is_cpu(self) -> bool:
        return self.device == "cpu"


@dataclass(frozen=True)
class Candidate:
    stage: int
    offload_optimizer: str = "none"  # none | cpu | nvme
    offload_param: str = "none"  # none | cpu | nvme (ZeRO-3 only)
    activation_checkpointing: bool = False
    micro_batch: int = 1

    def label(self) -> str:
        parts = [f"zero{self.stage}"]
        if self.offload_optimizer != "none":
            parts.append(f"opt->{self.offload_optimizer}")
        if self.offload_param != "none":
            parts.append(f"param->{self.offload_param}")
        if self.activation_checkpointing:
            parts.append("ckpt")
        return "+".join(parts)


@dataclass
class Estimate:
    candidate: Candidate
    grad_accum: int
    device: dict[str, int]  # per rank, bytes by component
    host_per_node: int
    nvme_per_node: int
    step_s: float
    step_parts: dict[str, float]
    fits: bool = False
    host_states: dict[str, float] = field(default_factory=dict)  # per rank: offloaded states, NVMe swap buffers
    margin: dict[str, float] = field(default_factory=dict)  # free fraction: device, host, nvme
    limits: list[str] = field(default_factory=list)

    framework: int = 0  # allocator slack, and the CUDA context on a GPU

    def model_state_bytes(self) -> int:
        """Parameters, gradients (fp32 ones included) and optimizer state on the device, with buckets."""
        d = self.device
        return d["model_params"] + d["model_grads"] + d["fp32_grads"] + d["model_optimizer"] + d["buckets"]

    def cpu_rank_bytes(self) -> int:
        """On CPU ranks the device is the host: what one rank holds at its peak, offloaded states included
        (without the 1.5x buffer factor that the host figure for fitting adds)."""
        return self.device_total + int(sum(self.host_states.values()))

    def peak_allocated(self) -> int:
        d = self.device
        resident = d["model_params"] + d["model_grads"] + d["model_optimizer"] + d["buckets"] + d["workspaces"]
        backward = d["live_params"] + d["activations"] + d["logits"]
        return resident + max(backward, d["fp32_grads"] + d["optimizer_scratch"])

    @property
    def device_total(self) -> int:
        """The device's peak: what is allocated at the fuller of the two moments, plus framework."""
        return self.peak_allocated() + self.framework

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self.candidate),
            "label": self.candidate.label(),
            "grad_accum": self.grad_accum,
            "device_bytes": {**self.device, "framework": self.framework, "total": self.device_total},
            "host_bytes_per_node": self.host_per_node,
            "nvme_bytes_per_node": self.nvme_per_node,
            "step_s": self.step_s,
            "step_parts_s": self.step_parts,
            "fits": self.fits,
            "margin": self.margin,
            "limits": self.limits,
        }


def bytes_per_value(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def model_states(
    n_params: int, largest_layer: int, stage: int, world: int, precision: str, cand: Candidate, zero: dict | None = None
) -> dict:
    """Bytes per rank of model states as DeepSpeed allocates them: ``device`` (params, live_params:
    ZeRO-3's gathered parameters in forward and backward, grads: the 16-bit gradients held through
    backward, fp32_grads: made for the optimizer step, optimizer),
    ``host`` (offloaded) and ``nvme``. ``optimizer_partition`` is the largest fp32 tensor the
    optimizer steps on."""
    zero = zero or {}
    p, n = n_params, world
    e = bytes_per_value(precision)
    mixed = e == 2
    opt_partition = 12 * p / n  # fp32 master (cloned even in fp32 runs) + Adam's two moments, partitioned
    device = {"params": 0.0, "live_params": 0.0, "grads": 0.0, "fp32_grads": 0.0, "optimizer": 0.0}
    host = {"params": 0.0, "grads": 0.0, "optimizer": 0.0}
    nvme = 0.0
    if stage == 0:
        # Mixed precision: DeepSpeed's bf16/fp16 optimizer steps an fp32 master copy on fp32 gradients.
        device.update(params=e * p, grads=e * p, optimizer=(12 if mixed else 8) * p)
        device["fp32_grads"] = 4 * p if mixed else 0.0
        partition = largest_layer  # its optimizer steps parameter by parameter
    elif stage in (1, 2):
        # DeepSpeed's ZeRO-1 and ZeRO-2 share one implementation: gradients are reduce-scattered into a
        # 16-bit partition as backward runs, then copied to fp32 for the optimizer step.
        device["params"] = e * p
        partition = p / n
        if cand.offload_optimizer == "none":
            device["grads"] = e * p / n
            device["fp32_grads"] = 4 * p / n if mixed else 0.0
            device["optimizer"] = opt_partition
        else:  # gradients go straight to the fp32 partition on the host, next to master weights and moments
            host.update(grads=4 * p / n, optimizer=opt_partition)
    else:
        partition = p / n
        # Gathered parameters kept live: the largest layer, or up to stage3_max_live_parameters while
        # their next use is within stage3_max_reuse_distance (the whole forward, for the defaults).
        max_live = zero.get("stage3_max_live_parameters", 1_000_000_000)
        live = max(largest_layer, min(p, max_live))
        device["live_params"] = e * live
        if cand.offload_param == "none":
            device["params"] = e * p / n
        else:
            if cand.offload_param == "cpu":
                host["params"] = e * p / n
            else:
                nvme += e * p / n
        device["grads"] = e * largest_layer  # one layer's full gradients before they are reduce-scattered
        if cand.offload_optimizer == "none":
            device["grads"] += e * p / n
            device["fp32_grads"] = 4 * p / n if mixed else 0.0
            device["optimizer"] = opt_partition
        else:
            host["grads"] = 4 * p / n
            if cand.offload_optimizer == "cpu":
                host["optimizer"] = opt_partition
            else:
                nvme += opt_partition
    return {"device": device, "host": host, "nvme": nvme, "optimizer_partition": partition}


def optimizer_temp_bytes(template: dict[str, Any], on_device: bool, partition: float, device_is_cpu: bool) -> float:
    """Scratch memory of the optimizer step over an fp32 partition of ``partition`` elements: torch's
    AdamW makes two temporaries of the tensor it steps (single-tensor, the CPU default) or one
    (foreach, the CUDA default); fused kernels and DeepSpeed's FusedAdam and CPUAdam make none."""
    if not on_device:
        return 0.0
    params = (template.get("optimizer") or {}).get("params") or {}
    if not params.get("torch_adam") or params.get("fused"):
        return 0.0
    return (2 if device_is_cpu or params.get("foreach") is False else 1) * 4 * partition


def block_tensors(activation: str) -> int:
    """Activations one GPT-2 block saves for backward, in units of ``micro_batch x seq x n_embd``:
    LayerNorm inputs (2), QKV (3), attention output and its contiguous copy (2), LayerNorm outputs
    feeding the linears (2), the MLP's up-projection output and GELU output (4 + 4). GPT-2's
    ``gelu_new`` is written out in Python and keeps three more 4x-wide intermediates
    (tanh, 0.5x, 1 + tanh) that a fused GELU does not."""
    return 17 + (12 if activation == "gelu_new" else 0)


def activation_bytes(
    shape: ModelShape, micro_batch: int, precision: str, checkpointing: bool, on_gpu: bool = True
) -> dict[str, float]:
    """Bytes saved for backward by one rank's micro-batch: the blocks' activations, and logits with the loss."""
    e = bytes_per_value(precision)
    tokens = micro_batch * shape.seq
    per_tensor = tokens * shape.n_embd * e
    per_block = block_tensors(shape.activation)
    if checkpointing:
        blocks = shape.n_layer * per_tensor + per_block * per_tensor
    else:
        blocks = shape.n_layer * per_block * per_tensor
    blocks += 2 * per_tensor  # embedding sum, final LayerNorm
    return {"activations": blocks, "logits": loss_bytes(shape, tokens, e, on_gpu)}


def loss_bytes(shape: ModelShape, tokens: int, e: int, on_gpu: bool = True) -> float:
    """The loss's worst moment, on top of the saved activations."""
    if not shape.fused_loss:
        if on_gpu:
            # Log-softmax's backward: its saved fp32 output, the fp32 gradient coming from the
            # negative log-likelihood and the one it makes, all alive at once.
            return tokens * shape.vocab * 12
        # Measured on CPU ranks: log-softmax saved from forward and its fp32 gradient, then the
        # logits' gradient in the model's dtype (the logits and their fp32 copy are freed by then).
        return tokens * shape.vocab * (8 + e)
    # In forward, per chunk: fp32 logits (their gradient made in place) and its 16-bit copy, and
    # on a GPU logsumexp's fp32 temporary of the chunk; for all positions: the hidden states'
    # gradient, the weight's fp32 gradient (and a 16-bit product).
    rows = min(tokens, shape.loss_chunk_tokens or auto_chunk_tokens(shape.vocab))
    sixteen_bit = e if e < 4 else 0
    return (
        rows * shape.vocab * (4 + sixteen_bit + (4 if on_gpu else 0))
        + tokens * shape.n_embd * e
        + shape.vocab * shape.n_embd * (4 + sixteen_bit)
    )


def cublas_workspace_bytes(capability: tuple[int, int]) -> int:
    """cuBLAS's and cuBLASLt's workspaces, which torch takes from its caching allocator: 32 MiB each
    on Hopper and newer, 8 MiB + 128 KiB before (torch's defaults, ``CUBLAS_WORKSPACE_CONFIG``)."""
    each = 32 * 2**20 if tuple(capability) >= (9, 0) else 4096 * 1024 * 2 + 16 * 1024 * 8
    return 2 * each


def bucket_bytes(zero: dict[str, Any], stage: int, precision: str, n_params: int, on_cpu: bool) -> float:
    """DeepSpeed's communication buffers. A GPU allocates them whole; on CPU only touched pages count,
    so a bucket larger than the model costs the model's size."""
    e = bytes_per_value(precision)
    reduce = float(zero.get("reduce_bucket_size", DEFAULT_BUCKET))
    cap = (lambda x: min(x, n_params)) if on_cpu else (lambda x: x)
    if stage == 0:
        return 0.0
    if stage in (1, 2):
        n = 2 if zero.get("overlap_comm", True) and stage == 2 else 1
        return n * cap(reduce) * e if zero.get("contiguous_gradients", True) else 0.0
    # ZeRO-3 keeps one flat gradient bucket; its prefetch "bucket" sizes fetches and holds no buffer.
    return cap(reduce) * e


def nvme_buffer_bytes(zero: dict[str, Any], cand: Candidate, n_params: int, world: int, precision: str) -> float:
    """Host buffers DeepSpeed pins to swap states with NVMe: parameter buffers of ``buffer_size``
    elements, optimizer buffers of one fp32 sub-group each."""
    total = 0.0
    if cand.offload_param == "nvme":
        p = zero.get("offload_param") or {}
        total += p.get("buffer_count", 5) * p.get("buffer_size", 100_000_000) * bytes_per_value(precision)
    if cand.offload_optimizer == "nvme":
        o = zero.get("offload_optimizer") or {}
        sub_group = min(zero.get("sub_group_size", 1_000_000_000), n_params / world)
        total += o.get("buffer_count", 4) * sub_group * 4
    return total


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
    template = template or {}
    zero = template.get("zero_optimization") or {}
    states = model_states(shape.n_params, shape.largest_layer_params, cand.stage, n, precision, cand, zero)
    acts = activation_bytes(shape, cand.micro_batch, precision, cand.activation_checkpointing, not cluster.is_cpu)
    d = states["device"]
    device = {
        "model_params": int(d["params"]),
        "live_params": int(d["live_params"]),
        "model_grads": int(d["grads"]),
        "model_optimizer": int(d["optimizer"]),
        "buckets": int(bucket_bytes(zero, cand.stage, precision, shape.n_params, cluster.is_cpu)),
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
        "nvme_buffers": nvme_buffer_bytes(zero, cand, shape.n_params, n, precision),
    }
    offloaded = sum(states["host"].values())
    # Before ZeRO-3's partitioned construction, every rank builds the whole model in fp32 on the host
    # (on CPU ranks, that model is the device's own parameters).
    load = 0.0 if cand.stage == 3 or cluster.is_cpu else 4 * shape.n_params
    # DeepSpeed's estimators' additional_buffer_factor covers the offload path's staging; NVMe swap
    # buffers are sized exactly.
    host = int(r * (max(offloaded, load) * 1.5 + host_parts["nvme_buffers"]))
    nvme = int(r * states["nvme"])
    parts = step_time(shape, cand, cluster, global_batch, precision)
    est = Estimate(cand, global_batch // (n * cand.micro_batch), device, host, nvme, sum(parts.values()), parts)
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
    """Every combination DeepSpeed supports: optimizer offload from ZeRO-1 on, parameter offload and
    NVMe only with ZeRO-3."""
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


def plan(
    shape: ModelShape, cluster: Cluster, global_batch: int, precision: str, template: dict[str, Any] | None = None
) -> list[Estimate]:
    """Every candidate whose micro-batch divides the per-rank batch, fastest first (less device memory on ties)."""
    if global_batch % cluster.world:
        raise PlanError(f"global batch {global_batch} is not divisible by the {cluster.world} ranks of the hostfile")
    per_rank = global_batch // cluster.world
    sizes = [m for m in (1, 2, 4, 8, 16, 32, 64, 128) if per_rank % m == 0]
    out = [
        estimate(shape, c, cluster, global_batch, precision, template)
        for c in candidates(micro_batches=sizes, allow_nvme=cluster.nvme > 0)
    ]
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


def fmt_bytes(n: float) -> str:
    return f"{n / GiB:.1f} GiB" if abs(n) >= 0.1 * GiB else f"{n / 2**20:.0f} MiB"


def shape_from_config(cfg: RunConfig, vocab: int) -> ModelShape:
    m: ModelConfig = cfg.model
    return ModelShape(
        m.n_layer,
        m.n_embd,
        m.n_head,
        m.n_positions,
        vocab,
        cfg.data.block_size,
        m.activation_function,
        m.fused_loss,
        m.loss_chunk_tokens,
    )


def ds_config_for(est: Estimate, template: dict[str, Any], nvme_path: str = "auto") -> dict[str, Any]:
    """A DeepSpeed template for the chosen candidate: the run-config-owned values stay "auto"."""
    c = est.candidate
    ds = json.loads(json.dumps(template))
    zero = {k: v for k, v in (ds.get("zero_optimization") or {}).items() if not k.startswith("offload_")}
    zero["stage"] = c.stage
    if c.stage == 3:
        zero.setdefault("stage3_prefetch_bucket_size", DEFAULT_BUCKET)
        zero.setdefault("stage3_param_persistence_threshold", 100000)
        zero.setdefault("stage3_gather_16bit_weights_on_model_save", True)
    else:
        for k in list(zero):
            if k.startswith("stage3_"):
                del zero[k]
    for key, where in (("offload_optimizer", c.offload_optimizer), ("offload_param", c.offload_param)):
        if where == "cpu":
            zero[key] = {"device": "cpu", "pin_memory": True}
        elif where == "nvme":
            zero[key] = {"device": "nvme", "nvme_path": nvme_path, "pin_memory": True}
    ds["zero_optimization"] = zero
    opt = ds.get("optimizer", {}).get("params", {})
    if c.offload_optimizer != "none":
        for key in ("torch_adam", "fused", "foreach"):  # offload needs DeepSpeed's CPUAdam, which takes none
            opt.pop(key, None)
    if "nvme" in (c.offload_optimizer, c.offload_param):
        ds.setdefault("aio", {"block_size": 1048576, "queue_depth": 8, "single_submit": False, "overlap_events": True})
    return ds


def table(estimates: list[Estimate], limit: int | None = None) -> str:
    head = (
        f"{'candidate':<30}{'micro':>6}{'accum':>6}{'device':>11}{'margin':>8}{'host/node':>11}{'nvme/node':>11}"
        f"{'step s':>9}  fits"
    )
    rows = [head, "-" * len(head)]
    for e in estimates[:limit]:
        c = e.candidate
        rows.append(
            f"{c.label():<30}{c.micro_batch:>6}{e.grad_accum:>6}{fmt_bytes(e.device_total):>11}"
            f"{e.margin.get('device', 0):>8.0%}{fmt_bytes(e.host_per_node):>11}"
            f"{(fmt_bytes(e.nvme_per_node) if e.nvme_per_node else '-'):>11}{e.step_s:>9.3f}  "
            f"{'yes' if e.fits else 'no: ' + '; '.join(e.limits)}"
        )
    return "\n".join(rows)


def breakdown(e: Estimate) -> str:
    parts = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in {**e.device, "framework": e.framework}.items())
    steps = ", ".join(f"{k} {v:.3f} s" for k, v in e.step_parts.items())
    return f"per device: {parts}\nstep: {steps}"


def write_plan(path: Path, ds: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(ds, indent=2) + "\n")
    tmp.replace(path)


# ----------------------------------------------------------------------------------------------
# The command


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
    parser.add_argument("--write", metavar="PATH", help="write the recommended DeepSpeed config here")
    parser.add_argument("--json", action="store_true", help="print everything as JSON")
    parser.add_argument("--top", type=int, default=12, help="table rows (default 12)")
    parser.set_defaults(func=plan_command)


def _positive(args, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(args, name.replace("-", "_"))
        if value is not None and not value > 0:
            raise PlanError(f"--{name} must be > 0, got {value:g}")


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
    _positive(args, ("gpu-mem-gb", "cpu-mem-gb", "tflops", "intra-node-gbs", "inter-node-gbs", "pcie-gbs", "nvme-gbs"))
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
    from llm_ds.ds_config import resolve_precision

    # The hostfile, run config and DeepSpeed template pass the same checks as `llm-ds launch`.
    launch_args = argparse.Namespace(
        **vars(args), launcher="pdsh", master_addr=None, master_port=None, node_rank=None, env_names=[]
    )
    spec, cfg, template, world = validate(launch_args)
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
    global_batch = args.global_batch or cfg.train.micro_batch_size * cfg.train.grad_accum_steps * world
    if global_batch <= 0:
        raise PlanError(f"--global-batch must be > 0, got {global_batch}")
    estimates = plan(shape, cluster, global_batch, precision, template)
    best = estimates[0] if estimates and estimates[0].fits else None
    hints = [] if best else what_would_fit(shape, cluster, global_batch, precision, template)
    run_values = _run_values(best) if best else {}
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
    if written:
        print(f"wrote {written}")
    return 0


def _run_values(best: Estimate) -> dict[str, Any]:
    c = best.candidate
    return {
        "train.micro_batch_size": c.micro_batch,
        "train.grad_accum_steps": best.grad_accum,
        "model.activation_checkpointing": str(c.activation_checkpointing).lower(),
    }


def _vocab_size(cfg: RunConfig) -> int:
    from llm_ds.model import build_tokenizer, resolve_vocab_size

    if cfg.model.vocab_size is not None:
        return resolve_vocab_size(cfg.model, None)
    return resolve_vocab_size(cfg.model, len(build_tokenizer(cfg.data.tokenizer)))
