"""The GPU script's machinery on CPU, so it cannot rot between the rare sessions with a GPU: the
import check, tests/gpu, every kind of variant, results written as it goes, and the deadline."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.dist


def gpu_sh(out, *args, timeout=400):
    env = {**os.environ, "OUT": str(out), "PY": sys.executable}
    return subprocess.run(["bash", "bench/gpu.sh", "--smoke", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def test_smoke_runs_tests_then_every_kind_of_variant(tmp_path):
    variants = "plain,zero1,zero1_transformers_loss,zero1_compile,zero1_dp2,zero1_pp2"  # tp2: the same runner path
    proc = gpu_sh(tmp_path, "--variants", variants)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    imports = [line for line in proc.stdout.splitlines() if line.startswith("imports: deepspeed ")]
    assert len(imports) == 1 and imports[0].endswith("einops, msgpack, cpuinfo: ok")
    assert proc.stdout.index(imports[0]) < proc.stdout.index("tests/gpu") < proc.stdout.index("plain:")
    assert "skipped" in (tmp_path / "gpu-tests.txt").read_text()  # tests/gpu ran (and skipped, on CPU)
    assert (tmp_path / "gpu-tests.xml").is_file()
    report = json.loads((tmp_path / "gpu-cpu-smoke.json").read_text())
    assert report["complete"] and list(report["variants"]) == variants.split(",")
    for name, r in report["variants"].items():
        assert "error" not in r, (name, r.get("error"))
        assert r["tokens_per_s"] > 0 and r["seconds_to_first_step"] > 0, name
    assert report["ratios"]["zero1_vs_plain"] > 0 and report["ratios"]["fused_loss_vs_transformers_loss"] > 0
    assert report["ratios"]["pp2_vs_dp2"] > 0


def test_deadline_skips_what_cannot_finish_and_still_writes_the_results(tmp_path):
    proc = gpu_sh(tmp_path, "--no-tests", "--deadline", "1", timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not (tmp_path / "gpu-tests.txt").exists()
    report = json.loads((tmp_path / "gpu-cpu-smoke.json").read_text())
    assert report["complete"] and report["setup"]["deadline_s"] == 1
    assert report["variants"] and all("before --deadline" in r["skipped"] for r in report["variants"].values())
    assert "plain: skipped (needs about 60 s" in proc.stdout
