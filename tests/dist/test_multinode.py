"""Two nodes on one machine: loopback addresses 127.0.0.2 and 127.0.0.3, each with its own sshd.

The unmodified ``deepspeed --hostfile`` path (pdsh over ssh) trains 2 nodes x 1 rank to the same
losses as a 2-rank single-node run; a node that loses its rank stops the whole job, which a rerun
resumes. Keys, host keys and sshd configuration live in the test's temporary folder: the user's
~/.ssh is never read or written. Every sshd started here is stopped at the end, also on failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import DEEPSPEED, ROOT, free_port, run_driver

pytestmark = [pytest.mark.dist, pytest.mark.multinode]
NODES = ("127.0.0.2", "127.0.0.3")
SSHD = Path("/usr/sbin/sshd")


def _free_port_on(addresses) -> int:
    for _ in range(50):
        with socket.socket() as s:
            s.bind((addresses[0], 0))
            port = s.getsockname()[1]
        try:
            for a in addresses[1:]:
                with socket.socket() as s:
                    s.bind((a, port))
            return port
        except OSError:
            continue
    raise RuntimeError("no common free port")


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    if not SSHD.exists() or not shutil.which("pdsh"):
        pytest.fail("multi-node tests need openssh-server and pdsh (make install puts them in)")
    folder = tmp_path_factory.mktemp("nodes")
    for name in ("id", "host_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / name)], check=True)
    shutil.copy(folder / "id.pub", folder / "authorized_keys")
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege-separation folder
    port = _free_port_on(NODES)
    daemons = {}
    ssh_args = (f"-F /dev/null -i {folder / 'id'} -o IdentitiesOnly=yes -o UserKnownHostsFile=/dev/null "
                f"-o StrictHostKeyChecking=no -o LogLevel=ERROR")

    def start_sshd(address):
        daemons[address] = subprocess.Popen([
            str(SSHD), "-D", "-e", "-f", "/dev/null", "-p", str(port), "-o", f"ListenAddress={address}",
            "-o", f"HostKey={folder / 'host_key'}", "-o", f"AuthorizedKeysFile={folder / 'authorized_keys'}",
            "-o", "StrictModes=no", "-o", "PasswordAuthentication=no", "-o", "PermitRootLogin=prohibit-password",
            "-o", "UsePAM=no", "-o", f"PidFile={folder / address}.pid"],
            stdout=subprocess.DEVNULL, stderr=open(folder / f"sshd-{address}.log", "a"))
        deadline = time.monotonic() + 30
        while subprocess.run(["ssh", *ssh_args.split(), "-p", str(port), address, "true"],
                             capture_output=True).returncode != 0:  # until the node answers over ssh
            assert time.monotonic() < deadline, (folder / f"sshd-{address}.log").read_text()
            time.sleep(0.2)

    def stop_sshd(address):
        """The node's sshd stops listening: it no longer answers (sessions already open go on)."""
        daemon = daemons.pop(address)
        daemon.terminate()
        daemon.wait(timeout=30)

    try:
        for address in NODES:
            start_sshd(address)
        (folder / "hosts").write_text("".join(f"{a} slots=1\n" for a in NODES))
        (folder / "env").write_text("GLOO_SOCKET_IFNAME=lo\n")
        yield {"hostfile": folder / "hosts", "port": port, "start_sshd": start_sshd, "stop_sshd": stop_sshd,
               "env": {"PDSH_SSH_ARGS_APPEND": ssh_args, "DS_ENV_FILE": str(folder / "env")}}
    finally:
        for daemon in daemons.values():
            for child in psutil.Process(daemon.pid).children(recursive=True):  # sessions still open
                child.kill()
            daemon.terminate()
            daemon.wait(timeout=30)


def train_args(out, data_cache, steps=20) -> list[str]:
    return ["--ds_config", "ds_configs/zero1.json", "--set", "data.block_size=64", "--set", "train.micro_batch_size=4",
            "--set", f"train.max_steps={steps}", "--set", "train.warmup_steps=5", "--set", "train.eval_interval=0",
            "--set", "train.eval_max_batches=2", "--set", "logging.log_interval=5", "--set", "checkpoint.interval=5",
            "--set", f"train.output_dir={out}", "--set", f"data.cache_dir={data_cache}"]


def multinode_cmd(nodes, args) -> list[str]:
    return [str(DEEPSPEED), "--hostfile", str(nodes["hostfile"]), "--master_addr", NODES[0],
            "--master_port", str(free_port()), "--ssh_port", str(nodes["port"]), "--no_ssh_check",
            str(ROOT / "llm_ds" / "train.py"), *args]


def losses(out) -> dict[int, float]:
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def test_two_nodes_train_like_one_node_with_two_ranks_as_replicas_and_as_pipeline_stages(two_nodes, tmp_path, data_cache):
    single, multi = tmp_path / "single", tmp_path / "multi"
    proc = run_driver(train_args(single, data_cache), ranks=2)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = subprocess.run(multinode_cmd(two_nodes, train_args(multi, data_cache)), cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ, **two_nodes["env"]})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "127.0.0.2: | epoch" in proc.stdout  # rank 0's lines came back through pdsh from node 127.0.0.2
    summary = json.loads((multi / "summary.json").read_text())
    assert summary["world_size"] == 2
    reference, got = losses(single), losses(multi)
    assert sorted(got) == sorted(reference) == [1, 5, 10, 15, 20]
    for step in reference:
        assert got[step] == pytest.approx(reference[step], rel=1e-6), step

    # The same training as two pipeline stages, one per node: activations and their gradients cross the nodes.
    stages = tmp_path / "stages"
    pipeline = [*train_args(stages, data_cache), "--set", "parallel.pipeline=2", "--set", "train.grad_accum_steps=2"]
    proc = subprocess.run(multinode_cmd(two_nodes, pipeline), cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **two_nodes["env"]})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 rank(s) (pipeline 2 stages x data-parallel 1)" in proc.stdout
    got = losses(stages)
    assert sorted(got) == sorted(reference)
    for step in reference:
        assert got[step] == pytest.approx(reference[step], rel=1e-4), step


def launch_cmd(nodes, args, *options) -> list[str]:
    return [sys.executable, "-m", "llm_ds.cli", "launch", "--hostfile", str(nodes["hostfile"]),
            "--master_addr", NODES[0], "--master_port", str(free_port()), "--ssh_port", str(nodes["port"]),
            *options, *args]


def start_launch(nodes, args, *options) -> subprocess.Popen:
    return subprocess.Popen(launch_cmd(nodes, args, *options), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **nodes["env"], "GLOO_SOCKET_IFNAME": "lo", "PYTHONUNBUFFERED": "1"})


def wait_for_checkpoint(out, step, job, timeout_s=300) -> None:
    deadline = time.monotonic() + timeout_s
    while not (out / "checkpoints" / f"global_step{step}" / "COMPLETE").exists():
        assert job.poll() is None and time.monotonic() < deadline, job.stdout.read()[-3000:]
        time.sleep(0.05)


def wait_for_checkpoint_after(out, since: float, job, timeout_s=300) -> None:
    """Until a checkpoint is completed after ``since``."""
    deadline = time.monotonic() + timeout_s
    while not any(p.stat().st_mtime > since for p in (out / "checkpoints").glob("global_step*/COMPLETE")):
        assert job.poll() is None and time.monotonic() < deadline, job.stdout.read()[-3000:]
        time.sleep(0.1)


def node_rank(out, node: int) -> psutil.Process:
    """The rank process of node ``node`` (its launcher was started with --node_rank=node) of the run in ``out``."""
    ranks = [p for p in psutil.process_iter(["cmdline"])
             if "--local_rank=0" in (p.info["cmdline"] or []) and str(out) in " ".join(p.info["cmdline"])]
    mine = [p for p in ranks if any(f"--node_rank={node}" in " ".join(a.cmdline()) for a in p.parents()[:2])]
    assert len(mine) == 1, [r.cmdline() for r in ranks]
    return mine[0]


def test_a_lost_node_is_dropped_and_the_job_finishes_on_the_rest(two_nodes, tmp_path, data_cache):
    """Node 2 loses its rank and stops answering ssh: the supervisor drops it and resumes on node 1 alone, with
    twice the accumulation, to the losses of an uninterrupted run."""
    whole, out = tmp_path / "whole", tmp_path / "run"
    proc = run_driver(train_args(whole, data_cache, steps=100), ranks=2)
    assert proc.returncode == 0, proc.stderr[-2000:]
    job = start_launch(two_nodes, train_args(out, data_cache, steps=100),
                       "--max-restarts", "2", "--min-nodes", "1", "--restart-delay", "1")
    try:
        wait_for_checkpoint(out, 20, job)
        two_nodes["stop_sshd"](NODES[1])
        node_rank(out, 1).kill()
        output, _ = job.communicate(timeout=600)
    finally:
        if job.poll() is None:
            job.kill()
        two_nodes["start_sshd"](NODES[1])
    assert job.returncode == 0, output[-4000:]
    assert f"dropped {NODES[1]}; 1 rank(s), master {NODES[0]}, resuming at step" in output
    assert "on 1 rank(s) (was 2): grad_accum_steps 1 -> 2, global batch 8 kept" in output
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["steps"], summary["world_size"], summary["grad_accum_steps"]) == (100, 1, 2)
    (restart,) = summary["restarts"]
    assert restart["hosts_dropped"] == [NODES[1]] and restart["world_size"] == 1
    assert restart["resumed_at_step"] == summary["resumed_at_step"] >= 20
    assert f"{NODES[1]} (not reachable by ssh" in restart["reason"]
    reference, got = losses(whole), losses(out)
    after = [s for s in reference if s > restart["resumed_at_step"]]
    assert after and all(got[s] == pytest.approx(reference[s], rel=1e-4) for s in after), (reference, got)


def test_a_killed_rank_restarts_on_both_nodes_and_a_second_failure_gives_up(two_nodes, tmp_path, data_cache):
    out = tmp_path / "run"
    args = train_args(out, data_cache, steps=400) + ["--set", "checkpoint.interval=10"]
    job = start_launch(two_nodes, args, "--max-restarts", "1", "--restart-delay", "0")
    try:
        wait_for_checkpoint(out, 10, job)
        killed_at = time.time()
        node_rank(out, 1).kill()  # the node stays healthy
        wait_for_checkpoint_after(out, killed_at, job)  # by the restarted run: the first cannot go on without it
        node_rank(out, 1).kill()
        output, _ = job.communicate(timeout=600)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode != 0
    resumed = re.search(r"restart 1 of 1 at .*; no host dropped; 2 rank\(s\), resuming at step (\d+)", output)
    assert resumed and int(resumed[1]) >= 10 and int(resumed[1]) % 10 == 0, output[-3000:]
    assert "giving up: 1 restart(s) allowed (--max-restarts); 2 failure(s):" in output
    failures = [x for x in output.splitlines() if "llm-ds launch:   failure" in x]
    assert [x.split(" at ")[0] for x in failures] == ["llm-ds launch:   failure 1", "llm-ds launch:   failure 2"]
    assert all("exit status" in x for x in failures)


def test_no_ssh_with_node_ranks_given_per_node_restarts_together(tmp_path, data_cache):
    """Kubernetes-style: no ssh; each node runs its own `llm-ds launch --launcher no-ssh --node_rank N
    --max-restarts 1`. A rank killed on node 2 fails both nodes' jobs; both start again and finish the run."""
    hostfile = tmp_path / "hosts"
    hostfile.write_text("".join(f"{a} slots=1\n" for a in NODES))
    single, multi = tmp_path / "single", tmp_path / "multi"
    proc = run_driver(train_args(single, data_cache, steps=60), ranks=2)
    assert proc.returncode == 0, proc.stderr[-2000:]
    port = str(free_port())
    args = train_args(multi, data_cache, steps=60) + ["--set", "checkpoint.interval=10"]
    nodes = [subprocess.Popen([sys.executable, "-m", "llm_ds.cli", "launch", "--hostfile", str(hostfile),
                               "--launcher", "no-ssh", "--node_rank", str(rank), "--master_addr", NODES[0],
                               "--master_port", port, "--max-restarts", "1", "--restart-delay", "5", *args],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "GLOO_SOCKET_IFNAME": "lo", "PYTHONUNBUFFERED": "1"})
             for rank in (0, 1)]
    try:
        wait_for_checkpoint(multi, 10, nodes[0])
        node_rank(multi, 1).kill()
        outputs = [n.communicate(timeout=600)[0] for n in nodes]
    finally:
        for n in nodes:
            if n.poll() is None:
                n.kill()
    assert [n.returncode for n in nodes] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    summary = json.loads((multi / "summary.json").read_text())
    resumed = summary["resumed_at_step"]
    assert summary["world_size"] == 2 and resumed >= 10 and resumed % 10 == 0
    assert all("restart 1 of 1" in o and f"2 rank(s), resuming at step {resumed}" in o for o in outputs)
    reference, got = losses(single), losses(multi)
    assert sorted(got) == sorted(reference)
    for step in reference:
        assert got[step] == pytest.approx(reference[step], rel=1e-6), step


def test_doctor_checks_every_host(two_nodes, tmp_path):
    import sys

    def doctor(hosts: list[str]):
        hostfile = tmp_path / "hosts"
        hostfile.write_text("".join(f"{h} slots=1\n" for h in hosts))
        return subprocess.run([sys.executable, "-m", "llm_ds.cli", "doctor", "--hostfile", str(hostfile),
                               "--ssh_port", str(two_nodes["port"]), "--master_port", str(free_port()),
                               "--set", f"train.output_dir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True,
                              text=True, timeout=300, env={**os.environ, **two_nodes["env"]})

    ok = doctor(list(NODES))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.strip().endswith("ok: every host is ready")
    assert all(f"{h} " in ok.stdout and "shared" in ok.stdout for h in NODES)
    broken = doctor([*NODES, "127.0.0.4"])  # no sshd there
    assert broken.returncode == 1
    problems = [x for x in broken.stderr.splitlines() if x.startswith("problem: ")]
    assert len(problems) == 1 and problems[0].startswith("problem: 127.0.0.4: not reachable by ssh")
