"""What a plan writes: the DeepSpeed template for a candidate, the table and breakdown shown."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llm_ds.plan.shapes import DEFAULT_BUCKET, Estimate, fmt_bytes


def ds_config_for(est: Estimate, template: dict[str, Any], nvme_path: str = "auto") -> dict[str, Any]:
    """A DeepSpeed template for the chosen candidate: the run-config-owned values stay "auto"."""
    c = est.candidate
    ds = json.loads(json.dumps(template))
    zero = {k: v for k, v in (ds.get("zero_optimization") or {}).items() if not k.startswith("offload_")}
    zero["stage"] = c.stage
    if c.stage == 3:
        zero.setdefault("stage3_prefetch_bucket_size", DEFAULT_BUCKET)
        zero.setdefault("stage3_param_persistence_threshold", 100000)
        zero.setdefault("stage3_gather_16bit_weights_on_model_save", True)
    else:
        for k in list(zero):
            if k.startswith("stage3_"):
                del zero[k]
    for key, where in (("offload_optimizer", c.offload_optimizer), ("offload_param", c.offload_param)):
        if where == "cpu":
            zero[key] = {"device": "cpu", "pin_memory": True}
        elif where == "nvme":
            zero[key] = {"device": "nvme", "nvme_path": nvme_path, "pin_memory": True}
    ds["zero_optimization"] = zero
    opt = ds.get("optimizer", {}).get("params", {})
    if c.offload_optimizer != "none":
        for key in ("torch_adam", "fused", "foreach"):  # offload needs DeepSpeed's CPUAdam, which takes none
            opt.pop(key, None)
    if "nvme" in (c.offload_optimizer, c.offload_param):
        ds.setdefault("aio", {"block_size": 1048576, "queue_depth": 8, "single_submit": False, "overlap_events": True})
    return ds


def table(estimates: list[Estimate], limit: int | None = None) -> str:
    head = (
        f"{'candidate':<30}{'micro':>6}{'accum':>6}{'device':>11}{'margin':>8}{'host/node':>11}{'nvme/node':>11}"
        f"{'step s':>9}  fits"
    )
    rows = [head, "-" * len(head)]
    for e in estimates[:limit]:
        c = e.candidate
        rows.append(
            f"{c.label():<30}{c.micro_batch:>6}{e.grad_accum:>6}{fmt_bytes(e.device_total):>11}"
            f"{e.margin.get('device', 0):>8.0%}{fmt_bytes(e.host_per_node):>11}"
            f"{(fmt_bytes(e.nvme_per_node) if e.nvme_per_node else '-'):>11}{e.step_s:>9.3f}  "
            f"{'yes' if e.fits else 'no: ' + '; '.join(e.limits)}"
        )
    return "\n".join(rows)


def breakdown(e: Estimate) -> str:
    parts = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in {**e.device, "framework": e.framework}.items())
    steps = ", ".join(f"{k} {v:.3f} s" for k, v in e.step_parts.items())
    return f"per device: {parts}\nstep: {steps}"


def write_plan(path: Path, ds: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(ds, indent=2) + "\n")
    tmp.replace(path)
