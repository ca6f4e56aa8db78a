#!/usr/bin/env python3
"""The image's last build step: fail unless DeepSpeed's ops are prebuilt for the nodes' accelerator.

    llm-ds-check-ops cuda ds_configs

DS_BUILD_X=1 skips an op that cannot build without failing the install, and ds_report does not fail
either; DeepSpeed ignores ops prebuilt for another accelerator and JIT-compiles them at every start.
This reads what the install recorded (``deepspeed.git_version_info``) and the ops the shipped
DeepSpeed configs need: fused_adam for an optimizer on the device, cpu_adam for an optimizer
offloaded to CPU or NVMe, async_io for NVMe offload.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

OFFLOADS = ("offload_optimizer", "offload_param")


def ops_needed(config: dict) -> set[str]:
    zero = config.get("zero_optimization", {})
    devices = {section: zero.get(section, {}).get("device", "none") for section in OFFLOADS}
    ops = set()
    if "optimizer" in config:
        ops.add("cpu_adam" if devices["offload_optimizer"] in ("cpu", "nvme") else "fused_adam")
    if "nvme" in devices.values():
        ops.add("async_io")
    return ops


def main(accelerator: str, configs_dir: str) -> int:
    from deepspeed.git_version_info import accelerator_name, installed_ops

    needed = {}
    for path in sorted(Path(configs_dir).glob("*.json")):
        for op in ops_needed(json.loads(path.read_text())):
            needed.setdefault(op, []).append(path.name)
    problems = []
    if accelerator_name != accelerator:
        problems.append(f"DeepSpeed's ops were built for the {accelerator_name!r} accelerator, not {accelerator!r}")
    for op, users in sorted(needed.items()):
        if not installed_ops.get(op):
            problems.append(f"op {op} (used by {', '.join(users)}) is not prebuilt")
    for problem in problems:
        print(f"check-ops: {problem}", file=sys.stderr)
    if not problems:
        print(f"check-ops: {', '.join(sorted(needed))} prebuilt for {accelerator}")
    return 1 if problems else 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: llm-ds-check-ops ACCELERATOR DS_CONFIGS_DIR")
    sys.exit(main(sys.argv[1], sys.argv[2]))
