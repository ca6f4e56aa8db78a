"""The planner's terms: model shape, cluster, candidate, estimate, and its constants."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from llm_ds.config import ConfigError, ModelConfig, RunConfig
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

    def stage_blocks(self, pipeline: int) -> list[int]:
        """Blocks per pipeline stage as llm-ds shares them out (``llm_ds.parallel.layout.stage_blocks``)."""
        from llm_ds.parallel.layout import head_blocks, stage_blocks

        return stage_blocks(self.n_layer, pipeline, head_blocks(self.vocab, self.n_embd, self.seq))

    def params_per_device(self, tensor: int = 1, pipeline: int = 1) -> int:
        """Parameters one rank of a replica holds, on the fullest rank. Tensor parallelism splits each
        block's matrices and the biases of the column-split ones (q/k/v, the MLP's first matrix), not the
        LayerNorms, the output projections' biases or the embeddings; a pipeline's first stage holds its
        blocks and the token and position tables, the last its blocks, the final LayerNorm and the tied table."""
        d = self.n_embd
        block = (12 * d * d + 7 * d) / tensor + 6 * d
        if pipeline == 1:
            return int(self.n_layer * block + self.vocab * d + self.n_positions * d + 2 * d)
        blocks = self.stage_blocks(pipeline)
        first = blocks[0] * block + self.vocab * d + self.n_positions * d
        return int(max(first, blocks[-1] * block + self.vocab * d + 2 * d))

    def largest_layer_per_device(self, tensor: int = 1) -> int:
        d = self.n_embd
        return max(self.vocab * d, (4 * d * d + 4 * d) // tensor)

    def busiest_rank_flops_per_token(self, tensor: int = 1, pipeline: int = 1) -> float:
        """Training FLOPs per token of a replica's batch on its busiest rank: a tensor group splits the blocks'
        work and repeats the output head on every rank; a pipeline's stages run their blocks, the last also
        the head (``stage_blocks`` balances them)."""
        if tensor == pipeline == 1:
            return self.flops_per_token()
        d = self.n_embd
        block = 6 * (12 * d * d + 13 * d) + 12 * d * self.seq
        head = 6 * (self.vocab * d + 2 * d)
        if pipeline == 1:
            return self.n_layer * block / tensor + head
        blocks = self.stage_blocks(pipeline)
        return max(max(blocks[:-1]) * block, blocks[-1] * block + head)

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
    tensor: int = 1  # parallel.tensor
    pipeline: int = 1  # parallel.pipeline

    @property
    def model_parallel(self) -> int:
        return self.tensor * self.pipeline

    def label(self) -> str:
        parts = [f"zero{self.stage}"]
        if self.tensor > 1:
            parts.append(f"tp{self.tensor}")
        if self.pipeline > 1:
            parts.append(f"pp{self.pipeline}")
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
