"""What every benchmark records: the machine it ran on, and spreads of repeated measurements."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time


def machine_info() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "date": time.strftime("%Y-%m-%d"),
    }


def spread(values) -> dict[str, float]:
    """min, median and max of repeated measurements."""
    values = list(values)
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}
