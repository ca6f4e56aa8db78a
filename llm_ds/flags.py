"""Command-line flags that take either spelling: ``--num_gpus`` or ``--num-gpus``, ``--gpu-mem-gb`` or
``--gpu_mem_gb``.

Flags are declared in one spelling (DeepSpeed's runner's own where they are its flags: ``--num_gpus``,
``--master_port``, ``--ssh_port``), and help shows that one; the other is accepted as the same flag.
"""

from __future__ import annotations

import argparse


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose long flags also answer to the other spelling of ``-`` and ``_``;
    subparsers made from it are of the same kind."""

    def add_argument(self, *names, **kwargs):
        action = super().add_argument(*names, **kwargs)
        for name in action.option_strings:
            if not name.startswith("--"):
                continue
            for other in ("--" + name[2:].replace("_", "-"), "--" + name[2:].replace("-", "_")):
                # Parsed as the same flag; not listed in help or in error messages.
                self._option_string_actions.setdefault(other, action)
        return action

    def _get_option_tuples(self, option_string):
        # An abbreviation matches both spellings of one flag: that is one flag, not an ambiguity.
        unique, seen = [], set()
        for option in super()._get_option_tuples(option_string):
            if id(option[0]) not in seen:
                seen.add(id(option[0]))
                unique.append(option)
        return unique


def add_run_arguments(parser: argparse.ArgumentParser, ds_config: bool = True) -> None:
    """``--config``, ``--ds_config`` and ``--set``: a run, for every command that takes one (the driver,
    ``config``, ``prepare``, ``launch``, ``plan``, ``doctor``)."""
    from llm_ds.ds_config import DEFAULT_DS_CONFIG

    parser.add_argument("--config", help="run config YAML (default: the bundled tiny.yaml)")
    if ds_config:
        parser.add_argument(
            "--ds_config", help=f"DeepSpeed JSON template (default: ds_configs/{DEFAULT_DS_CONFIG.name})"
        )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a run config value; repeatable",
    )
