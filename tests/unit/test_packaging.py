"""setup.cfg lists its packages by hand (to ship ds_configs/ inside llm_ds): the list must cover the tree."""

import configparser
import os

from tests.conftest import ROOT


def test_every_folder_of_the_package_is_listed_and_ds_configs_ships_inside_it():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    listed = set(cfg["options"]["packages"].split())
    package_dir = dict(line.split(" = ") for line in cfg["options"]["package_dir"].strip().splitlines())
    assert package_dir == {"llm_ds.ds_configs": "ds_configs"}
    on_disk = {"llm_ds.ds_configs"}
    for top in ("llm_ds", "launcher"):
        for folder in [ROOT / top, *(ROOT / top).rglob("*")]:
            if folder.is_dir() and folder.name != "__pycache__" and any(p.is_file() for p in folder.iterdir()):
                on_disk.add(".".join(folder.relative_to(ROOT).parts))
    assert listed == on_disk
    data = cfg["options.package_data"]
    assert data["llm_ds.ds_configs"].strip() == "*.json" and data["llm_ds.configs"].strip() == "*.yaml"


def test_make_install_takes_torch_from_the_index_asked_for():
    import subprocess

    def recipe(*args):
        proc = subprocess.run(["make", "-n", "-B", ".venv/.installed", *args], cwd=ROOT, capture_output=True,
                              text=True, check=True)  # fmt: skip
        return proc.stdout

    assert "--index-url https://example.invalid/whl/cu128" in recipe("TORCH_INDEX=https://example.invalid/whl/cu128")
    assert "--index-url" not in recipe()  # pip's own index unless asked
    assert '"torch==2.13.0"' in recipe() and '"torch==2.5.1"' in recipe("TORCH=torch==2.5.1")


def declared_requirements():
    from packaging.requirements import Requirement

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = cfg["options"]["install_requires"].splitlines()
    for extra in cfg["options.extras_require"].values():
        lines += extra.splitlines()
    return [Requirement(line) for line in lines if line.strip() and not line.strip().startswith("llm-ds[")]


# Reached into beyond their public API: a new minor release may break us, so it must be proven first.
INTERNALS = {"torch", "deepspeed", "transformers"}


def test_every_dependency_has_a_floor_and_a_ceiling_just_above_what_the_suite_runs_with():
    """Under `make test-floors` (LLM_DS_FLOORS=1): every dependency is at its floor, so this run proves the
    floors; otherwise every ceiling lies just above the release this run uses."""
    from importlib.metadata import version

    from packaging.version import Version

    requirements = declared_requirements()
    names = {r.name for r in requirements}
    assert {"torch", "deepspeed", "transformers", "pyarrow", "datasets", "wandb", "matplotlib"} <= names
    for req in requirements:
        ops = {s.operator: Version(s.version) for s in req.specifier}
        assert set(ops) == {">=", "<"}, f"{req}: a floor (>=) and a ceiling (<), nothing else"
        running = Version(version(req.name))
        assert running in req.specifier, f"the suite runs {req.name} {running}, outside {req}"
        if os.environ.get("LLM_DS_FLOORS") == "1":
            assert Version(running.public) == ops[">="], f"{req.name} {running} is not its floor"
            continue
        if req.name in INTERNALS:
            limit = Version(f"{running.major}.{running.minor + 1}")
        else:
            limit = Version(f"{running.major + 1}") if running.major else Version(f"0.{running.minor + 1}")
        assert ops["<"] <= limit, f"{req}: the ceiling lies beyond what the suite has proven ({running})"


def test_the_makefile_and_the_dockerfile_take_versions_from_setup_cfg_alone():
    """Their one pin is torch's (the wheel index is theirs to choose), inside setup.cfg's range; every other
    package comes from installing llm-ds itself, beside that torch."""
    import re

    torch_req = next(r for r in declared_requirements() if r.name == "torch")
    makefile = (ROOT / "Makefile").read_text()
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert re.search(r"^TORCH \?= torch==(\S+)$", makefile, re.M).group(1) in torch_req.specifier
    assert re.search(r"^ARG TORCH_VERSION=(\S+)$", dockerfile, re.M).group(1) in torch_req.specifier
    for name, text in (("Makefile", makefile), ("Dockerfile", dockerfile)):
        code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
        pins = re.findall(r"\b([A-Za-z][\w.-]*)\s*(?:==|>=|<=|~=)\s*[\w$.{}]", code)
        assert set(pins) <= {"torch"}, f"{name} pins {pins}: versions belong in setup.cfg"
    assert "python3 requirements.py setup.cfg hub wandb > /tmp/requirements.txt" in dockerfile
    assert 'pip install --no-build-isolation -r /tmp/requirements.txt "torch==${TORCH_VERSION}"' in dockerfile
