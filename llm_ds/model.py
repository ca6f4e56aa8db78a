"""GPT-2 from the run config: tokenizer, config, model, parameter groups and counts."""

from __future__ import annotations

import contextlib
import logging
import math
import zlib

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel
from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions
from transformers.models.gpt2.modeling_gpt2 import GPT2Model, GPT2PreTrainedModel

from llm_ds.config import ConfigError, ModelConfig
from llm_ds.loss import LMHead

logger = logging.getLogger(__name__)


def build_tokenizer(name_or_path: str):
    """``AutoTokenizer.from_pretrained`` for a local folder or a hub name, with a clear offline error."""
    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except OSError as exc:
        raise ConfigError(
            f"data.tokenizer={name_or_path!r} could not be loaded ({str(exc).splitlines()[0]}); "
            f"offline, point it at a local folder that holds tokenizer files"
        ) from None


def resolve_vocab_size(cfg: ModelConfig, tokenizer_size: int | None) -> int:
    """The embedding rows: ``model.vocab_size`` or the tokenizer's size, rounded up to ``vocab_multiple_of``."""
    if cfg.vocab_size is None and tokenizer_size is None:
        raise ConfigError("model.vocab_size is null and no tokenizer was given to take it from")
    if cfg.vocab_size is not None and tokenizer_size is not None and cfg.vocab_size < tokenizer_size:
        raise ConfigError(f"model.vocab_size={cfg.vocab_size} is smaller than the tokenizer's {tokenizer_size} tokens")
    size = cfg.vocab_size if cfg.vocab_size is not None else tokenizer_size
    m = cfg.vocab_multiple_of
    return -(-size // m) * m


def build_gpt2_config(cfg: ModelConfig, vocab_size: int, eos_token_id: int | None = None) -> GPT2Config:
    """A ``GPT2Config`` with SDPA attention; dropout everywhere set from ``model.dropout``."""
    return GPT2Config(
        vocab_size=vocab_size,
        n_positions=cfg.n_positions,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        use_cache=False,
        attn_implementation="sdpa",
        activation_function=cfg.activation_function,
    )


class GPT2FusedLoss(GPT2LMHeadModel):
    """``GPT2LMHeadModel`` whose loss never holds the whole (tokens x vocab) logits.

    The same parameters and state-dict keys; without ``labels`` it returns the usual logits. With
    ``labels`` the output head computes the loss chunk by chunk (``llm_ds.loss``) and no logits
    are returned.
    """

    def __init__(self, config: GPT2Config):
        GPT2PreTrainedModel.__init__(self, config)  # GPT2LMHeadModel's own __init__, with our head
        self.transformer = GPT2Model(config)
        self.lm_head = LMHead(config.n_embd, config.vocab_size)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        if labels is None:
            return super().forward(input_ids, attention_mask=attention_mask, **kwargs)
        hidden = self.transformer(input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        return CausalLMOutputWithCrossAttentions(loss=self.lm_head(hidden, labels=labels))  # hidden: (B, T, d)


def build_model(cfg: ModelConfig, vocab_size: int, eos_token_id: int | None = None, seed: int = 0) -> torch.nn.Module:
    """A causal LM: ``model.init_from`` (a local path or hub name) or a fresh GPT-2 from the config.

    A fresh model's weights depend only on ``seed`` (see ``init_gpt2_weights``), the same on every rank.
    GPT-2 models get the fused loss (``GPT2FusedLoss``) unless ``model.fused_loss`` is false.
    """
    gpt2_class = GPT2FusedLoss if cfg.fused_loss else GPT2LMHeadModel
    if cfg.init_from:
        try:
            is_gpt2 = AutoConfig.from_pretrained(cfg.init_from).model_type == "gpt2"
            model_class = gpt2_class if is_gpt2 else AutoModelForCausalLM
            model = model_class.from_pretrained(cfg.init_from, attn_implementation="sdpa")
        except OSError as exc:
            raise ConfigError(
                f"model.init_from={cfg.init_from!r} could not be loaded ({str(exc).splitlines()[0]})"
            ) from None
        logger.info(
            "model.init_from=%s: the model's own config is used; the model section's shape is ignored", cfg.init_from
        )
        if cfg.fused_loss and not is_gpt2:
            logger.info("model.fused_loss applies to GPT-2 models; %s keeps transformers' loss", type(model).__name__)
        if model.get_input_embeddings().num_embeddings < vocab_size:
            model.resize_token_embeddings(vocab_size)
    else:
        model = gpt2_class(build_gpt2_config(cfg, vocab_size, eos_token_id))
        init_gpt2_weights(model, seed, cfg.n_layer)
    if isinstance(model.get_output_embeddings(), LMHead):
        model.get_output_embeddings().chunk_tokens = cfg.loss_chunk_tokens
    # GPT2LMHeadModel's class name does not tell transformers which loss it uses: say it.
    model.loss_type = "ForCausalLM"
    if cfg.activation_checkpointing:
        model.gradient_checkpointing_enable()
    return model


def init_gpt2_weights(model: torch.nn.Module, seed: int, n_layer: int, std: float = 0.02, prefix: str = "") -> None:
    """GPT-2's initialisation, drawn per parameter from a generator seeded by (seed, name).

    Weights depend only on the seed and the parameter's name, not on construction order, so a
    model built under ``deepspeed.zero.Init`` (ZeRO-3, partitioned as it is built) starts from
    exactly the weights of a model built whole: every ZeRO stage and world size trains the same
    model. Matrices ~ N(0, std), residual projections ~ N(0, std / sqrt(2 * n_layer)) (GPT-2
    paper), biases 0, LayerNorm gains 1.

    Values are drawn in fp32 on the CPU with ``torch.normal``, which ``zero.Init`` leaves alone: it
    replaces ``torch.randn``, ``torch.empty`` and the other constructors with versions that put the
    tensor on the accelerator (where a CPU generator cannot draw it) and cast it to the engine's
    16-bit dtype before our scaling. Each value is rounded to the parameter's dtype once, as the
    engine rounds a whole model's fp32 weights. ``prefix`` names a part of GPT-2 by its place in the whole
    (``transformer.h.3.``), so that each pipeline stage draws the weights the whole model has.
    """
    for name, param in model.named_parameters(prefix=prefix.rstrip(".")):
        gen = torch.Generator(device="cpu").manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (1 << 63))
        shape = tuple(param.ds_shape) if hasattr(param, "ds_shape") else tuple(param.shape)
        scale = std / math.sqrt(2 * n_layer) if name.endswith("c_proj.weight") else std
        is_matrix = len(shape) >= 2
        if is_matrix:
            value = torch.normal(0.0, 1.0, shape, generator=gen, dtype=torch.float32, device="cpu").mul_(scale)
        with _gathered(param):
            if not param.numel():  # under ZeRO-3 only the modifier rank holds the full tensor here
                continue
            if is_matrix:
                param.data.copy_(value)
            elif name.endswith(".bias"):
                param.data.zero_()
            else:  # LayerNorm gain
                param.data.fill_(1.0)


def _gathered(param: torch.nn.Parameter):
    """Gather a ZeRO-3 partitioned parameter for rank 0 to modify and re-partition; no-op otherwise."""
    if hasattr(param, "ds_id"):
        import deepspeed

        return deepspeed.zero.GatheredParameters([param], modifier_rank=0)
    return contextlib.nullcontext()


def count_parameters(model: torch.nn.Module) -> int:
    """Unique parameters (the tied input/output embedding counted once), as the seed prints them.

    Works on ZeRO-3 partitioned models too, whose local tensors are empty (``ds_numel`` is the full size).
    """
    return sum(getattr(p, "ds_numel", p.numel()) for p in {id(p): p for p in model.parameters()}.values())


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (linear and embedding weights), none on biases and LayerNorm gains.

    Decided by the full shape, also for ZeRO-3 parameters, whose local tensors are flat partitions.
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            ndim = len(p.ds_shape) if hasattr(p, "ds_shape") else p.dim()  # ZeRO-3 partitions are 1-D
            (decay if ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def describe_model(model: torch.nn.Module) -> str:
    """Its parameter count and shape, for the console: GPT-2's layers, width, heads and vocabulary where the
    model has a transformers config, else its class."""
    n = f"{count_parameters(model):,}"
    mc = getattr(model, "config", None)
    layers = getattr(mc, "n_layer", None) or getattr(mc, "num_hidden_layers", None)
    width = getattr(mc, "n_embd", None) or getattr(mc, "hidden_size", None)
    heads = getattr(mc, "n_head", None) or getattr(mc, "num_attention_heads", None)
    if not (layers and width and heads):
        return f"{n} ({type(model).__name__})"
    return f"{n} ({layers} layers, {width} wide, {heads} heads, vocab {mc.vocab_size})"
