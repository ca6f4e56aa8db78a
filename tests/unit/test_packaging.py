"""setup.cfg lists its packages by hand (to ship ds_configs/ inside llm_ds): the list must cover the tree."""

import configparser

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
