"""Committed checkpoints and resume (DESIGN.md section 6).

A checkpoint is `<run dir>/checkpoints/step_000001200/`:
- DeepSpeed's engine state (model, ZeRO optimizer shards, LR schedule): `engine.save_checkpoint`,
  which every rank calls;
- `rank_00000.json`, one per rank: every RNG state (Python, NumPy, torch CPU and CUDA), the
  data loader's state, the counters (step, tokens, skipped steps). JSON, not pickle;
- `config.yaml` (the resolved config) and `meta.json` (step, world size, tokenizer
  fingerprint, model config);
- `manifest.json`: size and SHA-256 of every other file, written LAST by rank 0 after a barrier,
  atomically (temporary name, then rename). A directory without a manifest that verifies is
  not a checkpoint.

Resume (`checkpoint.resume`): `auto` takes the newest directory whose manifest verifies and
skips the others with a warning naming what is wrong; `none` starts afresh; a path must verify.
`checkpoint.keep` committed checkpoints are kept; the newest committed one is never deleted.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

MANIFEST, META = "manifest.json", "meta.json"
PREFIX = "step_"


def step_name(step: int) -> str:
    return f"{PREFIX}{step:09d}"


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.json"


# ---- RNG states as JSON --------------------------------------------------------------------


def rng_state() -> dict:
    version, state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    out = {
        "python": [version, list(state), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        out["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return out


def set_rng_state(state: dict) -> None:
    version, values, gauss = state["python"]
    random.setstate((version, tuple(values), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


# ---- writing -------------------------------------------------------------------------------


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class SaveFailed(RuntimeError):
    """A save that could not finish (full disk, I/O error); its directory is removed and the
    previous committed checkpoint is untouched."""


def save(engine, root: Path, step: int, rank_state: dict, meta: dict, config_yaml: str,
         keep: int) -> Path:  # fmt: skip
    """Write the checkpoint of `step` from every rank (collective) and commit it; returns its
    directory. `rank_state` is this rank's JSON-able state; `meta` is rank 0's. Raises
    `SaveFailed` on every rank when any rank could not write its part."""
    rank = torch.distributed.get_rank()
    name = step_name(step)
    path = root / name
    if rank == 0 and path.exists():  # an uncommitted leftover of a killed run at this step
        shutil.rmtree(path)
    torch.distributed.barrier()
    _everywhere(lambda: _check_room(root) if rank == 0 else None, path, rank)

    def rank_files() -> None:
        engine.save_checkpoint(str(root), tag=name, save_latest=False)
        _write_atomic(path / rank_file(rank), json.dumps(rank_state))

    _everywhere(rank_files, path, rank)  # a barrier: every rank's files are on disk

    def commit() -> None:
        if rank != 0:
            return
        _write_atomic(path / "config.yaml", config_yaml)
        _write_atomic(path / META, json.dumps(meta, indent=2))
        if pause := float(os.environ.get("RNNSCALE_FAULT_PAUSE_BEFORE_COMMIT_S", "0")):
            time.sleep(pause)  # fault injection for tests: a kill here lands mid-save
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name != MANIFEST)
        manifest = {
            "step": step,
            "files": {
                str(p.relative_to(path)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
                for p in files
            },
        }
        _write_atomic(path / MANIFEST, json.dumps(manifest, indent=1))  # the commit
        prune(root, keep)

    _everywhere(commit, path, rank)
    return path


def _check_room(root: Path) -> None:
    """Refuse to start a save that cannot fit: the newest committed checkpoint's size is the
    estimate (the first save has none and finds out by writing)."""
    committed = [p for p in candidates(root) if (p / MANIFEST).exists()]
    if not committed:
        return
    need = sum(p.stat().st_size for p in committed[0].rglob("*") if p.is_file())
    free = shutil.disk_usage(root).free
    if free < need:
        raise OSError(
            errno.ENOSPC,
            f"No space left on device: the last checkpoint took {need / 2**20:.1f} MiB and "
            f"{free / 2**20:.1f} MiB are free",
            str(root),
        )


def _everywhere(write, path: Path, rank: int) -> None:
    """Run `write` on every rank; if it failed with an OSError anywhere, remove the partial
    checkpoint and raise SaveFailed on every rank (no rank is left waiting in a barrier)."""
    error = None
    try:
        write()
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
        error = e
    failed = torch.tensor([0 if error is None else 1])
    torch.distributed.all_reduce(failed, op=torch.distributed.ReduceOp.MAX)
    if int(failed):
        torch.distributed.barrier()
        if rank == 0:
            shutil.rmtree(path, ignore_errors=True)
        torch.distributed.barrier()
        free = shutil.disk_usage(path.parent).free / 2**20
        if isinstance(error, OSError):
            what = f"{error.strerror} ({error.filename})"
        else:
            what = str(error).splitlines()[0] if error else "another rank failed"
        raise SaveFailed(
            f"the checkpoint {path.name} was not saved: {what}; {free:.0f} MiB free under "
            f"{path.parent}. Its partial files are removed; the last committed checkpoint is "
            f"intact."
        )


def prune(root: Path, keep: int) -> None:
    """Keep the newest `keep` committed checkpoints (at least the newest one); remove older
    committed ones and any uncommitted directory older than the newest committed one."""
    committed = [p for p in candidates(root) if (p / MANIFEST).exists()]
    if not committed:
        return
    newest = committed[0]
    for p in committed[max(keep, 1) :]:
        shutil.rmtree(p, ignore_errors=True)
    for p in candidates(root):
        if not (p / MANIFEST).exists() and _step(p) < _step(newest):
            shutil.rmtree(p, ignore_errors=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# ---- finding and reading -------------------------------------------------------------------


def candidates(root: Path) -> list[Path]:
    """Checkpoint directories under `root`, newest first."""
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)]
    return sorted(dirs, key=_step, reverse=True)


def _step(path: Path) -> int:
    try:
        return int(path.name[len(PREFIX) :])
    except ValueError:
        return -1


def verify(path: Path) -> str | None:
    """None when the manifest is there and every file has its size and checksum; else what is
    wrong, naming the file."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        return f"{manifest} is missing: the save did not finish"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as e:
        return f"{manifest} is unreadable ({e})"
    for name, info in files.items():
        p = path / name
        if not p.is_file():
            return f"{p} is missing"
        if p.stat().st_size != info["bytes"]:
            return f"{p} has {p.stat().st_size} bytes, the manifest says {info['bytes']}"
        if _sha256(p) != info["sha256"]:
            return f"{p} does not match its checksum in the manifest"
    return None


def find_resume(root: Path) -> Path | None:
    """The newest checkpoint that verifies; the ones skipped on the way are reported."""
    for path in candidates(root):
        problem = verify(path)
        if problem is None:
            return path
        print(f"rnnscale: skipping checkpoint {path.name}: {problem}", file=sys.stderr, flush=True)
    return None


def load(engine, path: Path) -> dict:
    """Restore the engine (collective) and return this rank's saved state."""
    rank = torch.distributed.get_rank()
    load_path, _ = engine.load_checkpoint(
        str(path.parent), tag=path.name, load_optimizer_states=True,
        load_lr_scheduler_states=True,
    )  # fmt: skip
    if load_path is None:
        raise RuntimeError(f"DeepSpeed found no checkpoint in {path}")
    state_file = path / rank_file(rank)
    if not state_file.is_file():
        raise RuntimeError(
            f"{state_file} is missing: {path} was written by fewer ranks than this job has "
            f"({torch.distributed.get_world_size()}); resume with the world size it was saved "
            f"with ({json.loads((path / META).read_text())['world_size']})"
        )
    return json.loads(state_file.read_text())
