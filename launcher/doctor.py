"""``llm-ds doctor --hostfile H``: preflight every host before a multi-node job spends its first hour.

One ssh call per host (with the ssh options the runner's pdsh will use, from
``PDSH_SSH_ARGS_APPEND``) runs a small Python probe with this node's interpreter in this node's
working directory, as pdsh will: it reports versions, accelerators, the clock, libaio, and whether
the checkpoint folder is writable and shows this node's marker (a shared folder). Nothing here
imports torch.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

from launcher.hostfile import Host, parse_hostfile
from llm_ds.flags import add_run_arguments

SSH_TIMEOUT_S = 10
MAX_CLOCK_SKEW_S = 2.0
PACKAGES = ("torch", "deepspeed", "transformers")
PROBE = r"""
import importlib.metadata as m, json, os, platform, shutil, subprocess, sys, time
ckpt, marker, token = sys.argv[1], sys.argv[2], sys.argv[3]
out = {"python": sys.executable, "python_version": platform.python_version(), "cwd": os.getcwd(), "time": time.time()}
for p in PACKAGES_PLACEHOLDER:
    try:
        out[p] = m.version(p)
    except m.PackageNotFoundError:
        out[p] = None
smi = shutil.which("nvidia-smi")
out["gpus"] = len(subprocess.run([smi, "-L"], capture_output=True, text=True).stdout.splitlines()) if smi else 0
out["libaio"] = os.path.exists("/usr/include/libaio.h")
try:
    os.makedirs(ckpt, exist_ok=True)
    probe = os.path.join(ckpt, ".doctor-" + platform.node())
    open(probe, "w").write("ok")
    os.remove(probe)
    out["ckpt_writable"] = True
except OSError as e:
    out["ckpt_writable"] = str(e)
try:
    out["ckpt_shared"] = open(marker).read() == token
except OSError:
    out["ckpt_shared"] = False
print("LLM_DS_DOCTOR " + json.dumps(out))
""".replace("PACKAGES_PLACEHOLDER", repr(PACKAGES))


def ssh_command(host: str, remote: str, ssh_port: int | None) -> list[str]:
    extra = shlex.split(os.environ.get("PDSH_SSH_ARGS_APPEND", ""))
    port = ["-p", str(ssh_port)] if ssh_port else []
    return ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={SSH_TIMEOUT_S}", *extra, *port, host, remote]


def probe_host(host: Host, ckpt_dir: Path, marker: Path, token: str, ssh_port: int | None) -> dict:
    remote = (
        f"cd {shlex.quote(os.getcwd())} && {shlex.quote(sys.executable)} -c {shlex.quote(PROBE)} "
        f"{shlex.quote(str(ckpt_dir))} {shlex.quote(str(marker))} {token}"
    )
    sent = time.time()
    try:
        proc = subprocess.run(
            ssh_command(host.name, remote, ssh_port), capture_output=True, text=True, timeout=SSH_TIMEOUT_S + 20
        )
    except subprocess.TimeoutExpired:
        return {"error": f"no answer over ssh within {SSH_TIMEOUT_S + 20} s"}
    received = time.time()
    line = next((x for x in proc.stdout.splitlines() if x.startswith("LLM_DS_DOCTOR ")), None)
    if line is None:
        why = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        if proc.returncode == 255:
            return {"error": f"not reachable by ssh within {SSH_TIMEOUT_S} s ({why})"}
        return {"error": f"{sys.executable} or {os.getcwd()} is not usable there ({why})"}
    result = json.loads(line[len("LLM_DS_DOCTOR ") :])
    result["skew_s"] = result["time"] - (sent + received) / 2
    return result


MAX_CONCURRENT_PROBES = 32


def probe_hosts(
    hosts: list[Host], ckpt_dir: Path, marker: Path, token: str, ssh_port: int | None, workers: int | None = None
) -> dict[str, dict]:
    """Every host probed at once (at most ``MAX_CONCURRENT_PROBES`` ssh sessions), results in hostfile order:
    a hundred nodes take about as long as the slowest one, not a hundred times one."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers or min(MAX_CONCURRENT_PROBES, len(hosts))) as pool:
        futures = [pool.submit(probe_host, h, ckpt_dir, marker, token, ssh_port) for h in hosts]
        return {h.name: f.result() for h, f in zip(hosts, futures, strict=True)}


def check(hosts: list[Host], results: dict[str, dict], needs_libaio: bool, master_port: int) -> list[str]:
    """One actionable line per problem found."""
    problems = []
    local = {p: _local_version(p) for p in PACKAGES}
    for host in hosts:
        r = results[host.name]
        if "error" in r:
            problems.append(f"{host.name}: {r['error']}")
            continue
        for pkg in PACKAGES:
            if r[pkg] != local[pkg]:
                problems.append(
                    f"{host.name}: {pkg} {r[pkg]} but {local[pkg]} here; install the same version on every node"
                )
        if r["python_version"] != sys.version.split()[0]:
            problems.append(f"{host.name}: Python {r['python_version']} but {sys.version.split()[0]} here")
        if r["gpus"] and r["gpus"] < host.slots:
            problems.append(f"{host.name}: slots={host.slots} but {r['gpus']} GPU(s); lower slots in the hostfile")
        if needs_libaio and not r["libaio"]:
            problems.append(f"{host.name}: libaio missing for NVMe offload; apt-get install libaio-dev")
        if r["ckpt_writable"] is not True:
            problems.append(f"{host.name}: checkpoint folder not writable ({r['ckpt_writable']})")
        elif not r["ckpt_shared"]:
            problems.append(
                f"{host.name}: does not see this node's files in the checkpoint folder; it must be a "
                f"shared filesystem (or set checkpoint.dir to one)"
            )
        if abs(r["skew_s"]) > MAX_CLOCK_SKEW_S:
            problems.append(f"{host.name}: clock {r['skew_s']:+.1f} s off this node's; sync it (chrony/ntp)")
    if not _port_free(master_port):
        problems.append(f"master port {master_port} is in use on this node; pass another --master_port")
    return problems


def _local_version(package: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("", port))
            return True
        except OSError:
            return False


def doctor_command_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "doctor",
        help="preflight every host of a hostfile before a multi-node job",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--hostfile", required=True)
    parser.add_argument("--ssh_port", type=int, help="the port sshd listens on, as for the runner")
    parser.add_argument("--master_port", type=int, default=29500)
    add_run_arguments(parser)  # the checkpoint folder every host must share; NVMe offload needs libaio
    parser.set_defaults(func=doctor_command)


def doctor_command(args: argparse.Namespace) -> int:
    from llm_ds.config import load_run_config
    from llm_ds.ds_config import load_ds_template, uses_nvme

    hosts = parse_hostfile(args.hostfile)
    cfg = load_run_config(args.config, args.overrides)
    needs_libaio = uses_nvme(load_ds_template(args.ds_config))
    ckpt_dir = cfg.checkpoint_dir.resolve()
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    marker = ckpt_dir / f".doctor-{token}"
    marker.write_text(token)
    try:
        results = probe_hosts(hosts, ckpt_dir, marker, token, args.ssh_port)
    finally:
        marker.unlink(missing_ok=True)
    print(f"{'host':<24}{'slots':>6}{'gpus':>6}  {'python':<9}{'torch':<14}{'deepspeed':<11}{'clock':>8}  checkpoints")
    for h in hosts:
        r = results[h.name]
        if "error" in r:
            print(f"{h.name:<24}{h.slots:>6}  unreachable")
            continue
        shared = "shared" if r["ckpt_shared"] else ("not shared" if r["ckpt_writable"] is True else "not writable")
        print(
            f"{h.name:<24}{h.slots:>6}{r['gpus']:>6}  {r['python_version']:<9}{str(r['torch']):<14}"
            f"{str(r['deepspeed']):<11}{r['skew_s']:>+7.2f}s  {shared}"
        )
    problems = check(hosts, results, needs_libaio, args.master_port)
    for line in problems:
        print(f"problem: {line}", file=sys.stderr)
    print("ok: every host is ready" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0
