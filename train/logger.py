"""One Logger with sinks (DESIGN.md section 8): metrics.jsonl always, a console progress bar.

Only rank 0 writes; every other rank gets a Logger with no sinks, so callers never branch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from tqdm import tqdm


class JsonlSink:
    """One JSON object per logged step in <run.dir>/metrics.jsonl, flushed at once."""

    def __init__(self, path: Path):
        self.file = open(path, "a", encoding="utf-8")

    def write(self, step: int, metrics: dict) -> None:
        # strict JSON has no NaN/Infinity: write non-finite numbers as strings ("nan", "inf")
        clean = {k: v if _finite(v) else str(v) for k, v in metrics.items()}
        self.file.write(json.dumps({"step": step, **clean}) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class ConsoleSink:
    """A tqdm progress bar with step, loss, tokens/s and ETA."""

    def __init__(self, total_steps: int, initial: int = 0):
        self.bar = tqdm(total=total_steps, initial=initial, desc="train", unit="step")

    def write(self, step: int, metrics: dict) -> None:
        self.bar.n = step
        self.bar.set_postfix(
            loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}", refresh=False
        )
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def _finite(v) -> bool:
    return not isinstance(v, float) or math.isfinite(v)


class Logger:
    def __init__(self, sinks: list):
        self.sinks = sinks

    @classmethod
    def for_rank(cls, rank: int, run_dir: Path, total_steps: int, progress_bar: bool) -> Logger:
        if rank != 0:
            return cls([])
        sinks: list = [JsonlSink(run_dir / "metrics.jsonl")]
        if progress_bar:
            sinks.append(ConsoleSink(total_steps))
        return cls(sinks)

    def log(self, step: int, metrics: dict) -> None:
        for sink in self.sinks:
            sink.write(step, metrics)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
