"""On a CUDA machine: the fused loss against transformers' in bf16 and fp16, and its memory."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llm_ds.loss import linear_cross_entropy, shifted_targets

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
GPT2 = {"d": 768, "vocab": 50304}


def usual_loss(hidden, weight, labels):
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits.reshape(-1, weight.shape[0]), shifted_targets(labels).reshape(-1))


def inputs(dtype, batch=4, seq=1024):
    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(batch, seq, GPT2["d"], device="cuda", generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(GPT2["vocab"], GPT2["d"], device="cuda", generator=gen) * 0.02).to(dtype).requires_grad_()
    labels = torch.randint(0, GPT2["vocab"], (batch, seq), device="cuda", generator=gen)
    return hidden, weight, labels


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_transformers_loss(dtype):
    hidden, weight, labels = inputs(dtype)
    scale = 1024.0 if dtype == torch.float16 else 1.0  # a loss scale, as fp16 training applies
    expected_loss = usual_loss(hidden, weight, labels)
    expected = torch.autograd.grad(expected_loss * scale, (hidden, weight))
    loss = linear_cross_entropy(hidden, weight, labels)
    got = torch.autograd.grad(loss * scale, (hidden, weight))
    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-3)
    for a, b in zip(got, expected, strict=True):
        assert torch.isfinite(a).all()
        err = (a.float() - b.float()).abs().max().item()
        assert err <= 0.02 * b.float().abs().max().item()


def test_peak_memory_is_a_chunk_not_the_logits():
    hidden, weight, labels = inputs(torch.bfloat16, batch=16)

    def peak(fn) -> int:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    usual = peak(lambda: usual_loss(hidden, weight, labels))
    fused = peak(lambda: linear_cross_entropy(hidden, weight, labels))
    logits_fp32 = 16 * 1024 * GPT2["vocab"] * 4
    assert usual >= logits_fp32  # transformers' loss holds the fp32 logits (3.3 GB here)
    assert fused < logits_fp32 / 3
