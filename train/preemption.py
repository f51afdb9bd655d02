"""Preemption notices: a scheduler that takes the machines back (Slurm, Kubernetes, spot
instances) sends SIGTERM, or the signal it was told to (Slurm's `--signal`), some seconds
before it kills. On a notice every rank finishes the step it is in, the run commits a
checkpoint of that step, logs a `preempted` event and raises `Preempted`; the process exits
with EXIT_PREEMPTED (75, EX_TEMPFAIL: "try again"), and the same command, run again (a Slurm
requeue, a restarted pod, Ray restarting the workers), resumes from that checkpoint.

How the ranks agree: a rank that got the signal only sets a flag; at each step's end the ranks
take the maximum of their flags (one all-reduce of one integer: Megatron-LM does the same), so
all of them stop after the same step, whichever of them the signal reached.

Where the notice comes from (either is enough):
- a signal to any rank: SIGTERM, and checkpoint.preempt_signal (default SIGUSR1); to a process
  that trains in its main thread (`rnnscale train` alone, torchrun, which passes its SIGTERM on
  to its workers, srun's tasks);
- the file `<run.dir>/PREEMPT`, which rank 0 looks for at each step's end (one `stat`): what a
  Slurm batch script's signal trap, a Kubernetes preStop hook or a person writes, and what the
  Ray driver writes when it gets the signal (Ray's workers train in a thread of Ray's actor
  process and cannot install signal handlers). The run deletes it when it stops on it (one
  left behind by a run killed within its grace period stops the next run after one step,
  with a checkpoint: nothing is lost).

The grace period (checkpoint.preempt_grace_s, from the notice): a rank that has not committed
the checkpoint by then prints what is kept and exits with EXIT_PREEMPTED at once (the
scheduler's kill would come anyway); the resume then starts from the newest committed
checkpoint, and a checkpoint that was being written is never taken for a whole one (it has no
manifest).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

import torch

from rnnscale.train.files import write_atomic

EXIT_PREEMPTED = 75
NOTICE_FILE = "PREEMPT"  # in the run directory


def notice_signals(preempt_signal: str) -> list[signal.Signals]:
    """SIGTERM, and checkpoint.preempt_signal unless it is none."""
    names = ["SIGTERM"] + ([preempt_signal] if preempt_signal != "none" else [])
    return [getattr(signal, n) for n in names]


def post_notice(run_dir: Path, why: str) -> None:
    """Write the notice file whole (a temporary file renamed over it): rank 0 may look at any
    moment, and a file it finds must already say why (a plain write is seen empty at first)."""
    write_atomic(Path(run_dir) / NOTICE_FILE, why.rstrip("\n") + "\n")


class Preempted(Exception):
    """The run stopped on a preemption notice, after committing a checkpoint when it could."""


class Preemption:
    """Catches the notices (SIGTERM and checkpoint.preempt_signal) from `install()` until
    `uninstall()`; `agreed()` at each step's end says, the same on every rank, whether to stop."""

    def __init__(self, preempt_signal: str, grace_s: float, kept):
        self.signals = notice_signals(preempt_signal)
        self.grace_s, self.kept = grace_s, kept  # kept(): what a resume would start from
        self.received: str | None = None
        self.done = threading.Event()
        self._old: dict = {}
        self.notice_file: Path | None = None  # rank 0's

    @classmethod
    def for_run(cls, cfg) -> Preemption:
        """Installed for `cfg` (a RunConfig): its signals, and on rank 0 its notice file."""
        from rnnscale.train.room import what_is_kept

        c = cfg.checkpoint
        preemption = cls(c.preempt_signal, c.preempt_grace_s,
                         lambda: what_is_kept(cfg.checkpoint_dir))  # fmt: skip
        if torch.distributed.get_rank() == 0:
            preemption.notice_file = cfg.run_dir / NOTICE_FILE
        preemption.install()
        return preemption

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # a Ray worker: the driver's notice comes as the notice file
        for s in self.signals:
            self._old[s] = signal.signal(s, self._handler)

    def uninstall(self) -> None:
        self.done.set()
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old = {}

    def _handler(self, signum, frame) -> None:
        self.notice(signal.Signals(signum).name)

    def notice(self, what: str) -> None:
        """Take a notice (once): stop at the next step's end; exit at the grace period's end."""
        if self.received is not None:
            return
        self.received = what
        timer = threading.Thread(target=self._expire, name="preempt-grace", daemon=True)
        timer.start()

    def _expire(self) -> None:
        if self.done.wait(self.grace_s):
            return
        print(f"rnnscale: preempted ({self.received}), and no checkpoint was committed within "
              f"checkpoint.preempt_grace_s={self.grace_s:g} s: exiting now; {self.kept()}",
              file=sys.stderr, flush=True)  # fmt: skip
        os._exit(EXIT_PREEMPTED)

    def agreed(self) -> bool:
        """Whether any rank has a notice (a collective when there are several ranks)."""
        if self.received is None and self.notice_file is not None and self.notice_file.exists():
            try:  # who wrote it and why, when it says (the Ray driver: its signal, a resize)
                said = self.notice_file.read_text().strip().splitlines()[0]
            except (OSError, IndexError, UnicodeDecodeError):
                said = ""
            self.notice(f"{self.notice_file}" + (f" ({said[:200]})" if said else ""))
        flag = torch.tensor([int(self.received is not None)])
        if torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() and self.received is None:
            self.received = "another rank's notice"
        return bool(flag.item())

    def stopped(self) -> None:
        """The run stops on the notice: the grace timer ends, the notice file goes."""
        self.done.set()
        if self.notice_file is not None:
            self.notice_file.unlink(missing_ok=True)
