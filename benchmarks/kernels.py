"""Scan kernels: the chunkwise PyTorch path against the step loop, forward + backward.

    .venv/bin/python benchmarks/kernels.py              # B=1, H=8, K=V=64 (scan D=1024)
    .venv/bin/python benchmarks/kernels.py --smoke      # tiny shapes, seconds (the test runs it)
    .venv/bin/python benchmarks/kernels.py --memory     # peak memory of fwd+bwd against T

Both paths run in the same process on the same inputs (fp32), so the ratio is what to read;
absolute times move with the machine's load. FLOPs count the chunkwise algorithm's matmuls
(2 m n k each) forward and twice that backward; the peak is a square fp32 matmul measured in
the same run. The scan family is elementwise (memory-bound): its GFLOP/s are not comparable to a
matmul peak and are left out.

`--memory` runs every (family, T) in a fresh process and reports the growth of its peak resident
memory over what it held just before the forward (inputs made): on CPU there is no allocator
high-water mark, so the process's peak RSS stands in for one. The peer is the step loop's growth
for the same inputs, each in a fresh process too (up to --loop-max-len).

On a CUDA device the Triton path is timed beside flash-linear-attention's kernels (when `fla`
is installed) in the same run; without one the output says that fla was not measured and why.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time

import torch
from measure import matmul_peak_gflops, peak_rss_mb, rss_mb

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
    "gla": (chunk_gla, naive_recurrent_gla, 32, lambda C, K, V: 2 * C * K + 2 * C * V + 4 * K * V),
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


def memory_child(path: str, name: str, T: int, H: int, K: int, V: int) -> None:
    """In a fresh process: one fwd+bwd of the chunkwise path or the step loop; print the peak
    RSS growth in MiB."""
    chunk, loop, C, _ = FAMILIES[name]
    leaves = [x.requires_grad_() for x in inputs(name, 1, T, H, K, V)]
    before = rss_mb()
    if path == "chunk":
        out, _ = chunk(*leaves, chunk_size=C, backend="torch")
    else:
        out, _ = loop(*leaves)
    out.sum().backward()
    print(f"{peak_rss_mb() - before:.1f}")


def memory_mib(path: str, name: str, T: int, H: int, K: int, V: int) -> float:
    cmd = [sys.executable, __file__, "--memory-child", path, name, *map(str, (T, H, K, V))]
    return float(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)


def memory_table(lengths: list[int], H: int, K: int, V: int, loop_max_len: int) -> None:
    print(
        "| family | T | peak memory growth MiB | MiB per 1K tokens | "
        "peer: step loop peak memory growth MiB | step loop / chunkwise |"
    )
    print("|---|---|---|---|---|---|")
    for name in FAMILIES:
        for T in lengths:
            mib = memory_mib("chunk", name, T, H, K, V)
            if T <= loop_max_len:
                loop = memory_mib("loop", name, T, H, K, V)
                peer, ratio = f"{loop:.0f}", f"{loop / max(mib, 1):.1f}x"
            else:
                peer, ratio = f"not measured: step loop skipped above T = {loop_max_len}", "-"
            print(f"| {name} | {T} | {mib:.0f} | {1024 * mib / T:.1f} | {peer} | {ratio} |",
                  flush=True)  # fmt: skip


def triton_vs_fla(lengths: list[int], H: int, K: int, V: int) -> None:
    """On CUDA: the Triton path against flash-linear-attention's chunk kernels, fwd+bwd."""
    if not torch.cuda.is_available():
        print(
            "Triton path vs flash-linear-attention: not measured: no CUDA device on this machine "
            "(fla's kernels are Triton kernels for GPUs)"
        )
        return
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_delta
        from fla.ops.gla import chunk_gla as fla_gla
        from fla.ops.simple_gla import chunk_simple_gla as fla_simple

        peers = {"gla": fla_gla, "simple_gla": fla_simple, "delta": fla_delta}
    except ImportError:
        peers = {}
    print(f"device: {torch.cuda.get_device_name()}; fla {'found' if peers else 'not installed'}")
    print("| family | T | rnnscale triton ms | peer: fla ms | rnnscale / fla time |")
    print("|---|---|---|---|---|")
    missing = "fla not installed" if not peers else "fla has no kernel of this family"
    for name, (chunk, *_) in FAMILIES.items():
        for T in lengths:
            xs = [x.cuda().bfloat16() for x in inputs(name, 1, T, H, K, V)]
            ours = _cuda_ms(chunk, xs, backend="triton")
            theirs = _cuda_ms(peers[name], xs) if name in peers else None
            ratio = f"{ours / theirs:.2f}" if theirs else "-"
            fla_ms = f"{theirs:.2f}" if theirs else f"not measured: {missing}"
            print(f"| {name} | {T} | {ours:.2f} | {fla_ms} | {ratio} |", flush=True)


def _cuda_ms(fn, xs, **kw) -> float:
    for _ in range(3):  # warm-up: compilation and the autotuner
        fwd_bwd_seconds(fn, xs, 1, **kw)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        fwd_bwd_seconds(fn, xs, 1, **kw)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 100


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes: check it runs")
    parser.add_argument("--lengths", type=int, nargs="*", default=[1024, 4096, 16384])
    parser.add_argument(
        "--loop-max-len", type=int, default=4096, help="longest T for the step loop (it is slow)"
    )
    parser.add_argument("--memory", action="store_true", help="peak memory against T instead")
    parser.add_argument("--memory-child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        path, name, *dims = args.memory_child
        return memory_child(path, name, *map(int, dims))
    H, K, V = (2, 16, 16) if args.smoke else (8, 64, 64)
    lengths = [64] if args.smoke else args.lengths
    if args.memory:
        loop_max_len = 256 if args.smoke else args.loop_max_len
        return memory_table([256, 512] if args.smoke else lengths, H, K, V, loop_max_len)
    repeats = 1 if args.smoke else 3
    torch.manual_seed(0)
    peak = matmul_peak_gflops(256 if args.smoke else 1024)
    print(
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; fp32 matmul peak {peak:.1f} GFLOP/s"
    )
    print(
        "| family | T | chunkwise fwd+bwd s | peer: step loop fwd+bwd s | speed-up | GFLOP/s | "
        "% of matmul peak |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, (chunk, loop, C, flops) in FAMILIES.items():
        for T in lengths:
            xs = inputs(name, 1, T, H, K, V)
            t_chunk = fwd_bwd_seconds(chunk, xs, repeats, chunk_size=C, backend="torch")
            t_loop = fwd_bwd_seconds(loop, xs, 1) if T <= args.loop_max_len else None
            speedup = f"{t_loop / t_chunk:.0f}x" if t_loop else "-"
            skipped = f"not measured: step loop skipped above T = {args.loop_max_len} (minutes)"
            loop_s = f"{t_loop:.3f}" if t_loop else skipped
            if flops:
                gflops = 3 * flops(C, K, V) * T * H / t_chunk / 1e9
                rate, share = f"{gflops:.1f}", f"{100 * gflops / peak:.1f}%"
            else:
                rate, share = "n/a (elementwise)", "n/a"
            print(
                f"| {name} | {T} | {t_chunk:.3f} | {loop_s} | {speedup} | {rate} | {share} |",
                flush=True,
            )
    triton_vs_fla(lengths, H, K, V)


if __name__ == "__main__":
    main()
