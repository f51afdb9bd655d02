"""Scan kernels: the chunkwise PyTorch path against the step loop, forward + backward.

    .venv/bin/python benchmarks/kernels.py              # B=1, H=8, K=V=64 (scan D=1024)
    .venv/bin/python benchmarks/kernels.py --smoke      # tiny shapes, seconds (the test runs it)

Both paths run in the same process on the same inputs (fp32), so the ratio is what to read;
absolute times move with the machine's load. FLOPs count the chunkwise algorithm's matmuls
(2 m n k each) forward and twice that backward; the peak is a square fp32 matmul measured in
the same run. The scan family is elementwise (memory-bound): its GFLOP/s are not comparable to a
matmul peak and are left out. The Triton path is not measured here (no GPU on this machine).
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from rnnscale.kernels.delta import chunk_gated_delta_rule, naive_recurrent_gated_delta_rule
from rnnscale.kernels.gla import chunk_gla, naive_recurrent_gla
from rnnscale.kernels.scan import linear_scan, naive_linear_scan
from rnnscale.kernels.simple_gla import chunk_simple_gla, naive_recurrent_simple_gla


def inputs(family: str, B: int, T: int, H: int, K: int, V: int) -> list[torch.Tensor]:
    r = lambda *s: torch.randn(*s)  # noqa: E731
    sig = torch.nn.functional.logsigmoid
    if family == "scan":
        return [torch.sigmoid(r(B, T, H * K) + 2), r(B, T, H * K)]
    q, k, v = r(B, T, H, K), torch.nn.functional.normalize(r(B, T, H, K), dim=-1), r(B, T, H, V)
    if family == "gla":
        return [q, k, v, sig(r(B, T, H, K) + 3)]
    if family == "simple_gla":
        return [q, k, v, sig(r(B, T, H) + 3)]
    return [q, k, v, sig(r(B, T, H) + 3), torch.sigmoid(r(B, T, H))]


FAMILIES = {  # name: (chunkwise, step loop, chunk size, forward FLOPs per token and head)
    "gla": (chunk_gla, naive_recurrent_gla, 16, lambda C, K, V: 3 * C * K + 2 * C * V + 4 * K * V),
    "simple_gla": (
        chunk_simple_gla,
        naive_recurrent_simple_gla,
        64,
        lambda C, K, V: 2 * C * K + 2 * C * V + 4 * K * V,
    ),
    "delta": (
        chunk_gated_delta_rule,
        naive_recurrent_gated_delta_rule,
        64,
        lambda C, K, V: 6 * C * K + 4 * C * V + 6 * K * V,
    ),
    "scan": (linear_scan, naive_linear_scan, 32, None),
}


def fwd_bwd_seconds(fn, xs, repeats: int, **kw) -> float:
    best = float("inf")
    for _ in range(repeats):
        leaves = [x.clone().requires_grad_() for x in xs]
        start = time.perf_counter()
        out, _ = fn(*leaves, **kw)
        out.sum().backward()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_peak_gflops(n: int = 1024, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _timed(f) -> float:
    start = time.perf_counter()
    f()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes: check it runs")
    parser.add_argument("--lengths", type=int, nargs="*", default=[1024, 4096, 16384])
    parser.add_argument(
        "--loop-max-len", type=int, default=4096, help="longest T for the step loop (it is slow)"
    )
    args = parser.parse_args()
    H, K, V = (2, 16, 16) if args.smoke else (8, 64, 64)
    lengths = [64] if args.smoke else args.lengths
    repeats = 1 if args.smoke else 3
    torch.manual_seed(0)
    peak = matmul_peak_gflops(256 if args.smoke else 1024)
    print(
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; fp32 matmul peak {peak:.1f} GFLOP/s"
    )
    print(
        "| family | T | chunkwise fwd+bwd s | step loop fwd+bwd s | speed-up | GFLOP/s | "
        "% of matmul peak |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, (chunk, loop, C, flops) in FAMILIES.items():
        for T in lengths:
            xs = inputs(name, 1, T, H, K, V)
            t_chunk = fwd_bwd_seconds(chunk, xs, repeats, chunk_size=C)
            t_loop = fwd_bwd_seconds(loop, xs, 1) if T <= args.loop_max_len else None
            speedup = f"{t_loop / t_chunk:.0f}x" if t_loop else "not run"
            loop_s = f"{t_loop:.3f}" if t_loop else "not run"
            if flops:
                gflops = 3 * flops(C, K, V) * T * H / t_chunk / 1e9
                rate, share = f"{gflops:.1f}", f"{100 * gflops / peak:.1f}%"
            else:
                rate, share = "n/a (elementwise)", "n/a"
            print(
                f"| {name} | {T} | {t_chunk:.3f} | {loop_s} | {speedup} | {rate} | {share} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
