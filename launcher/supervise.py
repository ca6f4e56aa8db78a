"""``llm-ds launch --max-restarts N``: a job that loses a rank or a node starts again by itself.

The DeepSpeed runner is started and watched. When it fails (a rank died, a node was lost, the runner
timed out), every host of the job is probed over ssh as ``llm-ds doctor`` does; the hosts that do not
answer are dropped, and the runner starts again on the rest with ``checkpoint.resume=auto``, from the
latest complete checkpoint, possibly on fewer ranks (the driver keeps the global batch). It gives up
after N restarts or when fewer than ``--min-nodes`` hosts answer. A stop asked for (SIGTERM or SIGINT to
this process, or to the ranks, which save first) is not a failure: nothing restarts.

Every restart is one line on stderr and an entry of ``restarts`` in the run's ``summary.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from launcher.command import LaunchSpec, build_command, is_this_node_only, world_size
from launcher.hostfile import Host
from llm_ds.config import UserError

PROG = "llm-ds launch"
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@dataclass
class Attempt:
    """One run of DeepSpeed's runner."""

    code: int  # its exit status
    signalled: bool  # this process got SIGTERM or SIGINT and passed it on
    stopped_by: str | None  # why the run stopped before its last step, as rank 0's summary says (a signal, an error)
    started: float

    @property
    def clean_stop(self) -> bool:
        """Stopped on a signal, after saving: the ranks were asked to stop, nothing failed."""
        return bool(self.stopped_by and self.stopped_by.startswith("SIG"))


def run_attempt(argv: list[str], env: dict[str, str], summary: Path, grace_s: float = 600.0) -> Attempt:
    """Run DeepSpeed's runner once, forwarding SIGTERM and SIGINT.

    The runner starts in a process group of its own, and a signal to this process goes to that whole
    group: the runner, its launcher and the ranks on this node (which save at a step boundary and
    stop; the runner stops the other nodes' ranks). This process then waits until every process of the
    group has exited, so nothing is left training.
    """
    started = time.time()
    proc = subprocess.Popen(argv, env=env, start_new_session=True)
    received: list[int] = []

    def forward(signum, frame):
        received.append(signum)
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass

    previous = {sig: signal.signal(sig, forward) for sig in _STOP_SIGNALS}
    try:
        code = proc.wait()
        deadline = time.time() + grace_s
        while _group_alive(proc.pid) and time.time() < deadline:  # the ranks may still be saving
            time.sleep(0.2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return Attempt(code, bool(received), _stopped_by(summary, started), started)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stopped_by(summary: Path, since: float) -> str | None:
    """Why the run stopped early, where rank 0 wrote ``summary.json`` after ``since``."""
    try:
        if summary.stat().st_mtime < since:
            return None
        return json.loads(summary.read_text()).get("stopped_by")
    except (OSError, ValueError):
        return None


@dataclass
class Policy:
    max_restarts: int = 0
    min_nodes: int = 1
    restart_delay_s: float = 10.0


def latest_step(checkpoint_dir: Path) -> int | None:
    """The step of the checkpoint a restart resumes from (None: none yet)."""
    from llm_ds.checkpoint import list_checkpoints, step_of

    complete, _ = list_checkpoints(checkpoint_dir)
    return step_of(complete[-1]) if complete else None


def reachable(hosts: list[Host], checkpoint_dir: Path, ssh_port: int | None) -> tuple[list[Host], dict[str, str]]:
    """The hosts that answer ``llm-ds doctor``'s probe over ssh within its time limit, and why the others did not."""
    from launcher.doctor import probe_hosts

    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    marker = checkpoint_dir / f".doctor-{token}"
    marker.write_text(token)
    try:
        results = probe_hosts(hosts, checkpoint_dir, marker, token, ssh_port)
    finally:
        marker.unlink(missing_ok=True)
    return [h for h in hosts if "error" not in results[h.name]], {
        h.name: results[h.name]["error"] for h in hosts if "error" in results[h.name]
    }


def write_hostfile(path: Path, hosts: list[Host]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{h.name} slots={h.slots}\n" for h in hosts))
    return path.resolve()


def supervise(spec: LaunchSpec, env: dict[str, str], output_dir: Path, checkpoint_dir: Path, policy: Policy) -> int:
    """Run the job; on a failure, drop the hosts that do not answer and start again, per ``policy``."""
    summary = output_dir / "summary.json"
    restarts: list[dict] = []
    failures: list[str] = []
    probe = spec.hosts is not None and spec.launcher == "pdsh" and not is_this_node_only(spec.hosts)
    while True:
        step_before = latest_step(checkpoint_dir)
        attempt = run_attempt(build_command(spec), {**env, **_hostfile_env(spec)}, summary)
        if attempt.code == 0 or attempt.signalled or attempt.stopped_by:
            # Done, stopped on request, or stopped by an error of its own (a callback's): nothing to restart.
            _record_restarts(summary, restarts, attempt.started)
            if attempt.code != 0 and attempt.clean_stop:
                print(f"{PROG}: stopped on {attempt.stopped_by}, checkpoint saved", file=sys.stderr)
                return 0
            return attempt.code
        step_after = latest_step(checkpoint_dir)
        reason = f"exit status {attempt.code} after {time.time() - attempt.started:.0f} s"
        if step_after == step_before:
            reason += ", no new checkpoint since it started (no progress)"
        alive, dropped = spec.hosts, {}
        if probe and len(failures) < policy.max_restarts:
            alive, dropped = reachable(spec.hosts, checkpoint_dir, spec.ssh_port)
            if dropped:
                reason += "; not answering: " + ", ".join(f"{h} ({why})" for h, why in dropped.items())
        failures.append(f"{time.strftime('%H:%M:%S')}: {reason}")
        if len(failures) > policy.max_restarts:
            return _give_up(failures, f"{policy.max_restarts} restart(s) allowed (--max-restarts)", attempt.code)
        if len(alive or ()) < policy.min_nodes and alive is not None:
            return _give_up(failures, f"{len(alive)} node(s) answer, fewer than --min-nodes {policy.min_nodes}", 1)
        if dropped:
            path = write_hostfile(output_dir / f".hostfile.restart{len(failures)}", alive)
            spec = dataclasses.replace(spec, hosts=alive, hostfile=path)
        if len(failures) == 1:
            spec = dataclasses.replace(spec, train_args=[*spec.train_args, "--set", "checkpoint.resume=auto"])
        try:
            _check_resumable(spec)
        except UserError as exc:
            return _give_up(failures, f"the job cannot resume on {world_size(spec)} rank(s): {exc}", 2)
        record = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "reason": reason,
            "hosts_dropped": sorted(dropped),
            "world_size": world_size(spec),
            "resumed_at_step": step_after or 0,
        }
        restarts.append(record)
        print(
            f"{PROG}: restart {len(restarts)} of {policy.max_restarts} at {record['time']}: {reason}; "
            f"{'dropped ' + ', '.join(record['hosts_dropped']) if dropped else 'no host dropped'}; "
            f"{record['world_size']} rank(s), resuming at step {record['resumed_at_step']} "
            f"in {policy.restart_delay_s:g} s",
            file=sys.stderr,
            flush=True,
        )
        if not _wait(policy.restart_delay_s):
            print(f"{PROG}: stopped on a signal before restart {len(restarts)}; nothing is running", file=sys.stderr)
            return 0


def _wait(seconds: float) -> bool:
    """Sleep, unless SIGTERM or SIGINT comes first (then False): between attempts no rank runs to stop."""
    received: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum)) for sig in _STOP_SIGNALS}
    try:
        deadline = time.monotonic() + seconds
        while not received and time.monotonic() < deadline:
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return not received


def _hostfile_env(spec: LaunchSpec) -> dict[str, str]:
    return {"LLM_DS_HOSTFILE": str(spec.hostfile)} if spec.hostfile else {}


def _check_resumable(spec: LaunchSpec) -> None:
    """The checkpoint a restart resumes from must fit the ranks left (else every rank would refuse it)."""
    import argparse

    from llm_ds.checkpoint import find_resume_point, fit_world_size
    from llm_ds.config import load_run_config
    from llm_ds.flags import add_run_arguments

    parser = argparse.ArgumentParser(add_help=False)
    add_run_arguments(parser)
    args = parser.parse_args(spec.train_args)
    cfg = load_run_config(args.config, args.overrides)
    point = find_resume_point(cfg)
    if point is not None:
        fit_world_size(point, cfg, world_size(spec))


def _give_up(failures: list[str], why: str, code: int) -> int:
    print(f"{PROG}: giving up: {why}; {len(failures)} failure(s):", file=sys.stderr)
    for i, failure in enumerate(failures, 1):
        print(f"{PROG}:   failure {i} at {failure}", file=sys.stderr)
    return code or 1


def _record_restarts(summary: Path, restarts: list[dict], since: float) -> None:
    """Add ``restarts`` to the summary rank 0 wrote during the last attempt."""
    if not restarts:
        return
    try:
        if summary.stat().st_mtime < since:
            return
        data = json.loads(summary.read_text())
    except (OSError, ValueError):
        return
    data["restarts"] = restarts
    tmp = summary.with_name(f".{summary.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, summary)
