import pytest

from llm_ds.config import CONFIGS_DIR, ConfigError, load_run_config

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
