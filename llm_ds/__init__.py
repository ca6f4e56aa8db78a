"""llm-ds: train GPT-2-style language models with DeepSpeed, from one laptop to many nodes.

The Python API::

    from llm_ds import RunConfig, Trainer

    cfg = RunConfig.from_dict({"train": {"max_steps": 50}})
    summary = Trainer(cfg, ds_config="ds_configs/zero1.json").fit()

``Trainer`` and ``TrainerCallback`` import torch and DeepSpeed when first used; the config names do not,
so ``import llm_ds`` stays fast for commands that only check configs.
"""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

from llm_ds.config import ConfigError, RunConfig, UserError, load_run_config

try:
    __version__ = _version("llm-ds")
except PackageNotFoundError:  # a checkout used without installing it
    __version__ = "0+unknown"

__all__ = [
    "ConfigError",
    "RunConfig",
    "Trainer",
    "TrainerCallback",
    "UserError",
    "__version__",
    "load_run_config",
]


def __getattr__(name: str):
    if name in ("Trainer", "TrainerCallback"):
        from llm_ds import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'llm_ds' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
