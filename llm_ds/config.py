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
import keyword
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
CACHE_ENV = "LLM_DS_CACHE"  # where token caches go by default: $LLM_DS_CACHE, else DEFAULT_CACHE
DEFAULT_CACHE = "~/.cache/llm_ds"
IGNORE_INDEX = -100  # the label of a position that is not scored (padding), as in transformers
NVME_DIR = "nvme"  # NVMe offload's swap folder under the output folder, by default


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


def opt(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = dataclasses.MISSING, shown: str = ""):
    """A config field with its description as data: ``llm-ds config --explain`` and the README table show
    ``help``; ``shown`` is how the default reads where its value says little (``the bundled corpus``)."""
    return field(default=default, default_factory=factory, metadata={"help": help, "shown": shown})


ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu", "relu", "silu")


@dataclass
class ModelConfig:
    """GPT-2 shape. ``vocab_size: null`` takes the tokenizer's size."""

    n_layer: int = opt(4, "transformer blocks")
    n_embd: int = opt(128, "model width")
    n_head: int = opt(4, "attention heads; must divide `n_embd`")
    n_positions: int = opt(256, "learned positions, the longest `data.block_size`")
    vocab_size: int | None = opt(None, "embedding rows; null takes the tokenizer's size")
    vocab_multiple_of: int = opt(64, "rows rounded up to a multiple (a faster output matmul)")
    dropout: float = opt(0.0, "residual, embedding and attention dropout")
    init_from: str | None = opt(None, "start from a pretrained causal LM (a local path or hub name)")
    activation_checkpointing: bool = opt(False, "recompute activations in backward")
    # 5% faster on CPU and 12 fewer saved tensors per layer than "gelu_new", written out in Python.
    activation_function: str = opt(
        "gelu_pytorch_tanh",
        "GPT-2's GELU (tanh approximation) as torch's one fused kernel; `gelu_new` is GPT-2's own Python "
        "spelling of the same formula (see Benchmarks, Make it fast); also `gelu`, `relu`, `silu`",
    )
    fused_loss: bool = opt(
        True,
        "cross-entropy fused with the output projection, a chunk of positions at a time: the (tokens x "
        "vocabulary) logits are never held whole (GPT-2 models; see Inside); false: transformers' loss",
    )
    loss_chunk_tokens: int | None = opt(
        None,
        "positions per chunk of the fused loss; null: as many as make 256 MiB of fp32 logits (1,335 for "
        "GPT-2's vocabulary)",
    )

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

    path: str | None = opt(None, "a file, directory or glob (or `hub`)")
    hub: str | None = opt(None, "a dataset name for `datasets.load_dataset` (`wikipedia`), or a local dataset folder")
    config: str | None = opt(None, "the hub dataset's config, e.g. `20220301.en`")
    revision: str | None = opt(None, "the hub dataset's branch, tag or commit; null: its main branch")
    split: str = opt("train", "the split to read")
    text_field: str | None = opt(None, "the field holding the text; null: `data.text_field`")
    format: str | None = opt(None, "`txt`, `json`, `jsonl`, `parquet`, `csv`; null: from each file's suffix")
    weight: float = opt(1.0, "relative sampling weight with `data.mix: interleave`")

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

    paths: list[str] = opt(
        help="local files, directories or globs (the short form of `data.sources`)",
        factory=lambda: [str(BUNDLED_CORPUS)],
        shown="the bundled corpus",
    )
    text_field: str = opt("text", "the field holding the text in JSON, parquet, CSV and hub datasets")
    sources: list[SourceConfig] = opt(
        help="a list of sources (`data.sources[]` below, and Data, Sources); when given, replaces `data.paths`",
        factory=list,
    )
    mix: str = opt(
        "concat",
        "`concat`: sources one after another; `interleave`: each document drawn from a source by `weight`, "
        "from `train.seed`",
    )
    val_sources: list[SourceConfig] = opt(
        help="explicit validation sources; otherwise `val_fraction` is held out", factory=list
    )
    val_fraction: float = opt(0.05, "documents held out for validation, before packing")
    tokenizer: str = opt(
        str(BUNDLED_TOKENIZER),
        "a folder or hub name for `AutoTokenizer.from_pretrained`",
        shown="the bundled tokenizer",
    )
    block_size: int = opt(128, "tokens per training sequence")
    packing: bool = opt(True, "false: the seed's padding, one document per row, pads masked (see Data)")
    streaming: bool = opt(False, "tokenize and pack while training, for corpora larger than disk or memory")
    num_proc: int = opt(1, "tokenizer processes when building the cache")
    normalize_nfkc: bool = opt(False, "Unicode NFKC normalization (preprocessing, see Data)")
    strip_control: bool = opt(False, "drop control and non-printing characters (emoji sequences kept)")
    replace_urls: str | None = opt(None, "replace URLs with this placeholder, e.g. `<url>`")
    min_chars: int = opt(0, "drop documents shorter than this, after the steps above")
    dedup: bool = opt(False, "drop exact duplicate documents (by hash)")
    cache_dir: str | None = opt(None, "where token arrays are cached", shown=f"`${CACHE_ENV}` or `{DEFAULT_CACHE}`")
    num_workers: int = opt(0, "DataLoader worker processes")

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

    seed: int = opt(1234, "weights, document split and shuffling")
    micro_batch_size: int = opt(8, "sequences per rank per forward")
    grad_accum_steps: int = opt(1, "micro-batches per optimizer step")
    max_steps: int | None = opt(500, "length of the run in optimizer steps; null: `train.epochs`")
    epochs: float | None = opt(None, "length of the run in epochs of the train split, when `max_steps` is null")
    lr: float = opt(
        2e-3,
        "peak learning rate of WarmupDecayLR: linear warm-up from `min_lr`, then linear decay to 0 at the last step",
    )
    min_lr: float = opt(0.0, "where the warm-up starts (WarmupDecayLR's warmup_min_lr)")
    warmup_steps: int = opt(30, "warm-up steps (DeepSpeed's warm-up schedulers need >= 1)")
    weight_decay: float = opt(0.1, "AdamW's; no decay on biases and LayerNorm gains")
    betas: list[float] = opt(help="AdamW's betas", factory=lambda: [0.9, 0.95])
    eps: float = opt(1e-8, "AdamW's epsilon")
    grad_clip: float = opt(1.0, "global gradient-norm clipping (0 disables)")
    precision: str = opt(
        "auto", "`auto` (bf16 where the accelerator has it, else fp16; fp32 on CPU), `fp32`, `bf16`, `fp16`"
    )
    eval_interval: int = opt(100, "steps between evaluations (0: only at the end)")
    eval_max_batches: int | None = opt(None, "cap on validation batches per rank per evaluation; null: all")
    output_dir: str | None = opt(None, "where everything goes", shown="`runs/<run_name>`")
    run_name: str | None = opt(None, "names the output folder and the W&B run", shown="the config file's name")
    nvme_path: str | None = opt(None, "swap folder for NVMe offload", shown=f"`<output_dir>/{NVME_DIR}`")
    compile: bool = opt(
        False, "`torch.compile` the model through DeepSpeed's `engine.compile()` (compiled on the first forward)"
    )
    tf32: bool = opt(
        True,
        "on a GPU, fp32 matmuls use TF32 tensor cores (Ampere and newer; said in the start-up line of fp32 "
        "runs) and MFU counts against the TF32 peak; false keeps full fp32 and its peak",
    )

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

    log_interval: int = opt(10, "steps between console lines and metric records (step 1 is always logged)")
    peak_tflops: float | None = opt(None, "the device's peak TFLOP/s for MFU; null: looked up by GPU name")
    tensorboard: bool = opt(True, "TensorBoard event files under `<output_dir>/tensorboard`")
    wandb: bool = opt(False, "Weights & Biases: online where `WANDB_API_KEY` is set, offline otherwise")
    wandb_project: str = opt("llm-ds", "the W&B project")

    def validate(self) -> None:
        _check(self.log_interval > 0, "logging.log_interval", self.log_interval, "must be > 0")
        if self.wandb:
            _check_extra("logging.wandb", self.wandb, "wandb", "wandb")


@dataclass
class CheckpointConfig:
    """When to save. ``interval: 0`` saves only at the end."""

    interval: int = opt(100, "steps between checkpoints (0: only at the end)")
    dir: str | None = opt(None, "where checkpoints go", shown="`<output_dir>/checkpoints`")
    save_final: bool = opt(True, "save after the last step")
    resume: str = opt(
        "auto",
        "`auto`: continue from the latest complete checkpoint if there is one; `never`; or a checkpoint folder",
    )
    keep_last: int = opt(3, "complete checkpoints kept (0 keeps all); older ones go once a newer one is complete")
    save_trigger: str | None = opt(None, "a file path: creating it makes the run save at the next step boundary")
    async_: bool = opt(
        False,
        "write checkpoints behind training: it waits only while the states are copied to host memory (kept for "
        "the next save); at most one save in flight",
    )

    def validate(self) -> None:
        _check(self.interval >= 0, "checkpoint.interval", self.interval, "must be >= 0 (0: only at the end)")
        _check(self.keep_last >= 0, "checkpoint.keep_last", self.keep_last, "must be >= 0 (0 keeps all)")


@dataclass
class ParallelConfig:
    """How each model replica is split over ranks; the rest of the ranks are data-parallel."""

    tensor: int = opt(
        1,
        "tensor-parallel ranks per replica (DeepSpeed's AutoTP): each layer's matrices split over them; divides "
        "`model.n_head` and the ranks per node",
    )
    pipeline: int = opt(
        1,
        "pipeline stages per replica (DeepSpeed's pipeline engine, GPT-2 of the model section): the layers split "
        "into stages that pass activations on; at most `model.n_layer`; ZeRO stage 0 or 1",
    )

    def validate(self) -> None:
        _check(self.tensor > 0, "parallel.tensor", self.tensor, "must be > 0")
        _check(self.pipeline > 0, "parallel.pipeline", self.pipeline, "must be > 0")

    @property
    def model_parallel(self) -> int:
        """Ranks that hold one replica of the model."""
        return self.tensor * self.pipeline


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    source: str = field(default=str(DEFAULT_CONFIG), compare=False)  # the YAML it came from

    def __post_init__(self) -> None:
        self.check()

    @classmethod
    def from_dict(cls, values: typing.Mapping[str, Any], overrides: typing.Sequence[str] = ()) -> RunConfig:
        """A run config from ``{section: {key: value}}`` plus ``section.key=value`` overrides, checked as a
        YAML file is: an unknown key, a wrong type or a bad value is a ``ConfigError`` naming the key.
        Keys not given take their defaults (those of the bundled ``tiny.yaml``)."""
        return _build_run_config(values, overrides, "run config dict", str(DEFAULT_CONFIG), "override")

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
        if not self.model.init_from:  # a pretrained model's shape is its own, checked when it is loaded
            _check(
                self.model.n_head % self.parallel.tensor == 0,
                "parallel.tensor",
                self.parallel.tensor,
                f"must divide model.n_head ({self.model.n_head}): each rank holds whole attention heads",
            )
            _check(
                self.parallel.pipeline <= self.model.n_layer,
                "parallel.pipeline",
                self.parallel.pipeline,
                f"must be <= model.n_layer ({self.model.n_layer}): each stage holds at least one layer",
            )

    def data_parallel_size(self, world_size: int) -> int:
        """Ranks that each read their own share of every batch: the world over ``parallel.tensor`` x
        ``parallel.pipeline``; ``ConfigError`` where that does not divide."""
        mp = self.parallel.model_parallel
        if world_size % mp:
            raise ConfigError(
                f"`parallel.tensor` x `parallel.pipeline` = {self.parallel.tensor} x {self.parallel.pipeline} "
                f"= {mp} does not divide the world size of {world_size} rank(s)"
            )
        return world_size // mp

    def check_ranks_per_node(self, per_node: typing.Mapping[str, int]) -> None:
        """A tensor group's all-reduces run in every layer, so its ranks must share a node: ``parallel.tensor``
        divides the ranks of every node (``{node: ranks}``); ``ConfigError`` names the first that it does not."""
        tp = self.parallel.tensor
        for node, ranks in per_node.items():
            _check(
                ranks % tp == 0,
                "parallel.tensor",
                tp,
                f"must divide the ranks of every node ({node} runs {ranks}): a tensor group never spans nodes",
            )

    @property
    def run_name(self) -> str:
        return self.train.run_name or Path(self.source).stem

    @property
    def output_dir(self) -> Path:
        return Path(self.train.output_dir or Path("runs") / self.run_name)

    @property
    def nvme_dir(self) -> Path:
        """NVMe offload's swap folder: ``train.nvme_path``, by default under the output folder."""
        return Path(self.train.nvme_path) if self.train.nvme_path else self.output_dir / NVME_DIR

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else self.output_dir / "checkpoints"

    def to_dict(self) -> dict[str, Any]:
        return {name: {_key(k): v for k, v in dataclasses.asdict(getattr(self, name)).items()} for name in SECTIONS}


SECTIONS = ("model", "data", "train", "logging", "checkpoint", "parallel")
_SECTION_TYPES = {name: typing.get_type_hints(RunConfig)[name] for name in SECTIONS}


def _check(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise ConfigError(f"`{key}` {rule}, got {value!r}")


def _key(attr: str) -> str:
    """A field's key in YAML and ``--set``: its name, less the underscore a Python keyword needs (``async_``)."""
    return attr[:-1] if attr.endswith("_") and keyword.iskeyword(attr[:-1]) else attr


def _keys(cls) -> dict[str, tuple[str, Any]]:
    """A section's keys as ``{key: (field name, type hint)}``."""
    return {_key(name): (name, hint) for name, hint in typing.get_type_hints(cls).items()}


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
        setattr(obj, f.name, _coerce(getattr(obj, f.name), hints[f.name], f"{key}.{_key(f.name)}"))


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
        keys = _keys(hint)
        for k in value:
            if k not in keys:
                raise ConfigError(f"unknown key `{key}.{k}`{_closest(k, keys, f'{key}.')}")
        return hint(**{keys[k][0]: _coerce(v, keys[k][1], f"{key}.{k}") for k, v in value.items()})
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"`{key}` must be {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def _build_section(name: str, values: Any, where: str):
    cls = _SECTION_TYPES[name]
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: section `{name}` must be a mapping, got {values!r}")
    keys = _keys(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in keys:
            raise ConfigError(f"{where}: unknown key `{name}.{key}`{_closest(key, keys, f'{name}.')}")
        try:
            kwargs[keys[key][0]] = _coerce(value, keys[key][1], f"{name}.{key}")
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    return cls(**kwargs)


def parse_override(text: str, flag: str = "--set") -> tuple[list[str], Any]:
    """Split ``section.key=value`` into the key path and the YAML-parsed value."""
    if "=" not in text:
        raise ConfigError(f"{flag} {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{flag} {key}: value {raw!r} is not valid YAML ({exc.__class__.__name__})") from exc
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


def _build_run_config(
    raw: typing.Mapping[str, Any], overrides: typing.Sequence[str], where: str, source: str, flag: str = "--set"
):
    """``raw`` (sections of keys) with ``overrides`` applied, checked; errors start with ``where``, or for an
    override with ``flag`` (what the user wrote it with)."""
    if not isinstance(raw, typing.Mapping):
        raise ConfigError(f"{where}: top level must be a mapping of sections, got {raw!r}")
    for section in raw:
        if section not in SECTIONS:
            raise ConfigError(f"{where}: unknown section `{section}`{_closest(str(section), SECTIONS)}")
    sections = {name: _build_section(name, raw.get(name) or {}, where) for name in SECTIONS}
    for text in overrides:
        keys, value = parse_override(text, flag)
        dotted = ".".join(keys)
        if keys[0] not in SECTIONS:
            raise ConfigError(f"{flag} {dotted}: unknown section `{keys[0]}`{_closest(keys[0], SECTIONS)}")
        fields = _keys(_SECTION_TYPES[keys[0]])
        if len(keys) != 2 or keys[1] not in fields:
            name = keys[1] if len(keys) > 1 else ""
            raise ConfigError(f"{flag} {dotted}: unknown key `{dotted}`{_closest(name, fields, f'{keys[0]}.')}")
        try:
            value = _coerce(value, fields[keys[1]][1], dotted)
        except ConfigError as exc:
            raise ConfigError(f"{flag} {exc}") from None
        sections[keys[0]] = dataclasses.replace(sections[keys[0]], **{fields[keys[1]][0]: value})
    try:
        return RunConfig(**sections, source=source)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def field_docs() -> list[tuple[str, str, str]]:
    """Every run-config key as ``(key, default as shown, description)``: the sections in order, and after
    ``data`` the keys of each entry of ``data.sources`` / ``data.val_sources``."""
    rows = []
    for name in SECTIONS:
        rows += _field_rows(_SECTION_TYPES[name], name)
        if name == "data":
            rows += _field_rows(SourceConfig, "data.sources[]")
    return rows


def _field_rows(cls, prefix: str) -> list[tuple[str, str, str]]:
    rows = []
    for f in dataclasses.fields(cls):
        value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = f.metadata.get("shown") or (f"`{value}`" if isinstance(value, str) else _yaml_value(value))
        rows.append((f"{prefix}.{_key(f.name)}", shown, f.metadata.get("help", "")))
    return rows


def _yaml_value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).removesuffix("\n...\n").strip()


def field_table() -> str:
    """The run config's keys as a Markdown table, as the README shows it (``llm-ds config --explain``)."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    lines += [f"| `{key}` | {default} | {help} |" for key, default, help in field_docs()]
    return "\n".join(lines) + "\n"


def dump_run_config(cfg: RunConfig) -> str:
    """The resolved run config as YAML, as rank 0 saves it beside the run."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
