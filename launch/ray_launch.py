"""`rnnscale train` with launch.num_workers > 1: the workers run under Ray Train (DESIGN.md
section 7, docs/cluster.md).

An embedded local Ray of which every process listens on 127.0.0.1 only (its dashboard too), or
the cluster of launch.address / RAY_ADDRESS. Ray Train V2's `TorchTrainer` starts
launch.num_workers workers, sets up their gloo or NCCL process group and the torchrun-style
environment (RANK, WORLD_SIZE, LOCAL_RANK, ...), and each worker calls
`rnnscale.train.run(cfg)`: nothing else. On an embedded Ray the group meets through a file in a
private directory of this machine instead of Ray's TCP store (which listens on every interface).
When a worker or its node dies, Ray restarts the whole group (`FailureConfig(max_failures)`) and
`run` resumes from the newest committed checkpoint by itself (checkpoint.resume: auto).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import socket
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import ray
from ray.train._internal.worker_group import WorkerGroup as V1WorkerGroup
from ray.train.torch.config import (
    TorchConfig,
    _set_torch_distributed_env_vars,
    _setup_torch_process_group,
    _TorchBackend,
)

from rnnscale.launch.elastic import run_resizing
from rnnscale.train.config import RunConfig, from_dict, to_dict
from rnnscale.train.distributed import loopback_interface, process_group_backend
from rnnscale.train.preemption import Preempted, notice_signals, post_notice
from rnnscale.train.run_dir import finished_message, last_event
from rnnscale.train.run_lock import HELD_VAR, RunLock

LOOPBACK = "127.0.0.1"
# off: Ray takes this machine for a single-node one, and 127.0.0.1 as its address (below)
RAY_CLUSTERS_VAR = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def absolute_paths(cfg: RunConfig) -> RunConfig:
    """The config with its run, checkpoint, data and tokenizer paths made absolute from here, so
    that workers whose working directory differs (Ray's) read and write the same places."""
    data = to_dict(cfg)
    data["run"]["dir"] = str(cfg.run_dir.resolve())
    if cfg.checkpoint.dir:
        data["checkpoint"]["dir"] = str(Path(cfg.checkpoint.dir).resolve())
    for key in ("streams", "val_streams"):
        for stream in data["data"][key]:
            if "://" not in stream["path"]:
                stream["path"] = str(Path(stream["path"]).resolve())
    if cfg.data.tokenizer and "://" not in cfg.data.tokenizer:
        data["data"]["tokenizer"] = str(Path(cfg.data.tokenizer).resolve())
    resume = cfg.checkpoint.resume
    if resume not in ("auto", "none"):
        data["checkpoint"]["resume"] = str(Path(resume).resolve())
    return from_dict(data)


def worker(config: dict) -> None:
    """One Ray Train worker: the same `run(cfg)` every launcher ends in."""
    from rnnscale.train import run

    env = os.environ
    if config.get("cluster") and env.get("RANK") == "0" and "MASTER_ADDR" in env:
        print(f"rnnscale: the process group's TCP store (torch c10d) listens on every interface "
              f"of rank 0's node, port {env['MASTER_PORT']}; the ranks reach it at "
              f"{env['MASTER_ADDR']}", flush=True)  # fmt: skip
    if config.get("lock_held"):  # the driver holds the run directory's lock for the job
        os.environ[HELD_VAR] = str(config["lock_held"])
    try:
        run(from_dict(config["config"]))
    except Preempted:  # every rank stops alike, after the checkpoint: the driver says so
        return


@dataclass
class LoopbackTorchConfig(TorchConfig):
    """Ray Train's `TorchConfig` for the workers of an embedded Ray: their process group meets
    through a torch FileStore in `store_dir` (a private directory of this machine) instead of a
    TCPStore on rank 0, which listens on every interface whatever address it is given; gloo and
    NCCL use the loopback interface `interface` unless GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME
    name another."""

    store_dir: str = ""
    interface: str = "lo"

    @property
    def backend_cls(self):
        return _LoopbackTorchBackend


def _loopback_env(interface: str) -> None:
    """On a worker, before its process group: gloo's and NCCL's sockets on the loopback."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", interface)
    os.environ.setdefault("NCCL_SOCKET_IFNAME", interface)


class _LoopbackTorchBackend(_TorchBackend):
    """`_TorchBackend.on_start` (ray/train/torch/config.py) with a `file://` rendezvous, a new
    file for every start of the group (a restarted group must not meet the old one's keys)."""

    store = ""

    def on_start(self, worker_group, backend_config: LoopbackTorchConfig):
        self.store = os.path.join(backend_config.store_dir, f"group-{uuid.uuid4().hex}")
        worker_group.execute(_loopback_env, backend_config.interface)
        if not isinstance(worker_group, V1WorkerGroup):
            worker_group.execute(_set_torch_distributed_env_vars)
        world = len(worker_group)
        ray.get([
            worker_group.execute_single_async(
                rank, _setup_torch_process_group, backend=backend_config.backend,
                world_rank=rank, world_size=world, init_method=f"file://{self.store}",
                timeout_s=backend_config.timeout_s,
            )
            for rank in range(world)
        ])  # fmt: skip

    def on_shutdown(self, worker_group, backend_config):
        try:  # raises when a worker died
            super().on_shutdown(worker_group, backend_config)
        finally:
            with contextlib.suppress(OSError):
                os.remove(self.store)


def check_dashboard_port(port: int) -> None:
    """A port named in launch.dashboard_port must be free on 127.0.0.1 (Ray's own error says
    nothing of launch.dashboard_port); 0 lets Ray pick one."""
    if not port:
        return
    with socket.socket() as s:
        try:
            s.bind((LOOPBACK, port))
        except OSError as e:
            why = "in use (another Ray's dashboard?)" if e.errno == errno.EADDRINUSE else e
            print(f"rnnscale: launch.dashboard_port={port}: {LOOPBACK}:{port} is {why}; "
                  f"set launch.dashboard_port=0 (a free port) or another port",
                  file=sys.stderr)  # fmt: skip
            raise SystemExit(2) from None


def start_embedded_ray(launch) -> str:
    """A Ray on this machine only: node address 127.0.0.1, so that gcs_server, the raylet, the
    workers, the driver, the dashboard, its agent, the runtime-env agent and the metrics
    exporters all listen on 127.0.0.1. Returns the dashboard's URL."""
    from ray._private import ray_constants

    check_dashboard_port(launch.dashboard_port)
    needed = int(launch.num_workers * launch.cpus_per_worker + 0.999)
    # Ray's servers bind 127.0.0.1 when the node address is 127.0.0.1, else every interface
    # (src/ray/rpc/grpc_server.cc, dashboard/agent.py), but ray.init replaces a node address of
    # 127.0.0.1 by this machine's external one (_private/services.py, resolve_ip_for_localhost)
    # unless multi-node clusters are off, as Ray has them on macOS and Windows. Off for the
    # start: Ray's processes, started now, inherit the variable.
    saved = os.environ.get(RAY_CLUSTERS_VAR), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[RAY_CLUSTERS_VAR], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        context = ray.init(
            _node_ip_address=LOOPBACK,
            include_dashboard=True,
            dashboard_host=LOOPBACK,
            dashboard_port=launch.dashboard_port or None,  # None: 8265, else the next free
            num_cpus=max(os.cpu_count() or 1, needed),
        )
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved[1]
        if saved[0] is None:
            os.environ.pop(RAY_CLUSTERS_VAR, None)
        else:
            os.environ[RAY_CLUSTERS_VAR] = saved[0]
    node = context.address_info["node_ip_address"]
    if node != LOOPBACK:  # this Ray version would listen beyond this machine: refuse
        ray.shutdown()
        print(f"rnnscale: the embedded Ray started with node address {node}, not {LOOPBACK}: "
              f"it would listen beyond this machine, so the run stops. Name a cluster in "
              f"launch.address to train on one, or report this with `ray --version`",
              file=sys.stderr)  # fmt: skip
        raise SystemExit(1)
    return context.dashboard_url or ""


def join_cluster(address: str) -> str:
    """Connect to the cluster at `address`; says which addresses this job uses there."""
    context = ray.init(address=address)
    info = getattr(context, "address_info", {})  # a ray:// client has none
    if info:
        print(f"rnnscale: joined the Ray cluster at {address}: its GCS at "
              f"{info.get('gcs_address')}, this driver's node address "
              f"{info.get('node_ip_address')}; Ray's processes listen where its nodes' "
              f"`ray start` put them", flush=True)  # fmt: skip
    return context.dashboard_url or ""


def require_train_v2() -> None:
    """Ray Train V2 (the default since Ray 2.51; V1's TorchTrainer restarts and reports
    differently): stop with one line where the environment turned it off."""
    from ray.train.v2._internal.constants import V2_ENABLED_ENV_VAR, is_v2_enabled

    if not is_v2_enabled():
        print(f"rnnscale: Ray Train V2 is off ({V2_ENABLED_ENV_VAR}="
              f"{os.environ.get(V2_ENABLED_ENV_VAR)!r} in the environment); rnnscale's Ray launch "
              f"needs it: unset {V2_ENABLED_ENV_VAR} or set it to 1", file=sys.stderr)  # fmt: skip
        raise SystemExit(2)


def train_with_ray(cfg: RunConfig) -> None:
    """Run the job's workers under Ray Train and wait for them; raises Ray's
    `TrainingFailedError` when the workers fail more than launch.max_failures times, and
    RunLocked when another run trains in run.dir. A finished run says so and starts nothing.
    On an embedded Ray this driver holds the run directory's lock for the whole job (its
    workers restart under it); on a cluster, whose nodes may not share this driver's files,
    rank 0 takes it."""
    require_train_v2()  # before anything is written
    cfg = absolute_paths(cfg)
    address = cfg.launch.address or os.environ.get("RAY_ADDRESS", "")
    if address:
        _train_with_ray(cfg, address, lock_held=0)
        return
    finished = finished_message(cfg)
    if finished:
        print(f"rnnscale: {finished}", flush=True)
        return
    with RunLock.take(cfg.run_dir):
        _train_with_ray(cfg, address, lock_held=os.getpid())


def _train_with_ray(cfg: RunConfig, address: str, lock_held: int) -> None:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.constants import WORKER_GROUP_START_TIMEOUT_S_ENV_VAR

    launch = cfg.launch
    dashboard = ""
    if not ray.is_initialized():
        dashboard = join_cluster(address) if address else start_embedded_ray(launch)
    # our ranks print through stdout once (Ray forwards it); Train's print patch would print
    # every line a second time through its logger (the setting reaches the workers)
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    gpus = launch.gpus_per_worker
    resources = {"CPU": launch.cpus_per_worker, **({"GPU": gpus} if gpus else {})}
    storage = launch.storage_path or str(cfg.run_dir / "ray")
    where = f"the Ray cluster at {address}" if address else "an embedded local Ray"
    if dashboard and not dashboard.startswith("http"):
        dashboard = f"http://{dashboard}"
    print(f"rnnscale: {launch.num_workers} Ray Train workers on {where}; Ray dashboard: "
          f"{dashboard or 'not running'}", flush=True)  # fmt: skip
    store_dir = "" if address else tempfile.mkdtemp(prefix="rnnscale-group-")  # mode 0700
    torch_config = _torch_config(cfg, store_dir)
    # how long a (re)started group waits to be placed before Ray counts a failure (elastic.py)
    os.environ[WORKER_GROUP_START_TIMEOUT_S_ENV_VAR] = f"{launch.worker_wait_s:g}"

    def fit(workers: int) -> None:
        TorchTrainer(
            worker,
            train_loop_config={
                "config": to_dict(cfg),
                "cluster": bool(address),
                "lock_held": lock_held,
            },  # fmt: skip
            torch_config=torch_config,
            scaling_config=ScalingConfig(
                num_workers=workers,
                use_gpu=gpus > 0,
                resources_per_worker=resources,
                placement_strategy=launch.placement,
            ),
            run_config=RunConfig(
                name=cfg.run.name,
                storage_path=storage,
                # a group that cannot be placed is Ray's controller failing, retried forever
                # unless limited: limited when the run may go on with fewer (elastic.py)
                failure_config=FailureConfig(
                    max_failures=launch.max_failures,
                    controller_failure_limit=launch.max_failures if launch.min_workers else -1,
                ),
            ),
        ).fit()

    try:
        with _notices_to_file(cfg):
            run_resizing(cfg, fit)
    finally:
        if store_dir:
            shutil.rmtree(store_dir, ignore_errors=True)
    _raise_if_preempted(cfg)


def _torch_config(cfg: RunConfig, store_dir: str) -> TorchConfig:
    """gloo or NCCL; on an embedded Ray (`store_dir`) the loopback group; a collective gives up
    after twice train.hang_timeout_s (train/watchdog.py) instead of Ray's 30 minutes."""
    backend = process_group_backend(cfg.launch.gpus_per_worker > 0)
    hang = cfg.train.hang_timeout_s
    timeout = {"timeout_s": max(int(2 * hang), 1)} if hang else {}
    if not store_dir:  # a cluster: the nodes' own addresses, Ray's TCP store on rank 0
        return TorchConfig(backend=backend, **timeout)
    return LoopbackTorchConfig(backend, store_dir=store_dir, interface=loopback_interface(),
                               **timeout)  # fmt: skip


@contextlib.contextmanager
def _notices_to_file(cfg: RunConfig):
    """While the workers train: this driver's SIGTERM and checkpoint.preempt_signal become the
    notice file that rank 0 looks for at each step's end (train/preemption.py)."""
    signals = notice_signals(cfg.checkpoint.preempt_signal)

    def handler(signum, frame):
        post_notice(cfg.run_dir, signal.Signals(signum).name)
        print(f"rnnscale: {signal.Signals(signum).name}: the workers stop after this step, with "
              f"a checkpoint", file=sys.stderr, flush=True)  # fmt: skip

    old = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _raise_if_preempted(cfg: RunConfig) -> None:
    """Preempted when the workers' run ended on a notice (its last event says so)."""
    last = last_event(cfg.run_dir / "events.jsonl")
    if last.get("event") == "preempted":
        kept = last.get("checkpoint") or "no checkpoint of that step (the save failed)"
        raise Preempted(f"preempted ({last.get('notice')}) after step {last['step']}: {kept}; "
                        f"run the same command again to resume")  # fmt: skip
