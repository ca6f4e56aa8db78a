"""The process group: this rank's place in it, joining it, DeepSpeed's /dev/shm cleanup, and teardown.

Joining is idempotent: a second ``Trainer`` in the same process (a notebook kernel, a test) uses
the group the first one joined. Teardown belongs to the process's owner (the driver's ``main``),
never to a ``Trainer``.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

SHM_DIR = Path("/dev/shm")


def dist_env() -> tuple[int, int, int]:
    """``(rank, local_rank, world_size)`` from the launcher's environment (1 process without one)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def ranks_per_node(world_size: int) -> int:
    """Ranks on this node: DeepSpeed's launcher says it in ``LOCAL_SIZE``, torchrun in ``LOCAL_WORLD_SIZE``;
    a launch that says neither is taken as one node."""
    return int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or world_size)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> None:
    """Join the process group the launcher describes, or make a group of one for a plain ``python`` run
    (a script, a notebook). Does nothing when this process has joined one already."""
    import deepspeed
    import torch.distributed
    from deepspeed.accelerator import get_accelerator

    if torch.distributed.is_initialized():
        return
    if "RANK" not in os.environ:
        os.environ.update(
            RANK="0",
            LOCAL_RANK="0",
            WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())),
        )
    accel = get_accelerator()
    if accel.device_name() != "cpu" and "LOCAL_RANK" in os.environ:  # (MPI launches learn it in init_distributed)
        # Each rank on its own device before any collective: NCCL would otherwise put every rank of a node on
        # device 0 for the collectives that run before deepspeed.initialize sets it (a checkpoint's conversion).
        accel.set_device(int(os.environ["LOCAL_RANK"]))
    deepspeed.init_distributed(dist_backend=accel.communication_backend_name())
    if accel.device_name() == "cpu":  # the segments belong to DeepSpeed's CPU backend alone
        unlink_shm_buffers()


def unlink_shm_buffers() -> None:
    """Remove the names of DeepSpeed's CPU shared-memory all-reduce buffers once every rank has mapped them.

    On CPU, DeepSpeed's communication backend creates a 69 MB ``/dev/shm`` segment per rank when all
    ranks share a machine and never unlinks it: each run would leave its segments in memory until
    reboot. The mappings stay valid after the names go, and a killed run leaves nothing behind.
    """
    import deepspeed.comm as dist

    addr, port, rank = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT"), os.environ.get("RANK")
    if not (addr and port and rank is not None and SHM_DIR.is_dir()):
        return
    dist.barrier()  # every rank has opened its peers' segments
    for path in SHM_DIR.glob(f"deepspeed_allreduce_buffer_*_{addr}_{port}_{rank}"):
        path.unlink(missing_ok=True)


def barrier() -> None:
    import deepspeed.comm as dist

    dist.barrier()


def teardown() -> None:
    """Wait for every rank, then tear the process group down before the interpreter does, so no
    communication thread outlives it. For the process's owner: the driver calls it once, at the end."""
    import torch.distributed

    if torch.distributed.is_initialized():
        barrier()
        torch.distributed.destroy_process_group()
