"""The planner behind ``llm-ds plan`` (the command is launcher/plan.py): memory and step time for every
ZeRO stage, offload and micro-batch, before a launch.

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

from llm_ds.plan.memory import activation_bytes, model_states
from llm_ds.plan.render import breakdown, ds_config_for, table, write_plan
from llm_ds.plan.search import candidates, estimate, plan, splits, what_would_fit
from llm_ds.plan.shapes import (
    NCCL_NVLS_BYTES,
    Candidate,
    Cluster,
    Estimate,
    GiB,
    ModelShape,
    PlanError,
    fmt_bytes,
    shape_from_config,
)
from llm_ds.plan.timing import measured_tflops, step_time

__all__ = [
    "NCCL_NVLS_BYTES",
    "Candidate",
    "Cluster",
    "Estimate",
    "GiB",
    "ModelShape",
    "PlanError",
    "activation_bytes",
    "breakdown",
    "candidates",
    "ds_config_for",
    "estimate",
    "fmt_bytes",
    "measured_tflops",
    "model_states",
    "plan",
    "shape_from_config",
    "splits",
    "step_time",
    "table",
    "what_would_fit",
    "write_plan",
]
