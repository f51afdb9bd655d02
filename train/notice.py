"""Notices to the person running the job, through one path: the `rnnscale` Python logger.

    notice("resumed from ...")                    # rank 0 says it, on stdout
    notice("checkpoint failed ...", warning=True)  # rank 0, on stderr
    notice("this rank's GPU is slow", every_rank=True)  # every rank, prefixed "[rank N]"

A line that every rank would say alike is said once, by rank 0: 64 ranks do not print 64
copies of "step 12 skipped". What only one rank knows is said with `every_rank=True` and
carries its rank. Metrics and events go through `rnnscale.train.logger.Logger` instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys

log = logging.getLogger("rnnscale")


def _rank() -> int:
    """This process's rank: the process group's once it exists, else the launcher's RANK (a
    config read before the group exists, under torchrun, is said once too). Imports nothing:
    the config path stays torch-free."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0") or 0)


class _Console(logging.Handler):
    """stdout for information, stderr for warnings; the streams are looked up at each line
    (a test's captured streams, a worker's redirected ones)."""

    def emit(self, record: logging.LogRecord) -> None:
        every = getattr(record, "every_rank", False)
        rank = _rank()
        if rank != 0 and not every:
            return
        where = f" [rank {rank}]" if every else ""
        stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
        bar = sys.modules.get("tqdm")  # a progress bar on the terminal steps aside for the line
        with bar.tqdm.external_write_mode(file=stream) if bar else contextlib.nullcontext():
            print(f"rnnscale{where}: {record.getMessage()}", file=stream, flush=True)


if not any(type(h).__name__ == "_Console" for h in log.handlers):  # once, reloads included
    log.addHandler(_Console())
    log.setLevel(logging.INFO)
    log.propagate = False  # the root logger's handlers (DeepSpeed sets some) would repeat it


def notice(message: str, *, warning: bool = False, every_rank: bool = False) -> None:
    log.log(logging.WARNING if warning else logging.INFO, message,
            extra={"every_rank": every_rank})  # fmt: skip
