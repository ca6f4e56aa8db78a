"""`pip install .` as a user does it: the wheel, in a fresh venv, used from a folder outside the checkout."""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import venv

import pytest

from tests.conftest import ROOT, free_port

pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A venv holding the built wheel and nothing else; torch, DeepSpeed and the other dependencies come
    from this environment's site-packages through a .pth line (its editable install of llm-ds is not seen)."""
    work = tmp_path_factory.mktemp("wheel")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(work / "dist"), str(ROOT)], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (work / "dist").glob("llm_ds-*.whl")
    env_dir = work / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    target = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                            capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    (work / "venv" / target.split(str(env_dir) + "/", 1)[1] / "reuse.pth").write_text(site.getsitepackages()[0] + "\n")
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True, timeout=300)
    outside = work / "elsewhere"
    outside.mkdir()
    return env_dir, outside


def run(env_dir, outside, *cmd, timeout=300):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{env_dir / 'bin'}:{env['PATH']}", PYTHONUNBUFFERED="1")
    return subprocess.run(list(cmd), cwd=outside, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_wheel_carries_the_templates_and_recipes(installed):
    env_dir, outside = installed
    proc = run(env_dir, outside, "python", "-c", "import llm_ds, llm_ds.ds_config as d; print(llm_ds.__file__); "
               "print(d.DS_CONFIGS_DIR); print(sorted(p.name for p in d.DS_CONFIGS_DIR.glob('*.json')))")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    package, templates, names = proc.stdout.splitlines()
    assert package.startswith(str(env_dir)) and templates.startswith(str(env_dir))  # not the checkout's
    assert names == str(sorted(p.name for p in (ROOT / "ds_configs").glob("*.json")))


def test_config_and_train_from_outside_the_checkout(installed):
    env_dir, outside = installed
    # The README's paths name the shipped files from any folder.
    proc = run(env_dir, outside, "llm-ds", "config", "--config", "llm_ds/configs/tiny.yaml",
               "--ds_config", "ds_configs/zero3.json")  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert '"stage": 3' in proc.stdout
    sets = ["--set", "train.max_steps=5", "--set", "train.warmup_steps=2", "--set", "train.eval_max_batches=2",
            "--set", "logging.log_interval=1", "--set", f"data.cache_dir={outside / 'cache'}"]  # fmt: skip
    proc = run(env_dir, outside, "llm-ds", "train", *sets, "--set", "train.output_dir=run")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((outside / "run" / "summary.json").read_text())
    assert summary["steps"] == 5 and summary["final_eval_loss"] is not None
    # The DeepSpeed runner starts the installed driver as a module.
    proc = run(env_dir, outside, "python", "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port",
               str(free_port()), "--module", "llm_ds.train", "--ds_config", "ds_configs/zero2.json", *sets,
               "--set", "train.max_steps=2", "--set", "train.output_dir=module-run")  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads((outside / "module-run" / "summary.json").read_text())["steps"] == 2
