"""Measuring helpers shared by the benchmark scripts: the machine's matmul peak, peak memory."""

from __future__ import annotations

import os
import resource
import sys

import torch

from rnnscale.train.measure import measure_peak_flops


def matmul_peak_gflops(n: int = 1024) -> float:
    """fp32 GFLOP/s of a square matmul on this machine, now (the yardstick for MFU; the same
    measurement the trainer makes when train.peak_tflops is 0)."""
    return measure_peak_flops(torch.device("cpu"), "fp32", n) / 1e9


def rss_mb() -> float:
    """Resident memory of this process now, MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_rss_mb() -> float:
    """The highest resident memory this process has had, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# glibc's malloc kept on its heap: by default each allocation over 32 MiB (its largest mmap
# threshold; less before it has grown) is a fresh mmap, whose pages the kernel faults in and
# zeroes on first touch and which free returns at once (docs/performance.md).
HEAP_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(2**30), "MALLOC_TRIM_THRESHOLD_": str(2**32)}


def heap_malloc_on() -> bool:
    """Whether this process started under HEAP_MALLOC."""
    return all(os.environ.get(k) == v for k, v in HEAP_MALLOC.items())


def rerun_with_heap_malloc(script: str) -> None:
    """Replace this process by `script` with the same arguments under HEAP_MALLOC (glibc reads
    the variables at start), unless it already runs under it."""
    if not heap_malloc_on():
        os.execve(sys.executable, [sys.executable, script, *sys.argv[1:]],
                  {**os.environ, **HEAP_MALLOC})  # fmt: skip
