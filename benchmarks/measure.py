"""Measuring helpers shared by the benchmark scripts: the machine's matmul peak, peak memory."""

from __future__ import annotations

import resource

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
