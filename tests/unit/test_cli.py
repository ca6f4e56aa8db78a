import json

from llm_ds.cli import main
from tests.conftest import ROOT


def test_config_prints_the_resolved_pair(capsys):
    assert (
        main(
            [
                "config",
                "--ds_config",
                "ds_configs/zero3_offload.json",
                "--world_size",
                "4",
                "--set",
                "train.grad_accum_steps=2",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    ds = json.loads(out[out.index("{") : out.rindex("}") + 1])
    assert ds["train_batch_size"] == 8 * 2 * 4
    assert ds["zero_optimization"]["offload_param"]["nvme_path"] == "runs/tiny/nvme"


def test_config_errors_exit_2_with_one_line(capsys):
    assert main(["config", "--set", "train.lr=-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "`train.lr` must be > 0" in err[0]


def test_prepare_builds_once_then_reuses(tmp_path, capsys):
    (tmp_path / "docs.jsonl").write_text(
        "".join(json.dumps({"text": f"Document {i % 40} " * 30}) + "\n" for i in range(50))
    )  # 10 exact duplicates
    args = [
        "prepare",
        "--set",
        f"data.paths=[{tmp_path / 'docs.jsonl'}]",
        "--set",
        f"data.cache_dir={tmp_path / 'c'}",
        "--set",
        "data.dedup=true",
    ]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert first.startswith("built in") and "preprocessing: duplicates 10" in first
    assert main(args) == 0
    second = capsys.readouterr().out
    assert second.startswith("cached already") and str(tmp_path / "c" / "tokens") in second


def test_prepare_reports_bad_data(tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text('{"body": "no text field"}\n')
    assert (
        main(
            ["prepare", "--set", f"data.paths=[{tmp_path / 'bad.jsonl'}]", "--set", f"data.cache_dir={tmp_path / 'c'}"]
        )
        == 2
    )
    assert "bad.jsonl:1: no field 'text'" in capsys.readouterr().err


def test_report_of_a_folder_without_metrics(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "metrics.jsonl: no such file" in capsys.readouterr().err


def test_report_draws_a_png(tmp_path, capsys):
    records = [
        {"step": s, "train/loss": 9 - s / 10, "train/lr": s * 1e-4, "perf/tokens_per_s": 1000 + s}
        for s in (1, 10, 20, 30)
    ] + [{"step": 30, "eval/loss": 6.5, "eval/perplexity": 665.1}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["report", str(tmp_path)]) == 0
    png = (tmp_path / "report.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


def test_export_of_a_folder_that_is_no_checkpoint(tmp_path, capsys):
    assert main(["export", str(tmp_path), str(tmp_path / "out")]) == 2
    assert "not a complete llm-ds checkpoint" in capsys.readouterr().err


def test_config_refuses_a_typo_inside_a_section_in_one_line(tmp_path, capsys):
    template = json.loads((ROOT / "ds_configs" / "zero2_offload.json").read_text())
    template["zero_optimization"]["offload_optimizer"]["pin_memroy"] = True
    (tmp_path / "typo.json").write_text(json.dumps(template))
    assert main(["config", "--ds_config", str(tmp_path / "typo.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "unknown key `zero_optimization.offload_optimizer.pin_memroy`; did you mean `pin_memory`?" in err


def test_version(capsys):
    import importlib.metadata

    import pytest

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"llm-ds {importlib.metadata.version('llm-ds')}"


def test_every_long_flag_of_every_command_takes_both_spellings():
    import argparse

    from llm_ds.cli import build_parser

    parser = build_parser()
    (subparsers,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    checked = 0
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            for flag in action.option_strings:
                if flag.startswith("--") and ("_" in flag or "-" in flag[2:]):
                    for other in (flag.replace("_", "-"), "--" + flag[2:].replace("-", "_")):
                        assert sub._option_string_actions[other] is action, (name, flag, other)
                        checked += 1
    assert checked > 20
    plan = parser.parse_args(["plan", "--num-gpus", "2", "--gpu_mem_gb", "40"])
    assert plan.num_gpus == 2 and plan.gpu_mem_gb == 40.0
    launch = parser.parse_args(["launch", "--dry_run", "--master-port", "3", "--ds-config", "x.json"])
    assert launch.dry_run and launch.master_port == 3 and launch.ds_config == "x.json"


def test_an_optional_package_that_is_missing_is_named_with_its_extra(tmp_path, capsys, monkeypatch):
    """wandb, datasets and matplotlib are extras: asking for one that is absent stops at the config check
    (before any rank starts) with one line naming the key and the pip command."""
    for module in ("wandb", "datasets", "matplotlib"):
        monkeypatch.setitem(__import__("sys").modules, module, None)  # the import machinery's "not here"
    assert main(["config", "--set", "logging.wandb=true"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "`logging.wandb` needs the wandb package" in err[0] and "llm-ds[wandb]" in err[0]
    assert main(["config", "--set", "data.sources=[{hub: wikitext, config: wikitext-2-raw-v1}]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "`data.sources[0].hub` needs the datasets package" in err[0] and "llm-ds[hub]" in err[0]
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "train/loss": 9.0}) + "\n")
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "matplotlib" in err[0] and "llm-ds[report]" in err[0]
    assert main(["config"]) == 0  # none of them is needed otherwise
