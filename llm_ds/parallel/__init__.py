"""What tensor and pipeline parallelism need beside DeepSpeed: how ranks are laid out, the model in the form
DeepSpeed splits (``tensor``: GPT-2 for AutoTP; ``pipeline``: GPT-2 as a PipelineModule), and the one split a
process runs."""

from llm_ds.config import ConfigError
from llm_ds.parallel.layout import Layout

__all__ = ["Layout", "claim_split"]

_split: tuple[int, int] | None = None  # the first model-parallel split of this process


def claim_split(tensor: int, pipeline: int) -> None:
    """One process, one model-parallel split. DeepSpeed keeps the process groups of a split (and the unit
    that names them) for the whole process: a later engine with another split, or without one, would reduce
    its gradients over the first one's groups. A second ``Trainer`` with the same split, or any number
    without a split before the first with one, is fine."""
    global _split
    if _split is None:
        if tensor * pipeline > 1:
            _split = (tensor, pipeline)
        return
    if (tensor, pipeline) != _split:
        raise ConfigError(
            f"parallel.tensor={tensor}, parallel.pipeline={pipeline}: this process already trained with "
            f"parallel.tensor={_split[0]}, parallel.pipeline={_split[1]}, whose process groups DeepSpeed keeps "
            f"for the process; run another split in a new process"
        )
