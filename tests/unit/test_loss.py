"""The fused, chunked loss against transformers' own: the same loss and gradients, less memory."""

import pytest
import torch
import torch.nn.functional as F

from llm_ds.config import ModelConfig, auto_chunk_tokens
from llm_ds.data.loader import collate
from llm_ds.loss import LMHead, linear_cross_entropy
from llm_ds.model import GPT2FusedLoss, build_model

VOCAB = 96


def model_pair(dtype=torch.float32):
    """The same tiny GPT-2 with transformers' loss and with the fused one."""
    cfg = ModelConfig(n_layer=2, n_embd=32, n_head=4, n_positions=32, vocab_multiple_of=1)
    plain = build_model(ModelConfig(**{**cfg.__dict__, "fused_loss": False}), VOCAB, eos_token_id=0, seed=7)
    fused = build_model(cfg, VOCAB, eos_token_id=0, seed=7)
    assert type(plain).__name__ == "GPT2LMHeadModel" and isinstance(fused, GPT2FusedLoss)
    return plain.to(dtype), fused.to(dtype)


def padded_batch():
    """Three rows of unequal length, padded like ``data.packing: false``: pads are not scored."""
    gen = torch.Generator().manual_seed(0)
    samples = []
    for n in (20, 11, 17):
        ids = torch.zeros(20, dtype=torch.long)
        ids[:n] = torch.randint(1, VOCAB, (n,), generator=gen)
        mask = (torch.arange(20) < n).long()
        samples.append({"input_ids": ids, "attention_mask": mask})
    return collate(samples)


def loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("chunk_tokens", [None, 1, 7, 60, 1000])
def test_same_loss_and_gradients_as_transformers(chunk_tokens):
    plain, fused = model_pair()
    fused.lm_head.chunk_tokens = chunk_tokens
    batch = padded_batch()
    assert (batch["labels"] == -100).sum() == 12  # the pads are there to be ignored
    loss_a, grads_a = loss_and_grads(plain, batch)
    loss_b, grads_b = loss_and_grads(fused, batch)
    assert loss_b == pytest.approx(loss_a.item(), rel=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    # The tied output weight's gradient holds both uses: the embedding's and the head's.
    assert grads_b["transformer.wte.weight"] is not None and fused.lm_head.weight is fused.transformer.wte.weight


def test_bf16_within_rounding_of_transformers():
    plain, fused = model_pair(torch.bfloat16)
    fused.lm_head.chunk_tokens = 16
    batch = padded_batch()
    loss_a, grads_a = loss_and_grads(plain, batch)
    loss_b, grads_b = loss_and_grads(fused, batch)
    assert loss_b == pytest.approx(loss_a.item(), rel=1e-2)
    for name, grad in grads_a.items():
        scale = grad.float().abs().max().item()
        assert (grads_b[name].float() - grad.float()).abs().max().item() <= 0.02 * scale, name


def test_without_gradients_and_without_labels():
    plain, fused = model_pair()
    batch = padded_batch()
    with torch.no_grad():
        assert fused(**batch).loss == pytest.approx(plain(**batch).loss.item(), rel=1e-6)
    ids = batch["input_ids"]
    assert torch.equal(fused(input_ids=ids).logits, plain(input_ids=ids).logits)  # generation is unchanged


def saved_bytes(fn) -> int:
    """Bytes of the tensors autograd keeps from ``fn()`` for the backward pass."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def test_keeps_no_logits_for_backward():
    n, d, vocab = 512, 16, 4096
    hidden = torch.randn(1, n, d, requires_grad=True)
    weight = torch.randn(vocab, d, requires_grad=True)
    labels = torch.randint(0, vocab, (1, n))

    def usual():
        logits = F.linear(hidden, weight).float()
        return F.cross_entropy(logits[0, :-1], labels[0, 1:])

    kept_usual = saved_bytes(usual)
    kept_fused = saved_bytes(lambda: linear_cross_entropy(hidden, weight, labels, chunk_tokens=64))
    assert kept_usual >= n * vocab * 4  # the whole fp32 logits (log-softmax) wait for backward
    assert kept_fused <= 4 * (n * d + vocab * d)  # the two gradients, nothing vocab-by-tokens


def test_chunk_size_from_the_vocabulary():
    assert auto_chunk_tokens(50304) == 1334  # GPT-2's padded vocabulary: 256 MiB of fp32 logits
    assert auto_chunk_tokens(8192) == 8192
    assert auto_chunk_tokens(2**40) == 1


def test_init_from_keeps_the_fused_head(tmp_path):
    _, fused = model_pair()
    fused.save_pretrained(tmp_path / "pretrained")
    cfg = ModelConfig(init_from=str(tmp_path / "pretrained"), loss_chunk_tokens=5)
    grown = build_model(cfg, VOCAB + 10)  # resized to a larger tokenizer: the head stays ours
    assert isinstance(grown.lm_head, LMHead) and grown.lm_head.chunk_tokens == 5
    assert grown.lm_head.weight is grown.transformer.wte.weight
    batch = padded_batch()
    assert torch.isfinite(grown(**batch).loss)


def test_init_from_another_architecture_keeps_its_own_loss(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    model = build_model(ModelConfig(init_from=str(tmp_path / "llama")), VOCAB)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert torch.isfinite(model(**padded_batch()).loss)


def test_accumulation_scale_applied_in_fp32():
    """DeepSpeed divides the loss by grad_accum_steps; 1/3 in bf16 is 0.33398: no such bias here."""
    _, fused = model_pair(torch.bfloat16)
    batch = padded_batch()
    _, whole = loss_and_grads(fused, batch)
    fused.zero_grad()
    (fused(**batch).loss / 3).backward()
    third = fused.lm_head.weight.grad.float() * 3
    full = whole["transformer.wte.weight"].float()  # the tied weight: embedding and head
    ratio = third[full != 0] / full[full != 0]
    assert ratio.numel() > 1000 and ratio.median().item() == pytest.approx(1.0, abs=5e-4)


def test_fp16_recomputes_chunks_under_a_loss_scale():
    """fp16 scales the loss in backward only: the chunks' gradients must be made after that."""
    n, d, vocab, scale = 2048, 32, 512, 2.0**16
    gen = torch.Generator().manual_seed(1)
    hidden = (torch.randn(1, n, d, generator=gen)).half().requires_grad_()
    weight = (torch.randn(vocab, d, generator=gen) * 0.02).half().requires_grad_()
    labels = torch.randint(0, vocab, (1, n), generator=gen)

    def usual():
        logits = F.linear(hidden, weight).float()
        return F.cross_entropy(logits[0, :-1], labels[0, 1:])

    expected = torch.autograd.grad(usual() * scale, (hidden, weight))
    loss = linear_cross_entropy(hidden, weight, labels, chunk_tokens=300)
    assert loss.item() == pytest.approx(usual().item(), rel=1e-3)
    got = torch.autograd.grad(loss * scale, (hidden, weight))
    for a, b in zip(got, expected, strict=True):
        assert torch.isfinite(a).all() and (a != 0).float().mean() > 0.9  # nothing underflowed to zero
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2 * b.float().abs().max().item())
    assert saved_bytes(lambda: linear_cross_entropy(hidden, weight, labels, chunk_tokens=300)) < n * vocab * 2
