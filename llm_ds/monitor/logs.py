"""This process's console: rank 0 prints llm-ds's lines plainly, other ranks only warnings; secrets masked."""

from __future__ import annotations

import logging
import os
import sys
import warnings


def setup_logging(rank: int) -> None:
    """Rank 0 prints our lines plainly; other ranks only warnings, tagged with their rank. Idempotent."""
    handler = logging.StreamHandler(sys.stdout)
    handler.addFilter(_RedactSecrets())
    handler.setFormatter(logging.Formatter("%(message)s" if rank == 0 else f"[rank {rank}] %(levelname)s %(message)s"))
    for name in ("llm_ds", "llm_ds.data.cache"):
        log = logging.getLogger(name)
        log.handlers[:] = [handler] if name == "llm_ds" else []
        log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
        log.propagate = name != "llm_ds"
    # DeepSpeed's own INFO lines repeat per rank; LLM_DS_DEEPSPEED_LOG=info brings them back.
    deepspeed_log = logging.getLogger("DeepSpeed")
    deepspeed_log.setLevel(os.environ.get("LLM_DS_DEEPSPEED_LOG", "WARNING").upper())
    if not any(isinstance(f, _KnownNoise) for f in deepspeed_log.filters):
        deepspeed_log.addFilter(_KnownNoise())
    # torch deprecates the collectives DeepSpeed's ZeRO calls, in a warning per rank and call site.
    warnings.filterwarnings(
        "ignore",
        message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
        category=FutureWarning,
    )


class _KnownNoise(logging.Filter):
    """DeepSpeed's scheduler warns, per rank, that its learning rate is read before the first step:
    ``deepspeed.initialize`` reads it itself. Harmless, on every run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Attempting to get learning rate from scheduler before it has started")


class _RedactSecrets(logging.Filter):
    """Mask the values of secret environment variables (``*_TOKEN``, ``*_KEY``, ...) in every line."""

    def filter(self, record: logging.LogRecord) -> bool:
        from llm_ds.monitor.metrics import redact

        record.msg, record.args = redact(record.getMessage()), None
        return True
