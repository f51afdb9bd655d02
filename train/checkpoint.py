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

Another world size (or ZeRO stage) on resume goes through DeepSpeed's universal form of the
checkpoint, `<checkpoint>/universal/` (train/universal.py); the per-rank JSON states are
combined by `elastic_rank_state`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from rnnscale.train.files import write_atomic
from rnnscale.train.notice import notice

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


# ---- loading without pickle ----------------------------------------------------------------

# The only non-tensor classes in DeepSpeed's checkpoint files (deepspeed 0.19, ZeRO 0-3, fp32 and
# bf16, and their universal form): plain data, safe to rebuild. Anything else is refused.
SAFE_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)
WEIGHTS_ONLY_ENV = {"TORCH_FORCE_WEIGHTS_ONLY_LOAD": "1"}


def safe_globals() -> list:
    import importlib

    out = []
    for name in SAFE_GLOBALS:
        module, _, attr = name.rpartition(".")
        out.append(getattr(importlib.import_module(module), attr))
    return out


@contextlib.contextmanager
def weights_only_loading():
    """Every `torch.load` inside, DeepSpeed's included (which asks for pickle), reads with
    `weights_only=True`: tensors, containers, numbers and the SAFE_GLOBALS classes, never
    arbitrary pickled code (torch's TORCH_FORCE_WEIGHTS_ONLY_LOAD switch, read at each load)."""
    before = {k: os.environ.get(k) for k in WEIGHTS_ONLY_ENV}
    os.environ.update(WEIGHTS_ONLY_ENV)
    try:
        with torch.serialization.safe_globals(safe_globals()):
            yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---- writing -------------------------------------------------------------------------------


class SaveFailed(RuntimeError):
    """A save that could not finish (full disk, I/O error); its directory is removed and the
    previous committed checkpoint is untouched."""


def start_save(engine, root: Path, step: int, rank_state: dict, meta: dict, config_yaml: str,
               keep: int, asynchronous: bool = False) -> PendingSave:  # fmt: skip
    """Begin the checkpoint of `step` on every rank (collective): DeepSpeed's state and this
    rank's JSON `rank_state` go to a `Writer`, written now or, when `asynchronous`, from a copy
    in memory by a background thread; `PendingSave.commit()` finishes it. `meta` is rank 0's.
    Raises `SaveFailed` on every rank when a rank could not even begin (no room)."""
    from deepspeed.checkpoint import constants as c

    from rnnscale.train.checkpoint_writer import Writer, writer_engine

    rank = torch.distributed.get_rank()
    path = root / step_name(step)
    if rank == 0 and path.exists():  # an uncommitted leftover of a killed run at this step
        shutil.rmtree(path)
    torch.distributed.barrier()
    from rnnscale.train.room import check_room

    _everywhere(lambda: check_room(root) if rank == 0 else None, path, rank)
    writer = Writer(asynchronous)

    def begin() -> None:
        # what DeepSpeed's converter to the universal form (another world size) requires
        engine.module.universal_checkpoint_info = {
            c.UNIVERSAL_CHECKPOINT_VERSION_KEY: c.UNIVERSAL_CHECKPOINT_VERSION_VALUE
        }
        engine.checkpoint_engine = writer_engine(writer)
        engine.save_checkpoint(str(root), tag=path.name, save_latest=False)
        writer.save_text(json.dumps(rank_state), path / rank_file(rank))

    try:
        _everywhere(begin, path, rank)
    except SaveFailed:
        writer.close()
        raise
    return PendingSave(path, step, rank, writer, meta, config_yaml, keep)


class PendingSave:
    """A checkpoint whose files are being written; `commit()` (collective) waits for every
    rank's files and writes the manifest. `ready()` (collective) tells, without waiting, whether
    every rank's files are written, so a training loop can commit when they are."""

    def __init__(self, path: Path, step: int, rank: int, writer, meta: dict, config_yaml: str,
                 keep: int):  # fmt: skip
        self.path, self.step, self.rank, self.writer = path, step, rank, writer
        self.meta, self.config_yaml, self.keep = meta, config_yaml, keep

    def ready(self) -> bool:
        done = torch.tensor([int(self.writer.done())])
        torch.distributed.all_reduce(done, op=torch.distributed.ReduceOp.MIN)
        return bool(done)

    def commit(self) -> Path:
        """Wait for every rank's files, then rank 0 writes config.yaml, meta.json and, last,
        the manifest (sizes and checksums the writers recorded) and prunes old checkpoints.
        Raises `SaveFailed` on every rank if any rank's write failed (the directory is
        removed)."""
        path, rank = self.path, self.rank
        records: list = [None]

        def wait() -> None:
            mine = self.writer.wait()
            records[0] = {str(Path(k).relative_to(path)): v for k, v in mine.items()}

        try:
            _everywhere(wait, path, rank)  # a barrier: every rank's files are on disk
        finally:
            self.writer.close()
        everyone: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(everyone, records[0])

        def commit() -> None:
            if rank != 0:
                return
            write_atomic(path / "config.yaml", self.config_yaml)
            write_atomic(path / META, json.dumps(self.meta, indent=2))
            if pause := float(os.environ.get("RNNSCALE_FAULT_PAUSE_BEFORE_COMMIT_S", "0")):
                time.sleep(pause)  # fault injection for tests: a kill here lands mid-save
            files = {k: v for rank_records in everyone for k, v in rank_records.items()}
            for p in path.rglob("*"):  # ours, and anything written around the writers
                name = str(p.relative_to(path))
                if p.is_file() and name not in files and name != MANIFEST:
                    files[name] = {"bytes": p.stat().st_size, "sha256": sha256_of(p)}
            manifest = {"step": self.step, "files": dict(sorted(files.items()))}
            write_atomic(path / MANIFEST, json.dumps(manifest, indent=1))  # the commit
            prune(path.parent, self.keep)

        _everywhere(commit, path, rank)
        return path


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
        elif error is not None:  # torch.save's, e.g. "[enforce fail ...] unexpected pos"
            what = f"a write failed ({str(error).splitlines()[0]})"
        else:
            what = "another rank's write failed"
        raise SaveFailed(
            f"the checkpoint {path.name} was not saved: {what}; {free:.1f} MiB free under "
            f"{path.parent}. Its partial files are removed."
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


def sha256_of(path: Path) -> str:
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
    if not path.is_dir():
        return f"{path} is not a directory"
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
        if sha256_of(p) != info["sha256"]:
            return f"{p} does not match its checksum in the manifest"
    return None


def find_resume(root: Path) -> Path | None:
    """The newest checkpoint that verifies; the ones skipped on the way are reported."""
    for path in candidates(root):
        problem = verify(path)
        if problem is None:
            return path
        notice(f"skipping checkpoint {path.name}: {problem}", warning=True)
    return None


UNIVERSAL = "universal"  # the folder of a checkpoint's universal form


def read_meta(path: Path) -> dict:
    return json.loads((path / META).read_text())


def rollback_target(root: Path, before_step: int, world: int, zero_stage: int) -> Path | None:
    """The newest checkpoint under `root` from before step `before_step` that verifies and was
    saved by this world size and ZeRO stage (a running engine reloads only its own form)."""
    for path in candidates(root):
        if _step(path) >= before_step or verify(path) is not None:
            continue
        meta = read_meta(path)
        if meta["world_size"] == world and meta["zero_stage"] == zero_stage:
            return path
    return None


def remove_after(root: Path, path: Path) -> None:
    """Remove every checkpoint directory under `root` newer than `path` (a rollback abandons
    the steps they hold; a later resume must not find them)."""
    for other in candidates(root):
        if _step(other) > _step(path):
            shutil.rmtree(other, ignore_errors=True)


def load(engine, path: Path, reshard_loader, universal: bool = False) -> dict:
    """Restore the engine (collective) from `path`, or from its universal form (the engine
    must then be configured with `checkpoint.load_universal`), and return this rank's saved
    state: its own, or when the world size changed, one combined by `elastic_rank_state`
    (`reshard_loader(old states, new world)`: the new ranks' loader states)."""
    from rnnscale.train.checkpoint_writer import writer_engine

    load_dir, tag = (path, UNIVERSAL) if universal else (path.parent, path.name)
    engine.checkpoint_engine = writer_engine(None)
    try:
        with weights_only_loading():
            load_path, _ = engine.load_checkpoint(
                str(load_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
            )
    except (RuntimeError, EOFError, OSError, ValueError) as e:  # torch.load's, the zip reader's
        from rnnscale.train.config import ConfigError

        older = [p.name for p in candidates(path.parent) if _step(p) < _step(path)]
        hint = f"checkpoint.resume={path.parent / older[0]}" if older else "checkpoint.resume=none"
        why = str(e).splitlines()[0].split(". ")[0]
        raise ConfigError(
            f"checkpoint {path} verifies against its manifest but cannot be read "
            f"({why}): it was damaged after it was committed. Resume "
            f"from another one ({hint}) or move it aside"
        ) from None
    if load_path is None:
        raise RuntimeError(f"DeepSpeed found no checkpoint in {load_dir / tag}")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    saved_world = read_meta(path)["world_size"]
    if saved_world == world:
        return json.loads((path / rank_file(rank)).read_text())
    states = [json.loads((path / rank_file(r)).read_text()) for r in range(saved_world)]
    return elastic_rank_state(states, rank, world, reshard_loader)


def elastic_rank_state(states: list[dict], rank: int, world: int, reshard_loader) -> dict:
    """The state of `rank` of `world` from the states of all ranks of another world size: the
    counters (the same on every rank), the RNG state of old rank `rank mod old world`, and
    the loader state `reshard_loader` deals to it."""
    return {
        "rng": states[rank % len(states)]["rng"],
        "loader": reshard_loader([s["loader"] for s in states], world)[rank],
        "counters": dict(states[0]["counters"]),
    }
