"""Train a GPT-2 with DeepSpeed: ``deepspeed [runner args] llm_ds/train.py [--config RUN.yaml] [--ds_config DS.json]``.

Also ``python llm_ds/train.py`` (one process), ``python -m llm_ds.train`` and ``llm-ds train``.
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a script: import the package, not this folder's modules
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
    sys.path.insert(0, os.path.dirname(_here))

import argparse  # noqa: E402
import gc  # noqa: E402
import logging  # noqa: E402
import time  # noqa: E402
from typing import NoReturn  # noqa: E402

from llm_ds.checkpoint import CheckpointError  # noqa: E402
from llm_ds.config import ConfigError, load_run_config  # noqa: E402
from llm_ds.data.sources import DataError  # noqa: E402
from llm_ds.ds_config import load_ds_template, resolve_ds_config, resolve_precision  # noqa: E402


def train_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    from llm_ds.flags import ArgumentParser

    parser = parser or ArgumentParser(prog="llm_ds/train.py", description=__doc__)
    parser.add_argument("--config", help="run config YAML (default: the bundled tiny.yaml)")
    parser.add_argument("--ds_config", help="DeepSpeed JSON template (default: ds_configs/zero1.json)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a run config value; repeatable",
    )
    parser.add_argument(
        "--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)), help="set by the deepspeed launcher"
    )
    # DeepSpeed's own --deepspeed / --deepspeed_config, for scripts written against them.
    parser.add_argument("--deepspeed", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--deepspeed_config", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    start_time = time.time()
    args = train_parser().parse_args(argv)
    ds_path = args.ds_config or args.deepspeed_config
    try:
        # Everything the user wrote is checked before torch is imported or any rank trains.
        cfg = load_run_config(args.config, args.overrides)
        template = load_ds_template(ds_path)
        world_size = int(os.environ.get("WORLD_SIZE", 1))
        early_precision = resolve_precision(cfg.train.precision, template, "cpu", False, False)
        resolve_ds_config(template, cfg, world_size, early_precision, None, ds_path or "zero1.json")

        from llm_ds import runtime

        rank = runtime.dist_env()[0]
        runtime.setup_logging(rank)
        runtime.init_distributed()
        run = runtime.build_run(cfg, template, ds_path or "zero1.json")
        return runtime.fit_and_report(cfg, run, start_time)
    except (ConfigError, DataError, CheckpointError) as exc:
        print(f"llm_ds: error: {exc}", file=sys.stderr)
        return 2


def exit_process(code: int) -> NoReturn:
    """End a training process with ``code``, without the interpreter's teardown.

    By now everything is written and the process group is destroyed. Tearing the interpreter
    down can still destroy objects that torch's communication threads hold (gloo's async work)
    and abort the process, "terminate called without an active exception", after a complete run,
    which the launcher then reports as the whole job's failure. Flush, and leave.
    """
    gc.collect()  # data loader workers and engine buffers go while the interpreter is whole
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_process(main())
