"""llm-ds: train GPT-2-style language models with DeepSpeed, from one laptop to many nodes."""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

try:
    __version__ = _version("llm-ds")
except PackageNotFoundError:  # a checkout used without installing it
    __version__ = "0+unknown"
