"""Metrics from rank 0 to console, metrics.jsonl, TensorBoard and Weights & Biases."""

from llm_ds.monitor.sinks import Monitor, build_monitor, format_console_line

__all__ = ["Monitor", "build_monitor", "format_console_line"]
