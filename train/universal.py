"""DeepSpeed's universal checkpoints: whether a resume needs one (another number of ranks or
ZeRO stage) and making one from a committed checkpoint (`rnnscale ckpt reshard`, or the resume
itself), with a manifest of its own."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from rnnscale.train.checkpoint import (
    MANIFEST,
    UNIVERSAL,
    WEIGHTS_ONLY_ENV,
    read_meta,
    sha256_of,
    verify,
)
from rnnscale.train.files import write_atomic


def needs_universal(path: Path, world: int, zero_stage: int) -> bool:
    """Whether resuming `path` on `world` ranks at `zero_stage` must go through a universal
    checkpoint: its ZeRO optimizer state is split over another number of ranks, or another
    stage. (ZeRO-0 keeps the whole optimizer state in one file that any world size reads.)"""
    meta = read_meta(path)
    saved_stage = meta["zero_stage"]
    if saved_stage != zero_stage and not {saved_stage, zero_stage} <= {1, 2}:
        raise ValueError(
            f"{path} was saved with ZeRO stage {saved_stage} and this run has stage "
            f"{zero_stage}; DeepSpeed's checkpoints change stage only between 1 and 2. Resume "
            f"it with parallel.zero_stage={saved_stage} (on any number of ranks)"
        )
    if saved_stage == 0:
        return False
    return meta["world_size"] != world or saved_stage != zero_stage


def make_universal(path: Path) -> Path:
    """`<path>/universal/`, DeepSpeed's universal form of the checkpoint `path`, made with
    `deepspeed.checkpoint.ds_to_universal` in a child process (it runs worker pools) into a
    temporary folder, given its own manifest, then renamed into place; an existing one is
    reused when it verifies. Raises RuntimeError with the converter's output on failure."""
    out = path / UNIVERSAL
    if out.is_dir() and verify(out) is None:
        return out
    problem = verify(path)
    if problem is not None:
        raise RuntimeError(f"{path} cannot be converted: {problem}")
    if read_meta(path)["zero_stage"] == 0:
        raise RuntimeError(
            f"{path} was saved with ZeRO stage 0, whose one model-state file any world size "
            f"reads; it needs no universal form (resume it with zero_stage=0)"
        )
    tmp = path / f".{UNIVERSAL}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    # DeepSpeed's converter, run with weights-only loading (it asks torch.load for pickle)
    script = (
        "import torch; from rnnscale.train.checkpoint import safe_globals; "
        "torch.serialization.add_safe_globals(safe_globals()); "
        "from deepspeed.checkpoint import ds_to_universal as c; c.main(c.parse_arguments())"
    )
    command = [sys.executable, "-c", script, "--input_folder", str(path), "--output_folder",
               str(tmp), "--num_extract_workers", "2", "--num_merge_workers", "1"]  # fmt: skip
    import subprocess

    r = subprocess.run(command, capture_output=True, text=True,
                       env={**os.environ, **WEIGHTS_ONLY_ENV})  # fmt: skip
    (path / "latest_universal").unlink(missing_ok=True)  # the converter's; we name the tag
    if r.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(
            f"converting {path} to a universal checkpoint failed (exit {r.returncode}):\n"
            f"{(r.stdout + r.stderr)[-3000:]}"
        )
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    manifest = {
        "step": read_meta(path)["step"],
        "files": {
            str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": sha256_of(p)}
            for p in files
        },
    }
    write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1))
    os.replace(tmp, out)
    return out
