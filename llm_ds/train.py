"""Train a GPT-2 with DeepSpeed: ``deepspeed [runner args] llm_ds/train.py [--config RUN.yaml] [--ds_config DS.json]``.

Also ``python llm_ds/train.py`` (one process), ``python -m llm_ds.train`` and ``llm-ds train``.
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str] | None = None) -> int:
    """The driver: ``llm-ds train`` with the runner's flags; user errors are one line and status 2."""
    from llm_ds.cli import run_user_command, train_command, train_parser

    return run_user_command(train_command, train_parser().parse_args(argv), "llm_ds")


def exit_process(code: int) -> None:
    """End a training process with ``code``, without the interpreter's teardown.

    By now everything is written and the process group is destroyed. Tearing the interpreter
    down can still destroy objects that torch's communication threads hold (gloo's async work)
    and abort the process, "terminate called without an active exception", after a complete run,
    which the launcher then reports as the whole job's failure. Flush, and leave.
    """
    import gc
    import logging

    gc.collect()  # data loader workers and engine buffers go while the interpreter is whole
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    if not __package__:  # run as a path: Python put this folder first on sys.path, where config.py,
        sys.path[0] = os.path.dirname(os.path.abspath(sys.path[0]))  # data/ and model.py would shadow other modules
    exit_process(main())
