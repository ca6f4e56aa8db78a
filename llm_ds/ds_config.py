"""DeepSpeed JSON templates merged with the run config, and checked by DeepSpeed's own parser.

``ds_configs/*.json`` hold engine settings (ZeRO stage, offload, communication). The values
that the run config owns may be ``"auto"`` there and are filled from it, as the Hugging Face
Trainer does; an explicit value that disagrees with the run config or with the world size
stops the run before training, naming both numbers. Every key is then checked the way
DeepSpeed will read it: top-level keys against the ones its config parser looks up, and each
section against its pydantic models, so a typo stops ``llm-ds config``, ``launch``, ``plan`` and
the driver in one line, before any data work. DeepSpeed (and so torch) is imported only inside
the checking functions.
"""

from __future__ import annotations

import collections.abc
import copy
import difflib
import json
import logging
from functools import lru_cache
from pathlib import Path
from typing import Any

from llm_ds.config import PACKAGE_DIR, ConfigError, RunConfig, shipped_path

AUTO = "auto"
# The templates live at the checkout's top level; an installed package carries them as llm_ds/ds_configs.
DS_CONFIGS_DIR = next(
    (d for d in (PACKAGE_DIR / "ds_configs", PACKAGE_DIR.parent / "ds_configs") if d.is_dir()),
    PACKAGE_DIR.parent / "ds_configs",
)
DEFAULT_DS_CONFIG = DS_CONFIGS_DIR / "zero1.json"
RESOLVED_PRECISIONS = ("fp32", "bf16", "fp16")
WARMUP_SCHEDULERS = ("WarmupLR", "WarmupDecayLR", "WarmupCosineLR")  # refuse warmup_num_steps < 1


def ds_config_source(ds_config: str | Path | dict | None) -> str:
    """How errors name a DeepSpeed template: its path, the default's file name, or "dict"."""
    if isinstance(ds_config, dict):
        return "dict"
    return str(ds_config) if ds_config else DEFAULT_DS_CONFIG.name


def load_ds_template(path: str | Path | dict | None) -> dict[str, Any]:
    """Read a DeepSpeed JSON template (``None``: the default, ZeRO-1); a missing or malformed file is a
    ConfigError naming it. A dict is taken as the template itself, copied and checked the same way."""
    if isinstance(path, dict):
        config = copy.deepcopy(path)
        check_top_level_keys(config, ds_config_source(path))
        return config
    path = shipped_path(path, DS_CONFIGS_DIR, "ds_configs") if path else DEFAULT_DS_CONFIG
    if not path.is_file():
        raise ConfigError(f"DeepSpeed config {path}: no such file")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"DeepSpeed config {path}: invalid JSON at line {exc.lineno} column {exc.colno}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"DeepSpeed config {path}: top level must be a JSON object")
    check_top_level_keys(config, str(path))
    return config


# Top-level keys DeepSpeed reads outside its config parser, only when it builds a device mesh
# (deepspeed.initialize; DeepSpeedConfig with a distributed world).
MESH_KEYS = ("sequence_parallel_size", "data_parallel_size")


def _import_deepspeed_config():
    """``deepspeed.runtime.config``, imported without DeepSpeed's start-up lines on the console."""
    logging.disable(logging.WARNING)  # e.g. "Setting accelerator to CPU" on a machine without GPUs
    try:
        import deepspeed.runtime.config as ds_runtime_config
    finally:
        logging.disable(logging.NOTSET)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    return ds_runtime_config


@lru_cache(maxsize=1)
def deepspeed_top_level_keys() -> frozenset[str]:
    """The top-level keys the installed DeepSpeed reads: every key its ``DeepSpeedConfig`` looks up while
    parsing a config (recorded as it does), and the device-mesh keys ``deepspeed.initialize`` reads."""
    ds_runtime_config = _import_deepspeed_config()
    seen: set[str] = set()

    class Keys(collections.abc.KeysView):
        def __contains__(self, key):
            seen.add(key)
            return key in self._mapping

    class Recording(dict):
        def get(self, key, *default):
            seen.add(key)
            return super().get(key, *default)

        def __getitem__(self, key):
            seen.add(key)
            return super().__getitem__(key)

        def __contains__(self, key):
            seen.add(key)
            return super().__contains__(key)

        def keys(self):
            return Keys(self)

    minimal = {"train_batch_size": 1, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1}
    ds_runtime_config.DeepSpeedConfig(Recording(minimal))
    return frozenset(seen | set(MESH_KEYS))


def _closest(word: str, candidates) -> str:
    match = difflib.get_close_matches(word, sorted(candidates), n=1, cutoff=0.6)
    return f"; did you mean `{match[0]}`?" if match else ""


def check_top_level_keys(config: dict[str, Any], source: str) -> None:
    """Refuse a top-level key DeepSpeed does not read (it would ignore it silently), naming the closest one."""
    keys = deepspeed_top_level_keys()
    for key in config:
        if key not in keys:
            raise ConfigError(
                f"DeepSpeed config {source}: unknown top-level key `{key}` (DeepSpeed would ignore it)"
                f"{_closest(key, keys)}"
            )


def check_with_deepspeed(ds: dict[str, Any], source: str) -> None:
    """Parse a resolved config with DeepSpeed's own ``DeepSpeedConfig``; whatever it refuses (a key no
    section model has, a value of the wrong kind) becomes one line naming the key path and the closest
    valid key. The batch sizes (checked by ``resolve_ds_config``) are given as DeepSpeed counts them without a
    model-parallel unit: for every rank of the process group, or one rank before it exists."""
    import pydantic
    import torch.distributed

    ds_runtime_config = _import_deepspeed_config()
    checked = copy.deepcopy(ds)
    micro, accum = checked.get("train_micro_batch_size_per_gpu"), checked.get("gradient_accumulation_steps")
    if isinstance(micro, int) and isinstance(accum, int):
        ranks = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        checked["train_batch_size"] = micro * accum * ranks
    try:
        ds_runtime_config.DeepSpeedConfig(checked)
    except pydantic.ValidationError as exc:
        raise ConfigError(_describe(exc, ds, source)) from None
    except (ValueError, AssertionError, KeyError, TypeError, ds_runtime_config.DeepSpeedConfigError) as exc:
        # DeepSpeedConfigError: a section DeepSpeed has removed (nebula, ...), a plain Exception of its own
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"DeepSpeed config {source}: DeepSpeed refuses it: {first}") from None


def _describe(exc, ds: dict[str, Any], source: str) -> str:
    """One line for a pydantic error of one of DeepSpeed's section models."""
    error = exc.errors()[0]
    loc = tuple(str(part) for part in error["loc"])
    model = _model_named(exc.title)
    sections = [k for k, v in ds.items() if isinstance(v, dict) and _has_path(v, loc)]
    if len(sections) > 1 and model is not None:  # the section whose own model refuses it
        sections = [k for k in sections if _refused(model, ds[k])] or sections
    path = ".".join((sections[0], *loc) if sections else loc)
    if error["type"] == "extra_forbidden":
        return f"DeepSpeed config {source}: unknown key `{path}`{_closest(loc[-1], _valid_keys(model, loc[:-1]))}"
    return f"DeepSpeed config {source}: `{path}`={error.get('input')!r}: {error['msg']}"


def _has_path(section: dict, loc: tuple[str, ...]) -> bool:
    for part in loc:
        if not isinstance(section, dict) or part not in section:
            return False
        section = section[part]
    return True


def _refused(model, value: dict) -> bool:
    import pydantic

    try:
        model(**value)
    except pydantic.ValidationError:
        return True
    except Exception:  # noqa: BLE001 - a model that cannot take this section at all does not own it
        return False
    return False


def _model_named(name: str):
    from deepspeed.runtime.config_utils import DeepSpeedConfigModel

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    return next((m for m in subclasses(DeepSpeedConfigModel) if m.__name__ == name), None)


def _valid_keys(model, loc: tuple[str, ...]) -> set[str]:
    """The field names (and aliases) of a DeepSpeed section model, or of its nested model at ``loc``."""
    import typing

    from deepspeed.runtime.config_utils import DeepSpeedConfigModel

    for part in loc:
        field = model.model_fields.get(part) if model else None
        if field is None:
            return set()
        candidates = [field.annotation, *typing.get_args(field.annotation)]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, DeepSpeedConfigModel)), None)
    if model is None:
        return set()
    return {name for name in model.model_fields} | {f.alias for f in model.model_fields.values() if f.alias}


def global_batch_size(cfg: RunConfig, world_size: int) -> int:
    """Sequences per optimizer step across all ranks: the ranks of one tensor group (or pipeline) read the same
    sequences, so only data-parallel ranks count."""
    return cfg.train.micro_batch_size * cfg.train.grad_accum_steps * cfg.data_parallel_size(world_size)


def zero_stage(ds_config: dict[str, Any]) -> int:
    return int((ds_config.get("zero_optimization") or {}).get("stage", 0))


def uses_nvme(ds_config: dict[str, Any]) -> bool:
    zero = ds_config.get("zero_optimization") or {}
    return any((zero.get(k) or {}).get("device") == "nvme" for k in ("offload_param", "offload_optimizer"))


def _fill(section: dict[str, Any], key: str, value: Any, where: str, owner: str) -> None:
    """Set ``section[key]`` from the run config where it is auto or absent; refuse a contradiction."""
    current = section.get(key, AUTO)
    if current == AUTO:
        section[key] = value
    elif not _same(current, value):
        raise ConfigError(
            f"DeepSpeed config {where}: {key}={current!r} contradicts {owner}={value!r}; "
            f'set it to "auto" or make the two agree'
        )


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=False))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(a - b) <= 1e-12 * max(abs(a), abs(b), 1.0)
    return a == b


def resolve_ds_config(
    template: dict[str, Any],
    cfg: RunConfig,
    world_size: int,
    precision: str,
    total_steps: int | None,
    source: str = "",
) -> dict[str, Any]:
    """Fill a template's ``"auto"`` values from the run config and check the explicit ones.

    Args:
        template: the parsed JSON (left untouched).
        cfg: the run config, the source of truth for batch sizes, optimiser, schedule, precision.
        world_size: total ranks (``parallel`` says how many of them are data-parallel).
        precision: the resolved precision, one of fp32, bf16, fp16.
        total_steps: optimizer steps of the whole run (``None`` before the data is known:
            the schedule length is then left unchecked).
        source: the template's file name, for messages.

    Returns:
        A new dict ready for ``deepspeed.initialize(config=...)``.
    """
    if precision not in RESOLVED_PRECISIONS:
        raise ValueError(f"precision must be resolved to one of {RESOLVED_PRECISIONS}, got {precision!r}")
    where = source or "template"
    ds = copy.deepcopy(template)
    t = cfg.train
    _fill(ds, "train_micro_batch_size_per_gpu", t.micro_batch_size, where, "train.micro_batch_size")
    _fill(ds, "gradient_accumulation_steps", t.grad_accum_steps, where, "train.grad_accum_steps")
    batch = global_batch_size(cfg, world_size)
    if ds.get("train_batch_size", AUTO) not in (AUTO, batch):
        ranks = (
            f"data-parallel ranks ({cfg.data_parallel_size(world_size)} of {world_size})"
            if cfg.parallel.model_parallel > 1
            else f"world size ({world_size})"
        )
        raise ConfigError(
            f"DeepSpeed config {where}: train_batch_size={ds['train_batch_size']!r} but train.micro_batch_size "
            f"({t.micro_batch_size}) x train.grad_accum_steps ({t.grad_accum_steps}) x {ranks} "
            f'= {batch}; set it to "auto" or change the run config'
        )
    ds["train_batch_size"] = batch
    _fill(ds, "gradient_clipping", t.grad_clip, where, "train.grad_clip")

    optimizer = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = optimizer.setdefault("params", {})
    _fill(params, "lr", t.lr, f"{where} optimizer.params", "train.lr")
    _fill(params, "betas", list(t.betas), f"{where} optimizer.params", "train.betas")
    _fill(params, "eps", t.eps, f"{where} optimizer.params", "train.eps")
    _fill(params, "weight_decay", t.weight_decay, f"{where} optimizer.params", "train.weight_decay")

    scheduler = ds.get("scheduler")
    if scheduler is not None:
        sp = scheduler.setdefault("params", {})
        sw = f"{where} scheduler.params"
        _fill(sp, "warmup_min_lr", t.min_lr, sw, "train.min_lr")
        _fill(sp, "warmup_max_lr", t.lr, sw, "train.lr")
        _fill(sp, "warmup_num_steps", t.warmup_steps, sw, "train.warmup_steps")
        if scheduler.get("type") in WARMUP_SCHEDULERS and not sp["warmup_num_steps"] >= 1:
            raise ConfigError(
                f"train.warmup_steps={t.warmup_steps}: DeepSpeed's {scheduler['type']} ({where}) needs at least 1 "
                f"warm-up step; set train.warmup_steps >= 1"
            )
        if total_steps is not None:
            _fill(sp, "total_num_steps", total_steps, sw, "the run's total steps")
        elif sp.get("total_num_steps", AUTO) == AUTO:
            sp["total_num_steps"] = AUTO

    for name in ("bf16", "fp16"):
        section = ds.setdefault(name, {})
        _fill(section, "enabled", precision == name, f"{where} {name}", f"precision {precision}")

    _fill_parallel(ds, cfg, where)
    _check_checkpoint_writer(ds, where)
    nvme_path = str(cfg.nvme_dir)
    zero = ds.get("zero_optimization") or {}
    for key in ("offload_param", "offload_optimizer"):
        offload = zero.get(key)
        if offload and offload.get("device") == "nvme":
            if offload.get("nvme_path", AUTO) == AUTO:
                offload["nvme_path"] = nvme_path
    check_with_deepspeed(ds, where)
    return ds


def _fill_parallel(ds: dict[str, Any], cfg: RunConfig, where: str) -> None:
    """DeepSpeed's ``tensor_parallel.autotp_size`` from ``parallel.tensor`` (AutoTP combines with ZeRO 1-3);
    refuse what DeepSpeed cannot combine, and what llm-ds would train but could not export."""
    tp = cfg.parallel.tensor
    if tp > 1 or "tensor_parallel" in ds:
        section = ds.setdefault("tensor_parallel", {})
        if tp > 1 or section.get("autotp_size", AUTO) not in (AUTO, 0, 1):
            _fill(section, "autotp_size", tp, f"{where} tensor_parallel", "parallel.tensor")
        else:
            section["autotp_size"] = 0  # DeepSpeed's "off"
    pp = cfg.parallel.pipeline
    if pp > 1 and tp > 1:
        raise ConfigError(
            f"`parallel.pipeline`={pp} with `parallel.tensor`={tp}: DeepSpeed's pipeline engine does not take AutoTP; "
            f"choose one of them (set the other to 1)"
        )
    stage = zero_stage(ds)
    if tp > 1 and stage == 0:
        raise ConfigError(
            f"DeepSpeed config {where}: zero_optimization.stage=0 with `parallel.tensor`={tp}: its checkpoints "
            f"keep the weights in per-rank shards that `llm-ds export` cannot join; use ZeRO stage 1 or more "
            f"(ds_configs/zero1.json)"
        )
    if tp * pp > 1 and cfg.train.compile:
        raise ConfigError(
            f"`train.compile` with `parallel.tensor`={tp}, `parallel.pipeline`={pp}: DeepSpeed's compiled engine "
            f"is not run with a split model here; set train.compile=false"
        )
    if pp > 1 and stage > 1:
        raise ConfigError(
            f"DeepSpeed config {where}: zero_optimization.stage={stage} with `parallel.pipeline`={pp}: DeepSpeed's "
            f"pipeline engine takes ZeRO stage 0 or 1 (ds_configs/zero1.json)"
        )


def _check_checkpoint_writer(ds: dict[str, Any], where: str) -> None:
    """DeepSpeed's own ``checkpoint.writer`` is refused: its decoupled mode finishes a save inside a later
    optimizer step, after llm-ds would have marked it complete (and DeepSpeed's pipeline engine never
    finishes it); its fast writer splits a ZeRO file into one part per data-parallel rank under other names,
    and its mock writer writes nothing. llm-ds writes with torch.save, in the background where asked."""
    writer = (ds.get("checkpoint") or {}).get("writer")
    if writer:
        mode = "decoupled" if writer.get("decoupled") else str(writer.get("type", "fast")).lower()
        raise ConfigError(
            f"DeepSpeed config {where}: checkpoint.writer ({mode}) writes checkpoints llm-ds cannot mark complete and "
            f"resume from; remove it (llm-ds writes them with torch.save, behind training with checkpoint.async=true)"
        )


def find_auto(ds: Any, prefix: str = "") -> list[str]:
    """Key paths still set to ``"auto"`` (a resolved config must have none)."""
    if isinstance(ds, dict):
        return [p for k, v in ds.items() for p in find_auto(v, f"{prefix}{k}.")]
    return [prefix.rstrip(".")] if ds == AUTO else []


def check_job(
    cfg: RunConfig,
    template: dict[str, Any],
    world_size: int,
    source: str,
    precision: str | None = None,
    total_steps: int | None = None,
) -> tuple[dict[str, Any], str]:
    """Everything about a job that can be checked before any rank starts, on any machine: the DeepSpeed
    config resolved against the run config for ``world_size`` ranks, and the precision it assumed.

    The hardware is not known here: ``train.precision: auto`` is taken as ``precision`` where given (what
    the target hardware will pick), else as a CPU would resolve it. Raises ``ConfigError``.
    """
    assumed = resolve_precision(cfg.train.precision, template, "cpu", False, False)
    if precision and cfg.train.precision == AUTO:
        assumed = precision
    return resolve_ds_config(template, cfg, world_size, assumed, total_steps, source), assumed


def resolve_precision(requested: str, template: dict[str, Any], device: str, has_bf16: bool, has_fp16: bool) -> str:
    """Choose fp32, bf16 or fp16.

    An explicit ``train.precision`` wins; with ``auto``, an explicit ``bf16``/``fp16``
    ``enabled: true`` in the template wins; otherwise the hardware decides among those the
    template does not disable: bf16 where the accelerator has it, fp16 (dynamic loss scaling)
    where it has only that, and fp32 on CPU, whose bf16 is emulated on most cores and slower
    than fp32.
    """
    if requested != AUTO:
        return requested
    enabled = {name: (template.get(name) or {}).get("enabled", AUTO) for name in ("bf16", "fp16")}
    for name, value in enabled.items():
        if value is True:
            return name
    if device == "cpu":
        return "fp32"
    if has_bf16 and enabled["bf16"] is not False:
        return "bf16"
    return "fp16" if has_fp16 and enabled["fp16"] is not False else "fp32"
