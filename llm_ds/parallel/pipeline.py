"""GPT-2 as a DeepSpeed ``PipelineModule``: the layers in order, split into stages.

The token table is a tied layer: the first stage embeds with it, the last stage scores with it, and
DeepSpeed sums its two gradients over the tied group every step. The position table is a layer of its own
on the first stage (inside the tied layer, the last stage would carry a dead, unsynchronised copy). Each
layer draws the weights its part of the whole model draws (``init_gpt2_weights`` by name), so a pipeline
trains exactly the model one rank trains. The loss runs on the last stage: the fused one
(``linear_cross_entropy``, no logits held whole), or the logits' cross-entropy.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from transformers import GPT2Config

from llm_ds.config import IGNORE_INDEX
from llm_ds.loss import linear_cross_entropy

TIED_KEY = "wte"


class TokenEmbedding(torch.nn.Embedding):
    """GPT-2's token table (``transformer.wte``): embeds on the first stage, scores on the last."""

    def __init__(self, config: GPT2Config, seed: int):
        super().__init__(config.vocab_size, config.n_embd)
        _init(self, seed, config, "transformer.wte.")


class Positions(torch.nn.Module):
    """Adds GPT-2's learned positions (``transformer.wpe``) and the embedding dropout."""

    def __init__(self, config: GPT2Config, seed: int):
        super().__init__()
        self.wpe = torch.nn.Embedding(config.n_positions, config.n_embd)
        self.drop = torch.nn.Dropout(config.embd_pdrop)
        _init(self, seed, config, "transformer.")

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(hidden.shape[1], device=hidden.device)
        return self.drop(hidden + self.wpe(positions))


class Block(torch.nn.Module):
    """GPT-2's block ``i`` (``transformer.h.<i>``), causal, on hidden states alone."""

    def __init__(self, config: GPT2Config, seed: int, i: int):
        from transformers.models.gpt2.modeling_gpt2 import GPT2Block

        super().__init__()
        self.block = GPT2Block(config, layer_idx=i)
        _init(self.block, seed, config, f"transformer.h.{i}.")

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.block(hidden)
        return out[0] if isinstance(out, tuple) else out


class FinalNorm(torch.nn.LayerNorm):
    """GPT-2's last LayerNorm (``transformer.ln_f``)."""

    def __init__(self, config: GPT2Config, seed: int):
        super().__init__(config.n_embd, eps=config.layer_norm_epsilon)
        _init(self, seed, config, "transformer.ln_f.")


def _init(module: torch.nn.Module, seed: int, config: GPT2Config, prefix: str) -> None:
    from llm_ds.model import init_gpt2_weights

    init_gpt2_weights(module, seed, config.n_layer, prefix=prefix)


def _head(embedding: TokenEmbedding, hidden: torch.Tensor):
    """The last stage's use of the tied table: hand the loss the hidden states and the output weight."""
    return hidden, embedding.weight


class LossFn:
    """The loss of the last stage's output (hidden states, output weight) against the unshifted labels: the
    mean over scored targets, or inside ``summed()`` their sum (for evaluation weighted by targets)."""

    def __init__(self, fused: bool, chunk_tokens: int | None):
        self.fused, self.chunk_tokens, self.sum = fused, chunk_tokens, False

    @contextlib.contextmanager
    def summed(self):
        self.sum = True
        try:
            yield
        finally:
            self.sum = False

    def __call__(self, outputs, labels: torch.Tensor) -> torch.Tensor:
        hidden, weight = outputs
        if self.fused:
            loss = linear_cross_entropy(hidden, weight, labels, self.chunk_tokens)
        else:
            logits = (hidden @ weight.t())[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
            )
        return loss * (labels[:, 1:] != IGNORE_INDEX).sum() if self.sum else loss


def hf_name(name: str, n_layer: int) -> str:
    """GPT-2's (Hugging Face's) name for a parameter of the pipeline: ``PipelineModule`` registers layer ``i``
    (see ``gpt2_layers``) as ``<i>``, the tied table as ``tied_modules.wte``."""
    head, _, rest = name.partition(".")
    if head == "tied_modules":
        return f"transformer.{rest}"
    layer = int(head)
    if layer == 1:
        return f"transformer.{rest}"
    if 2 <= layer < n_layer + 2:
        return f"transformer.h.{layer - 2}.{rest.removeprefix('block.')}"
    if layer == n_layer + 2:
        return f"transformer.ln_f.{rest}"
    return f"transformer.wte.{rest}"  # layer 0, the token table (also its tied use as the head)


def load_gpt2_weights(module, state_dict: dict) -> None:
    """Copy a GPT-2's weights (Hugging Face names) into this stage's layers."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            param.copy_(state_dict[hf_name(name, module.config.n_layer)])


def gpt2_layers(config: GPT2Config, seed: int) -> list:
    """The layer specs: token table (tied), positions, the blocks, the final LayerNorm, the tied head."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    return [
        TiedLayerSpec(TIED_KEY, TokenEmbedding, config, seed),
        LayerSpec(Positions, config, seed),
        *[LayerSpec(Block, config, seed, i) for i in range(config.n_layer)],
        LayerSpec(FinalNorm, config, seed),
        TiedLayerSpec(TIED_KEY, TokenEmbedding, config, seed, forward_fn=_head),
    ]


def build_pipeline(
    config: GPT2Config,
    stages: int,
    seed: int,
    fused_loss: bool = True,
    chunk_tokens: int | None = None,
    activation_checkpointing: bool = False,
    seq: int | None = None,
):
    """GPT-2 over ``stages`` pipeline stages, the blocks shared out by compute (``stage_blocks``: the last
    stage, which also runs the head and the loss at sequence length ``seq``, takes fewer); each rank builds
    only its own stage's layers. ``.config`` is the GPT-2 config, as on a transformers model."""
    from llm_ds.parallel.layout import head_blocks, stage_blocks

    head = head_blocks(config.vocab_size, config.n_embd, seq or config.n_positions)
    blocks = stage_blocks(config.n_layer, stages, head)
    module = _GPT2Pipeline(
        blocks,
        layers=gpt2_layers(config, seed),
        num_stages=stages,
        loss_fn=LossFn(fused_loss, chunk_tokens),
        activation_checkpoint_interval=1 if activation_checkpointing else 0,
        checkpointable_layers=["Block"],  # recompute blocks; the embedding's input is token ids
    )
    module.config = config
    count_once_in_the_norm(module)
    # DeepSpeed's pipeline engine runs in-place broadcasts (its transfers between stages over gloo, the tied
    # table's synchronisation) on tensors that a backward pass later reaches, and torch warns that no autograd
    # kernel is registered for them, "silently incorrect" perhaps. The gradients are right: a pipeline's losses
    # equal one rank's at every step (tests/dist/test_model_parallel.py), so the warning is not shown.
    warnings.filterwarnings("ignore", message="c10d::broadcast_: an autograd kernel was not registered")
    return module


def _pipeline_module_class():
    from deepspeed.pipe import PipelineModule

    class GPT2Pipeline(PipelineModule):
        """A ``PipelineModule`` whose stages take the given numbers of blocks (tables with the first stage,
        the final LayerNorm and the head with the last)."""

        def __init__(self, blocks: list[int], **kwargs):
            self.stage_blocks = blocks  # read by _partition_layers, during PipelineModule.__init__
            super().__init__(**kwargs)

        def _partition_layers(self, method="uniform"):
            starts = [0]
            for n in self.stage_blocks[:-1]:
                starts.append((starts[-1] or 2) + n)  # layers 0 and 1 (tables) go with the first stage's blocks
            self.parts = [*starts, len(self._layer_specs)]
            stage = self._topo.get_coord(self.global_rank).pipe
            self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])

    return GPT2Pipeline


def _GPT2Pipeline(blocks: list[int], **kwargs):
    return _pipeline_module_class()(blocks, **kwargs)


def count_once_in_the_norm(module) -> None:
    """Make DeepSpeed's gradient clipping without ZeRO (``clip_grad_norm_``) count every parameter of the model
    once. It sums per-stage norms over the pipeline, but on stages after the first counts only parameters
    marked ``model_parallel``: the later stages' gradients were left out of the global norm (and each stage
    clipped by a norm of the first stage's parameters alone). Every parameter a stage owns is marked; the
    last stage's copy of the tied table (``ds_pipe_replicated``) is not, so it is counted once, on the first.
    ZeRO's own norm is unaffected: it decides by tensor-parallel rank, 0 on every stage here."""
    for param in module.parameters():
        if not getattr(param, "ds_pipe_replicated", False):
            param.model_parallel = True
