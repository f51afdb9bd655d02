"""A model past 1B parameters trained with its optimizer state on NVMe (ZeRO-Infinity), beside
the largest that ZeRO-3 trains without offload, on this machine's 2 CPU ranks (24 GiB).

    .venv/bin/python benchmarks/offload.py --nvme-path /local_nvme

Two rows, one after the other in one run, of benchmarks/zero3_capacity.py's 2-rank ZeRO-3 run
(synthetic data, seq_len 64, one row per rank, 3 steps, fp32) of the gla-1.3b recipe with tied
embeddings and CPU-sized buckets: 12 layers (0.67B, the largest without offload here, 2026-11-22)
without offload, and 19 layers (1.03B) with parallel.offload_optimizer=nvme (the fp32 master
weights and both AdamW moments, 12 of the 16 bytes a parameter, on the drive; DeepSpeed's
async_io op, so libaio, is needed). Prints a markdown table: parameters, peak resident memory of
rank 0, step time (steps 2-3; step 1 includes first-touch costs), loss of each step.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from zero3_capacity import run_row  # noqa: E402

RECIPE = "configs/recipes/gla-1.3b.yaml"
CPU_BUCKETS = ["model.tie_embeddings=true", "parallel.reduce_bucket_size=50000000",
               "parallel.stage3_max_live_parameters=100000000",
               "parallel.stage3_prefetch_bucket_size=20000000"]  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nvme-path", default=None,
                        help="directory for the swapped optimizer state, about 12 bytes a "
                             "parameter (default: a temporary directory under /tmp)")  # fmt: skip
    parser.add_argument("--layers", type=int, default=19, help="layers of the offloaded model")
    parser.add_argument("--peer-layers", type=int, default=12,
                        help="layers of the model trained without offload")  # fmt: skip
    args = parser.parse_args()
    swap = Path(args.nvme_path or tempfile.mkdtemp(prefix="rnnscale-nvme-"))
    offload = [
        f"model.num_layers={args.layers}",
        "parallel.offload_optimizer=nvme",
        f"parallel.offload_nvme_path={swap}",
        "parallel.sub_group_size=50000000",
    ]
    rows = [("ZeRO-3, optimizer state on NVMe", offload),
            ("peer: ZeRO-3 without offload", [f"model.num_layers={args.peer_layers}"])]  # fmt: skip
    try:
        cells = [row_cells(extra) for _, extra in rows]
    finally:
        if args.nvme_path is None:
            shutil.rmtree(swap, ignore_errors=True)
    print(f"recipe: {RECIPE} {' '.join(CPU_BUCKETS)}; 2 ranks, 3 steps, seq_len 64\n")
    print("| measure | " + " | ".join(name for name, _ in rows) + " |\n|---|---|---|")
    for i, measure in enumerate(MEASURES):
        print(f"| {measure} | " + " | ".join(c[i] for c in cells) + " |")
    return 0 if all(c[1] == "trains" for c in cells) else 1


MEASURES = ["overrides", "result", "parameters", "peak resident memory, rank 0",
            "step time, steps 2-3 (step 1 adds first-touch costs)", "losses"]  # fmt: skip


def row_cells(extra: list[str]) -> list[str]:
    """One run's cells, in the order of MEASURES; its stderr's end when it failed."""
    code, params, records, stderr = run_row(RECIPE, CPU_BUCKETS + extra)
    if code != 0:
        print(stderr, file=sys.stderr)
    peak = max((r["peak_memory_gb"] for r in records), default=None)
    times = [r["step_time_s"] for r in records[1:]]
    return [
        f"`{' '.join(extra)}`",
        "trains" if code == 0 else f"exit {code}" + (" (killed)" if code == -9 else ""),
        params.split()[0],
        f"{peak:.2f} GiB" if peak is not None else "none logged",
        f"{min(times):.1f}-{max(times):.1f} s" if times else "none logged",
        ", ".join(f"{r['loss']:.4f}" for r in records) or "none logged",
    ]


if __name__ == "__main__":
    sys.exit(main())
