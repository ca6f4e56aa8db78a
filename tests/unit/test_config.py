import pytest

from llm_ds.config import (
    CONFIGS_DIR,
    ConfigError,
    DataConfig,
    ModelConfig,
    RunConfig,
    SourceConfig,
    TrainConfig,
    UserError,
    load_run_config,
)

SHIPPED = sorted(CONFIGS_DIR.glob("*.yaml"))


def test_configs_are_shipped():
    assert {p.name for p in SHIPPED} >= {"tiny.yaml", "gpt2-124m.yaml"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_yaml_loads_and_validates(path):
    cfg = load_run_config(path)
    assert cfg.run_name == path.stem
    assert cfg.data.block_size <= cfg.model.n_positions


def test_default_is_tiny_and_output_under_runs():
    cfg = load_run_config()
    assert cfg.run_name == "tiny"
    assert str(cfg.output_dir) == "runs/tiny"
    assert str(cfg.checkpoint_dir) == "runs/tiny/checkpoints"


def test_overrides_are_typed_and_applied_in_order():
    cfg = load_run_config(
        None,
        [
            "train.lr=1e-4",
            "train.max_steps=7",
            "train.betas=[0.8, 0.9]",
            "model.vocab_size=null",
            "train.max_steps=9",
            "train.lr=3",
        ],
    )
    assert cfg.train.lr == 3.0 and isinstance(cfg.train.lr, float)  # an int is accepted for a float
    assert cfg.train.max_steps == 9
    assert cfg.train.betas == [0.8, 0.9]
    assert cfg.model.vocab_size is None


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.lrr=1", "unknown key `train.lrr`; did you mean `train.lr`?"),
        ("trian.lr=1", "unknown section `trian`; did you mean `train`?"),
        ("train.max_steps=1.5", "`train.max_steps` must be int, got float 1.5"),
        ("train.lr=fast", "`train.lr` must be float, got str 'fast'"),
        ("logging.tensorboard=3", "`logging.tensorboard` must be bool"),
        ("train.betas=0.9", "`train.betas` must be a list of float"),
        ("train.lr", "expected section.key=value"),
        ("model.n_embd=130", "`model.n_embd` must be divisible by model.n_head (4), got 130"),
        ("data.block_size=512", "`data.block_size` must be <= model.n_positions (256), got 512"),
        ("train.precision=fp8", "`train.precision` must be one of"),
        ("model.activation_function=gelu_fast2", "`model.activation_function` must be one of"),
        ("model.loss_chunk_tokens=0", "`model.loss_chunk_tokens` must be > 0 (or null for automatic), got 0"),
    ],
)
def test_bad_overrides_name_the_key(override, expected):
    with pytest.raises(ConfigError) as err:
        load_run_config(None, [override])
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_key_in_yaml_names_file_and_closest(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  micro_batch: 4\n")
    with pytest.raises(
        ConfigError,
        match=r"run.yaml: unknown key `train.micro_batch`; did you mean "
        r"`train.micro_batch_size`\?",
    ):
        load_run_config(path)


def test_wrong_type_and_unknown_section_in_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  n_layer: two\n")
    with pytest.raises(ConfigError, match=r"run.yaml: `model.n_layer` must be int, got str 'two'"):
        load_run_config(path)
    path.write_text("optimizer:\n  lr: 1\n")
    with pytest.raises(ConfigError, match=r"unknown section `optimizer`"):
        load_run_config(path)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match=r"nope.yaml: no such file"):
        load_run_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: line \d+ is not valid YAML"):
        load_run_config(bad)


def test_neither_steps_nor_epochs():
    with pytest.raises(ConfigError, match="set train.max_steps or train.epochs"):
        load_run_config(None, ["train.max_steps=null"])
    assert load_run_config(None, ["train.max_steps=null", "train.epochs=0.5"]).train.epochs == 0.5


def test_from_dict_equals_the_yaml_and_applies_overrides():
    import yaml

    raw = yaml.safe_load((CONFIGS_DIR / "gpt2-124m.yaml").read_text())
    assert RunConfig.from_dict(raw).to_dict() == load_run_config(CONFIGS_DIR / "gpt2-124m.yaml").to_dict()
    cfg = RunConfig.from_dict({"train": {"max_steps": 50}}, overrides=["data.block_size=64", "train.lr=1"])
    assert (cfg.train.max_steps, cfg.data.block_size, cfg.train.lr) == (50, 64, 1.0)


@pytest.mark.parametrize(
    "values, overrides, message",
    [
        (
            {"train": {"max_step": 5}},
            [],
            "run config dict: unknown key `train.max_step`; did you mean `train.max_steps`?",
        ),
        ({"trian": {}}, [], "run config dict: unknown section `trian`; did you mean `train`?"),
        ({"train": {"micro_batch_size": "8"}}, [], "`train.micro_batch_size` must be int, got str '8'"),
        ({"train": {"lr": -1}}, [], "run config dict: `train.lr` must be > 0, got -1.0"),
        ({"data": {"sources": [{"hub": "x", "path": "y"}]}}, [], "`data.sources[0]` needs exactly one of"),
        ({}, ["train.warmup=3"], "override train.warmup: unknown key `train.warmup`; did you mean"),
        ([1, 2], [], "run config dict: top level must be a mapping of sections"),
    ],
)
def test_from_dict_errors_are_config_errors_naming_the_key(values, overrides, message):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_dict(values, overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_a_config_built_in_code_is_checked_when_made_and_again_on_check():
    with pytest.raises(ConfigError, match=r"`train.micro_batch_size` must be int, got str '8'"):
        RunConfig(train=TrainConfig(micro_batch_size="8"))
    with pytest.raises(ConfigError, match=r"`model.n_embd` must be divisible by model.n_head"):
        RunConfig(model=ModelConfig(n_embd=30, n_head=4))
    with pytest.raises(ConfigError, match=r"`data.sources\[0\].weight` must be float"):
        RunConfig(data=DataConfig(sources=[SourceConfig(path="x", weight="heavy")]))
    cfg = RunConfig(train=TrainConfig(lr=1))
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    cfg.train.max_steps = 0  # changed in place after it was made
    with pytest.raises(ConfigError, match=r"`train.max_steps` must be > 0, got 0"):
        cfg.check()


def test_every_user_error_shares_one_base():
    from launcher.hostfile import HostfileError
    from llm_ds.checkpoint import CheckpointError
    from llm_ds.data.sources import DataError
    from llm_ds.monitor.report import ReportError
    from llm_ds.plan import PlanError

    for error in (ConfigError, HostfileError, CheckpointError, DataError, ReportError, PlanError):
        assert issubclass(error, UserError), error


def test_the_readme_table_is_the_configs_own_description():
    from llm_ds.config import field_docs, field_table
    from tests.conftest import ROOT

    assert field_table() in (ROOT / "README.md").read_text()
    keys = [key for key, _, _ in field_docs()]
    expected = [f"{s}.{k}" for s in RunConfig().to_dict() for k in RunConfig().to_dict()[s]]
    assert [k for k in keys if "[]" not in k] == expected  # every key once, in order
    assert all(help for _, _, help in field_docs())


def test_config_explain_prints_the_table(capsys):
    from llm_ds.cli import main
    from llm_ds.config import field_table

    assert main(["config", "--explain"]) == 0
    assert capsys.readouterr().out == field_table()


def test_a_key_that_is_a_python_keyword_reads_and_dumps_as_written(tmp_path):
    """`checkpoint.async` is the field `async_` in code; YAML, --set, dicts and dumps say `async`."""
    import yaml

    from llm_ds.config import RunConfig, dump_run_config

    path = tmp_path / "run.yaml"
    path.write_text("checkpoint:\n  async: true\n")
    assert load_run_config(path).checkpoint.async_ is True
    assert load_run_config(None, ["checkpoint.async=true"]).checkpoint.async_ is True
    cfg = RunConfig.from_dict({"checkpoint": {"async": True}})
    assert yaml.safe_load(dump_run_config(cfg))["checkpoint"]["async"] is True
    assert RunConfig.from_dict(yaml.safe_load(dump_run_config(cfg))) == cfg
    with pytest.raises(ConfigError, match=r"unknown key `checkpoint.async_`; did you mean `checkpoint.async`\?"):
        load_run_config(None, ["checkpoint.async_=true"])
    with pytest.raises(ConfigError, match=r"`checkpoint.async` must be bool, got str 'soon'"):
        load_run_config(None, ["checkpoint.async=soon"])
