"""One run per directory: an exclusive lock on <run.dir>/.lock for the life of the run.

    with RunLock.take(run_dir):   # raises RunLocked naming the process that holds it
        ...

The lock is `flock` on an open file: the kernel drops it when the process ends, however it
ends, so a kill -9 never leaves a stale lock that would block the resume. The file stays (it
is removed by no one: removing it would let a third start lock a new file while the second
still holds the old one) and says who holds it: pid, host, time and command, read back for
the message a second start prints. One process takes it per job: rank 0 of a torchrun or
DeepSpeed job, or the driver of a Ray launch (whose workers are told so by `HELD_VAR`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from rnnscale.train.config import ConfigError

LOCK_FILE = ".lock"
HELD_VAR = "RNNSCALE_RUN_LOCK_HELD"
"""Set (to the holder's pid) in the processes of a job whose launcher holds the lock."""


class RunLocked(ConfigError):
    """Another process trains in this run directory."""


class RunLock:
    def __init__(self, fd: int, path: Path):
        self.fd, self.path = fd, path

    @classmethod
    def take(cls, run_dir: Path) -> RunLock:
        """Lock `run_dir` (made if missing) or raise RunLocked naming the holder."""
        path = run_dir / LOCK_FILE
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ConfigError(f"run.dir {run_dir}: cannot write there ({e.strerror}): choose a "
                              f"writable run.dir or fix its permissions") from None  # fmt: skip
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise RunLocked(
                f"run.dir {run_dir} is in use by {holder}: wait for that run to end or stop it "
                f"(a killed run's lock goes with it), or choose another run.dir"
            ) from None
        _write_holder(fd)
        return cls(fd, path)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the last descriptor drops the flock
            self.fd = -1

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _write_holder(fd: int) -> None:
    record = {"pid": os.getpid(), "host": socket.gethostname(),
              "since": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": " ".join(sys.argv)[:300]}  # fmt: skip
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)


def _holder(fd: int) -> str:
    """'pid N on HOST since TIME (COMMAND)', from what the holder wrote."""
    with contextlib.suppress(OSError, ValueError):
        record = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        if record:
            return (f"pid {record.get('pid')} on {record.get('host')} since "
                    f"{record.get('since')} ({record.get('command')})")  # fmt: skip
    return "another process"


@contextlib.contextmanager
def job_lock(run_dir: Path, rank: int):
    """The job's lock for the life of the block (a collective): rank 0 takes it, unless the
    job's launcher holds it; every rank raises the same RunLocked when it cannot."""
    import torch

    lock, box = None, [None]
    if rank == 0 and not held_by_launcher():
        try:
            lock = RunLock.take(run_dir)
        except ConfigError as e:
            box = [(type(e) is RunLocked, str(e))]
    torch.distributed.broadcast_object_list(box, src=0)
    if box[0] is not None:
        locked, message = box[0]
        raise (RunLocked if locked else ConfigError)(message)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def held_by_launcher() -> bool:
    """Whether this process belongs to a job whose launcher (a Ray driver) holds the lock."""
    return bool(os.environ.get(HELD_VAR))
