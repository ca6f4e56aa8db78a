"""The library a user would otherwise pick: Hugging Face's ``Trainer`` on llm-ds's model, data and schedule.

The same model and weights (``build_model`` from the run config), the same packed blocks of the
same cache, the same per-device batch, AdamW (betas, eps, weight decay on all but biases and
LayerNorm gains), linear warm-up then linear decay to 0, gradient clipping, steps and seed. One
process, no DeepSpeed (``Trainer`` with a DeepSpeed config on CPU ranks miscounts the world size
and fails its batch assertion). Its own data order: a shuffled sampler seeded by ``seed``.

    python bench/hf_trainer.py [--set section.key=value ...] --out result.json

Tokens per second are timed as llm-ds times them: from the end of step 1 to the end of the last.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from llm_ds.config import load_run_config
from llm_ds.data.loader import build_loaders, collate
from llm_ds.model import build_model, build_tokenizer, resolve_vocab_size


class StepClock(TrainerCallback):
    def __init__(self):
        self.after_first: float | None = None
        self.last: float | None = None
        self.losses: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            self.after_first = time.perf_counter()
        self.last = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    cfg = load_run_config(args.config, args.overrides)
    t = cfg.train
    torch.manual_seed(t.seed)
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    loaders = build_loaders(cfg.data, tokenizer, t.micro_batch_size, 0, 1, 0, t.seed, t.eval_max_batches)
    model = build_model(cfg.model, resolve_vocab_size(cfg.model, len(tokenizer)), tokenizer.eos_token_id, t.seed)
    clock = StepClock()
    with tempfile.TemporaryDirectory(prefix="hf-trainer-") as out:
        training_args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=t.micro_batch_size,
            gradient_accumulation_steps=t.grad_accum_steps,
            max_steps=t.max_steps,
            learning_rate=t.lr,
            lr_scheduler_type="linear",
            warmup_steps=t.warmup_steps,
            weight_decay=t.weight_decay,
            adam_beta1=t.betas[0],
            adam_beta2=t.betas[1],
            adam_epsilon=t.eps,
            max_grad_norm=t.grad_clip,
            logging_steps=cfg.logging.log_interval,
            save_strategy="no",
            eval_strategy="no",
            report_to="none",
            seed=t.seed,
            use_cpu=not torch.cuda.is_available(),
            bf16=t.precision == "bf16",
            dataloader_num_workers=cfg.data.num_workers,
            disable_tqdm=True,
        )
        trainer = Trainer(
            model=model,
            args=training_args,
            train_dataset=loaders.train.loader.dataset,
            data_collator=collate,
            callbacks=[clock],
        )
        trainer.train()
    tokens_per_step = t.micro_batch_size * t.grad_accum_steps * cfg.data.block_size
    timed_s = clock.last - clock.after_first
    Path(args.out).write_text(
        json.dumps(
            {
                "tokens_per_s": (t.max_steps - 1) * tokens_per_step / timed_s,
                "final_loss": clock.losses[-1] if clock.losses else None,
            }
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
