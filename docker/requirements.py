"""Print what setup.cfg requires, with the named extras, one requirement a line for ``pip install -r``.

The image installs its dependencies from setup.cfg alone, before the code is copied in, so a change to
the code rebuilds neither them nor DeepSpeed's ops:  python3 requirements.py setup.cfg hub wandb
"""

import configparser
import sys


def requirements(setup_cfg: str, extras: list[str]) -> list[str]:
    cfg = configparser.ConfigParser()
    if not cfg.read(setup_cfg):
        raise SystemExit(f"{setup_cfg}: no such file")
    lines = cfg["options"]["install_requires"].splitlines()
    for extra in extras:
        if extra not in cfg["options.extras_require"]:
            raise SystemExit(f"{setup_cfg}: no extra {extra!r}")
        lines += cfg["options.extras_require"][extra].splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("llm-ds[")]


if __name__ == "__main__":
    print("\n".join(requirements(sys.argv[1], sys.argv[2:])))
