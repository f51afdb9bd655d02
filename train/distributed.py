"""The process group, this rank's device and node, and the seeds: what every rank sets up
before it builds anything."""

from __future__ import annotations

import os
import random
import socket

import numpy as np
import torch


def init_distributed() -> None:
    """Join the job's process group through DeepSpeed (gloo on CPU, NCCL on GPU) from the usual
    RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; a process started alone (no
    WORLD_SIZE) is rank 0 of 1 on a free local port, without touching the environment (which
    processes it starts inherit). The group then stays for the life of the process: DeepSpeed
    caches its groups, so a second run in the same process (tests, notebooks) reuses it."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    import deepspeed

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if "WORLD_SIZE" in os.environ:
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    else:
        os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed reads it (children ignore it alone)
        deepspeed.init_distributed(
            dist_backend=backend, auto_mpi_discovery=False, verbose=False,
            init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
        )  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_device() -> torch.device:
    """This rank's GPU (LOCAL_RANK), made current, or the CPU."""
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def node_of_every_rank() -> list[str]:
    """`nodes[r]`: the node of rank r (Ray Train's NODE_RANK, torchrun's GROUP_RANK, else the
    host name); a collective."""
    world = torch.distributed.get_world_size()
    env = os.environ
    here = env.get("NODE_RANK") or env.get("GROUP_RANK") or socket.gethostname()
    nodes = [""] * world
    if world > 1:
        torch.distributed.all_gather_object(nodes, here)
    else:
        nodes = [here]
    return nodes


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
