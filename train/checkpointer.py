"""When a run saves: every checkpoint.interval steps, at the last step, every
checkpoint.interval_minutes; and the save in flight when saves are asynchronous."""

from __future__ import annotations

import time

import torch

from rnnscale.train import checkpoint
from rnnscale.train.config import RunConfig, dump_yaml
from rnnscale.train.notice import notice
from rnnscale.train.progress import Progress
from rnnscale.train.resume import checkpoint_meta
from rnnscale.train.room import RunStopped, newest_committed, what_is_kept


class Checkpointer:
    """A save that fails is reported (stderr, a `checkpoint_failed` event, saying what is kept)
    and training goes on; the next save tries again. After checkpoint.max_failed_saves failures
    in a row the run stops (`RunStopped`, on every rank: a failure is collective)."""

    def __init__(self, engine, cfg: RunConfig, batches, logger):
        self.engine, self.cfg, self.batches, self.logger = engine, cfg, batches, logger
        self.rank = torch.distributed.get_rank()
        self.pending: checkpoint.PendingSave | None = None
        self.last_save = time.monotonic()
        self.blocked_s = 0.0  # the step loop's wait for the pending save's start
        self.failures_in_a_row = 0
        self.committed: tuple[int, object] | None = None  # (step, path) of this run's newest

    def after_step(self, progress: Progress, last: bool) -> None:
        """At every step's end (collective)."""
        step = progress.step
        if self.pending is not None and self.pending.ready():
            self.finish(step)
        if self._due(step, last):
            self.finish(step)  # one save in flight at most
            self._start(progress)
            if not self.cfg.checkpoint.async_save:
                self.finish(step)

    def _due(self, step: int, last: bool) -> bool:
        c = self.cfg.checkpoint
        if c.interval and step % c.interval == 0 or last and (c.interval or c.interval_minutes):
            return True
        if not c.interval_minutes:
            return False
        late = time.monotonic() - self.last_save >= c.interval_minutes * 60
        flag = torch.tensor([int(late) if self.rank == 0 else 0])
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)  # rank 0's clock
        return bool(flag)

    def _start(self, progress: Progress) -> None:
        start = time.perf_counter()
        cfg, step = self.cfg, progress.step
        rank_state = {
            "rng": checkpoint.rng_state(),
            "loader": self.batches.state_dict(),  # collective for the streaming loader
            "counters": progress.as_dict(),
        }
        meta = {"step": step, "world_size": torch.distributed.get_world_size(),
                **checkpoint_meta(cfg)}  # fmt: skip
        self.last_save = time.monotonic()
        try:
            self.pending = checkpoint.start_save(
                self.engine, cfg.checkpoint_dir, step, rank_state, meta, dump_yaml(cfg),
                cfg.checkpoint.keep, asynchronous=cfg.checkpoint.async_save,
            )  # fmt: skip
        except checkpoint.SaveFailed as e:
            self._failed(step, e)
        self.blocked_s = time.perf_counter() - start

    def finish(self, step: int) -> None:
        """Commit the save in flight, if any, waiting for its files (collective); `step`: the
        step training has done (logged as `committed_step`)."""
        pending, self.pending = self.pending, None
        if pending is None:
            return
        start = time.perf_counter()
        try:
            path = pending.commit()
        except checkpoint.SaveFailed as e:
            self._failed(pending.step, e)
            return
        self.failures_in_a_row, self.committed = 0, (pending.step, path)
        blocked = self.blocked_s + time.perf_counter() - start  # the step loop's wait
        self.logger.event("checkpoint", step=pending.step, path=str(path), committed_step=step,
                          blocked_s=round(blocked, 4))  # fmt: skip
        notice(f"checkpoint {path} committed (step {pending.step}; training waited "
               f"{blocked:.1f} s for it)")  # fmt: skip

    def save_now(self, progress: Progress):
        """Commit a checkpoint of this step now (a preemption notice; collective): the save in
        flight first, then this step's own unless it is the one just committed. Returns its
        path, or None when the save failed (reported as any failed save)."""
        self.finish(progress.step)
        if self.committed is None or self.committed[0] != progress.step:
            self._start(progress)
            self.finish(progress.step)
        done = self.committed is not None and self.committed[0] == progress.step
        return self.committed[1] if done else None

    def _failed(self, step: int, error: Exception) -> None:
        self.failures_in_a_row += 1
        root, limit = self.cfg.checkpoint_dir, self.cfg.checkpoint.max_failed_saves
        kept = what_is_kept(root)
        self.logger.event("checkpoint_failed", step=step, error=str(error),
                          failures_in_a_row=self.failures_in_a_row)  # fmt: skip
        if limit and self.failures_in_a_row >= limit:
            raise RunStopped(
                f"{error} That is {self.failures_in_a_row} failed saves in a row "
                f"(checkpoint.max_failed_saves={limit}): stopping rather than training on with "
                f"nothing recent to resume from; {kept}. Make room under {root} (or point "
                f"checkpoint.dir at a disk with room) and run the same command again"
            )
        never = newest_committed(root) is None  # said at every failure, not once
        notice(f"{'NOTHING IS SAVED YET: ' if never else ''}{error} Training goes on; {kept}.",
               warning=True)  # fmt: skip
