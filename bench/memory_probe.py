"""One rank's memory under a real llm-ds DeepSpeed engine; run by bench_memory.py under `deepspeed`.

    deepspeed --num_gpus 2 bench/memory_probe.py --ds_config DS.json [--set ...] --out DIR

Builds the engine exactly as the driver does (llm_ds.Trainer), trains a few steps and
writes DIR/rank<r>.json with:

- model_state_bytes: the most bytes held by live tensors (parameters, gradients, optimizer states,
  DeepSpeed's flat buffers and partitions) in the last step, taken after backward and again as the
  optimizer steps (when DeepSpeed has made its fp32 gradients), each storage counted once.
  Allocated bytes, as a GPU's allocator would hold them, whether touched or not.
- peak_rss_growth_bytes: the process's peak resident set from just before the model was built
  (Linux VmHWM, reset there) minus its resident set at that point: everything the run added;
  peak_allocated_growth_bytes: the same less the library pages that training first touched
  (RssFile's growth after the engine was built), i.e. the memory the run allocated.
"""

from __future__ import annotations

import argparse
import gc
import json
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from llm_ds import Trainer, load_run_config
from llm_ds.distributed import teardown
from llm_ds.monitor.metrics import peak_rss_bytes, proc_status_bytes
from llm_ds.train import exit_process


def live_tensor_bytes() -> int:
    """Bytes of every distinct storage that a live tensor holds."""
    gc.collect()
    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and not obj.is_meta:
                storage = obj.untyped_storage()
                seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        except Exception:  # a tensor subclass without storage
            continue
    return sum(seen.values())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ds_config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int)  # passed by the deepspeed runner
    args = parser.parse_args()
    cfg = load_run_config(None, args.overrides)
    trainer = Trainer(cfg, args.ds_config)
    file_pages_after_build = proc_status_bytes("RssFile")
    engine, rank = trainer.engine, trainer.rank
    batches = iter(trainer.train_loader)
    states = 0
    last_step = False

    def at_optimizer_step(optimizer, args, kwargs):
        nonlocal states
        if last_step:
            states = max(states, live_tensor_bytes())

    register_optimizer_step_pre_hook(at_optimizer_step)
    for step in range(cfg.train.max_steps):
        for _ in range(cfg.train.grad_accum_steps):
            batch = {k: v.to(engine.device) for k, v in next(batches).items()}
            loss = engine(**batch).loss
            engine.backward(loss)
            del loss, batch
            last_step = step == cfg.train.max_steps - 1
            if last_step:
                states = max(states, live_tensor_bytes())
            engine.step()
    result = {
        "rank": rank,
        "parameters": trainer.n_params,
        "model_state_bytes": states,
        "peak_rss_growth_bytes": peak_rss_bytes() - trainer.metrics.rss_before_model,
        # Library code first run in training (backward, optimizer, collectives) is mapped from files
        # into the resident set too; it is not memory the run allocated.
        "file_pages_growth_bytes": proc_status_bytes("RssFile") - file_pages_after_build,
    }
    result["peak_allocated_growth_bytes"] = result["peak_rss_growth_bytes"] - result["file_pages_growth_bytes"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(result) + "\n")
    teardown()
    exit_process(0)  # as the driver does: no interpreter teardown to abort a finished run


if __name__ == "__main__":
    main()
