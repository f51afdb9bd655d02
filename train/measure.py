"""What the machine can do and what a run uses: the matmul peak (the yardstick for MFU when
`train.peak_tflops` is not given) and peak memory."""

from __future__ import annotations

import resource
import time

import torch


def measure_peak_flops(
    device: torch.device, dtype: str = "fp32", n: int | None = None, repeats: int = 5
) -> float:
    """FLOP/s of an n x n matmul on `device` in the training dtype, now (best of `repeats`)."""
    n = n or (4096 if device.type == "cuda" else 1024)
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    a = torch.randn(n, n, device=device, dtype=torch_dtype)
    b = torch.randn(n, n, device=device, dtype=torch_dtype)
    best = float("inf")
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def peak_memory_gb(device: torch.device) -> float:
    """The most memory this rank has held: allocated GPU memory, or the process's peak
    resident memory on CPU (Linux reports KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
