"""The DeepSpeed runner command for a launch, built by pure functions that tests call directly."""

from __future__ import annotations

import os
import re
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

from launcher.hostfile import Host, HostfileError

LAUNCHERS = ("pdsh", "openmpi", "slurm", "no-ssh")
PROPAGATED_PREFIXES = ("NCCL_", "GLOO_", "HF_", "WANDB_")
TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "llm_ds" / "train.py"
_RESOURCE = re.compile(r"^(?P<host>[A-Za-z0-9][A-Za-z0-9._:-]*?)(?::(?P<slots>\d+(?:,\d+)*))?$")


@dataclass
class LaunchSpec:
    """What ``llm-ds launch`` was asked to start."""

    hosts: list[Host] | None  # from the hostfile; None: one node, ``num_gpus`` ranks
    hostfile: Path | None = None
    launcher: str = "pdsh"
    include: str | None = None
    exclude: str | None = None
    num_gpus: int | None = None
    master_addr: str | None = None
    master_port: int | None = None
    node_rank: int | None = None  # no-ssh: this node's rank, given per node
    ssh_port: int | None = None  # the workers' sshd port (pdsh); default ssh's own
    train_args: list[str] = field(default_factory=list)  # --config, --ds_config, --set ... for the driver
    env_names: list[str] = field(default_factory=list)  # extra variables to propagate


def parse_resources(text: str, hosts: list[Host], flag: str) -> dict[str, list[int]]:
    """``host1:0,1@host2`` as DeepSpeed's runner reads it: host -> sorted distinct slot indices (a host named
    twice has its slots merged, a repeated slot counts once; no slots: all of them), checked against the
    hostfile."""
    by_name = {h.name: h for h in hosts}
    out: dict[str, set[int]] = {}
    for part in text.split("@"):
        m = _RESOURCE.match(part)
        if not m:
            raise HostfileError(f"{flag} {text!r}: {part!r} is not host or host:slot,slot")
        name = m["host"]
        if name not in by_name:
            raise HostfileError(f"{flag} {text!r}: host {name!r} is not in the hostfile ({', '.join(by_name)})")
        slots = {int(s) for s in m["slots"].split(",")} if m["slots"] else set(range(by_name[name].slots))
        bad = sorted(s for s in slots if s >= by_name[name].slots)
        if bad:
            raise HostfileError(f"{flag} {text!r}: {name} has slots 0-{by_name[name].slots - 1}, not {bad}")
        out.setdefault(name, set()).update(slots)
    return {name: sorted(slots) for name, slots in out.items()}


def selected_slot_ids(spec: LaunchSpec) -> dict[str, list[int]]:
    """The slots the runner will start a rank on, per host, in hostfile order, as DeepSpeed's runner
    computes them (``parse_inclusion_exclusion``, then ``--num_gpus`` ranks on every host)."""
    assert spec.hosts is not None
    if spec.include and spec.exclude:
        raise HostfileError("--include and --exclude cannot be used together")
    if spec.num_gpus is not None and (spec.include or spec.exclude):
        raise HostfileError("--num_gpus cannot be combined with --include or --exclude (the runner refuses it)")
    pool = {h.name: list(range(h.slots)) for h in spec.hosts}
    if spec.include:
        chosen = parse_resources(spec.include, spec.hosts, "--include")
        pool = {name: chosen[name] for name in pool if name in chosen}
    elif spec.exclude:
        for name, slots in parse_resources(spec.exclude, spec.hosts, "--exclude").items():
            pool[name] = [s for s in pool[name] if s not in slots]
    pool = {name: slots for name, slots in pool.items() if slots}
    if not pool:
        raise HostfileError(f"--exclude {spec.exclude!r} leaves no slot of the hostfile")
    if spec.num_gpus is not None:
        short = [f"{h.name} (slots={h.slots})" for h in spec.hosts if h.slots < spec.num_gpus]
        if short:
            raise HostfileError(f"--num_gpus {spec.num_gpus} is more than the hostfile gives {', '.join(short)}")
        pool = {name: list(range(spec.num_gpus)) for name in pool}
    return pool


def selected_slots(spec: LaunchSpec) -> dict[str, int]:
    """Ranks the launch will start on each host of the hostfile, after ``--include``/``--exclude``/``--num_gpus``."""
    return {name: len(slots) for name, slots in selected_slot_ids(spec).items()}


def world_size(spec: LaunchSpec) -> int:
    """Total ranks the launch will start: the selected slots of the hostfile, or ``num_gpus``."""
    if spec.hosts is None:
        return spec.num_gpus or 1
    return sum(selected_slots(spec).values())


def is_this_node_only(hosts: list[Host] | None) -> bool:
    """A hostfile naming only this machine: DeepSpeed's runner would insist on ssh to itself for it."""
    local = {"localhost", "127.0.0.1", "::1", socket.gethostname(), socket.getfqdn()}
    return hosts is not None and len(hosts) == 1 and hosts[0].name in local


def build_command(spec: LaunchSpec, python: str = sys.executable) -> list[str]:
    """The runner's argv (no shell ever sees it). A hostfile of this node alone runs locally, without ssh."""
    argv = [python, "-m", "deepspeed.launcher.runner"]
    if is_this_node_only(spec.hosts) and spec.launcher == "pdsh":
        # Without a hostfile the runner calls this node "localhost"; the slots chosen stay the same.
        (slots,) = selected_slot_ids(spec).values()
        argv += ["--num_gpus", str(len(slots))] if slots == list(range(len(slots))) else [
            "--include", "localhost:" + ",".join(map(str, slots))
        ]  # fmt: skip
        if spec.master_port:
            argv += ["--master_port", str(spec.master_port)]
        return [*argv, str(TRAIN_SCRIPT), *spec.train_args]
    if spec.hostfile is not None:
        argv += ["--hostfile", str(spec.hostfile)]
    if spec.include:
        argv += ["--include", spec.include]
    if spec.exclude:
        argv += ["--exclude", spec.exclude]
    if spec.num_gpus is not None:
        argv += ["--num_gpus", str(spec.num_gpus)]
    if spec.launcher in ("openmpi", "slurm"):
        argv += ["--launcher", spec.launcher]
    if spec.launcher == "no-ssh":
        argv += ["--no_ssh", "--node_rank", str(spec.node_rank or 0)]
    if spec.launcher == "pdsh":
        if spec.ssh_port is not None:
            argv += ["--ssh_port", str(spec.ssh_port)]
        # The runner's own ssh check ignores the options pdsh uses (PDSH_SSH_ARGS_APPEND: a key, a config), so
        # it can refuse hosts pdsh reaches; `llm-ds doctor` and the restart probe check with pdsh's options.
        argv += ["--no_ssh_check"]
    if spec.master_addr:
        argv += ["--master_addr", spec.master_addr]
    elif spec.launcher == "pdsh" and spec.hosts:
        # Rank 0 runs on the first host. Without this the runner asks that host for its address over plain ssh,
        # without pdsh's options.
        argv += ["--master_addr", next(iter(selected_slot_ids(spec)))]
    if spec.master_port:
        argv += ["--master_port", str(spec.master_port)]
    return [*argv, str(TRAIN_SCRIPT), *spec.train_args]


def is_secret_name(name: str) -> bool:
    from llm_ds.monitor.metrics import SECRET_NAME

    return bool(SECRET_NAME.search(name))


def propagated_env(environ: dict[str, str], extra_names: list[str]) -> dict[str, str]:
    """The variables every node gets: NCCL_*, GLOO_*, HF_*, WANDB_* and the names asked for (``--env``).

    Secret-named variables (``HF_TOKEN``, ``WANDB_API_KEY``, ``*_KEY``, ``*_TOKEN``...) only when named
    with ``--env``: the file holds them in plain text, and DeepSpeed's pdsh runner puts every variable
    of it on each node's command line, where ``ps`` shows it.
    """
    return {
        k: v
        for k, v in sorted(environ.items())
        if k in extra_names or (k.startswith(PROPAGATED_PREFIXES) and not is_secret_name(k))
    }


def withheld_secrets(environ: dict[str, str], extra_names: list[str]) -> list[str]:
    """Secret-named variables of a propagated prefix that stay on this node (not named with ``--env``)."""
    return sorted(
        k for k in environ if k.startswith(PROPAGATED_PREFIXES) and is_secret_name(k) and k not in extra_names
    )


def write_env_file(path: Path, env: dict[str, str]) -> None:
    """DeepSpeed's ``.deepspeed_env`` format, one ``NAME=value`` a line, readable by the user only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.writelines(f"{k}={v}\n" for k, v in env.items())
