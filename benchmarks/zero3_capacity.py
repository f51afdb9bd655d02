"""The largest model that trains with ZeRO-3 on this machine's CPU ranks.

    .venv/bin/python benchmarks/zero3_capacity.py configs/recipes/gla-1.3b.yaml [key=value ...]

Runs `torchrun --nproc_per_node 2 -m rnnscale.train RECIPE` with ZeRO-3 for a few steps at a
short sequence (synthetic data, no tokenizer needed) and reports, from the run's metrics, the
parameters, the peak resident memory of rank 0 (each rank holds about the same), the step time
and the loss, next to the same numbers DeepSpeed's estimator predicts for model states on 2
ranks. A recipe that does not fit ends in the kernel's OOM kill, reported as such.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHORT = ["parallel.zero_stage=3", "train.seq_len=64", "train.micro_batch_size=1",
         "train.global_batch_size=2", "train.max_steps=3", "train.log_interval=1",
         "data.source=synthetic", "log.progress_bar=false", "log.wandb.mode=disabled",
         "log.tensorboard=false", "schedule.warmup_steps=0"]  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rnnscale-zero3-") as tmp:
        cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node",
               "2", "-m", "rnnscale.train", args.recipe, *SHORT, f"run.dir={tmp}/run",
               *args.overrides]  # fmt: skip
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        metrics = Path(tmp) / "run" / "metrics.jsonl"
        records = [json.loads(line) for line in metrics.open()] if metrics.exists() else []
        params = next((ln for ln in r.stdout.splitlines() if ln.startswith("parameters:")), "")
        print(f"recipe: {args.recipe} {' '.join(args.overrides)}; {params}")
        print(f"exit code: {r.returncode}" + (" (killed: out of memory?)" if r.returncode < 0
                                               or "SIGKILL" in r.stderr else ""))  # fmt: skip
        for rec in records:
            print(
                f"step {rec['step']}: loss {rec['loss']:.4f}, {rec['step_time_s']:.1f} s, "
                f"peak resident memory of rank 0 {rec['peak_memory_gb']:.2f} GiB"
            )
        if r.returncode != 0:
            print(r.stderr[-2000:])
    return 0 if records else 1


if __name__ == "__main__":
    sys.exit(main())
