"""``llm-ds launch --max-restarts N``: a job that loses a rank or a node starts again by itself.

The DeepSpeed runner is started and watched. When it fails (a rank died, a node was lost, the runner
timed out), every host of the job is probed over ssh as ``llm-ds doctor`` does (pdsh launches of more
than one host; other launchers have no ssh to probe with); the hosts that do not answer are dropped,
and the runner starts again on the rest, from the latest checkpoint this job wrote
(``checkpoint.resume=auto``; before its first checkpoint, as it first started), possibly on fewer
ranks (the driver keeps the global batch). It gives up after N restarts or when fewer than
``--min-nodes`` hosts answer. A stop asked for (SIGTERM or SIGINT to this process, or to the ranks,
which save first) is not a failure: nothing restarts.

Every restart is one line on stderr and an entry of ``restarts`` in the run's ``summary.json``.
"""

from __future__ import annotations

import argparse
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


class Signals:
    """SIGTERM and SIGINT while the supervisor runs: passed on to the running job's process group, if any,
    and remembered, so that a stop asked for between attempts (during a probe or the restart delay)
    starts nothing new."""

    def __init__(self):
        self.received: list[int] = []
        self.group: int | None = None  # the running runner's process group

    def __enter__(self):
        self._previous = {sig: signal.signal(sig, self._on_signal) for sig in _STOP_SIGNALS}
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum, frame) -> None:
        self.received.append(signum)
        if self.group is not None:
            try:
                os.killpg(self.group, signum)
            except ProcessLookupError:
                pass

    @property
    def name(self) -> str | None:
        return signal.Signals(self.received[0]).name if self.received else None


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


def run_attempt(argv: list[str], env: dict[str, str], summary: Path, signals: Signals, grace_s: float = 600.0):
    """Run DeepSpeed's runner once; ``signals`` passes SIGTERM and SIGINT on to it.

    The runner starts in a process group of its own, and a signal to this process goes to that whole
    group: the runner, its launcher and the ranks on this node (which save at a step boundary and
    stop; the runner stops the other nodes' ranks). This process then waits until every process of the
    group has exited (at most ``grace_s`` after the runner, then kills what is left), so nothing is
    left training or holding a device.
    """
    started, before = time.time(), len(signals.received)
    proc = subprocess.Popen(argv, env=env, start_new_session=True)
    signals.group = proc.pid
    try:
        code = proc.wait()
        deadline = time.time() + grace_s
        while _group_alive(proc.pid) and time.time() < deadline:  # the ranks may still be saving
            time.sleep(0.2)
        if _group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
    finally:
        signals.group = None
    return Attempt(code, len(signals.received) > before, _stopped_by(summary, started), started)


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


def probes_hosts(spec: LaunchSpec) -> bool:
    """Whether a failure is followed by probing the hosts (and dropping those that do not answer): pdsh launches
    of more than this node. Elsewhere there is no ssh to probe with, and a restart uses the same hosts."""
    return spec.hosts is not None and spec.launcher == "pdsh" and not is_this_node_only(spec.hosts)


def write_hostfile(path: Path, hosts: list[Host]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{h.name} slots={h.slots}\n" for h in hosts))
    return path.resolve()


def supervise(spec: LaunchSpec, env: dict[str, str], output_dir: Path, checkpoint_dir: Path, policy: Policy) -> int:
    """Run the job; on a failure, drop the hosts that do not answer and start again, per ``policy``."""
    with Signals() as signals:
        return _supervise(spec, env, output_dir, checkpoint_dir, policy, signals)


def _supervise(spec, env, output_dir: Path, checkpoint_dir: Path, policy: Policy, signals: Signals) -> int:
    summary = output_dir / "summary.json"
    restarts: list[dict] = []
    failures: list[str] = []
    probe = probes_hosts(spec)
    first_args, job_started = list(spec.train_args), time.time()
    while True:
        step_before = resume_step(spec.train_args)
        attempt = run_attempt(build_command(spec), {**env, **_hostfile_env(spec)}, summary, signals)
        if attempt.code == 0 or attempt.signalled or attempt.stopped_by or signals.received:
            # Done, stopped on request, or stopped by an error of its own (a callback's): nothing to restart.
            _record_restarts(summary, restarts, attempt.started)
            if attempt.code != 0 and attempt.clean_stop:
                print(f"{PROG}: stopped on {attempt.stopped_by}, checkpoint saved", file=sys.stderr)
                return 0
            return attempt.code
        if policy.max_restarts == 0:
            return attempt.code
        # From this job's latest checkpoint; before it wrote one, as the job first started (resume=never stays
        # never, an explicit checkpoint stays that checkpoint).
        resume_args = [*first_args, "--set", "checkpoint.resume=auto"]
        if not _has_checkpoint_since(resume_args, job_started):
            resume_args = first_args
        step_after = resume_step(resume_args)
        reason = f"exit status {attempt.code} after {time.time() - attempt.started:.0f} s"
        if step_after == step_before:
            reason += ", no new checkpoint since it started (no progress)"
        alive, dropped = spec.hosts, {}
        if probe and len(failures) < policy.max_restarts:
            alive, dropped = reachable(spec.hosts, checkpoint_dir, spec.ssh_port)
            if dropped:
                reason += "; not answering: " + ", ".join(f"{h} ({why})" for h, why in dropped.items())
        failures.append(f"{time.strftime('%H:%M:%S')}: {reason}")
        if signals.received:
            return _give_up(failures, f"stopped on {signals.name} before a restart; nothing is running", 0)
        if len(failures) > policy.max_restarts:
            return _give_up(failures, f"{policy.max_restarts} restart(s) allowed (--max-restarts)", attempt.code)
        if alive is not None and len(alive) < policy.min_nodes:
            return _give_up(failures, f"{len(alive)} node(s) answer, fewer than --min-nodes {policy.min_nodes}", 1)
        spec = dataclasses.replace(spec, train_args=resume_args)
        if dropped:
            path = write_hostfile(output_dir / f".hostfile.restart{len(failures)}", alive)
            spec = dataclasses.replace(spec, hosts=alive, hostfile=path)
            if spec.master_addr in dropped:  # rank 0 runs on the first host left
                spec = dataclasses.replace(spec, master_addr=alive[0].name)
        try:
            check_resumable(spec)
        except UserError as exc:
            return _give_up(failures, f"the job cannot resume on {world_size(spec)} rank(s): {exc}", 2)
        record = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "reason": reason,
            "hosts_dropped": sorted(dropped),
            "world_size": world_size(spec),
            "resumed_at_step": step_after,
        }
        restarts.append(record)
        print(
            f"{PROG}: restart {len(restarts)} of {policy.max_restarts} at {record['time']}: {reason}; "
            f"{'dropped ' + ', '.join(record['hosts_dropped']) if dropped else 'no host dropped'}; "
            f"{record['world_size']} rank(s){f', master {spec.master_addr}' if dropped else ''}, "
            f"resuming at step {step_after} in {policy.restart_delay_s:g} s",
            file=sys.stderr,
            flush=True,
        )
        deadline = time.monotonic() + policy.restart_delay_s
        while not signals.received and time.monotonic() < deadline:
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
        if signals.received:
            print(f"{PROG}: stopped on {signals.name} before restart {len(restarts)}; nothing is running",
                  file=sys.stderr)  # fmt: skip
            return 0


def _hostfile_env(spec: LaunchSpec) -> dict[str, str]:
    return {"LLM_DS_HOSTFILE": str(spec.hostfile)} if spec.hostfile else {}


def _run_config(train_args: list[str]):
    """The run config and DeepSpeed template path the driver will get from ``train_args``."""
    from llm_ds.config import load_run_config
    from llm_ds.flags import add_run_arguments

    parser = argparse.ArgumentParser(add_help=False)
    add_run_arguments(parser)
    args = parser.parse_args(train_args)
    return load_run_config(args.config, args.overrides), args.ds_config


def resume_step(train_args: list[str]) -> int:
    """The step the driver resumes from with ``train_args`` (0: it starts from scratch)."""
    from llm_ds.checkpoint import find_resume_point, step_of

    point = find_resume_point(_run_config(train_args)[0])
    return step_of(point) if point is not None else 0


def _has_checkpoint_since(train_args: list[str], since: float) -> bool:
    """Whether the checkpoint ``train_args`` resume from was written after ``since`` (by this job)."""
    from llm_ds.checkpoint import COMPLETE, find_resume_point

    point = find_resume_point(_run_config(train_args)[0])
    return point is not None and (point / COMPLETE).stat().st_mtime >= since


def check_resumable(spec: LaunchSpec) -> None:
    """What the driver will check on every rank, here once: the checkpoint a restart resumes from fits the ranks
    left, and the DeepSpeed config agrees with the batch that gives (a failure here would cost a restart)."""
    from llm_ds.checkpoint import config_for_resume
    from llm_ds.ds_config import check_job, ds_config_source, load_ds_template

    cfg, ds_config = _run_config(spec.train_args)
    ranks = world_size(spec)
    check_job(config_for_resume(cfg, ranks), load_ds_template(ds_config), ranks, ds_config_source(ds_config))


def _give_up(failures: list[str], why: str, code: int) -> int:
    print(f"{PROG}: giving up: {why}; {len(failures)} failure(s):", file=sys.stderr)
    for i, failure in enumerate(failures, 1):
        print(f"{PROG}:   failure {i} at {failure}", file=sys.stderr)
    return code


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
