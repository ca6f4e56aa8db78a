"""What tensor and pipeline parallelism need beside DeepSpeed: how ranks are laid out, and the model in the
form DeepSpeed splits (``tensor``: GPT-2 for AutoTP)."""

from llm_ds.parallel.layout import Layout

__all__ = ["Layout"]
