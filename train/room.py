"""Room on disk for what a run writes (docs/checkpointing.md, "A full disk"): the checkpoint
size estimated before the first step, the check before each save, what a failed save leaves
behind, and the error that stops a run which can no longer keep anything."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import torch

from rnnscale.train.config import ConfigError, RunConfig

MODULE_BYTES = {"fp32": 4, "bf16": 2}


class RunStopped(RuntimeError):
    """The run cannot go on (saves fail again and again, the model cannot be written); the
    message says why, what is kept on disk and what to do. Raised on every rank."""


def newest_committed(root: Path) -> Path | None:
    from rnnscale.train.checkpoint import MANIFEST, candidates

    committed = [p for p in candidates(root) if (p / MANIFEST).exists()]
    return committed[0] if committed else None


def what_is_kept(root: Path) -> str:
    """What a run would resume from if it stopped now."""
    newest = newest_committed(root)
    if newest is None:
        return f"there is no committed checkpoint under {root} yet: nothing to resume from"
    return f"the newest committed checkpoint, {newest}, is intact"


def check_room(root: Path) -> None:
    """Refuse to start a save that cannot fit: the newest committed checkpoint's size is the
    estimate (the first save has the pre-flight estimate of `check_room_at_start` only)."""
    newest = newest_committed(root)
    if newest is None:
        return
    need = sum(p.stat().st_size for p in newest.rglob("*") if p.is_file())
    free = shutil.disk_usage(root).free
    if free < need:
        raise OSError(
            errno.ENOSPC,
            f"No space left on device: the last checkpoint took {need / 2**20:.1f} MiB and "
            f"{free / 2**20:.1f} MiB are free",
            str(root),
        )


def checkpoint_bytes(num_params: int, cfg: RunConfig) -> int:
    """About the size of one checkpoint, all ranks together: the module's weights in the
    training dtype, and the optimizer's fp32 state (Adam's two moments; under ZeRO 1-3 also the
    fp32 master weights). Measured on the debug model: 12.6 bytes a parameter at ZeRO 0 in
    fp32, 16.4 at ZeRO 2; this estimate is 12 and 16 (the rest is per-rank JSON and config)."""
    optimizer = 8 if cfg.parallel.zero_stage == 0 else 12
    return num_params * (MODULE_BYTES[cfg.parallel.dtype] + optimizer)


def room_problem(cfg: RunConfig, num_params: int) -> tuple[str, str]:
    """(why the run is refused, a warning), each "" when there is none: refused when
    checkpoint.dir cannot hold even one checkpoint, warned when it cannot hold checkpoint.keep
    + 1 (a save is written before the oldest kept one is removed)."""
    c = cfg.checkpoint
    if not (c.interval or c.interval_minutes):
        return "", ""
    root = cfg.checkpoint_dir
    root.mkdir(parents=True, exist_ok=True)
    need, free = checkpoint_bytes(num_params, cfg), shutil.disk_usage(root).free
    held = free // need
    if held < 1:
        return (
            f"checkpoint.dir {root}: {free / 2**20:.1f} MiB free, and one checkpoint of this "
            f"model ({num_params:,} parameters, {cfg.parallel.dtype}, ZeRO "
            f"{cfg.parallel.zero_stage}) takes about {need / 2**20:.1f} MiB: free space there, "
            f"point checkpoint.dir at a disk with room, or train without checkpoints "
            f"(checkpoint.interval=0 checkpoint.interval_minutes=0)"
        ), ""
    if held < c.keep + 1:
        return "", (
            f"checkpoint.dir {root} has room for {held} checkpoint(s) of about "
            f"{need / 2**20:.1f} MiB; checkpoint.keep={c.keep} needs {c.keep + 1} at a time. "
            f"Saves will fail once it is full (checkpoint.max_failed_saves)"
        )
    return "", ""


def check_room_at_start(cfg: RunConfig, num_params: int) -> None:
    """Before the first step (collective): `room_problem` on rank 0, its warning printed there
    and its refusal raised as the same ConfigError on every rank. A Ray launch makes the same
    check in its driver before any worker starts (train/preflight.py)."""
    from rnnscale.train.notice import notice

    problem = [""]
    if torch.distributed.get_rank() == 0:
        problem[0], warning = room_problem(cfg, num_params)
        if warning:
            notice(warning, warning=True)
    if torch.distributed.get_world_size() > 1:
        torch.distributed.broadcast_object_list(problem, src=0)
    if problem[0]:
        raise ConfigError(problem[0])
