"""Bad input stops the driver before any rank trains, with one line naming the culprit, and writes nothing."""

from __future__ import annotations

import json

import pytest

from tests.conftest import ROOT, run_driver


def assert_refused(proc, *fragments):
    assert proc.returncode != 0
    assert "| epoch" not in proc.stdout, "a rank started training"
    for fragment in fragments:
        assert fragment in proc.stderr, f"{fragment!r} not in:\n{proc.stderr[-2000:]}"


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--set", "train.micro_batchsize=4"], ["unknown key `train.micro_batchsize`",
                                                "did you mean `train.micro_batch_size`?"]),
        (["--set", "train.max_steps=ten"], ["`train.max_steps` must be int, got str 'ten'"]),
        (["--config", "no/such/run.yaml"], ["run config no/such/run.yaml: no such file"]),
        (["--ds_config", "ds_configs/zero9.json"], ["DeepSpeed config ds_configs/zero9.json: no such file"]),
        (["--set", "data.paths=[/no/such/corpus.txt]"], ["'/no/such/corpus.txt': no such file or directory"]),
    ],
)
def test_single_process_errors(tmp_path, args, fragments):
    marker = tmp_path / "keep.txt"
    marker.write_text("earlier results")
    proc = run_driver([*args, "--set", f"train.output_dir={tmp_path}", "--set",
                       f"data.cache_dir={tmp_path / 'cache'}"], ranks=None, timeout=300)
    assert_refused(proc, "llm_ds: error:", *fragments)
    assert len([line for line in proc.stderr.splitlines() if "error:" in line]) == 1
    assert marker.read_text() == "earlier results"
    assert sorted(p.name for p in tmp_path.iterdir()) in (["keep.txt"], ["cache", "keep.txt"])


@pytest.mark.dist
def test_contradicting_batch_size_stops_every_rank(tmp_path):
    ds = json.loads(open("ds_configs/zero2.json").read())
    ds["train_batch_size"] = 12
    path = tmp_path / "bad_batch.json"
    path.write_text(json.dumps(ds))
    proc = run_driver(["--ds_config", str(path), "--set", "train.micro_batch_size=4",
                       "--set", f"train.output_dir={tmp_path / 'run'}"], ranks=2, timeout=300)
    assert_refused(proc, "bad_batch.json: train_batch_size=12", "train.micro_batch_size (4)",
                   "world size (2) = 8")
    assert not (tmp_path / "run").exists()


def test_a_typo_inside_a_ds_config_section_stops_the_driver_before_the_data(tmp_path):
    template = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
    template["zero_optimization"]["overlap_com"] = True
    (tmp_path / "typo.json").write_text(json.dumps(template))
    proc = run_driver(["--ds_config", str(tmp_path / "typo.json"), "--set", f"train.output_dir={tmp_path / 'run'}",
                       "--set", f"data.cache_dir={tmp_path / 'cache'}"], ranks=None, timeout=300)  # fmt: skip
    assert_refused(proc, "unknown key `zero_optimization.overlap_com`; did you mean `overlap_comm`?")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()  # no data work, nothing written
