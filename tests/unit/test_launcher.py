import os
import stat
import sys

import pytest

from launcher.command import (
    LaunchSpec,
    build_command,
    propagated_env,
    selected_slot_ids,
    withheld_secrets,
    world_size,
    write_env_file,
)
from launcher.hostfile import Host, HostfileError
from llm_ds.cli import main

HOSTS = [Host("node-a", 8), Host("node-b", 8), Host("10.0.0.3", 4)]


@pytest.mark.parametrize(
    "include, exclude, expected",
    [
        (None, None, 20),
        ("node-a", None, 8),
        ("node-a:0,1@10.0.0.3", None, 6),
        (None, "node-b", 12),
        (None, "node-a:0,1,2@10.0.0.3", 13),
    ],
)
def test_world_size_follows_include_and_exclude(include, exclude, expected):
    assert world_size(LaunchSpec(hosts=HOSTS, include=include, exclude=exclude)) == expected


@pytest.mark.parametrize(
    "include, expected",
    [
        ("node-c", "host 'node-c' is not in the hostfile"),
        ("node-a:8", "node-a has slots 0-7, not [8]"),
        ("node-a;reboot", "is not host or host:slot,slot"),
    ],
)
def test_bad_resources(include, expected):
    with pytest.raises(HostfileError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        world_size(LaunchSpec(hosts=HOSTS, include=include))


@pytest.mark.parametrize(
    "include, exclude, num_gpus",
    [
        ("", "", None),
        ("node-a", "", None),
        ("node-a:0@node-a:1", "", None),  # a host named twice: its slots merged
        ("node-a:0,0", "", None),  # a slot named twice counts once
        ("node-a:3,1@10.0.0.3", "", None),
        ("10.0.0.3@node-a:5", "", None),  # ranks follow the hostfile's order, not the string's
        ("", "node-b", None),
        ("", "node-a:0,1,2@10.0.0.3", None),
        ("", "node-a:1@node-a:1,2", None),
        ("", "", 2),  # --num_gpus with a hostfile: that many ranks on every host
    ],
)
def test_selection_agrees_with_deepspeeds_runner(include, exclude, num_gpus):
    """The ranks llm-ds counts (world size, batch checks, plan) are the ranks the runner will start."""
    from deepspeed.launcher.runner import apply_num_nodes_and_gpus, parse_inclusion_exclusion

    pool = {h.name: h.slots for h in HOSTS}
    theirs = apply_num_nodes_and_gpus(parse_inclusion_exclusion(pool, include, exclude), -1, num_gpus or -1)
    ours = selected_slot_ids(LaunchSpec(hosts=HOSTS, include=include or None, exclude=exclude or None,
                                        num_gpus=num_gpus))  # fmt: skip
    assert list(ours.items()) == [(k, list(v)) for k, v in theirs.items()]


def test_num_gpus_with_include_is_refused_as_the_runner_does():
    with pytest.raises(HostfileError, match="--num_gpus cannot be combined with --include or --exclude"):
        world_size(LaunchSpec(hosts=HOSTS, include="node-a", num_gpus=2))
    with pytest.raises(HostfileError, match=r"--num_gpus 6 is more than the hostfile gives 10.0.0.3 \(slots=4\)"):
        world_size(LaunchSpec(hosts=HOSTS, num_gpus=6))


def test_a_hostfile_of_this_node_keeps_the_slots_asked_for(tmp_path):
    hostfile = tmp_path / "hosts"
    one = {"hosts": [Host("localhost", 4)], "hostfile": hostfile}
    assert build_command(LaunchSpec(**one, include="localhost:2,3"), "py")[3:5] == ["--include", "localhost:2,3"]
    assert build_command(LaunchSpec(**one, exclude="localhost:0"), "py")[3:5] == ["--include", "localhost:1,2,3"]
    assert build_command(LaunchSpec(**one, include="localhost:0,1"), "py")[3:5] == ["--num_gpus", "2"]
    assert build_command(LaunchSpec(**one), "py")[3:5] == ["--num_gpus", "4"]


def test_commands_per_launcher(tmp_path):
    hostfile = tmp_path / "hosts"
    common = {"hosts": HOSTS, "hostfile": hostfile, "train_args": ["--ds_config", "ds_configs/zero3.json"]}
    pdsh = build_command(LaunchSpec(**common), python="py")
    assert pdsh[:5] == ["py", "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile)]
    assert pdsh[-3:] == [pdsh[-3], "--ds_config", "ds_configs/zero3.json"] and pdsh[-3].endswith("llm_ds/train.py")
    assert "--launcher" not in pdsh  # pdsh is the runner's default
    assert "--no_ssh_check" in pdsh  # its check ignores PDSH_SSH_ARGS_APPEND; doctor checks with it
    assert pdsh[pdsh.index("--master_addr") + 1] == HOSTS[0].name  # not asked of the host over plain ssh
    assert build_command(LaunchSpec(**common, launcher="slurm"), "py")[5:7] == ["--launcher", "slurm"]
    assert build_command(LaunchSpec(**common, launcher="openmpi"), "py")[5:7] == ["--launcher", "openmpi"]
    no_ssh = build_command(
        LaunchSpec(**common, launcher="no-ssh", node_rank=1, master_addr="10.0.0.1", master_port=29600), "py"
    )
    assert no_ssh[5:13] == [
        "--no_ssh",
        "--node_rank",
        "1",
        "--master_addr",
        "10.0.0.1",
        "--master_port",
        "29600",
        no_ssh[12],
    ]
    local = build_command(LaunchSpec(hosts=None, num_gpus=2), "py")
    assert local[3:5] == ["--num_gpus", "2"]
    # A hostfile of this machine alone: a local launch, no ssh to itself.
    this_node = build_command(LaunchSpec(hosts=[Host("localhost", 2)], hostfile=hostfile, master_port=29500), "py")
    assert this_node[3:7] == ["--num_gpus", "2", "--master_port", "29500"] and "--hostfile" not in this_node


def test_propagated_environment_and_its_file(tmp_path):
    environ = {
        "NCCL_DEBUG": "INFO",
        "GLOO_SOCKET_IFNAME": "lo",
        "HF_HOME": "/hf",
        "WANDB_API_KEY": "k" * 12,
        "PATH": "/bin",
        "MY_VAR": "1",
        "HOME": "/root",
    }
    env = propagated_env(environ, ["MY_VAR"])
    # A secret is written to the file (and by pdsh onto each node's command line) only when named.
    assert set(env) == {"NCCL_DEBUG", "GLOO_SOCKET_IFNAME", "HF_HOME", "MY_VAR"}
    assert withheld_secrets(environ, ["MY_VAR"]) == ["WANDB_API_KEY"]
    assert "WANDB_API_KEY" in propagated_env(environ, ["WANDB_API_KEY"])
    assert withheld_secrets(environ, ["WANDB_API_KEY"]) == []
    path = tmp_path / "run" / ".deepspeed_env"
    write_env_file(path, env)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert "NCCL_DEBUG=INFO\n" in path.read_text()


def test_dry_run_prints_the_command_and_masks_secrets(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secretvalue42")
    monkeypatch.setenv("NCCL_DEBUG", "WARN")
    (tmp_path / "hosts").write_text("node-a slots=2\nnode-b slots=2\n")
    assert (
        main(
            [
                "launch",
                "--hostfile",
                str(tmp_path / "hosts"),
                "--dry-run",
                "--ds_config",
                "ds_configs/zero2.json",
                "--set",
                f"train.output_dir={tmp_path / 'run'}",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    out = captured.out
    assert out.splitlines()[0].startswith(f"{sys.executable} -m deepspeed.launcher.runner --hostfile ")
    assert "# 4 rank(s)" in out and "NCCL_DEBUG=WARN" in out and "HF_TOKEN" not in out
    assert "not propagated: HF_TOKEN (secrets reach other nodes only with --env NAME" in captured.err
    assert not (tmp_path / "run").exists()  # a dry run writes nothing
    # Named with --env, it is propagated (masked in the listing), with a word on where pdsh puts it.
    args = ["launch", "--hostfile", str(tmp_path / "hosts"), "--dry-run", "--env", "HF_TOKEN",
            "--set", f"train.output_dir={tmp_path / 'run'}"]  # fmt: skip
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "HF_TOKEN=***" in captured.out and "hf_secretvalue42" not in captured.out + captured.err
    assert "HF_TOKEN go to every node on the runner's command line (pdsh), visible to `ps` there" in captured.err


@pytest.mark.parametrize(
    "hostfile, args, expected",
    [
        ("a slots=2\n$(reboot) slots=2\n", [], "hosts:2: host '$(reboot)' is not a DNS name"),
        ("a slots=2\nb c slots=2\n", [], "hosts:2: expected '<host> slots=<n>'"),
        ("a slots=2\nb slots=0\n", [], "hosts:2: slots=0 for b"),
        ("a slots=2\nb slots=2\n", ["--include", "c"], "host 'c' is not in the hostfile"),
        ("a slots=2\nb slots=2\n", ["--ds_config", "{bad_batch}"], "train_batch_size=12 but"),
        ("a slots=2\nb slots=2\n", ["--ds_config", "{typo}"], "unknown top-level key `zero_optimisation`"),
        ("a slots=2\n", ["--launcher", "no-ssh"], "--launcher no-ssh needs --node_rank and --master_addr"),
        ("a slots=2\nb slots=2\n", ["--min-nodes", "3"], "--min-nodes 3: the job has 2 node(s); give 1 to 2"),
        ("a slots=2\n", ["--max-restarts", "-1"], "--max-restarts -1: give 0 (no restart) or more"),
        ("a slots=2\nb slots=2\n", ["--max-restarts", "2", "--exclude", "b"], "with --include/--exclude: write"),
        (
            "a slots=3\nb slots=3\n",
            ["--set", "parallel.tensor=2"],
            "`parallel.tensor` must divide the ranks of every node (a runs 3): a tensor group never spans",
        ),
        (
            "a slots=3\n",
            ["--set", "parallel.tensor=2"],
            "parallel.tensor` x `parallel.pipeline` = 2 x 1 = 2 does not divide the world size of 3 rank(s)",
        ),
        (
            "a slots=2\n",
            ["--ds_config", "ds_configs/zero3_offload.json", "--set", "train.nvme_path={typo}/nvme"],
            "/nvme: not writable here",
        ),
    ],
)
def test_bad_launches_stop_with_one_line(tmp_path, capsys, hostfile, args, expected):
    import json

    (tmp_path / "hosts").write_text(hostfile)
    (tmp_path / "bad_batch.json").write_text(json.dumps({"train_batch_size": 12}))
    (tmp_path / "typo.json").write_text(json.dumps({"zero_optimisation": {"stage": 2}}))
    args = [a.format(bad_batch=tmp_path / "bad_batch.json", typo=tmp_path / "typo.json") for a in args]
    rc = main(["launch", "--hostfile", str(tmp_path / "hosts"), *args, "--set", f"train.output_dir={tmp_path}/r"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and expected in err[0], err
    assert not (tmp_path / "r").exists()


def test_doctor_probes_hosts_concurrently_and_reports_in_hostfile_order(monkeypatch, tmp_path):
    import threading
    import time

    from launcher import doctor

    in_flight, most = [0], [0]
    lock = threading.Lock()

    def slow_probe(host, ckpt_dir, marker, token, ssh_port):
        with lock:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
        time.sleep(0.2 if host.name != "node-a" else 0.4)  # the first host answers last
        with lock:
            in_flight[0] -= 1
        return {"host": host.name}

    monkeypatch.setattr(doctor, "probe_host", slow_probe)
    hosts = [Host(f"node-{c}", 1) for c in "abcdefgh"]
    results = doctor.probe_hosts(hosts, tmp_path, tmp_path / "m", "t", None, workers=4)
    assert list(results) == [h.name for h in hosts] and all(results[h.name]["host"] == h.name for h in hosts)
    assert most[0] == 4  # bounded, and concurrent


def test_the_ssh_port_reaches_the_runner_as_it_reads_it(tmp_path, capsys):
    """`--ssh_port` (the image's workers listen on 2222) is passed on in the runner's own spelling and parsed
    by DeepSpeed's runner into the port pdsh and its ssh check use."""
    from deepspeed.launcher.runner import parse_args

    hostfile = tmp_path / "hosts"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    argv = build_command(LaunchSpec(hosts=[Host("node-a", 1), Host("node-b", 1)], hostfile=hostfile, ssh_port=2222))
    assert parse_args(argv[3:]).ssh_port == 2222
    assert "--ssh_port" not in build_command(LaunchSpec(hosts=[Host("node-a", 1), Host("node-b", 1)]))
    assert main(["launch", "--hostfile", str(hostfile), "--ssh-port", "2222", "--dry-run"]) == 0
    assert "--ssh_port 2222" in capsys.readouterr().out


def test_a_launch_that_cannot_resume_its_checkpoint_on_these_ranks_stops_before_any_node(tmp_path, capsys):
    import json

    tag = tmp_path / "r" / "checkpoints" / "global_step10"
    (tag / "llm_ds").mkdir(parents=True)
    (tag / "COMPLETE").write_text(json.dumps({"step": 10, "world_size": 2, "files": {}}))
    (tag / "llm_ds" / "ds_config.json").write_text(json.dumps({"train_batch_size": 8}))
    (tag / "llm_ds" / "config.yaml").write_text("parallel: {tensor: 1, pipeline: 1}\n")
    (tmp_path / "hosts").write_text("a slots=3\n")
    base = ["launch", "--hostfile", str(tmp_path / "hosts"), "--dry-run", "--set", f"train.output_dir={tmp_path}/r"]
    assert main([*base, "--set", "train.micro_batch_size=4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "its global batch of 8 sequences cannot be shared by 3 rank(s)" in err[0], err
    (tmp_path / "hosts").write_text("a slots=1\n")  # one rank: accumulation 2 keeps the global batch of 8
    assert main([*base, "--set", "train.micro_batch_size=4"]) == 0


def test_a_dry_run_says_how_the_job_is_supervised(tmp_path, capsys):
    (tmp_path / "hosts").write_text("a slots=1\nb slots=1\n")
    base = ["launch", "--hostfile", str(tmp_path / "hosts"), "--dry-run", "--set", f"train.output_dir={tmp_path}/r"]
    assert main([*base, "--max-restarts", "2", "--min-nodes", "2", "--restart-delay", "5"]) == 0
    assert "# supervised: up to 2 restart(s), 5 s apart, on at least 2 answering node(s)" in capsys.readouterr().out
    no_ssh = ["--launcher", "no-ssh", "--node_rank", "0", "--master_addr", "a"]
    assert main([*base, *no_ssh, "--max-restarts", "2", "--min-nodes", "2"]) == 0
    captured = capsys.readouterr()
    assert "on the same hosts" in captured.out and "--min-nodes 2 has no effect here" in captured.err
