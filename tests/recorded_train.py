"""`python -m rnnscale.train` that also records every micro batch a rank trains on, for tests
that count documents: `python tests/recorded_train.py CONFIG [key=value ...]` (or under
torchrun). Each rank of each start writes `<run.dir>/rows/<start>-rank<r>.jsonl`, one line per
micro batch: the start's id, the step it resumed from, the step and micro batch, the rows
(seq_len + 1 tokens each). `kept_rows` reads them back as the run that finished saw them: the
lines of a start that was killed past the step a later start resumed from are dropped."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


class Recorder:
    """Wraps the batch source: passes batches through, writing each as a line."""

    def __init__(self, batches, run_dir: Path):
        import torch

        self.batches, self.rank = batches, torch.distributed.get_rank()
        self.start = os.environ.get("TORCHELASTIC_RUN_ID") or str(os.getpid())
        self.dir, self.t = Path(run_dir) / "rows", time.time_ns()
        self.first_step, self.accum, self.count = 0, 1, 0

    def __getattr__(self, name):  # state_dict, load_state_dict, close, ...
        return getattr(self.batches, name)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self.batches)
        step, micro = divmod(self.count, self.accum)
        self.count += 1
        rows = [[*r, int(last)] for r, last in zip(batch["input_ids"].tolist(),
                                                   batch["labels"][:, -1].tolist())]  # fmt: skip
        line = {"start": self.start, "t": self.t, "from": self.first_step, "rank": self.rank,
                "step": self.first_step + step + 1, "micro": micro, "rows": rows}  # fmt: skip
        self.dir.mkdir(exist_ok=True)
        with open(self.dir / f"{self.start}-rank{self.rank}.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")
        return batch


def kept_rows(run_dir: Path) -> dict[tuple[int, int, int], tuple[str, list[list[int]]]]:
    """(step, rank, micro) -> (the start that trained them, rows), as the finished run trained
    on them. A start killed while it wrote a batch's line (before training on it) leaves that
    line cut: it is skipped (`launcher.records`)."""
    from launcher import records

    starts: dict[str, list[dict]] = {}
    for path in sorted((Path(run_dir) / "rows").glob("*.jsonl")):
        for line in records(path):
            starts.setdefault(line["start"], []).append(line)
    kept: dict[tuple[int, int, int], tuple[str, list[list[int]]]] = {}
    for lines in sorted(starts.values(), key=lambda ls: min(x["t"] for x in ls)):
        resumed_from = lines[0]["from"]
        kept = {k: v for k, v in kept.items() if k[0] <= resumed_from}
        kept.update({(x["step"], x["rank"], x["micro"]): (x["start"], x["rows"]) for x in lines})
    return kept


def _install() -> None:
    from rnnscale.train import trainer

    made, restore = trainer.make_batches, trainer.restore

    def make_batches(data, shape, seed, run_dir, layout):
        return Recorder(made(data, shape, seed, run_dir, layout), run_dir)

    def restoring(engine, path, cfg, batches, universal):
        progress = restore(engine, path, cfg, batches.batches, universal)
        batches.first_step = progress.step
        return progress

    trainer.make_batches, trainer.restore = make_batches, restoring
    accum = trainer.train_step

    def train_step(engine, batches, *args, **kwargs):
        batches.accum = engine.gradient_accumulation_steps()
        return accum(engine, batches, *args, **kwargs)

    trainer.train_step = train_step


if __name__ == "__main__":
    _install()
    from rnnscale.train.__main__ import main

    sys.exit(main(sys.argv[1:]))
