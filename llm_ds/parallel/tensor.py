"""Tensor parallelism through DeepSpeed's AutoTP, for GPT-2 and for models that carry a ``tp_plan``.

AutoTP refuses GPT-2 as it is (``gpt2`` has a kernel-injection policy, which AutoTP training does not take),
and its partition specs read a matrix as ``[out, in]`` where GPT-2's ``Conv1D`` stores ``[in, out]``. So a
GPT-2 is first given ``nn.Linear`` layers with the transposed weights (the same function), then split by
layer specs in Megatron's pattern: the fused query/key/value projection and the MLP's first matrix by output
columns (each rank whole heads), the two output projections by input rows (one all-reduce each). The
embeddings, LayerNorms and the tied output head stay whole on every rank.
"""

from __future__ import annotations

import torch

# DeepSpeed's ``tensor_parallel.partition_config`` for GPT-2 with Linear layers.
GPT2_LAYER_SPECS = [
    {"patterns": [r".*\.attn\.c_attn\.weight$"], "partition_type": "column", "shape": [3, -1], "partition_dim": 0},
    {"patterns": [r".*\.(attn|mlp)\.c_proj\.weight$"], "partition_type": "row"},
    {"patterns": [r".*\.mlp\.c_fc\.weight$"], "partition_type": "column"},
]


def is_gpt2(model: torch.nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "model_type", None) == "gpt2"


def linear_from_conv1d(model: torch.nn.Module) -> list[str]:
    """Replace every transformers ``Conv1D`` of ``model`` by an ``nn.Linear`` computing the same function
    (weight transposed); returns the names of the weights that were transposed."""
    from transformers.pytorch_utils import Conv1D

    names = []
    for module_name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if not isinstance(child, Conv1D):
                continue
            n_in, n_out = child.weight.shape
            linear = torch.nn.Linear(n_in, n_out, device=child.weight.device, dtype=child.weight.dtype)
            with torch.no_grad():
                linear.weight.copy_(child.weight.t())
                linear.bias.copy_(child.bias)
            linear.weight.requires_grad_(child.weight.requires_grad)
            linear.bias.requires_grad_(child.bias.requires_grad)
            setattr(module, child_name, linear)
            names.append(f"{module_name}.{child_name}.weight" if module_name else f"{child_name}.weight")
    return names


def prepare(model: torch.nn.Module, tensor: int) -> tuple[dict, list[str]]:
    """Make ``model`` ready for AutoTP over ``tensor`` ranks; returns the engine's ``tensor_parallel`` section
    and the weights transposed on the way (``linear_from_conv1d``). GPT-2 gets its layer specs; another model
    is split by its own ``tp_plan`` (transformers' models carry one), which AutoTP reads."""
    from llm_ds.config import ConfigError

    heads = getattr(getattr(model, "config", None), "num_attention_heads", None)
    if heads is not None and heads % tensor:
        raise ConfigError(
            f"`parallel.tensor` must divide the model's {heads} attention heads (each rank holds whole heads), "
            f"got {tensor}"
        )
    if not is_gpt2(model):
        return {"autotp_size": tensor}, []
    transposed = linear_from_conv1d(model)
    return {
        "autotp_size": tensor,
        "partition_config": {"use_default_specs": False, "layer_specs": GPT2_LAYER_SPECS},
    }, transposed


def finish(model: torch.nn.Module) -> None:
    """After ``deepspeed.initialize``: AutoTP gives GPT-2's attention its share of the width (``embed_dim``,
    ``num_heads``) but not the size it splits the fused q/k/v output by."""
    from transformers.models.gpt2.modeling_gpt2 import GPT2Attention

    for module in model.modules():
        if isinstance(module, GPT2Attention):
            module.split_size = module.embed_dim


def init_groups(tensor: int):
    """DeepSpeed's tensor and data-parallel groups, made before ``deepspeed.initialize`` so that its batch
    arithmetic counts data-parallel ranks only; returns the ``mpu`` to pass it."""
    from deepspeed.utils import groups

    groups._init_tp_mesh_device(tensor_model_parallel_size=tensor)
    return groups
