"""Catch a mistyped top-level key in a DeepSpeed config, which DeepSpeed itself silently ignores.

DeepSpeed has no single list of its config keys (they live in constants, pydantic models and
literal lookups across the package), so the vocabulary is read from the installed DeepSpeed's
source with ``ast``, without importing it (no torch), and cached per DeepSpeed version. A
top-level key that appears nowhere in that source is not a key DeepSpeed reads: refused, with
the closest common key. The check is permissive by design: it never refuses a key DeepSpeed
knows.
"""

from __future__ import annotations

import ast
import difflib
import importlib.metadata
import importlib.util
import json
import os
import re
from functools import lru_cache
from pathlib import Path

# The keys people use, for the "did you mean" hint (the vocabulary itself is much larger).
COMMON_TOP_LEVEL = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "optimizer",
    "scheduler",
    "fp16",
    "bf16",
    "amp",
    "torch_autocast",
    "gradient_clipping",
    "prescale_gradients",
    "gradient_predivide_factor",
    "sparse_gradients",
    "zero_optimization",
    "zero_allow_untested_optimizer",
    "zero_force_ds_cpu_optimizer",
    "activation_checkpointing",
    "flops_profiler",
    "steps_per_print",
    "wall_clock_breakdown",
    "memory_breakdown",
    "dump_state",
    "tensorboard",
    "wandb",
    "csv_monitor",
    "comet",
    "comms_logger",
    "aio",
    "autotuning",
    "elasticity",
    "data_efficiency",
    "curriculum_learning",
    "data_types",
    "communication_data_type",
    "checkpoint",
    "compile",
    "pipeline",
    "hybrid_engine",
    "weight_quantization",
    "compression_training",
    "sequence_parallel_size",
)
_IDENT = re.compile(r"^[a-z][a-z0-9_]*$")


class DSConfigError(ValueError):
    """A DeepSpeed config key that DeepSpeed would silently ignore."""


def _cache_file(version: str) -> Path:
    root = Path(os.environ.get("LLM_DS_CACHE", Path.home() / ".cache" / "llm_ds"))
    return root / f"deepspeed-keys-{version}.json"


@lru_cache(maxsize=1)
def deepspeed_vocabulary() -> frozenset[str]:
    """Every identifier-like string and annotated field name in the installed DeepSpeed's source."""
    spec = importlib.util.find_spec("deepspeed")
    if spec is None or spec.origin is None:
        return frozenset()  # no DeepSpeed here: nothing to check against
    version = importlib.metadata.version("deepspeed")
    cached = _cache_file(version)
    if cached.is_file():
        return frozenset(json.loads(cached.read_text()))
    words: set[str] = set()
    for path in Path(spec.origin).parent.rglob("*.py"):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="ignore"))
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and _IDENT.match(node.value):
                words.add(node.value)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                words.add(node.target.id)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(sorted(words)))
        os.replace(tmp, cached)
    except OSError:
        pass  # a read-only home: recompute next time
    return frozenset(words)


def check_top_level_keys(config: dict, source: str) -> None:
    """Refuse a top-level key DeepSpeed does not read, naming the closest common key."""
    vocabulary = deepspeed_vocabulary()
    if not vocabulary:
        return
    for key in config:
        if key not in vocabulary:
            match = difflib.get_close_matches(key, COMMON_TOP_LEVEL, n=1, cutoff=0.6)
            hint = f"; did you mean `{match[0]}`?" if match else ""
            raise DSConfigError(
                f"DeepSpeed config {source}: unknown top-level key `{key}` (DeepSpeed would ignore it){hint}"
            )
