"""Hung ranks: a rank that stops making progress (a stuck collective, a wedged GPU, a stopped
process) leaves every other rank waiting in a collective for the process group's timeout. Each
rank runs a watchdog thread: the loop says where it is (`beat`: a step done, a save or an
evaluation begun), and when nothing has been said for train.hang_timeout_s the watchdog prints
where this rank is, which ranks are behind and this process's Python stacks, logs a `hang`
event (rank 0) and ends the process with EXIT_HUNG. The launcher then does what it does with a
dead rank: Ray restarts the group and the run resumes from the newest committed checkpoint;
torchrun ends the job, to be run again.

Which ranks are behind: every rank publishes its last beat (step, phase, time) to the process
group's key-value store at most every `timeout / 4` seconds, from the watchdog thread (so the
cost does not grow with the step rate); the watchdog that fires reads all of them and names
the ranks behind the furthest: by their step, by their phase at the same step, or silent (no
beat for two intervals: a stopped or dead rank's watchdog stops with it, while a rank waiting
in a collective keeps publishing). Silence is judged by the hosts' clocks, which need to agree
within a publishing interval (NTP does).

The first step is not watched (it compiles and autotunes kernels on a GPU, which may take
minutes); from its end on, each step, each save and each evaluation must take less than
train.hang_timeout_s. The process group's own timeout is set to twice it (train/distributed.py),
so that a collective that never returns ends there too, after the watchdog has named the ranks.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time

import torch

EXIT_HUNG = 124  # as timeout(1)
STORE_KEY = "rnnscale/beat/"


class Watchdog:
    """`beat(step, phase)` from the training loop; `stop()` at its end."""

    def __init__(self, timeout_s: float, logger=None):
        self.timeout_s, self.logger = timeout_s, logger
        self.rank, self.world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        self.step, self.phase, self.last = 0, "the first step", time.monotonic()
        self.stopped = threading.Event()
        self.store = _store() if self.world > 1 else None
        self.published = 0.0
        self.thread: threading.Thread | None = None

    def start(self) -> Watchdog:
        if self.timeout_s > 0:
            self.thread = threading.Thread(target=self._watch, name="rnnscale-watchdog",
                                           daemon=True)  # fmt: skip
            self.thread.start()
        return self

    def beat(self, step: int, phase: str) -> None:
        self.step, self.phase, self.last = step, phase, time.monotonic()

    def stop(self) -> None:
        """The thread ends now and lets go of the store (torch's store, held by a thread at
        the interpreter's exit, aborts the process in C++)."""
        self.stopped.set()
        if self.thread is not None:
            self.thread.join()
        self.store = None

    def _watch(self) -> None:
        every = self._every()
        if self.store is not None:
            self._publish()
            self.published = time.monotonic()
        while not self.stopped.wait(every):
            now = time.monotonic()
            if self.store is not None and now - self.published >= every:
                self._publish()
                self.published = now
            if now - self.last > self.timeout_s and self.step > 0 and not self.stopped.is_set():
                self._fire(now - self.last)

    def _publish(self) -> None:
        try:
            self.store.set(f"{STORE_KEY}{self.rank}", f"{self.step} {self.phase}|{time.time()}")
        except Exception:  # the store's host is gone: the collective fails on its own
            pass

    def _behind(self) -> str:
        """The ranks behind the furthest one, with their step and phase and how long ago
        they said it: behind by their step, or at the same step in an earlier phase (its
        evaluation, logging and checkpoint come before the next step), or silent (no beat
        published for two intervals: a stopped or dead process, whose watchdog is gone)."""
        if self.store is None:
            return ""
        beats, now = {}, time.time()
        for rank in range(self.world):
            key = f"{STORE_KEY}{rank}"
            try:
                if self.store.check([key]):
                    where, at = self.store.get(key).decode().rsplit("|", 1)
                    step, phase = where.split(" ", 1)
                    beats[rank] = ((int(step), phase.startswith("step ")), where, now - float(at))
            except Exception:
                continue
        furthest = max((at for at, _, _ in beats.values()), default=(0, False))
        silent = 2 * self._every()
        behind = [f"rank {r} (step {w.split(' ', 1)[0]}, in {w.split(' ', 1)[1]}, "
                  f"{ago:.0f} s ago)" for r, (at, w, ago) in sorted(beats.items())
                  if at < furthest or ago > silent]  # fmt: skip
        behind += [f"rank {r} (no beat published)" for r in range(self.world) if r not in beats]
        return "; ranks behind: " + (", ".join(behind) if behind else "none found")

    def _every(self) -> float:
        """How often each rank publishes its beat."""
        return min(self.timeout_s / 4, 10.0)

    def _fire(self, quiet_s: float) -> None:
        behind = self._behind()
        message = (
            f"rnnscale: [rank {self.rank}] no progress for {quiet_s:.0f} s "
            f"(train.hang_timeout_s={self.timeout_s:g}): this rank is in {self.phase} after "
            f"step {self.step}{behind}. Ending this process so that the job restarts from its "
            f"newest committed checkpoint; its Python stacks follow"
        )
        print(message, file=sys.stderr, flush=True)
        if self.logger is not None:
            try:
                self.logger.event("hang", step=self.step, rank=self.rank, phase=self.phase,
                                  quiet_s=round(quiet_s, 1),
                                  behind=behind.lstrip("; "))  # fmt: skip
            except Exception:
                pass
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        os._exit(EXIT_HUNG)


def _store():
    try:
        return torch.distributed.distributed_c10d._get_default_store()
    except Exception:  # no store to share beats through: each rank still watches itself
        return None
