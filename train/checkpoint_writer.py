"""Writing a rank's checkpoint files: now, or in the background (`checkpoint.async`).

DeepSpeed writes its files through a checkpoint engine (`engine.checkpoint_engine.save(state,
path)`). `WriterEngine` is DeepSpeed's torch engine whose `save` hands the state to a `Writer`:

- synchronous: the file is written at once;
- asynchronous: every tensor is copied first (on the CPU, in memory; the step loop may then
  change the originals) and the file is written by one background thread while training goes on.

Either way each file is written through a hashing wrapper (torch.save writes sequentially), so
its size and SHA-256 for the manifest cost no second read, and is fsynced. `Writer.wait()` gives
this rank's file records, or raises the first write error. The background thread never calls
torch.distributed: all collectives stay in the training thread (checkpoint.PendingSave).
"""

from __future__ import annotations

import copy
import hashlib
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch


class Writer:
    """Writes files of one checkpoint directory, now or in a background thread."""

    def __init__(self, asynchronous: bool):
        self.asynchronous = asynchronous
        self._pool = (
            ThreadPoolExecutor(1, thread_name_prefix="rnnscale-ckpt") if asynchronous else None
        )
        self._jobs: list[Future] = []

    def save_tensors(self, state, path: str | Path) -> None:
        """torch.save `state` to `path` (a snapshot of it, when asynchronous)."""
        if self.asynchronous:
            state = _snapshot(state)
        self._submit(Path(path), lambda f: torch.save(state, f))

    def save_text(self, text: str, path: str | Path) -> None:
        data = text.encode()
        self._submit(Path(path), lambda f: f.write(data))

    def _submit(self, path: Path, fill) -> None:
        if self._pool is not None:
            self._jobs.append(self._pool.submit(_write, path, fill))
            return
        job: Future = Future()  # run now; Writer.wait reports an error like a background one
        try:
            job.set_result(_write(path, fill))
        except Exception as e:
            job.set_exception(e)
        self._jobs.append(job)

    def done(self) -> bool:
        """Every file handed over so far is written (or failed)."""
        return all(job.done() for job in self._jobs)

    def wait(self) -> dict[str, dict]:
        """Block until every file is written; {path: {bytes, sha256}}. Raises the first
        error a write met (OSError, or RuntimeError from torch.save)."""
        records, error = {}, None
        for job in self._jobs:
            try:
                path, record = job.result()
                records[path] = record
            except Exception as e:  # any failure of a write fails the save, never a rank alone
                if not isinstance(e, OSError | RuntimeError):
                    e = RuntimeError(f"{type(e).__name__}: {e}")
                error = error or e
        self._jobs = []
        if error is not None:
            raise error
        return records

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


_CHUNK = 64 << 20
_hasher = ThreadPoolExecutor(1, thread_name_prefix="rnnscale-sha256")


class _Hashing:
    """A file object that hashes and counts what goes through it. A large write is cut into
    chunks, each hashed by another thread while the file takes it (hashlib and file writes
    release the GIL), so hashing costs about nothing beside the disk."""

    def __init__(self, f):
        self.f, self.sha, self.bytes = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.bytes += len(view)
        if len(view) < 2 * _CHUNK:
            self.sha.update(view)
            return self.f.write(view)
        hashing = None
        for start in range(0, len(view), _CHUNK):
            chunk = view[start : start + _CHUNK]
            if hashing is not None:
                hashing.result()  # chunks are hashed in order
            hashing = _hasher.submit(self.sha.update, chunk)
            self.f.write(chunk)
        hashing.result()
        return len(view)

    def flush(self) -> None:
        self.f.flush()


def _write(path: Path, fill) -> tuple[str, dict]:
    with open(path, "wb") as f:
        h = _Hashing(f)
        fill(h)
        f.flush()
        os.fsync(f.fileno())
    return str(path), {"bytes": h.bytes, "sha256": h.sha.hexdigest()}


def _snapshot(item):
    """A copy that the training step cannot change: tensors copied to CPU memory, containers
    rebuilt, anything else deep-copied (small objects: loss scalers, enums, numbers)."""
    if isinstance(item, torch.Tensor):
        return item.detach().to("cpu", copy=True)
    if isinstance(item, dict):
        return type(item)((k, _snapshot(v)) for k, v in item.items())
    if isinstance(item, list | tuple):
        return type(item)(_snapshot(v) for v in item)
    return copy.deepcopy(item)


def writer_engine(writer: Writer | None):
    """DeepSpeed's torch checkpoint engine whose saves go through `writer` and whose loads map
    the file instead of reading it (DeepSpeed copies what it loads into its own buffers, so
    the pages are read once, straight from the page cache, with no intermediate copy)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class WriterEngine(TorchCheckpointEngine):
        def save(self, state_dict, path: str) -> None:
            if writer is None:
                raise RuntimeError("this checkpoint engine only loads")
            writer.save_tensors(state_dict, path)

        def load(self, path: str, map_location=None):
            with open(path, "rb") as f:
                mmap = f.read(4) == b"PK\x03\x04"  # torch's zip format maps; the legacy one not
            return torch.load(path, map_location=map_location, mmap=mmap, weights_only=True)

        def preserves_storage_sharing(self) -> bool:
            # DeepSpeed then clones the model state for torch.save; the snapshot already does
            return writer is None or not writer.asynchronous

    return WriterEngine()
