"""The layers of the code, one way: the library never imports the launcher, and neither imports torch
when a command only checks input."""

from __future__ import annotations

import ast
import subprocess
import sys

from tests.conftest import ROOT


def imported_modules(path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_the_library_never_imports_the_launcher():
    offenders = {
        str(path.relative_to(ROOT)): sorted(n for n in imported_modules(path) if n.split(".")[0] == "launcher")
        for path in (ROOT / "llm_ds").rglob("*.py")
    }
    assert {path: names for path, names in offenders.items() if names} == {}


def test_the_launchers_commands_reach_llm_ds_through_its_entry_points():
    from llm_ds.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    assert {"train", "config", "launch", "doctor", "plan"} <= set(commands)


def test_checking_a_job_imports_no_torch():
    code = (
        "import sys, launcher.cli, launcher.doctor, launcher.plan, llm_ds, llm_ds.cli, llm_ds.plan\n"
        "from llm_ds import RunConfig\n"
        "RunConfig.from_dict({'train': {'max_steps': 5}})\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'deepspeed')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.strip() == "[]"
