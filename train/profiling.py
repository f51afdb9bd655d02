"""Profiles of chosen training steps (train.profile_start, train.profile_steps): a
torch.profiler trace that TensorBoard's profiler plugin or ui.perfetto.dev opens, and on CUDA a
memory snapshot for pytorch.org/memory_viz, under <run dir>/profile/ (docs/monitoring.md,
Profiles).

    profile = StepProfiler.for_run(cfg, rank, device)
    while ...:
        profile.step_begins(step + 1)   # before each step
        ...
    profile.close()                     # after the loop

The step before the first profiled one is the profiler's warm-up (its own start-up costs stay
out of the trace); a run resumed inside the range profiles the steps left.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from rnnscale.train.config import RunConfig
from rnnscale.train.notice import notice

HOW_TO_OPEN = (
    "open it with `tensorboard --logdir {dir}` (pip install torch-tb-profiler) or at "
    "ui.perfetto.dev"
)


class StepProfiler:
    """Profiles steps first..last on this rank; a no-op where train.profile is off or the rank
    is not one of train.profile_ranks."""

    def __init__(self, steps: tuple[int, int] | None, out: Path, rank: int, device):
        self.steps, self.out, self.rank, self.device = steps, out, rank, device
        self._prof: torch.profiler.profile | None = None
        self._done = steps is None

    @classmethod
    def for_run(cls, cfg: RunConfig, rank: int, device) -> StepProfiler:
        t = cfg.train
        steps = (t.profile_start, t.profile_start + t.profile_steps - 1)
        if t.profile_start == 0 or (rank != 0 and t.profile_ranks == "rank0"):
            steps = None
        return cls(steps, cfg.run_dir / "profile", rank, device)

    def step_begins(self, step: int) -> None:
        """Call before step `step` (1-based) runs."""
        if self._done:
            return
        first, last = self.steps
        if self._prof is None and first - 1 <= step <= last:
            self._start(warmup=int(step < first), active=last - max(step, first) + 1)
        elif self._prof is not None:
            self._prof.step()
            if step > last:
                self.close()

    def close(self) -> None:
        """Write what was recorded (at the end of the range, or the end of the run)."""
        if self._prof is None:
            return
        prof, self._prof, self._done = self._prof, None, True
        prof.stop()
        snapshot = self._dump_memory()
        traces = sorted(self.out.glob(f"rank{self.rank}.*.pt.trace.json"),
                        key=lambda p: p.stat().st_mtime)  # fmt: skip
        written = f"{traces[-1]}" if traces else f"nothing in {self.out}"
        if snapshot:
            written += f" and memory snapshot {snapshot} (pytorch.org/memory_viz)"
        first, last = self.steps
        steps = f"step {first}" if first == last else f"steps {first}-{last}"
        notice(f"profile of {steps} written: {written}; "
               + HOW_TO_OPEN.format(dir=self.out), every_rank=self.rank != 0)  # fmt: skip

    def _start(self, warmup: int, active: int) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type != "cuda":  # kineto says it found no GPU, and more, on stderr
            os.environ.setdefault("KINETO_LOG_LEVEL", "6")
        else:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.memory._record_memory_history(max_entries=200_000)
        self._prof = torch.profiler.profile(
            activities=activities,
            schedule=torch.profiler.schedule(wait=0, warmup=warmup, active=active, repeat=1),
            on_trace_ready=torch.profiler.tensorboard_trace_handler(
                str(self.out), worker_name=f"rank{self.rank}"
            ),
            profile_memory=True,  # allocations per op, CPU and GPU: the trace's memory view
            record_shapes=False,
            with_stack=False,
        )
        self._prof.start()

    def _dump_memory(self) -> Path | None:
        """On CUDA, the allocator's history over the profiled steps (CPU has none)."""
        if self.device.type != "cuda":
            return None
        path = self.out / f"rank{self.rank}.memory.pickle"
        torch.cuda.memory._dump_snapshot(str(path))
        torch.cuda.memory._record_memory_history(enabled=None)
        return path
