"""Measuring helpers shared by the benchmark scripts: the machine's matmul peak, peak memory."""

from __future__ import annotations

import resource
import time

import torch


def matmul_peak_gflops(n: int = 1024, repeats: int = 5) -> float:
    """fp32 GFLOP/s of a square matmul on this machine, now (the yardstick for MFU)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def rss_mb() -> float:
    """Resident memory of this process now, MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_rss_mb() -> float:
    """The highest resident memory this process has had, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
