"""The run config: typed sections, YAML loading, ``--set`` overrides and validation.

The run config is the single source of truth for a run. Each section is a dataclass owned by
the module that uses it; ``load_run_config`` builds a ``RunConfig`` from a YAML file plus
``section.key=value`` overrides and fails with one line naming the key and the fix.
This module imports neither torch nor deepspeed, so bad input fails in well under a second.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PACKAGE_DIR = Path(__file__).resolve().parent
CONFIGS_DIR = PACKAGE_DIR / "configs"
DEFAULT_CONFIG = CONFIGS_DIR / "tiny.yaml"
BUNDLED_CORPUS = PACKAGE_DIR / "assets" / "corpus" / "python-docs.jsonl"
BUNDLED_TOKENIZER = PACKAGE_DIR / "assets" / "tokenizer"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def missing_extra(module: str, extra: str) -> str | None:
    """``None`` where ``module`` can be imported here; else the pip command that installs the extra holding
    it. Looks for the module without importing it."""
    try:
        found = importlib.util.find_spec(module) is not None
    except ValueError:  # None in sys.modules: its import is blocked
        found = False
    return None if found else f"pip install 'llm-ds[{extra}]'"


def shipped_path(path: str | Path, folder: Path, prefix: str) -> Path:
    """``path`` where it exists; else, for a bare file name or one under ``prefix`` (the folder's place in
    a checkout, e.g. ``ds_configs/zero3.json``), the copy shipped in the installed package's ``folder``.

    So the README's commands work from any folder once the package is installed.
    """
    path = Path(path)
    if path.exists() or path.is_absolute() or path.parent.as_posix() not in (".", prefix):
        return path
    shipped = folder / path.name
    return shipped if shipped.is_file() else path


class UserError(Exception):
    """Input the user can fix (a config, data, a checkpoint, a hostfile): the message is one line that names
    the file, key or value. Every command turns it into that line and exit status 2, with no traceback."""


class ConfigError(UserError, ValueError):
    """A run or DeepSpeed config that cannot be used; the message is one line for the user."""


ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu", "relu", "silu")


@dataclass
class ModelConfig:
    """GPT-2 shape. ``vocab_size: null`` takes the tokenizer's size."""

    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    n_positions: int = 256
    vocab_size: int | None = None
    vocab_multiple_of: int = 64  # padded embedding rows make the output matmul faster
    dropout: float = 0.0
    init_from: str | None = None  # a local path or hub name of a pretrained causal LM
    activation_checkpointing: bool = False
    # torch's fused kernel of GPT-2's GELU (the same tanh approximation): 5% faster on CPU and 12
    # fewer saved tensors per layer than GPT-2's own "gelu_new", written out in Python.
    activation_function: str = "gelu_pytorch_tanh"
    # Cross-entropy fused with the output projection, a chunk of positions at a time: the
    # (tokens x vocab) logits are never held whole (llm_ds/loss.py). GPT-2 models only.
    fused_loss: bool = True
    loss_chunk_tokens: int | None = None  # positions per chunk; null: auto_chunk_tokens(vocab)

    def validate(self) -> None:
        _check(self.n_layer > 0, "model.n_layer", self.n_layer, "must be > 0")
        _check(self.n_head > 0, "model.n_head", self.n_head, "must be > 0")
        _check(
            self.n_embd % self.n_head == 0,
            "model.n_embd",
            self.n_embd,
            f"must be divisible by model.n_head ({self.n_head})",
        )
        _check(self.n_positions > 0, "model.n_positions", self.n_positions, "must be > 0")
        _check(self.vocab_size is None or self.vocab_size > 0, "model.vocab_size", self.vocab_size, "must be > 0")
        _check(self.vocab_multiple_of > 0, "model.vocab_multiple_of", self.vocab_multiple_of, "must be > 0")
        _check(0.0 <= self.dropout < 1.0, "model.dropout", self.dropout, "must be in [0, 1)")
        _check(
            self.activation_function in ACTIVATIONS,
            "model.activation_function",
            self.activation_function,
            f"must be one of {ACTIVATIONS}",
        )
        _check(
            self.loss_chunk_tokens is None or self.loss_chunk_tokens > 0,
            "model.loss_chunk_tokens",
            self.loss_chunk_tokens,
            "must be > 0 (or null for automatic)",
        )


CHUNK_LOGIT_BYTES = 256 * 2**20  # fp32 logits of one chunk of the fused loss, by default


def auto_chunk_tokens(vocab_size: int) -> int:
    """Positions per chunk whose fp32 logits take ``CHUNK_LOGIT_BYTES``: 1,335 for GPT-2's 50,257 tokens."""
    return max(1, CHUNK_LOGIT_BYTES // (4 * vocab_size))


SOURCE_FORMATS = ("txt", "json", "jsonl", "parquet", "csv")
MIX_MODES = ("concat", "interleave")


@dataclass
class SourceConfig:
    """One text source: local files (``path``) or a Hugging Face dataset (``hub``)."""

    path: str | None = None  # a file, directory or glob
    hub: str | None = None  # a dataset name for datasets.load_dataset, e.g. wikipedia, or a local dataset folder
    config: str | None = None  # the hub dataset's config, e.g. 20220301.en
    revision: str | None = None  # the hub dataset's branch, tag or commit; default its main branch
    split: str = "train"
    text_field: str | None = None  # default: data.text_field
    format: str | None = None  # txt, json, jsonl, parquet, csv; default from each file's suffix
    weight: float = 1.0  # relative sampling weight with data.mix: interleave

    def validate(self, key: str) -> None:
        _check(
            (self.path is None) != (self.hub is None),
            f"{key}",
            asdict_short(self),
            "needs exactly one of `path` or `hub`",
        )
        _check(
            self.format is None or self.format in SOURCE_FORMATS,
            f"{key}.format",
            self.format,
            f"must be one of {SOURCE_FORMATS}",
        )
        _check(self.weight > 0, f"{key}.weight", self.weight, "must be > 0")
        if self.hub:
            _check_extra(f"{key}.hub", self.hub, "datasets", "hub")

    def describe(self) -> str:
        if self.hub:
            return f"hub:{self.hub}" + (f"/{self.config}" if self.config else "") + f"[{self.split}]"
        return self.path or ""


def asdict_short(source: SourceConfig) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(source).items() if v not in (None, "train", 1.0)}


@dataclass
class DataConfig:
    """Where the text comes from and how it becomes blocks of tokens."""

    paths: list[str] = field(default_factory=lambda: [str(BUNDLED_CORPUS)])  # local files; see also `sources`
    text_field: str = "text"  # the field holding the text in json/jsonl/parquet/csv and hub datasets
    sources: list[SourceConfig] = field(default_factory=list)  # when given, replaces `paths`
    mix: str = "concat"  # concat: one source after another; interleave: drawn by `weight`, from train.seed
    val_sources: list[SourceConfig] = field(default_factory=list)  # explicit validation text
    val_fraction: float = 0.05  # of documents, held out before packing (when val_sources is empty)
    tokenizer: str = str(BUNDLED_TOKENIZER)  # a local path or hub name for AutoTokenizer
    block_size: int = 128
    packing: bool = True  # false: the seed's one document per row, padded to block_size, pads masked
    streaming: bool = False  # tokenize and pack on the fly; for corpora larger than disk or memory
    num_proc: int = 1  # tokenizer worker processes
    normalize_nfkc: bool = False
    strip_control: bool = False  # drop control and non-printing characters (emoji sequences kept)
    replace_urls: str | None = None  # replace URLs with this placeholder, e.g. "<url>"
    min_chars: int = 0  # drop documents shorter than this, after the steps above
    dedup: bool = False  # drop exact duplicate documents (by hash)
    cache_dir: str | None = None  # default: $LLM_DS_CACHE or ~/.cache/llm_ds
    num_workers: int = 0

    def validate(self) -> None:
        _check(
            len(self.paths) > 0 or len(self.sources) > 0,
            "data.paths",
            self.paths,
            "must name at least one file, directory or glob (or use data.sources)",
        )
        for i, source in enumerate(self.sources):
            source.validate(f"data.sources[{i}]")
        for i, source in enumerate(self.val_sources):
            source.validate(f"data.val_sources[{i}]")
        _check(self.mix in MIX_MODES, "data.mix", self.mix, f"must be one of {MIX_MODES}")
        _check(self.block_size > 1, "data.block_size", self.block_size, "must be > 1")
        _check(0.0 < self.val_fraction < 1.0, "data.val_fraction", self.val_fraction, "must be in (0, 1)")
        _check(self.num_proc >= 1, "data.num_proc", self.num_proc, "must be >= 1")
        _check(self.min_chars >= 0, "data.min_chars", self.min_chars, "must be >= 0")
        _check(self.num_workers >= 0, "data.num_workers", self.num_workers, "must be >= 0")
        _check(
            self.packing or not self.streaming,
            "data.packing",
            self.packing,
            "must be true with data.streaming (padding mode needs the documents up front)",
        )

    def train_sources(self) -> list[SourceConfig]:
        """``sources``, or one local source per entry of ``paths``."""
        return self.sources or [SourceConfig(path=p) for p in self.paths]


@dataclass
class TrainConfig:
    """Optimisation and the loop. Batch sizes are per rank except ``global_batch_size``."""

    seed: int = 1234
    micro_batch_size: int = 8
    grad_accum_steps: int = 1
    max_steps: int | None = 500  # optimizer steps; null trains for ``epochs``
    epochs: float | None = None
    lr: float = 2e-3
    min_lr: float = 0.0  # WarmupDecayLR's warmup_min_lr; the decay ends at 0
    warmup_steps: int = 30
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0
    precision: str = "auto"  # auto: bf16 on accelerators that have it, else fp16, fp32 on CPU
    eval_interval: int = 100
    eval_max_batches: int | None = None  # null evaluates the whole validation split
    output_dir: str | None = None  # default runs/<run_name>
    run_name: str | None = None  # default: the run config's file name without extension
    nvme_path: str | None = None  # NVMe offload swap folder; default <output_dir>/nvme
    compile: bool = False  # torch.compile the model through DeepSpeed's engine.compile()
    tf32: bool = True  # fp32 runs on GPUs with TF32 tensor cores (Ampere on) use them for matmuls

    def validate(self) -> None:
        _check(self.micro_batch_size > 0, "train.micro_batch_size", self.micro_batch_size, "must be > 0")
        _check(self.grad_accum_steps > 0, "train.grad_accum_steps", self.grad_accum_steps, "must be > 0")
        _check(
            self.max_steps is not None or self.epochs is not None,
            "train.max_steps",
            None,
            "set train.max_steps or train.epochs",
        )
        _check(self.max_steps is None or self.max_steps > 0, "train.max_steps", self.max_steps, "must be > 0")
        _check(self.epochs is None or self.epochs > 0, "train.epochs", self.epochs, "must be > 0")
        _check(self.lr > 0, "train.lr", self.lr, "must be > 0")
        _check(0 <= self.min_lr <= self.lr, "train.min_lr", self.min_lr, f"must be in [0, train.lr={self.lr}]")
        _check(self.warmup_steps >= 0, "train.warmup_steps", self.warmup_steps, "must be >= 0")
        _check(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, "must be >= 0")
        _check(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "train.betas",
            self.betas,
            "must be two numbers in [0, 1)",
        )
        _check(self.grad_clip >= 0, "train.grad_clip", self.grad_clip, "must be >= 0 (0 disables clipping)")
        _check(self.precision in PRECISIONS, "train.precision", self.precision, f"must be one of {PRECISIONS}")
        _check(self.eval_interval >= 0, "train.eval_interval", self.eval_interval, "must be >= 0 (0: only at the end)")
        _check(
            self.eval_max_batches is None or self.eval_max_batches > 0,
            "train.eval_max_batches",
            self.eval_max_batches,
            "must be > 0",
        )


@dataclass
class LoggingConfig:
    """Where rank 0 reports."""

    log_interval: int = 10
    peak_tflops: float | None = None  # per device, for MFU; default: looked up by GPU name (none on CPU)
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "llm-ds"

    def validate(self) -> None:
        _check(self.log_interval > 0, "logging.log_interval", self.log_interval, "must be > 0")
        if self.wandb:
            _check_extra("logging.wandb", self.wandb, "wandb", "wandb")


@dataclass
class CheckpointConfig:
    """When to save. ``interval: 0`` saves only at the end."""

    interval: int = 100
    dir: str | None = None  # default <output_dir>/checkpoints
    save_final: bool = True
    resume: str = "auto"  # auto: from the latest complete checkpoint if any; never; or a checkpoint folder
    keep_last: int = 3  # complete checkpoints kept (0 keeps all); older ones go once a newer one is complete
    save_trigger: str | None = None  # a file whose appearance makes the run save at the next step

    def validate(self) -> None:
        _check(self.interval >= 0, "checkpoint.interval", self.interval, "must be >= 0 (0: only at the end)")
        _check(self.keep_last >= 0, "checkpoint.keep_last", self.keep_last, "must be >= 0 (0 keeps all)")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    source: str = field(default=str(DEFAULT_CONFIG), compare=False)  # the YAML it came from

    def __post_init__(self) -> None:
        self.check()

    @classmethod
    def from_dict(cls, values: typing.Mapping[str, Any], overrides: typing.Sequence[str] = ()) -> RunConfig:
        """A run config from ``{section: {key: value}}`` plus ``section.key=value`` overrides, checked as a
        YAML file is: an unknown key, a wrong type or a bad value is a ``ConfigError`` naming the key.
        Keys not given take their defaults (those of the bundled ``tiny.yaml``)."""
        return _build_run_config(values, overrides, "run config dict", str(DEFAULT_CONFIG))

    def check(self) -> None:
        """Every field's type (ints are taken for floats), then every rule; raises ``ConfigError`` naming the
        key. Runs when the config is made; run it again after changing fields in place."""
        for name in SECTIONS:
            section = getattr(self, name)
            if not isinstance(section, _SECTION_TYPES[name]):
                raise ConfigError(f"`{name}` must be a {_SECTION_TYPES[name].__name__}, got {section!r}")
            _check_fields(section, name)
        self.validate()

    def validate(self) -> None:
        for section in SECTIONS:
            getattr(self, section).validate()
        _check(
            not self.data.streaming or self.train.max_steps is not None,
            "train.max_steps",
            None,
            "must be set with data.streaming (a stream has no known length for train.epochs)",
        )
        _check(
            self.data.block_size <= self.model.n_positions,
            "data.block_size",
            self.data.block_size,
            f"must be <= model.n_positions ({self.model.n_positions})",
        )

    @property
    def run_name(self) -> str:
        return self.train.run_name or Path(self.source).stem

    @property
    def output_dir(self) -> Path:
        return Path(self.train.output_dir or Path("runs") / self.run_name)

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else self.output_dir / "checkpoints"

    def to_dict(self) -> dict[str, Any]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}


SECTIONS = ("model", "data", "train", "logging", "checkpoint")
_SECTION_TYPES = {name: typing.get_type_hints(RunConfig)[name] for name in SECTIONS}


def _check(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise ConfigError(f"`{key}` {rule}, got {value!r}")


def _check_extra(key: str, value: Any, module: str, extra: str) -> None:
    install = missing_extra(module, extra)
    _check(install is None, key, value, f"needs the {module} package, not installed here: {install}")


def _closest(name: str, choices: typing.Iterable[str], prefix: str = "") -> str:
    """A hint naming the closest valid key (with its section prefix), or all of them."""
    choices = list(choices)
    match = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    if match:
        return f"; did you mean `{prefix}{match[0]}`?"
    return f"; valid keys: {', '.join(prefix + c for c in sorted(choices))}"


def _check_fields(obj: Any, key: str) -> None:
    """Check a dataclass's fields against their type hints in place (a section built in code)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        setattr(obj, f.name, _coerce(getattr(obj, f.name), hints[f.name], f"{key}.{f.name}"))


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against a dataclass field's type hint; ints are accepted for floats."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is list:
        (item_type,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"`{key}` must be a list of {item_type.__name__}, got {value!r}")
        return [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        # YAML 1.1 reads 3e-4 (no dot) as a string; accept what Python reads as a number.
        try:
            return float(value)
        except ValueError:
            pass
    if hint is str and isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(hint) and isinstance(value, hint):
        _check_fields(value, key)
        return value
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(
                f"`{key}` must be a mapping of {', '.join(f.name for f in dataclasses.fields(hint))}, got {value!r}"
            )
        hints = typing.get_type_hints(hint)
        for k in value:
            if k not in hints:
                raise ConfigError(f"unknown key `{key}.{k}`{_closest(k, hints, f'{key}.')}")
        return hint(**{k: _coerce(v, hints[k], f"{key}.{k}") for k, v in value.items()})
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"`{key}` must be {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def _build_section(name: str, values: Any, where: str):
    cls = _SECTION_TYPES[name]
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: section `{name}` must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(f"{where}: unknown key `{name}.{key}`{_closest(key, hints, f'{name}.')}")
        try:
            kwargs[key] = _coerce(value, hints[key], f"{name}.{key}")
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``section.key=value`` into the key path and the YAML-parsed value."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML ({exc.__class__.__name__})") from exc
    return key.strip().split("."), value


def load_run_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> RunConfig:
    """Load a run config from YAML, apply ``--set`` overrides, validate.

    Args:
        path: a YAML file; ``None`` takes the bundled ``tiny.yaml``.
        overrides: ``section.key=value`` strings, applied in order.

    Raises:
        ConfigError: a missing file, unknown key, wrong type or invalid value, in one line.
    """
    path = shipped_path(path, CONFIGS_DIR, "llm_ds/configs") if path else DEFAULT_CONFIG
    if not path.is_file():
        raise ConfigError(f"run config {path}: no such file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"run config {path}:{line} is not valid YAML") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"run config {path}: top level must be a mapping of sections")
    return _build_run_config(raw, overrides, str(path), str(path))


def _build_run_config(raw: typing.Mapping[str, Any], overrides: typing.Sequence[str], where: str, source: str):
    """``raw`` (sections of keys) with ``overrides`` applied, checked; errors start with ``where``."""
    if not isinstance(raw, typing.Mapping):
        raise ConfigError(f"{where}: top level must be a mapping of sections, got {raw!r}")
    for section in raw:
        if section not in SECTIONS:
            raise ConfigError(f"{where}: unknown section `{section}`{_closest(str(section), SECTIONS)}")
    sections = {name: _build_section(name, raw.get(name) or {}, where) for name in SECTIONS}
    for text in overrides:
        keys, value = parse_override(text)
        dotted = ".".join(keys)
        if keys[0] not in SECTIONS:
            raise ConfigError(f"--set {dotted}: unknown section `{keys[0]}`{_closest(keys[0], SECTIONS)}")
        hints = typing.get_type_hints(_SECTION_TYPES[keys[0]])
        if len(keys) != 2 or keys[1] not in hints:
            name = keys[1] if len(keys) > 1 else ""
            raise ConfigError(f"--set {dotted}: unknown key `{dotted}`{_closest(name, hints, f'{keys[0]}.')}")
        try:
            value = _coerce(value, hints[keys[1]], dotted)
        except ConfigError as exc:
            raise ConfigError(f"--set {exc}") from None
        sections[keys[0]] = dataclasses.replace(sections[keys[0]], **{keys[1]: value})
    try:
        return RunConfig(**sections, source=source)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def dump_run_config(cfg: RunConfig) -> str:
    """The resolved run config as YAML, as rank 0 saves it beside the run."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
