"""The baseline llm-ds is measured against: a plain PyTorch loop, the seed chapter's LLMTrainer done right.

Same model, weights, data order, optimiser and schedule as llm-ds with a run config: AdamW with
decay on matrices only, linear warm-up then linear decay (DeepSpeed's WarmupDecayLR), global
gradient-norm clipping, ``model(**batch)`` with labels equal to the inputs (the model shifts
them), no host sync except at log points. One process, no DeepSpeed. The loss is transformers'
own (``model.fused_loss=false`` unless a ``--set`` says otherwise): llm-ds's fused loss is not
what a plain loop has.

    python bench/plain_loop.py --config RUN.yaml [--set section.key=value ...] --out result.json

On a GPU it does what a careful user would: bf16 autocast (``train.precision``), torch's fused
AdamW, pinned host batches copied without blocking, and ``--compile`` for ``torch.compile``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from llm_ds.config import load_run_config
from llm_ds.data.loader import build_loaders
from llm_ds.model import build_model, build_tokenizer, param_groups, resolve_vocab_size


def warmup_decay(step: int, warmup: int, total: int, min_lr: float, max_lr: float) -> float:
    """DeepSpeed's WarmupDecayLR with linear warm-up, as a function of the optimizer step (0-based)."""
    if step < warmup:
        return min_lr + (max_lr - min_lr) * step / max(1, warmup)
    return max_lr * max(0.0, (total - step) / max(1.0, total - warmup))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", required=True)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    args = parser.parse_args()
    launched = time.perf_counter()
    cfg = load_run_config(args.config, ["model.fused_loss=false", *args.overrides])
    t = cfg.train
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    precision = (
        t.precision if t.precision != "auto" else ("bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32")
    )
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    torch.manual_seed(t.seed)
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    loaders = build_loaders(
        cfg.data, tokenizer, t.micro_batch_size, 0, 1, 0, t.seed, t.eval_max_batches, pin_memory=cuda
    )
    model = build_model(cfg.model, resolve_vocab_size(cfg.model, len(tokenizer)), tokenizer.eos_token_id, t.seed)
    model.to(device).train()
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(
        param_groups(model, t.weight_decay),
        lr=t.lr,
        betas=tuple(t.betas),
        eps=t.eps,
        **({"fused": True} if cuda else {}),
    )
    forward = torch.compile(model) if args.compile else model
    batches = iter(loaders.train)
    tokens_per_step = t.micro_batch_size * t.grad_accum_steps * cfg.data.block_size
    losses, start, first_step_s = [], None, None
    intervals, mark = [], None  # tokens/s over each log interval: (last step, tokens/s)
    for step in range(t.max_steps):
        if step == 1:
            if cuda:
                torch.cuda.synchronize()
            first_step_s = time.perf_counter() - launched
            start = mark = time.perf_counter()  # the first step carries one-off warm-up costs, as in llm-ds
        for group in optimizer.param_groups:
            group["lr"] = warmup_decay(step, t.warmup_steps, t.max_steps, t.min_lr, t.lr)
        loss_sum = torch.zeros((), device=device)
        for _ in range(t.grad_accum_steps):
            batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                loss = forward(**batch).loss / t.grad_accum_steps
            loss.backward()
            loss_sum += loss.detach()
        if t.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step == 0 or (step + 1) % cfg.logging.log_interval == 0:
            losses.append((step + 1, loss_sum.item()))  # .item() waits for the device, as llm-ds's log points do
            if mark is not None:
                now = time.perf_counter()
                done = step + 1 - max(1, step + 1 - cfg.logging.log_interval)
                intervals.append((step + 1, done * tokens_per_step / (now - mark)))
                mark = now
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    result = {
        "steps": t.max_steps,
        "parameters": n_params,
        "precision": precision,
        "compiled": args.compile,
        "seconds_to_first_step": first_step_s,
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "tokens_per_s": (t.max_steps - 1) * tokens_per_step / elapsed,
        "interval_tokens_per_s": intervals,
        "losses": losses,
        "final_loss": losses[-1][1],
        "finite": all(math.isfinite(x) for _, x in losses),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
