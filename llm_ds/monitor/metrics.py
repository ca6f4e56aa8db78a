"""Pure functions behind the numbers: FLOPs, MFU, rank aggregation, redaction (peaks by device: llm_ds.hardware)."""

from __future__ import annotations

import os
import re
import statistics
from typing import Any

SECRET_NAME = re.compile(r"(API_KEY|_TOKEN|_KEY|_SECRET|PASSWORD)$|^HF_TOKEN$|^WANDB_API_KEY$", re.IGNORECASE)
REDACTED = "***"


def training_flops_per_token(n_params: int, n_position_params: int, n_layer: int, n_embd: int, seq_len: int) -> int:
    """6N + 12·L·d·T (PaLM appendix B, as nanoGPT applies it).

    N excludes the position embeddings; the tied token embedding counts, since it is also the
    output layer. The second term is attention's score and value matmuls.
    """
    return 6 * (n_params - n_position_params) + 12 * n_layer * n_embd * seq_len


def mfu(tokens_per_s_per_device: float, flops_per_token: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the device's peak."""
    if not peak:
        return None
    return tokens_per_s_per_device * flops_per_token / (peak * 1e12)


def straggler(step_ms: list[float]) -> tuple[int, float]:
    """The slowest rank and its lag over the median rank, as a fraction (0.25 = 25% slower)."""
    slowest = max(range(len(step_ms)), key=lambda r: step_ms[r])
    median = statistics.median(step_ms)
    return slowest, (step_ms[slowest] / median - 1.0) if median > 0 else 0.0


class StragglerWatch:
    """Names a rank that lagged the median rank by more than ``threshold`` at ``points`` log points
    running; each rank once per run, so a slow node is reported without repeating at every log point."""

    def __init__(self, threshold: float = 0.2, points: int = 3):
        self.threshold, self.points = threshold, points
        self.recent: list[int | None] = []  # the lagging rank at recent log points (None: none lagged)
        self.named: set[int] = set()

    def update(self, slowest: int, lag: float) -> int | None:
        """Record one log point's slowest rank and its lag; return the rank to name now, if any."""
        self.recent = [*self.recent[-(self.points - 1) :], slowest if lag > self.threshold else None]
        rank = self.recent[0]
        if len(self.recent) < self.points or rank is None or any(r != rank for r in self.recent):
            return None
        if rank in self.named:
            return None
        self.named.add(rank)
        return rank


def secret_values(environ: dict[str, str] | None = None) -> list[str]:
    """Values of environment variables that hold secrets (``*_TOKEN``, ``*_KEY``, ``*_SECRET``, ...)."""
    environ = os.environ if environ is None else environ
    return sorted({v for k, v in environ.items() if SECRET_NAME.search(k) and len(v) >= 6}, key=len, reverse=True)


def redact(obj: Any, secrets: list[str] | None = None) -> Any:
    """A copy of ``obj`` (str, dict, list) with every secret value and secret-named key's value masked."""
    secrets = secret_values() if secrets is None else secrets
    if isinstance(obj, str):
        for s in secrets:
            obj = obj.replace(s, REDACTED)
        return obj
    if isinstance(obj, dict):
        return {
            k: (REDACTED if isinstance(k, str) and SECRET_NAME.search(k) and v else redact(v, secrets))
            for k, v in obj.items()
        }
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v, secrets) for v in obj)
    return obj


def reset_peak_rss() -> bool:
    """Start this process's peak resident set size (``VmHWM``) afresh from its current size.

    Linux only (``/proc/self/clear_refs``); returns False where the peak cannot be reset, and
    ``peak_rss_bytes`` then reports the peak since the process started.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def proc_status_bytes(field: str) -> int | None:
    """A memory figure of this process from Linux's ``/proc/self/status`` (``VmHWM``, ``RssFile``, ...),
    in bytes; None where there is no such file or field."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """This process's peak resident set size since it started or since ``reset_peak_rss``."""
    peak = proc_status_bytes("VmHWM")
    if peak is not None:
        return peak
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
