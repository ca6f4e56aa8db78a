"""Next-token cross-entropy fused with the output projection, a chunk of positions at a time.

The usual loss computes ``logits = hidden @ weight.T`` for every position at once: a (tokens, vocab)
tensor, upcast to fp32 and kept for the backward pass. For GPT-2 (vocab 50,257) that is the largest
tensor of a step: at sequence 1024 it takes ~0.5 GB per sequence against ~0.3 GB for all the
activations of the 12 layers. Here the logits of ``chunk_tokens`` positions exist at a time: each
chunk's loss and its gradients with respect to the hidden states and the weight are computed in the
forward pass (as Liger-Kernel's fused linear cross-entropy does), and backward only scales them.
The matmuls are the ones the usual loss does (one forward, two backward), so no FLOP is added.
In fp16, whose loss scale reaches the loss only in backward, each chunk is recomputed in
backward instead (see ``linear_cross_entropy``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from llm_ds.config import IGNORE_INDEX, auto_chunk_tokens


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """Position t is scored against label t + 1; the last position of each row against nothing.

    Shifting the labels (not the hidden states) keeps the hidden states a view: no copy.
    """
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, T)


def _chunk_loss_and_grad(h, weight, t, scale):
    """One chunk: the sum of its losses and d(mean loss)/d(logits) in the model's dtype.

    Its (c, V) tensors are the fp32 logits, turned into their gradient in place, and the 16-bit
    copy of that gradient; they are freed on return, before the next chunk's are made.
    """
    scored = t != IGNORE_INDEX
    t = t.masked_fill(~scored, 0)
    logits = (h @ weight.T).float()  # (c, V)
    lse = torch.logsumexp(logits, dim=-1)  # (c,)
    loss_sum = ((lse - logits.gather(1, t[:, None]).squeeze(1)) * scored).sum()
    # d(mean loss)/d(logits) = (softmax - one_hot(target)) * scale, zero where not scored. The
    # scale goes into the exponent, exp(x - lse + log(scale)), saving a pass over the chunk;
    # log(0) = -inf makes the rows not scored exactly zero.
    row_scale = scored * scale  # (c,)
    grad = logits.sub_((lse - row_scale.log())[:, None]).exp_()
    grad[torch.arange(len(t), device=t.device), t] -= row_scale
    return loss_sum, grad.to(h.dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets``; gradients made in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_tokens):  # (N, d), (V, d), (N,)
        n_scored = (targets != IGNORE_INDEX).sum()
        scale = 1.0 / n_scored.clamp(min=1).float()  # transformers' mean over scored positions
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden)
        # Summed over chunks in fp32, then rounded once to the weight's dtype.
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for start in range(0, hidden.shape[0], chunk_tokens):
            h = hidden[start : start + chunk_tokens]  # (c, d)
            chunk_loss, grad = _chunk_loss_and_grad(h, weight, targets[start : start + chunk_tokens], scale)
            loss_sum += chunk_loss
            grad_hidden[start : start + chunk_tokens] = grad @ weight  # (c, d)
            if grad.dtype == grad_weight.dtype:
                grad_weight.addmm_(grad.T, h)  # (V, d), in place
            else:
                grad_weight += grad.T @ h  # a 16-bit product, summed in fp32
            del grad
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss_sum * scale

    @staticmethod
    def backward(ctx, grad_loss):
        # In fp32: a 16-bit 1/grad_accum_steps (1/3 -> 0.33398) would bias every gradient.
        grad_hidden, grad_weight = ctx.saved_tensors
        g = grad_loss.float()
        return (grad_hidden.float() * g).to(grad_hidden.dtype), (grad_weight * g).to(ctx.weight_dtype), None, None


def _chunk_loss_sum(h, weight, t):
    return F.cross_entropy((h @ weight.T).float(), t, reduction="sum")


def _chunked_loss(hidden, weight, targets, chunk_tokens, recompute: bool = False) -> torch.Tensor:
    """The same mean cross-entropy, a chunk at a time, through autograd.

    Without gradients (evaluation) no chunk outlives its loss. With ``recompute``, each chunk's
    logits are made again in backward instead of being kept: one more matmul of the head, and
    the gradient flows through autograd with the loss scale fp16 training applies to it.
    """
    loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_tokens):
        args = (hidden[start : start + chunk_tokens], weight, targets[start : start + chunk_tokens])
        if recompute:
            loss_sum = loss_sum + torch.utils.checkpoint.checkpoint(_chunk_loss_sum, *args, use_reentrant=False)
        else:
            loss_sum += _chunk_loss_sum(*args)
    return loss_sum / (targets != IGNORE_INDEX).sum().clamp(min=1)


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int | None = None
) -> torch.Tensor:
    """Mean next-token cross-entropy of the logits ``hidden @ weight.T``, never materialised whole.

    Args:
        hidden: the final hidden states, (B, T, d).
        weight: the output projection, (V, d) (GPT-2's is tied to the input embedding).
        labels: (B, T), unshifted, ``IGNORE_INDEX`` where a position is not scored; the
            prediction at t is scored against ``labels[:, t + 1]`` as in ``GPT2LMHeadModel``.
        chunk_tokens: positions per chunk; ``None`` takes ``auto_chunk_tokens(V)``.
    """
    chunk = chunk_tokens or auto_chunk_tokens(weight.shape[0])
    flat = hidden.reshape(-1, hidden.shape[-1])  # (B*T, d)
    targets = shifted_targets(labels).reshape(-1)  # (B*T,)
    if not (torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)):
        return _chunked_loss(flat, weight, targets, chunk)
    if hidden.dtype == torch.float16:
        # fp16 training scales the loss only in backward (dynamic loss scaling): gradients made in
        # forward, unscaled, would underflow fp16. Recompute each chunk in backward instead.
        return _chunked_loss(flat, weight, targets, chunk, recompute=True)
    return _LinearCrossEntropy.apply(flat, weight, targets, chunk)


class LMHead(torch.nn.Linear):
    """GPT-2's output projection; called with ``labels`` it returns the loss instead of the logits.

    The loss is computed inside the head's own forward so that ZeRO-3, which gathers a module's
    parameters around its forward and backward, gathers the (tied) weight for it as for the logits.
    """

    def __init__(self, in_features: int, out_features: int, chunk_tokens: int | None = None):
        super().__init__(in_features, out_features, bias=False)
        self.chunk_tokens = chunk_tokens

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is None:
            return super().forward(hidden)
        return linear_cross_entropy(hidden, self.weight, labels, self.chunk_tokens)
