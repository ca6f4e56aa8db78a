"""The ``llm-ds`` command: ``llm-ds <subcommand> ...``.

Each subcommand is a ``<name>_command_parser(subparsers)`` that registers its arguments and a
``<name>_command(args) -> int``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import NoReturn

from llm_ds.config import UserError, dump_run_config, field_table, load_run_config
from llm_ds.ds_config import check_job, ds_config_source, find_auto, load_ds_template
from llm_ds.flags import ArgumentParser, add_run_arguments


def train_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The driver's flags (``llm_ds/train.py``, ``llm-ds train``)."""
    parser = parser or ArgumentParser(prog="llm_ds/train.py", description="Train with DeepSpeed.")
    add_run_arguments(parser)
    parser.add_argument(
        "--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)), help="set by the deepspeed launcher"
    )
    # DeepSpeed's own --deepspeed / --deepspeed_config, for scripts written against them.
    parser.add_argument("--deepspeed", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--deepspeed_config", help=argparse.SUPPRESS)
    return parser


def train_command_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train in this process (ranks: deepspeed --num_gpus N --module llm_ds.train ...)",
        description="Train with the run config and DeepSpeed config given.",
    )
    train_parser(parser)
    parser.set_defaults(func=_train_and_exit)


def train_command(args: argparse.Namespace) -> int:
    """Check everything the user wrote before torch is imported, then train; the process group is this
    process's own and is torn down at the end."""
    import time

    started_at = time.time()
    ds_config = args.ds_config or args.deepspeed_config
    cfg = load_run_config(args.config, args.overrides)
    check_job(cfg, load_ds_template(ds_config), int(os.environ.get("WORLD_SIZE", 1)), ds_config_source(ds_config))

    from llm_ds.distributed import teardown
    from llm_ds.trainer import Trainer

    Trainer(cfg, ds_config, handle_signals=True, started_at=started_at).fit()
    teardown()
    return 0


def _train_and_exit(args: argparse.Namespace) -> NoReturn:
    from llm_ds.train import exit_process

    exit_process(run_user_command(train_command, args, "llm-ds"))


def run_user_command(func, args: argparse.Namespace, prog: str) -> int:
    """Run a command; a ``UserError`` (bad input, in any layer) becomes one line and exit status 2."""
    try:
        return func(args)
    except UserError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2


def config_command_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "config",
        help="validate and print the resolved run config and DeepSpeed config",
        description="Check a run config and a DeepSpeed template together, as the driver will, and print both "
        "resolved; every DeepSpeed key is checked by DeepSpeed's own parser. Nothing is trained.",
    )
    add_run_arguments(parser)
    parser.add_argument(
        "--world_size",
        type=int,
        default=int(os.environ.get("WORLD_SIZE", 1)),
        help="total ranks the run will have (default 1)",
    )
    parser.add_argument(
        "--precision",
        choices=("fp32", "bf16", "fp16"),
        help="what train.precision=auto resolves to on the target hardware (default: fp32)",
    )
    parser.add_argument(
        "--explain", action="store_true", help="list every run config key with its default and meaning, and exit"
    )
    parser.set_defaults(func=config_command)


def config_command(args: argparse.Namespace) -> int:
    if args.explain:
        print(field_table(), end="")
        return 0
    cfg = load_run_config(args.config, args.overrides)
    template = load_ds_template(args.ds_config)
    source = ds_config_source(args.ds_config)
    ds, precision = check_job(cfg, template, args.world_size, source, args.precision, cfg.train.max_steps)
    print(f"# run config ({cfg.source}; output to {cfg.output_dir})")
    print(dump_run_config(cfg), end="")
    print(f"# DeepSpeed config for {args.world_size} rank(s), precision {precision}")
    print(json.dumps(ds, indent=2))
    pending = find_auto(ds)
    if pending:
        print(f"# resolved when the data is known: {', '.join(pending)}")
    return 0


def prepare_command_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "prepare",
        help="read, clean, tokenize and cache a run config's data ahead of training",
        description="Build the token cache that training will use (keyed by sources, preprocessing, tokenizer and "
        "block size), so that no rank spends cluster time on it. Run it once where the cache directory is shared "
        "or on each node's local disk.",
    )
    add_run_arguments(parser, ds_config=False)
    parser.set_defaults(func=prepare_command)


def prepare_command(args: argparse.Namespace) -> int:
    import time

    from llm_ds.data import cache
    from llm_ds.data.pipeline import cache_key, cache_root, describe, load_or_build_arrays, pin_hub_commits
    from llm_ds.model import build_tokenizer

    cfg = load_run_config(args.config, args.overrides)
    if cfg.data.streaming:
        print("data.streaming is true: documents are tokenized while training; there is nothing to prepare")
        return 0
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    data = pin_hub_commits(cfg.data)
    key = cache_key(data, tokenizer, cfg.train.seed)
    hit = (cache_root(data) / key / cache.DONE_MARK).exists()
    start = time.perf_counter()
    _, info = load_or_build_arrays(data, tokenizer, cfg.train.seed, is_builder=True)
    size_mb = cache.cache_size_bytes(cache_root(data), key) / 1e6
    print(f"{'cached already' if hit else 'built'} in {time.perf_counter() - start:.1f} s: {describe(info)}")
    print(f"cache: {info['cache_dir']} ({size_mb:.1f} MB)")
    return 0


def export_command_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write a checkpoint as a Hugging Face model folder",
        description="Consolidate a checkpoint of any ZeRO stage into config.json, model.safetensors, tokenizer "
        "files and generation_config.json, loadable with AutoModelForCausalLM.from_pretrained(OUT_DIR).",
    )
    parser.add_argument("checkpoint", help="a checkpoint folder (global_step<N>) or a checkpoints folder (its latest)")
    parser.add_argument("out_dir")
    parser.set_defaults(func=export_command)


def export_command(args: argparse.Namespace) -> int:
    from llm_ds.export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out_dir)
    print(f"exported {args.checkpoint} to {out}")
    return 0


def generate_command_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate", help="sample text from a checkpoint or an export", description="Sample a continuation of a prompt."
    )
    parser.add_argument("path", help="an export folder, a checkpoint folder, or a checkpoints folder")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 decodes greedily")
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=generate_command)


def generate_command(args: argparse.Namespace) -> int:
    from llm_ds.export import generate

    text = generate(args.path, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed)
    print(text)
    return 0


def report_command_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "report",
        help="plot a run's loss, learning rate and throughput to a PNG",
        description="Read RUN_DIR/metrics.jsonl and write a PNG (no TensorBoard needed).",
    )
    parser.add_argument("run_dir")
    parser.add_argument("--out", help="the PNG to write (default: RUN_DIR/report.png)")
    parser.set_defaults(func=report_command)


def report_command(args: argparse.Namespace) -> int:
    from llm_ds.monitor.report import write_report

    out = write_report(args.run_dir, args.out)
    print(f"wrote {out}")
    return 0


COMMANDS = (
    train_command_parser,
    config_command_parser,
    prepare_command_parser,
    export_command_parser,
    generate_command_parser,
    report_command_parser,
)
COMMANDS_GROUP = "llm_ds.commands"  # entry points of the commands above the library: launch, doctor, plan


def registered_commands() -> list:
    """The parser builders of llm-ds's own commands, then those installed under ``COMMANDS_GROUP``."""
    from importlib.metadata import entry_points

    found = sorted(entry_points(group=COMMANDS_GROUP), key=lambda ep: ep.name)
    return [*COMMANDS, *(ep.load() for ep in found)]


def build_parser() -> argparse.ArgumentParser:
    from llm_ds import __version__

    parser = ArgumentParser(prog="llm-ds", description="Train GPT-2-style models with DeepSpeed.")
    parser.add_argument("--version", action="version", version=f"llm-ds {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for register in registered_commands():
        register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return run_user_command(args.func, args, "llm-ds")


if __name__ == "__main__":
    sys.exit(main())
