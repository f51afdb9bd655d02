"""What the machine can do and what a run uses: the peak FLOP/s that MFU divides by (when
`train.peak_tflops` is not given) and peak memory.

The peak (`peak_flops`): on a GPU whose datasheet we carry (`DATASHEET_TFLOPS`), the dense
(no 2:4 sparsity) tensor-core peak of the training dtype; on any other GPU and on CPU, an
n x n matmul in the training dtype measured on the device at start (`measure_peak_flops`), so
there MFU is relative to what this machine's matmul reaches, not to a datasheet.
"""

from __future__ import annotations

import re
import resource
import time

import torch

DATASHEET_TFLOPS = {
    "NVIDIA H100 SXM": {"bf16": 989.5, "tf32": 494.5, "fp32": 67.0},
    "NVIDIA H100 PCIe": {"bf16": 756.5, "tf32": 378.0, "fp32": 51.0},
    "NVIDIA H200 SXM": {"bf16": 989.5, "tf32": 494.5, "fp32": 67.0},
    "NVIDIA A100": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5},
}
"""Dense TFLOP/s per GPU from NVIDIA's datasheets (they print bf16 and tf32 with 2:4 sparsity;
these are half of that, e.g. H100 SXM bf16 1979 / 2): bf16 and tf32 on the tensor cores, fp32
on the CUDA cores (the clock-exact figures are 989.4 and 494.7 TFLOP/s). A100: SXM4 and PCIe
alike. H100 NVL, H200 NVL and GH200 run at other clocks and are not listed, nor is a MIG slice
of any GPU: those are measured."""

_NAMES = [  # (pattern on torch.cuda.get_device_name, DATASHEET_TFLOPS key), first match wins
    (r"\bMIG\b|\bNVL\b", None),  # a MIG slice has a part of the SMs; NVL: other clocks
    (r"\bH100\b.*\bPCIe\b", "NVIDIA H100 PCIe"),
    (r"\bH100\b", "NVIDIA H100 SXM"),  # "NVIDIA H100 80GB HBM3"
    (r"\bH200\b", "NVIDIA H200 SXM"),  # "NVIDIA H200"; GH200 does not match
    (r"\bA100\b", "NVIDIA A100"),  # "NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe"
]


def datasheet_peak(device_name: str, dtype: str, tf32: bool = False) -> tuple[float, str] | None:
    """(FLOP/s, where it comes from) of the GPU named `device_name` in the training dtype
    ("bf16", or "fp32": the tf32 tensor-core peak when fp32 matmuls may use TF32, else the
    CUDA-core fp32 peak); None for a GPU not in `DATASHEET_TFLOPS`."""
    key = next((k for pat, k in _NAMES if re.search(pat, device_name, re.IGNORECASE)), None)
    if key is None:
        return None
    kind = "bf16" if dtype == "bf16" else "tf32" if tf32 else "fp32"
    tflops = DATASHEET_TFLOPS[key][kind]
    return tflops * 1e12, f"datasheet: {key}, {kind} dense, {tflops:g} TFLOP/s"


def peak_flops(device: torch.device, dtype: str = "fp32") -> tuple[float, str]:
    """(FLOP/s of one device for MFU, where it comes from): the datasheet peak of a known GPU
    (`datasheet_peak`), else a matmul measured now (`measure_peak_flops`)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        known = datasheet_peak(name, dtype, tf32=torch.backends.cuda.matmul.allow_tf32)
        if known is not None:
            return known
        source = f"measured: {dtype} matmul on {name} (no datasheet entry)"
    else:
        source = f"measured: {dtype} matmul on {device.type}"
    return measure_peak_flops(device, dtype), source


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


def cpu_live_bytes(fn) -> tuple[int, int]:
    """`(peak, held)`: the most bytes that tensors allocated while `fn()` runs held at once
    through PyTorch's CPU allocator, and what they still hold when it returns. The measure of
    CUDA's `max_memory_allocated` for CPU tensors: unlike resident memory it leaves out what
    glibc's malloc keeps after a free, and the pages of the process that are not tensors.
    From the allocation events of `torch.profiler` (profile_memory), so `fn` runs slower."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    cpu = torch.autograd.DeviceType.CPU
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    held = peak = 0
    for _, nbytes in sorted((e.start_ns(), e.nbytes()) for e in events if e.device_type() == cpu):
        held += nbytes  # a free is negative; frees of blocks from before the start count 0
        peak = max(peak, held)
    return peak, held
