"""Going on with fewer workers, and back (launch.min_workers > 0).

Ray Train restarts a worker group whose worker or node died (launch.max_failures times), each
time waiting launch.worker_wait_s for its workers to be placed. When a node is gone for good
and no replacement comes, every start times out; Ray Train V2 counts that as a failure of its
controller, which it retries forever unless `FailureConfig(controller_failure_limit)` says
otherwise. With launch.min_workers set, the launch limits it to launch.max_failures, so that
`fit()` ends with `TrainingFailedError`; then the driver looks at what the cluster
holds now (the alive nodes' CPUs and GPUs against launch.cpus_per_worker / gpus_per_worker) and
starts the run again on the largest worker count that fits there, is at least min_workers and
that the batch arithmetic and sequence parallelism allow (`plan`); the run resumes from its
newest committed checkpoint on the new count, as any resume on another world size does (the
model through DeepSpeed's universal checkpoint, the data position dealt over the new ranks:
every document exactly once). A `resize` event records it.

Growing back: while the run has fewer workers than launch.num_workers, the driver looks every
launch.resize_check_s whether more fit again; when they do, it asks the run to stop after its
step with a checkpoint (the preemption notice file, train/preemption.py), then starts it again
on the larger count.

Decision: our own restart with a new size rather than Ray Train V2's elastic ScalingConfig
(num_workers=(min, max)): Ray's elastic policy may pick any count in the range, and ours must
divide the global batch (and be a multiple of the sequence-parallel size); here the count is
chosen among those that do.
"""

from __future__ import annotations

import threading

import ray

from rnnscale.train.config import ConfigError, RunConfig
from rnnscale.train.logger import append_event
from rnnscale.train.preemption import NOTICE_FILE, post_notice
from rnnscale.train.preflight import plan
from rnnscale.train.run_dir import last_event

RESIZE_NOTICE = "resize"  # how the notice file's text starts when the driver grows the run


def allowed_sizes(cfg: RunConfig) -> list[int]:
    """Worker counts from launch.num_workers down to launch.min_workers that the batch
    arithmetic and the parallel layout allow, largest first."""
    out = []
    for n in range(cfg.launch.num_workers, max(cfg.launch.min_workers, 1) - 1, -1):
        try:
            plan(cfg, n)
        except ConfigError:
            continue
        out.append(n)
    return out


def capacity(cfg: RunConfig) -> int:
    """Workers the cluster's alive nodes hold, by their total CPUs and GPUs."""
    launch, fit = cfg.launch, 0
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        have = node.get("Resources", {})
        counts = [have.get("CPU", 0.0) // launch.cpus_per_worker]
        if launch.gpus_per_worker:
            counts.append(have.get("GPU", 0.0) // launch.gpus_per_worker)
        fit += int(min(counts))
    return fit


def best_size(cfg: RunConfig) -> int | None:
    """The largest allowed count the cluster holds now, or None."""
    room = capacity(cfg)
    return next((n for n in allowed_sizes(cfg) if n <= room), None)


def stopped_to_resize(cfg: RunConfig) -> bool:
    """Whether the run's last event is its stop on the driver's resize notice."""
    last = last_event(cfg.run_dir / "events.jsonl")
    return last.get("event") == "preempted" and f"({RESIZE_NOTICE}:" in str(last.get("notice"))


def resize_event(cfg: RunConfig, old: int, new: int, why: str) -> None:
    append_event(cfg.run_dir / "events.jsonl", "resize", workers_before=old, workers=new, why=why)
    print(f"rnnscale: {why}: the run goes on with {new} workers (was {old})", flush=True)


class Regrow:
    """While the run has fewer workers than launch.num_workers: a thread that asks it to stop
    with a checkpoint once more fit (`target` is then the count to start again with)."""

    def __init__(self, cfg: RunConfig, workers: int):
        self.cfg, self.workers, self.target = cfg, workers, None
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="rnnscale-regrow", daemon=True)

    def __enter__(self) -> Regrow:
        if self.workers < self.cfg.launch.num_workers:
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        if self.thread.is_alive():
            self.thread.join()

    def _watch(self) -> None:
        while not self.stopped.wait(self.cfg.launch.resize_check_s):
            try:
                size = best_size(self.cfg)
            except Exception:  # Ray going down: the run's own end comes next
                return
            if size is not None and size > self.workers:
                self.target = size
                post_notice(self.cfg.run_dir, f"{RESIZE_NOTICE}: {size} workers fit again")
                return


def run_resizing(cfg: RunConfig, fit) -> None:
    """`fit(n)` (a Ray Train fit on n workers) from launch.num_workers, again on fewer after a
    failure the cluster cannot hold the workers for, again on more once they fit."""
    from ray.train import TrainingFailedError

    workers = cfg.launch.num_workers
    while True:
        with Regrow(cfg, workers) as regrow:
            try:
                fit(workers)
            except TrainingFailedError:
                smaller = best_size(cfg) if cfg.launch.min_workers else None
                if smaller is None or smaller >= workers:
                    raise  # not for want of room, or no allowed count fits
                held = capacity(cfg)
                resize_event(cfg, workers, smaller, f"the cluster holds {held}, not {workers}")
                workers = smaller
                continue
        if regrow.target is None or not stopped_to_resize(cfg):
            (cfg.run_dir / NOTICE_FILE).unlink(missing_ok=True)  # the run ended before it
            return
        resize_event(cfg, workers, regrow.target, f"{regrow.target} workers fit again")
        workers = regrow.target
