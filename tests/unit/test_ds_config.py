import json

import pytest

from llm_ds.config import ConfigError, load_run_config
from llm_ds.ds_config import (
    DS_CONFIGS_DIR,
    find_auto,
    load_ds_template,
    resolve_ds_config,
    resolve_precision,
    uses_nvme,
    zero_stage,
)

SHIPPED = sorted(DS_CONFIGS_DIR.glob("*.json"))
EXPECTED = {"zero1.json": 1, "zero2.json": 2, "zero3.json": 3, "zero2_offload.json": 2, "zero3_offload.json": 3}


def test_shipped_set():
    assert {p.name for p in SHIPPED} >= set(EXPECTED)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
@pytest.mark.parametrize("world_size", [1, 2, 16])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_every_template_resolves_fully(path, world_size, precision):
    cfg = load_run_config(None, ["train.grad_accum_steps=3"])
    ds = resolve_ds_config(load_ds_template(path), cfg, world_size, precision, total_steps=123, source=path.name)
    assert find_auto(ds) == []
    assert ds["train_batch_size"] == cfg.train.micro_batch_size * 3 * world_size
    assert ds["train_micro_batch_size_per_gpu"] == cfg.train.micro_batch_size
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["optimizer"]["params"]["lr"] == cfg.train.lr
    assert ds["scheduler"]["type"] == "WarmupDecayLR"
    assert ds["scheduler"]["params"]["total_num_steps"] == 123
    assert ds["scheduler"]["params"]["warmup_num_steps"] == cfg.train.warmup_steps
    assert ds["gradient_clipping"] == cfg.train.grad_clip
    assert ds["bf16"]["enabled"] is (precision == "bf16")
    assert ds["fp16"]["enabled"] is (precision == "fp16")
    if path.name in EXPECTED:
        assert zero_stage(ds) == EXPECTED[path.name]
    json.dumps(ds)  # serialisable, as rank 0 saves it


def test_offload_templates():
    z2 = load_ds_template(DS_CONFIGS_DIR / "zero2_offload.json")
    assert z2["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    z3 = load_ds_template(DS_CONFIGS_DIR / "zero3_offload.json")
    assert uses_nvme(z3) and not uses_nvme(z2)
    cfg = load_run_config(None, ["train.output_dir=/tmp/run-x"])
    ds = resolve_ds_config(z3, cfg, 2, "fp32", 10)
    for key in ("offload_param", "offload_optimizer"):
        assert ds["zero_optimization"][key]["nvme_path"] == "/tmp/run-x/nvme"
    ds = resolve_ds_config(z3, load_run_config(None, ["train.nvme_path=/local_nvme"]), 2, "fp32", 10)
    assert ds["zero_optimization"]["offload_param"]["nvme_path"] == "/local_nvme"


def test_batch_contradiction_names_both_numbers():
    cfg = load_run_config(None, ["train.micro_batch_size=4", "train.grad_accum_steps=2"])
    template = {"train_batch_size": 32, "zero_optimization": {"stage": 1}}
    assert resolve_ds_config(template, cfg, 4, "fp32", 10)["train_batch_size"] == 32
    with pytest.raises(ConfigError) as err:
        resolve_ds_config(template, cfg, 2, "fp32", 10, source="mine.json")
    msg = str(err.value)
    assert "mine.json" in msg and "train_batch_size=32" in msg and "= 16" in msg and "world size (2)" in msg


@pytest.mark.parametrize(
    "template, expected",
    [
        (
            {"train_micro_batch_size_per_gpu": 2},
            "train_micro_batch_size_per_gpu=2 contradicts train.micro_batch_size=8",
        ),
        ({"gradient_accumulation_steps": 4}, "gradient_accumulation_steps=4 contradicts train.grad_accum_steps=1"),
        ({"optimizer": {"type": "AdamW", "params": {"lr": 0.1}}}, "lr=0.1 contradicts train.lr=0.002"),
        ({"gradient_clipping": 0.5}, "gradient_clipping=0.5 contradicts train.grad_clip=1.0"),
        ({"bf16": {"enabled": True}}, "enabled=True contradicts precision fp32"),
        (
            {"scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": 50}}},
            "total_num_steps=50 contradicts the run's total steps=300",
        ),
    ],
)
def test_explicit_contradictions_stop(template, expected):
    cfg = load_run_config()
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        resolve_ds_config(template, cfg, 1, "fp32", 300)


def test_agreeing_explicit_values_are_kept():
    cfg = load_run_config()
    ds = resolve_ds_config(
        {"optimizer": {"type": "AdamW", "params": {"lr": 0.002, "betas": [0.9, 0.95]}}}, cfg, 1, "fp32", 300
    )
    assert ds["optimizer"]["params"]["lr"] == 0.002


def test_precision_resolution():
    auto = {"bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}}
    assert resolve_precision("auto", auto, "cuda", True, True) == "bf16"
    assert resolve_precision("auto", auto, "cuda", False, True) == "fp16"
    assert resolve_precision("auto", auto, "cuda", False, False) == "fp32"
    assert resolve_precision("auto", auto, "cpu", True, True) == "fp32"
    assert resolve_precision("auto", {"fp16": {"enabled": True}}, "cuda", True, True) == "fp16"
    assert resolve_precision("bf16", auto, "cpu", False, False) == "bf16"
    assert resolve_precision("auto", {"bf16": {"enabled": False}}, "cuda", True, True) == "fp16"
    assert (
        resolve_precision("auto", {"bf16": {"enabled": False}, "fp16": {"enabled": False}}, "cuda", True, True)
        == "fp32"
    )


def test_template_errors(tmp_path):
    with pytest.raises(ConfigError, match="missing.json: no such file"):
        load_ds_template(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"train_batch_size": 4,\n "zero_optimization": }')
    with pytest.raises(ConfigError, match=r"bad.json: invalid JSON at line 2"):
        load_ds_template(bad)


@pytest.mark.parametrize(
    "key, hint",
    [
        ("zero_optimisation", "did you mean `zero_optimization`?"),
        ("train_batchsize", "did you mean `train_batch_size`?"),
        ("gradient_clip", "did you mean `gradient_clipping`?"),
        ("frobnicate", ""),
    ],
)
def test_unknown_top_level_key_is_refused(tmp_path, key, hint):
    path = tmp_path / "typo.json"
    path.write_text(json.dumps({"train_batch_size": "auto", key: {"stage": 2}}))
    with pytest.raises(ConfigError) as err:
        load_ds_template(path)
    suffix = f"; {hint}" if hint else ""
    assert str(err.value).endswith(f"typo.json: unknown top-level key `{key}` (DeepSpeed would ignore it){suffix}")


@pytest.mark.parametrize("key", ["stage", "lr", "offload_optimizer", "seed"])
def test_words_of_deepspeeds_source_that_are_no_top_level_key_are_refused(key):
    from llm_ds.ds_config import check_top_level_keys

    with pytest.raises(ConfigError, match=f"unknown top-level key `{key}`"):
        check_top_level_keys({key: 1}, "x.json")


def test_the_top_level_keys_are_derived_from_deepspeeds_parser():
    """Recorded from DeepSpeedConfig as it parses: if that stops working for a DeepSpeed version, fail here
    rather than check nothing."""
    from llm_ds.ds_config import deepspeed_top_level_keys

    keys = deepspeed_top_level_keys()
    for path in SHIPPED:
        assert set(json.loads(path.read_text())) <= keys, path.name
    common = {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "optimizer",
              "scheduler", "fp16", "bf16", "gradient_clipping", "zero_optimization", "activation_checkpointing",
              "flops_profiler", "steps_per_print", "wall_clock_breakdown", "tensorboard", "wandb", "aio",
              "checkpoint", "compile", "data_types", "communication_data_type", "tensor_parallel",
              "pipeline"}  # fmt: skip
    assert common <= keys
    assert len(keys) < 200  # keys DeepSpeed reads, not every word in its source


@pytest.mark.parametrize(
    "edit, message",
    [
        (("zero_optimization", "overlap_com", True),
         "unknown key `zero_optimization.overlap_com`; did you mean `overlap_comm`?"),
        (("zero_optimization.offload_optimizer", "pin_memroy", True),
         "unknown key `zero_optimization.offload_optimizer.pin_memroy`; did you mean `pin_memory`?"),
        (("bf16", "enabld", True), "unknown key `bf16.enabld`; did you mean `enabled`?"),
        (("zero_optimization", "stage", 7), "`zero_optimization.stage`=7: Input should be"),
        (("zero_optimization", "reduce_bucket_size", "big"), "`zero_optimization.reduce_bucket_size`='big'"),
    ],
)  # fmt: skip
def test_section_typos_are_refused_as_deepspeed_refuses_them(edit, message):
    """DeepSpeed's own DeepSpeedConfig rejects these (later, in deepspeed.initialize, as a pydantic
    traceback); resolving the template says so first, in one line naming the key."""
    import pydantic
    from deepspeed.runtime.config import DeepSpeedConfig

    section, key, value = edit
    ds = load_ds_template(DS_CONFIGS_DIR / "zero3_offload.json")
    node = ds
    for part in section.split("."):
        node = node[part]
    node[key] = value
    cfg = load_run_config(None, [])
    resolved = resolve_ds_config(load_ds_template(DS_CONFIGS_DIR / "zero3_offload.json"), cfg, 1, "fp32", 10)
    node = resolved
    for part in section.split("."):
        node = node[part]
    node[key] = value
    with pytest.raises(pydantic.ValidationError):  # the library itself refuses the same config
        DeepSpeedConfig(resolved)
    with pytest.raises(ConfigError) as err:
        resolve_ds_config(ds, cfg, 1, "fp32", total_steps=10, source="zero3_offload.json")
    line = str(err.value)
    assert line.startswith("DeepSpeed config zero3_offload.json: ") and message in line and "\n" not in line


def test_every_key_deepspeed_reads_is_accepted(tmp_path):
    keys = [
        "tensorboard",
        "wandb",
        "csv_monitor",
        "comms_logger",
        "flops_profiler",
        "activation_checkpointing",
        "elasticity",
        "autotuning",
        "compile",
        "data_types",
        "checkpoint",
        "torch_autocast",
        "aio",
        "communication_data_type",
        "zero_allow_untested_optimizer",
        "prescale_gradients",
    ]
    path = tmp_path / "many.json"
    path.write_text(json.dumps({k: {} for k in keys}))
    assert set(load_ds_template(path)) == set(keys)


def test_zero_warmup_steps_is_refused_naming_the_key_before_deepspeed_raises():
    """DeepSpeed's WarmupDecayLR raises a traceback for warmup_num_steps=0 inside deepspeed.initialize."""
    import torch
    from deepspeed.runtime.lr_schedules import WarmupDecayLR

    cfg = load_run_config(None, ["train.warmup_steps=0"])
    template = load_ds_template(DS_CONFIGS_DIR / "zero1.json")
    with pytest.raises(ValueError, match="warmup_num_steps"):
        WarmupDecayLR(torch.optim.SGD([torch.zeros(1, requires_grad=True)]), 10, 0.0, 1e-3, warmup_num_steps=0)
    with pytest.raises(ConfigError, match=r"^train.warmup_steps=0: .*WarmupDecayLR.*train.warmup_steps >= 1$"):
        resolve_ds_config(template, cfg, 1, "fp32", total_steps=10, source="zero1.json")
    no_scheduler = {k: v for k, v in template.items() if k != "scheduler"}
    assert "scheduler" not in resolve_ds_config(no_scheduler, cfg, 1, "fp32", total_steps=10)


@pytest.mark.parametrize(
    "writer, mode", [({"type": "fast", "decoupled": True}, "decoupled"), ({"type": "fast"}, "fast"), ({}, "fast")]
)
def test_deepspeeds_checkpoint_writer_is_refused_naming_what_to_use(writer, mode):
    """Its decoupled mode finishes a save after COMPLETE would be written; its fast writer renames ZeRO files."""
    writer = writer or {"io_multiplier": 1}  # the type left to DeepSpeed's default, fast
    template = {**load_ds_template(DS_CONFIGS_DIR / "zero1.json"), "checkpoint": {"writer": writer}}
    message = rf"^DeepSpeed config zero1.json: checkpoint.writer \({mode}\) .*remove it \(llm-ds writes them"
    with pytest.raises(ConfigError, match=message):
        resolve_ds_config(template, load_run_config(None), 1, "fp32", total_steps=10, source="zero1.json")


def test_a_section_deepspeed_has_removed_is_one_line():
    """DeepSpeed raises its own DeepSpeedConfigError (a plain Exception) for a leftover nebula block."""
    template = {**load_ds_template(DS_CONFIGS_DIR / "zero1.json"), "nebula": {"enabled": True}}
    with pytest.raises(ConfigError, match=r"^DeepSpeed config zero1.json: DeepSpeed refuses it: Nebula checkpointing"):
        resolve_ds_config(template, load_run_config(None), 1, "fp32", total_steps=10, source="zero1.json")
