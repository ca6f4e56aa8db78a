"""Bytes per rank: model states, activations, logits and loss, buffers (see the package's docstring)."""

from __future__ import annotations

from typing import Any

from llm_ds.config import auto_chunk_tokens
from llm_ds.plan.shapes import DEFAULT_BUCKET, Candidate, ModelShape


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
    shape: ModelShape,
    micro_batch: int,
    precision: str,
    checkpointing: bool,
    on_gpu: bool = True,
    tensor: int = 1,
    pipeline: int = 1,
    in_flight: int = 1,
) -> dict[str, float]:
    """Bytes saved for backward by one rank's micro-batch: the blocks' activations, and logits with the loss.

    Tensor parallelism splits what the column-split matrices make (q/k/v, the attention output, the MLP's
    4x-wide tensors: all but the 4 LayerNorm inputs and outputs). A pipeline's first stage holds the
    activations of its layers for ``in_flight`` micro-batches (1F1B: as many as stages, at most the
    micro-batches of a step); the loss runs on the last stage, for one micro-batch at a time. The two are
    added: an upper bound on either stage."""
    e = bytes_per_value(precision)
    tokens = micro_batch * shape.seq
    per_tensor = tokens * shape.n_embd * e
    per_block = block_tensors(shape.activation)
    per_block = 4 + (per_block - 4) / tensor
    layers = shape.stage_blocks(pipeline)[0] if pipeline > 1 else shape.n_layer  # the first stage's
    if checkpointing:
        blocks = layers * per_tensor * in_flight + per_block * per_tensor
    else:
        blocks = layers * per_block * per_tensor * in_flight
    blocks += 2 * per_tensor * in_flight  # embedding sum, final LayerNorm
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


def checkpoint_bytes(n_params: int, precision: str, cand: Candidate, nodes: int) -> dict[str, float]:
    """What one checkpoint writes, as DeepSpeed lays it out: ``total`` and ``busiest_node`` (node 0's).

    The optimizer states (fp32 master copy and Adam's two moments: 12 bytes per parameter; 8 for ZeRO-0 in
    fp32, whose torch optimizer has no master copy) are shared evenly over the ranks under ZeRO 1-3; under
    ZeRO-0 the first data-parallel rank writes them all. The weights in the training precision are written
    by each model-parallel group's first data-parallel rank, on node 0 (a tensor group shares a node;
    pipeline stages spread them over the nodes they span); ZeRO-3 keeps them only in the optimizer states.
    """
    e = bytes_per_value(precision)
    optimizer = (8 if cand.stage == 0 and e == 4 else 12) * n_params
    weights = 0.0 if cand.stage == 3 else e * n_params
    weights_on_node0 = weights / min(cand.pipeline, nodes)
    optimizer_on_node0 = optimizer if cand.stage == 0 else optimizer / nodes
    return {"total": optimizer + weights, "busiest_node": optimizer_on_node0 + weights_on_node0}
