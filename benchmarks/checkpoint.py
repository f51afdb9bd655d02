"""Checkpoint save and load bandwidth against the raw disk, and the step-loop cost of a save.

    .venv/bin/python benchmarks/checkpoint.py [--dir DIR] [--saves N] [--smoke] [key=value ...]

The model (default: the gla-1.3b recipe cut to 6 layers with tied embeddings, 0.37B
parameters, ZeRO-2, fp32, one process, at a short sequence so a step stays short on a CPU)
trains through `rnnscale.train.run` three times, each in a fresh process, in DIR (default:
a temporary folder under runs/, on the repository's disk):

1. **sync**: a synchronous checkpoint at every step. Each save's time is what the step loop
   was held up (the `checkpoint` event's `blocked_s`). Side by side with each save, on the same
   disk and in the same process: just before it and just after it, one file of the
   checkpoint's size written with 8 MiB sequential writes and fsync (the raw write; the save is
   compared with the mean of the two, since a write right after another large one finds the
   disk slower); then the checkpoint loaded back into the engine (`checkpoint.load`, what
   resume and rollback run) and the raw file read back, each after dropping the page cache when
   this process may (root; the table says). The disk of a shared machine is noisy (0.3-1 GB/s
   from one minute to the next here), so the figures are medians over the saves, and the
   ratios are taken pair by pair.
2. **plain**: no checkpoints: the step time.
3. **async**: `checkpoint.async=true`, one save in the middle: the time the step loop was held
   up (the in-memory copy and the commit) plus the extra time of the steps that ran while the
   files were written, against one step.

Nothing here is asserted on; tests/test_benchmarks.py runs `--smoke` (the tiny debug model).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ["configs/recipes/gla-1.3b.yaml", "model.num_layers=6", "model.tie_embeddings=true"]
SMOKE = ["configs/debug_cpu.yaml"]
COMMON = ["train.seq_len=64", "train.micro_batch_size=1", "train.global_batch_size=1",
          "train.log_interval=1", "data.source=synthetic", "parallel.zero_stage=2",
          "log.progress_bar=false", "log.wandb.mode=disabled", "log.tensorboard=false",
          "schedule.warmup_steps=0", "checkpoint.keep=2", "train.peak_tflops=1"]  # fmt: skip


def drop_caches() -> bool:
    """Empty the page cache (root only), so that reads come from the disk."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def raw_write(path: Path, size: int) -> float:
    block = os.urandom(8 << 20)
    start = time.perf_counter()
    with open(path, "wb") as f:
        left = size
        while left > 0:
            left -= f.write(block[: min(left, len(block))])
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - start


def raw_read(path: Path) -> float:
    buffer = bytearray(8 << 20)  # reused: the read costs the disk and one copy, nothing else
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buffer):
            pass
    return time.perf_counter() - start


def checkpoint_bytes(path: Path) -> int:
    files = json.loads((path / "manifest.json").read_text())["files"]
    return sum(f["bytes"] for f in files.values())


def events(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "events.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == kind]


def step_times(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["step_time_s"] for r in map(json.loads, lines)}


class SideBySide:
    """Hooks into the trainer's Checkpointer: a raw write before each save, a timed load of
    the checkpoint and a raw read after each commit."""

    def __init__(self, folder: Path):
        self.raw = folder / "raw.bin"
        self.size = 0  # the last checkpoint's bytes; the first save has no raw write beside it
        self.writes: list[float | None] = []  # raw writes just before each save
        self.after: list[float] = []  # and just after it
        self.loads: list[tuple[int, float, float]] = []  # (bytes, load s, raw read s)
        self.dropped = True
        self.active = False  # only around the synchronous run

    def install(self, monkeypatch_target) -> None:
        from rnnscale.train import checkpoint

        real_start, real_finish = monkeypatch_target._start, monkeypatch_target.finish
        side = self

        def _start(self, progress):
            if side.active:
                side.writes.append(raw_write(side.raw, side.size) if side.size else None)
            return real_start(self, progress)

        def finish(self, step):
            pending = self.pending
            real_finish(self, step)
            if not side.active or pending is None or checkpoint.verify(pending.path):
                return
            side.size = checkpoint_bytes(pending.path)
            side.after.append(raw_write(side.raw, side.size))
            side.dropped &= drop_caches()
            start = time.perf_counter()
            checkpoint.load(self.engine, pending.path, type(self.batches).reshard)
            load_s = time.perf_counter() - start
            side.dropped &= drop_caches()
            side.loads.append((side.size, load_s, raw_read(side.raw)))

        monkeypatch_target._start, monkeypatch_target.finish = _start, finish


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", help="where to write (default: a temporary folder in runs/)")
    parser.add_argument("--saves", type=int, default=5, help="synchronous saves to time")
    parser.add_argument("--smoke", action="store_true", help="the tiny debug model")
    parser.add_argument("--child", choices=["sync", "plain", "async"], help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    model = SMOKE if args.smoke else MODEL
    if args.child:  # one run in a fresh process (each run's memory goes with it)
        child(args, model)
        return 0
    parent = Path(args.dir) if args.dir else ROOT / "runs"
    parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="rnnscale-ckpt-bench-", dir=parent) as tmp:
        tmp = Path(tmp)
        for mode in ("sync", "plain", "async"):
            cmd = [sys.executable, __file__, "--child", mode, "--dir", str(tmp),
                   "--saves", str(args.saves), *(["--smoke"] if args.smoke else []),
                   *args.overrides]  # fmt: skip
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise SystemExit(f"the {mode} run failed ({r.returncode}):\n{r.stderr[-3000:]}")
        side = json.loads((tmp / "side.json").read_text())
        saves = [e["blocked_s"] for e in events(tmp / "sync", "checkpoint")]
        plain = step_times(tmp / "plain")
        done = events(tmp / "async", "checkpoint")[0]
        overlapped = step_times(tmp / "async")
    report(model, side, saves, plain, done, overlapped)
    return 0


def child(args, model: list[str]) -> None:
    from rnnscale.train import trainer
    from rnnscale.train.checkpointer import Checkpointer
    from rnnscale.train.config import load_config

    folder = Path(args.dir)
    overrides = [*model[1:], *COMMON, *args.overrides, f"run.dir={folder / args.child}"]
    overrides += {
        "sync": [f"train.max_steps={args.saves + 1}", "checkpoint.interval=1"],
        "plain": ["train.max_steps=6", "checkpoint.interval=0"],
        "async": ["train.max_steps=6", "checkpoint.interval=3", "checkpoint.async=true"],
    }[args.child]
    side = SideBySide(folder)
    if args.child == "sync":
        side.install(Checkpointer)
        side.active = True
    trainer.run(load_config(ROOT / model[0], overrides))
    if args.child == "sync":
        fields = {"size": side.size, "writes": side.writes, "after": side.after,
                  "loads": side.loads, "dropped": side.dropped}  # fmt: skip
        (folder / "side.json").write_text(json.dumps(fields))


def report(model, side: dict, saves, plain, done, overlapped) -> None:
    step = statistics.median(plain[s] for s in plain if s > 1)  # step 1 warms up
    during = range(done["step"] + 1, done["committed_step"] + 1)
    extra = done["blocked_s"] + sum(overlapped[s] - step for s in during)
    # a save beside the mean of the raw writes just before and just after it: a write right
    # after another large one finds the disk slower (its write-back is still busy)
    pairs = [
        ((before + after) / 2, s)
        for before, after, s in zip(side["writes"], side["after"], saves, strict=True)
        if before is not None
    ]
    gb = side["size"] / 1e9
    write_bw = statistics.median(gb / w for w, _ in pairs)
    save_bw = statistics.median(gb / s for _, s in pairs)
    save_ratio = statistics.median(w / s for w, s in pairs)
    loads = side["loads"]
    read_bw = statistics.median(b / 1e9 / r for b, _, r in loads)
    load_bw = statistics.median(b / 1e9 / s for b, s, _ in loads)
    load_ratio = statistics.median(r / s for _, s, r in loads)
    print(f"model: {' '.join(model)}; one process, ZeRO-2, fp32; checkpoint {gb:.2f} GB; "
          f"{len(pairs)} saves and {len(loads)} loads, each beside a raw write / read of "
          f"the same size; page cache dropped before reads: "
          f"{'yes' if side['dropped'] else 'no (not root)'}")  # fmt: skip
    print(
        f"step {step:.3f} s (median of a plain run's steps 2-6); the async save of step "
        f"{done['step']} committed at step {done['committed_step']}\n"
    )
    print("| measure | rnnscale | peer, same run | ratio |")
    print("|---|---|---|---|")
    print(f"| save bandwidth (sync, GB/s) | {save_bw:.2f} | raw sequential write + fsync "
          f"{write_bw:.2f} | {save_ratio:.2f} |")  # fmt: skip
    print(f"| load bandwidth (GB/s) | {load_bw:.2f} | raw sequential read {read_bw:.2f} | "
          f"{load_ratio:.2f} |")  # fmt: skip
    sync_s = statistics.median(saves)
    print(f"| sync save, step loop held up (s) | {sync_s:.3f} | one training step {step:.3f} | "
          f"{sync_s / step:.2f} |")  # fmt: skip
    print(f"| async save, step loop held up + slower steps (s) | {extra:.3f} | one training "
          f"step {step:.3f} | {extra / step:.2f} |")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
