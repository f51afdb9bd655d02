"""The `launch` section of the config: how many workers, where, and with what (Ray, threads).
Imports no torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from rnnscale.train.config.fields import doc, require


@dataclass
class LaunchSection:
    num_workers: int = doc(
        1,
        "Training processes. 1: `rnnscale train` trains in its own process; more: it runs them "
        "as Ray Train workers (an embedded local Ray, or the cluster of launch.address).",
        gt=0,
    )
    address: str = doc(
        "",
        "Ray cluster to run the workers on ('auto', 'ray://HEAD:10001', 'HEAD:6379'); empty: "
        "the RAY_ADDRESS environment variable, else an embedded local Ray of which every "
        "process listens on 127.0.0.1 only (docs/cluster.md).",
    )
    cpus_per_worker: float = doc(1.0, "CPUs Ray reserves for each worker.", gt=0)
    gpus_per_worker: float = doc(0.0, "GPUs Ray reserves for each worker (0: train on CPU).", ge=0)
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = doc(
        "PACK",
        "Ray placement of the workers: PACK fills nodes in turn; STRICT_SPREAD puts one worker "
        "on every node. Streaming data wants the same number of workers on every node.",
    )
    max_failures: int = doc(
        3,
        "Times Ray restarts the worker group after a worker or node dies (the run then resumes "
        "from its newest committed checkpoint by itself); -1: no limit.",
        ge=-1,
        why="-1: no limit",
    )
    min_workers: int = doc(
        0,
        "Go on with fewer workers, down to this many, when Ray cannot place them all (after "
        "launch.max_failures restarts of launch.worker_wait_s each): the run resumes on as many "
        "as fit and grows back when they fit again (docs/cluster.md). 0: never fewer.",
        ge=0,
        why="0: no shrinking",
    )
    worker_wait_s: float = doc(
        60.0,
        "Seconds Ray Train waits for a (re)started worker group to be placed before it counts "
        "a failure (Ray's RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S).",
        gt=0,
    )
    resize_check_s: float = doc(
        30.0,
        "With fewer workers than launch.num_workers: how often the driver looks whether more "
        "fit again (then the run stops after its step with a checkpoint and resumes on them).",
        gt=0,
    )
    storage_path: str = doc(
        "",
        "Where Ray Train keeps its own run state (every node must see it on a multi-node "
        "cluster); empty: <run dir>/ray.",
    )
    threads_per_rank: int = doc(
        0,
        "CPU threads of each rank's torch (intra-op). 0: the cores this process may use divided "
        "by the ranks on its node (LOCAL_WORLD_SIZE), at least 1, whatever OMP_NUM_THREADS says "
        "(torchrun sets 1, Ray its own); logged at the start. More threads than cores per rank "
        "slows every rank down.",
        ge=0,
        why="0: cores / local ranks",
    )
    dashboard_port: int = doc(
        0,
        "Port of the embedded Ray's dashboard, on 127.0.0.1 only (the URL is printed at the "
        "start); 0: 8265 when free, else the next free port. A port named here must be free.",
        ge=0,
        le=65535,
        why="0: 8265 or the next free port",
    )

    def check(self, path: str) -> None:
        require(self.min_workers <= self.num_workers, f"{path}.min_workers",
                f"must be at most launch.num_workers ({self.num_workers})")  # fmt: skip
