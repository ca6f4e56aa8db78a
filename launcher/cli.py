"""``llm-ds launch``: check everything that costs a cluster hour when wrong, then start DeepSpeed's runner."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from launcher.command import (
    LAUNCHERS,
    LaunchSpec,
    build_command,
    is_secret_name,
    is_this_node_only,
    propagated_env,
    selected_slots,
    withheld_secrets,
    world_size,
    write_env_file,
)
from launcher.hostfile import HostfileError, parse_hostfile
from launcher.supervise import Policy, probes_hosts, supervise
from llm_ds.flags import add_run_arguments

if TYPE_CHECKING:
    from llm_ds.config import RunConfig


def launch_command_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "launch",
        help="validate a multi-node launch, then start the deepspeed runner",
        description="Check the hostfile, the run config and DeepSpeed config together (batch arithmetic over "
        "all ranks, unknown keys, the NVMe path) before any node starts; then run DeepSpeed's runner with "
        "llm_ds/train.py, propagating NCCL_*, GLOO_*, HF_*, WANDB_* and --env names to every node.",
    )
    add_job_arguments(parser)
    parser.add_argument("--launcher", choices=LAUNCHERS, default="pdsh")
    parser.add_argument("--master_addr")
    parser.add_argument("--master_port", type=int)
    parser.add_argument("--node_rank", type=int, help="with --launcher no-ssh: this node's rank")
    parser.add_argument("--ssh_port", type=int, help="the port the workers' sshd listens on (pdsh; the image: 2222)")
    parser.add_argument(
        "--env",
        dest="env_names",
        action="append",
        default=[],
        metavar="NAME",
        help="another environment variable to propagate; repeatable",
    )
    parser.add_argument(
        "--max-restarts",
        type=int,
        default=0,
        metavar="N",
        help="on a failure (a rank died, a node was lost), drop the hosts that do not answer over ssh and start "
        "again from the latest checkpoint, at most N times (default 0: no restart)",
    )
    parser.add_argument(
        "--min-nodes",
        type=int,
        default=1,
        metavar="M",
        help="give up when fewer than M hosts answer after a failure (default 1)",
    )
    parser.add_argument(
        "--restart-delay",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds to wait before a restart (default 10)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the command and environment, start nothing")
    parser.set_defaults(func=launch_command)


def add_job_arguments(parser: argparse.ArgumentParser) -> None:
    """What a job is, for every command that checks one (`launch`, `plan`): where its ranks run, its
    run config and its DeepSpeed template."""
    parser.add_argument("--hostfile", help="DeepSpeed hostfile (default: this node only)")
    parser.add_argument("--include", help="hosts/slots to use, as the runner spells it: host1:0,1@host2")
    parser.add_argument("--exclude", help="hosts/slots to leave out, same spelling")
    parser.add_argument(
        "--num_gpus", type=int, help="ranks per node: on this node without a hostfile, on every host with one"
    )
    add_run_arguments(parser)


class CheckedJob(NamedTuple):
    spec: LaunchSpec
    cfg: RunConfig
    template: dict
    ranks: int


def validate(args: argparse.Namespace, resuming: bool = True) -> CheckedJob:
    """Every check, in the order a user would fix them; returns the spec, the loaded run config and
    DeepSpeed template, and the number of ranks. ``resuming``: the job resumes its checkpoint, if it has one
    (on these ranks, with the checkpoint's global batch); the planner plans the run config as written."""
    from llm_ds.checkpoint import config_for_resume
    from llm_ds.config import ConfigError, load_run_config
    from llm_ds.ds_config import check_job, ds_config_source, load_ds_template, uses_nvme

    hosts = parse_hostfile(args.hostfile) if args.hostfile else None
    if args.launcher == "no-ssh" and (args.node_rank is None or not args.master_addr):
        raise HostfileError("--launcher no-ssh needs --node_rank and --master_addr on every node")
    train_args = [
        *(["--config", args.config] if args.config else []),
        *(["--ds_config", args.ds_config] if args.ds_config else []),
        *[a for o in args.overrides for a in ("--set", o)],
    ]
    spec = LaunchSpec(
        hosts=hosts,
        hostfile=Path(args.hostfile).resolve() if args.hostfile else None,
        launcher=args.launcher,
        include=args.include,
        exclude=args.exclude,
        num_gpus=args.num_gpus,
        master_addr=args.master_addr,
        master_port=args.master_port,
        node_rank=args.node_rank,
        ssh_port=getattr(args, "ssh_port", None),
        train_args=train_args,
        env_names=args.env_names,
    )
    ranks = world_size(spec)
    if ranks < 1:
        raise HostfileError(f"--include/--exclude leave no rank to run (hostfile {args.hostfile})")
    _check_restart_policy(args, len(selected_slots(spec)) if hosts else 1)
    cfg = load_run_config(args.config, args.overrides)
    template = load_ds_template(args.ds_config)
    if resuming:  # its checkpoint, if it has one: on these ranks, with the checkpoint's global batch
        cfg = config_for_resume(cfg, ranks)
    ds, _ = check_job(cfg, template, ranks, ds_config_source(args.ds_config))
    cfg.check_ranks_per_node(selected_slots(spec) if hosts else {"this node": ranks})
    if uses_nvme(ds):
        nvme = cfg.nvme_dir
        probe = next((p for p in (nvme, *nvme.parents) if p.exists()), None)
        if probe is None or not probe.is_dir() or not os.access(probe, os.W_OK):
            raise ConfigError(f"train.nvme_path={nvme}: not writable here ({probe} is the nearest existing path)")
    return CheckedJob(spec, cfg, template, ranks)


def _check_restart_policy(args: argparse.Namespace, n_hosts: int) -> None:
    max_restarts = getattr(args, "max_restarts", 0)
    if max_restarts < 0:
        raise HostfileError(f"--max-restarts {max_restarts}: give 0 (no restart) or more")
    if getattr(args, "restart_delay", 0) < 0:
        raise HostfileError(f"--restart-delay {args.restart_delay}: give 0 seconds or more")
    min_nodes = getattr(args, "min_nodes", None)
    min_nodes = 1 if min_nodes is None else min_nodes
    if not 1 <= min_nodes <= n_hosts:
        raise HostfileError(f"--min-nodes {min_nodes}: the job has {n_hosts} node(s); give 1 to {n_hosts}")
    if max_restarts and (args.include or args.exclude):
        raise HostfileError(
            "--max-restarts with --include/--exclude: write the hosts and slots to use into the hostfile"
        )


def launch_command(args: argparse.Namespace) -> int:
    from llm_ds.monitor.metrics import redact

    spec, cfg, _, ranks = validate(args)
    argv = build_command(spec)
    env = propagated_env(dict(os.environ), spec.env_names)
    env_file = (cfg.output_dir / ".deepspeed_env").resolve()
    withheld = withheld_secrets(dict(os.environ), spec.env_names)
    secrets_sent = sorted(name for name in env if is_secret_name(name))
    if withheld:
        print(
            f"not propagated: {', '.join(withheld)} (secrets reach other nodes only with --env NAME; or log in "
            "on each node: `wandb login`, `huggingface-cli login`)",
            file=sys.stderr,
        )
    if secrets_sent and spec.hosts and not is_this_node_only(spec.hosts) and spec.launcher == "pdsh":
        print(
            f"warning: {', '.join(secrets_sent)} go to every node on the runner's command line (pdsh), "
            "visible to `ps` there",
            file=sys.stderr,
        )
    probes = probes_hosts(spec)
    if args.max_restarts and args.min_nodes > 1 and not probes:
        print(
            f"note: --min-nodes {args.min_nodes} has no effect here: only pdsh launches of several hosts probe "
            "and drop hosts; a restart uses the same hosts",
            file=sys.stderr,
        )
    if args.dry_run:
        print(shlex.join(argv))
        if args.max_restarts:
            print(
                f"# supervised: up to {args.max_restarts} restart(s), {args.restart_delay:g} s apart"
                + (f", on at least {args.min_nodes} answering node(s)" if probes else ", on the same hosts")
            )
        print(f"# {ranks} rank(s); propagated to every node through {env_file}:")
        for name, value in env.items():
            print(f"{name}={redact(value) if not is_secret_name(name) else '***'}")
        return 0
    write_env_file(env_file, env)
    policy = Policy(args.max_restarts, args.min_nodes, args.restart_delay)
    return supervise(spec, {**os.environ, "DS_ENV_FILE": str(env_file)}, cfg.output_dir, cfg.checkpoint_dir, policy)
