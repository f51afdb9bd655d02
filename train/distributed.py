"""The process group, this rank's device and node, and the seeds: what every rank sets up
before it builds anything."""

from __future__ import annotations

import atexit
import contextlib
import functools
import gc
import os
import random
import socket
import sys
import threading
from datetime import timedelta
from typing import NoReturn

import numpy as np
import torch


def init_distributed(hang_timeout_s: float = 0.0) -> None:
    """Join the job's process group through DeepSpeed (gloo on CPU; NCCL and gloo on GPUs,
    `process_group_backend`) from the usual
    RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT. A process started alone (no
    WORLD_SIZE) is rank 0 of 1 with its store in memory: nothing listens for it, where a TCP
    store would listen on every interface (torch's TCPStore binds all of them, whatever address
    it is given); gloo and NCCL use the loopback interface unless GLOO_SOCKET_IFNAME /
    NCCL_SOCKET_IFNAME name another (the two variables stay set: every group DeepSpeed makes
    later reads them). The group then stays for the life of the process: DeepSpeed caches its
    groups, so a second run in the same process (tests, notebooks) reuses it. With
    `hang_timeout_s` (train.hang_timeout_s) a collective gives up after twice it instead of the
    backend's default (30 minutes for gloo, 10 for NCCL)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    import deepspeed

    backend = process_group_backend(torch.cuda.is_available())
    if "WORLD_SIZE" not in os.environ:
        os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed reads it (children ignore it alone)
        for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
            os.environ.setdefault(name, loopback_interface())
        store = torch.distributed.HashStore()
        torch.distributed.init_process_group(backend, store=store, rank=0, world_size=1)
    timeout = {"timeout": timedelta(seconds=2 * hang_timeout_s)} if hang_timeout_s else {}
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                               **timeout)  # fmt: skip


@functools.cache  # once per process
def leave_distributed_at_exit() -> None:
    """Destroy this process's process group when the interpreter exits, before it shuts down.
    A process that exits with its gloo group alive can abort at exit ("terminate called
    without an active exception": gloo's worker threads outlive the interpreter), which turns
    a clean exit code (2 for a bad config) into SIGABRT. The commands call it; it destroys
    nothing while the process lives, so a later run in the same process (tests, notebooks)
    still finds the group DeepSpeed cached."""
    atexit.register(_leave)


def _leave() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """End a command's process with `code`. A process that joined a process group does what
    the interpreter's exit does first, while the interpreter is whole: it waits for its
    non-daemon threads (a checkpoint write, the executors' own exit hooks), runs its exit
    handlers (the group's destruction among them), collects its garbage and flushes its output;
    then it ends without the interpreter's finalization:
    a gloo worker thread may still be releasing the tensors of the last collective (the
    export's broadcast) when the main thread reaches it, and releasing them takes the GIL,
    which a finalizing interpreter no longer grants; the thread then ends by unwinding through
    a noexcept destructor and the process aborts ("terminate called without an active
    exception", exit -6; torch 2.14, 1 run in 3 to 8 of a 2-rank DeepSpeed job on 2 busy
    cores). destroy_process_group alone does not prevent it: DeepSpeed still holds its groups,
    so their threads live on. Other processes exit as usual."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise SystemExit(code)
    try:
        threading._shutdown()  # what Py_FinalizeEx runs first
        atexit._run_exitfuncs()
        gc.collect()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


def process_group_backend(cuda: bool) -> str:
    """gloo on CPU; on GPUs NCCL for CUDA tensors and gloo for CPU ones: the step's metrics,
    the preemption flag, the loader's lock step and the checkpoint's agreement are small CPU
    tensors, which an NCCL-only group refuses ("No backend type associated with device type
    cpu"). Torch, DeepSpeed and Ray Train all take the combined form."""
    return "cpu:gloo,cuda:nccl" if cuda else "gloo"


def loopback_interface() -> str:
    """The name of this machine's loopback interface (`lo` on Linux, `lo0` on macOS)."""
    names = [name for _, name in socket.if_nameindex()]
    return next((name for name in names if name.startswith("lo")), "lo")


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


def set_threads(threads_per_rank: int) -> tuple[int, str]:
    """Set torch's intra-op threads for this rank (launch.threads_per_rank; 0: the cores this
    process may use divided by the ranks on its node); returns the count and why. Ranks that
    together ask for more threads than cores slow each other down many times over, and
    torch's default (every core, per rank) does exactly that with more than one rank."""
    if threads_per_rank:
        threads, why = threads_per_rank, "launch.threads_per_rank"
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        cores = cores or os.cpu_count() or 1
        local = max(int(os.environ.get("LOCAL_WORLD_SIZE") or 1), 1)
        threads = max(cores // local, 1)
        why = f"{cores} core(s) / {local} rank(s) on this node; launch.threads_per_rank sets it"
    torch.set_num_threads(threads)
    return threads, why


def from_rank0(compute):
    """`compute()` on rank 0, its result on every rank (a collective; any picklable value)."""
    box = [compute() if torch.distributed.get_rank() == 0 else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
