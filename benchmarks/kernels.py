"""Scan kernels: the chunkwise PyTorch path against two peers, forward + backward.

    .venv/bin/python benchmarks/kernels.py              # B=1, H=8, K=V=64 (scan D=1024)
    .venv/bin/python benchmarks/kernels.py --smoke      # tiny shapes, seconds (the test runs it)
    .venv/bin/python benchmarks/kernels.py --memory     # peak memory of fwd+bwd against T
    .venv/bin/python benchmarks/kernels.py --profile    # where the chunkwise path's time goes

The peers: each family's one-token step as a loop of linear cost (`step_loop` below, up to
--loop-max-len), and flash-linear-attention's own PyTorch references (`fla.ops.*.naive`, when
fla-core is installed: `pip install -e .[bench]`; its step loops only up to --fla-loop-max-len,
their backward being quadratic in T). Every path and peer runs in the same process on the same
inputs (fp32), timed by one function: one warm-up, then best of --repeats. The ratio is what to
read; absolute times move with the machine's load. FLOPs count the chunkwise algorithm's matmuls
(2 m n k each) forward and twice that backward; the peak is a square fp32 matmul measured in
the same run. The scan family is elementwise (memory-bound): its GFLOP/s are not comparable to a
matmul peak and are left out.

`--memory` runs every (family, T) in a fresh process and reports the growth of its peak resident
memory over what it held just before the forward (inputs made): on CPU there is no allocator
high-water mark, so the process's peak RSS stands in for one. The peer is the step loop's growth
for the same inputs, each in a fresh process too (up to --loop-max-len).

`--malloc heap` reruns the script with glibc's malloc kept on its heap (measure.HEAP_MALLOC):
by default a tensor over 32 MiB is a fresh mmap, faulted in and zeroed on first touch, so the
timings at long T depend on what the process allocated before. `--profile` prints, per family
and T, the self CPU time of one fwd + bwd (torch.profiler): the matmuls' share, the rate the
counted FLOPs would reach in the matmul time alone, and the largest other ops.

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
from measure import (
    heap_malloc_on,
    matmul_peak_gflops,
    peak_rss_mb,
    rerun_with_heap_malloc,
    rss_mb,
)

from rnnscale.kernels.delta import chunk_gated_delta_rule, gated_delta_rule_step
from rnnscale.kernels.gla import chunk_gla, gla_step
from rnnscale.kernels.scan import linear_scan, linear_scan_step
from rnnscale.kernels.simple_gla import chunk_simple_gla, simple_gla_step


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


def step_loop(step):
    """The family's one-token `step` over T, as a peer of linear cost: the inputs are cut into
    per-token views with `unbind(1)` (whose backward stacks the token gradients once), the outputs
    stacked at the end. The package's `naive_recurrent_*` index `x[b, t]` instead, which is right
    for a reference but writes a full-size gradient per token in the backward: quadratic in T."""

    def loop(*xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if step is linear_scan_step:
            state, extra = xs[1].new_zeros(xs[1].shape[0], xs[1].shape[2]), ()  # (B, D)
        else:
            (B, _, H, K), V = xs[0].shape, xs[2].shape[-1]
            state, extra = xs[0].new_zeros(B, H, K, V), (K**-0.5,)  # (B, H, K, V)
        outs = []
        for x_t in zip(*(x.unbind(1) for x in xs)):
            o, state = step(*x_t, state, *extra)
            outs.append(o)
        return torch.stack(outs, 1), state

    return loop


FAMILIES = {  # name: (chunkwise, step loop, chunk size, forward FLOPs per token and head)
    "gla": (chunk_gla, step_loop(gla_step), 32, lambda C, K, V: 2 * C * K + 2 * C * V + 4 * K * V),
    "simple_gla": (
        chunk_simple_gla,
        step_loop(simple_gla_step),
        64,
        lambda C, K, V: 2 * C * K + 2 * C * V + 4 * K * V,
    ),
    "delta": (
        chunk_gated_delta_rule,
        step_loop(gated_delta_rule_step),
        64,
        lambda C, K, V: 6 * C * K + 4 * C * V + 6 * K * V,
    ),
    "scan": (linear_scan, step_loop(linear_scan_step), 32, None),
}

# flash-linear-attention's own PyTorch references (fla-core, `pip install -e .[bench]`): the
# chunk form where fla has one that runs at any T, else its step loop. name: (module, function,
# its inputs from ours, keyword arguments, a step loop: its backward is quadratic in T).
FLA_REFERENCES = {
    "gla": ("fla.ops.gla.naive", "naive_recurrent_gla", None, {}, True),
    "simple_gla": (
        "fla.ops.simple_gla.naive",
        "naive_chunk_simple_gla",
        None,
        {"chunk_size": 64},
        False,
    ),  # fmt: skip
    "delta": (
        "fla.ops.gated_delta_rule.naive",
        "naive_chunk_gated_delta_rule",
        None,
        {"chunk_size": 64},
        False,
    ),  # fmt: skip
    # hgrn's recurrence h = exp(g) h + x is the scan's h = a h + b with g = log a
    "scan": ("fla.ops.hgrn.naive", "naive_recurrent_hgrn", lambda a, b: [b, a.log()], {}, True),
}


def fla_references() -> tuple[dict, str]:
    """{family: (function, inputs, kwargs, is a step loop)} of fla's references, and why not
    when fla is not installed."""
    import importlib
    import warnings

    peers = {}
    for name, (module, fn, convert, kw, loop) in FLA_REFERENCES.items():
        try:
            with warnings.catch_warnings():  # fla warns that Triton has no GPU here
                warnings.simplefilter("ignore")
                peers[name] = (getattr(importlib.import_module(module), fn), convert, kw, loop)
        except ImportError as e:
            return {}, f"fla not installed ({e.name}; `.venv/bin/pip install -e .[bench]`)"
    return peers, ""


def fwd_bwd_seconds(fn, xs, repeats: int, warmup: int = 1, **kw) -> float:
    """Best of `repeats` forward + backward runs after `warmup` untimed ones: every path and peer
    of the tables is timed by this one function with the same counts."""
    best = float("inf")
    for i in range(warmup + repeats):
        leaves = [x.clone().requires_grad_() for x in xs]
        start = time.perf_counter()
        out, _ = fn(*leaves, **kw)
        out.sum().backward()
        if i >= warmup:
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
        "| family | T | peak memory growth MiB | MiB per 1K tokens | slope from the previous T, "
        "MiB per 1K tokens | peer: step loop peak memory growth MiB | step loop / chunkwise |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in FAMILIES:
        last = None
        for T in lengths:
            mib = memory_mib("chunk", name, T, H, K, V)
            slope = "-" if last is None else f"{1024 * (mib - last[1]) / (T - last[0]):.1f}"
            last = (T, mib)
            if T <= loop_max_len:
                loop = memory_mib("loop", name, T, H, K, V)
                peer, ratio = f"{loop:.0f}", f"{loop / max(mib, 1):.1f}x"
            else:
                peer, ratio = f"not measured: step loop skipped above T = {loop_max_len}", "-"
            cells = [name, T, f"{mib:.0f}", f"{1024 * mib / T:.1f}", slope, peer, ratio]
            print("| " + " | ".join(map(str, cells)) + " |", flush=True)


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
        fwd_bwd_seconds(fn, xs, 1, warmup=0, **kw)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        fwd_bwd_seconds(fn, xs, 1, warmup=0, **kw)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 100


def check_peers(T: int = 100) -> None:
    """Each peer computes what the chunkwise path does (fp32, relative RMS of the output)."""
    fla, _ = fla_references()
    for name, (chunk, loop, C, _) in FAMILIES.items():
        xs = inputs(name, 1, T, 2, 16, 16)
        want = chunk(*xs, chunk_size=C, backend="torch")[0]
        outs = [loop(*xs)[0]]
        if name in fla:
            fn, convert, kw, _ = fla[name]
            outs.append(fn(*(convert(*xs) if convert else xs), **kw)[0])
        for out in outs:
            err = ((out - want).norm() / want.norm()).item()
            assert err < 1e-4, f"{name}: a peer's output differs from the chunkwise path by {err}"


def speed_table(
    lengths, H, K, V, repeats: int, loop_max_len: int, fla_loop_max_len: int, peak_n: int
) -> None:
    peak = matmul_peak_gflops(peak_n)
    print(
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; fp32 matmul peak {peak:.1f} GFLOP/s; malloc: "
        f"{'heap' if heap_malloc_on() else 'default'}"
    )
    fla, why = fla_references()
    print(
        "| family | T | chunkwise fwd+bwd s | peer: step loop fwd+bwd s | step loop / chunkwise | "
        "peer: fla reference fwd+bwd s | fla reference / chunkwise | GFLOP/s | % of matmul peak |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (chunk, loop, C, flops) in FAMILIES.items():
        for T in lengths:
            xs = inputs(name, 1, T, H, K, V)
            t_chunk = fwd_bwd_seconds(chunk, xs, repeats, chunk_size=C, backend="torch")
            if T <= loop_max_len:
                t_loop = fwd_bwd_seconds(loop, xs, repeats)
                loop_cells = f"{t_loop:.3f} | {t_loop / t_chunk:.1f}x"
            else:
                loop_cells = f"not measured: step loop skipped above T = {loop_max_len} | -"
            if name not in fla:
                fla_cells = f"not measured: {why or 'fla has no reference of this family'} | -"
            elif fla[name][3] and T > fla_loop_max_len:
                fla_cells = (f"not measured: fla's step loop (quadratic backward) skipped above "
                             f"T = {fla_loop_max_len} | -")  # fmt: skip
            else:
                fn, convert, kw, _ = fla[name]
                t_fla = fwd_bwd_seconds(fn, convert(*xs) if convert else xs, repeats, **kw)
                fla_cells = f"{t_fla:.3f} | {t_fla / t_chunk:.1f}x"
            if flops:
                gflops = 3 * flops(C, K, V) * T * H / t_chunk / 1e9
                rate = f"{gflops:.1f} | {100 * gflops / peak:.1f}%"
            else:
                rate = "n/a (elementwise) | n/a"
            print(f"| {name} | {T} | {t_chunk:.3f} | {loop_cells} | {fla_cells} | {rate} |",
                  flush=True)  # fmt: skip
    print("fla references: " + (why or ", ".join(
        f"{n}: `{FLA_REFERENCES[n][1]}`" for n in FAMILIES if n in fla)))  # fmt: skip


MATMULS = {"aten::bmm", "aten::mm", "aten::addmm", "aten::baddbmm"}


def profile_table(lengths, H, K, V, peak_n: int) -> None:
    """Where a chunkwise fwd + bwd spends its time (torch.profiler, self CPU time of one run
    after a warm-up): the matmuls' share, the rate of the counted FLOPs in the matmul time
    alone (what the path would reach if nothing else ran), and the largest other ops."""
    peak = matmul_peak_gflops(peak_n)
    print(f"fp32 matmul peak {peak:.1f} GFLOP/s")
    print(
        "| family | T | profiled fwd+bwd ms | matmul ms | matmul share | % of matmul peak, "
        "counted FLOPs over the matmul time alone | largest other ops, ms | "
        "peer: a square fp32 matmul, GFLOP/s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, (chunk, _, C, flops) in FAMILIES.items():
        if not flops:
            continue
        for T in lengths:
            xs, kw = inputs(name, 1, T, H, K, V), dict(chunk_size=C, backend="torch")
            fwd_bwd_seconds(chunk, xs, 0, warmup=1, **kw)
            with torch.profiler.profile() as prof:
                fwd_bwd_seconds(chunk, xs, 1, warmup=0, **kw)
            own = {e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages()}
            total, mm = sum(own.values()), sum(own.get(k, 0.0) for k in MATMULS)
            rest = sorted((ms, k) for k, ms in own.items() if k not in MATMULS)[::-1][:3]
            ceiling = 3 * flops(C, K, V) * T * H / (mm / 1e3) / 1e9
            others = ", ".join(f"{k.removeprefix('aten::')} {ms:.1f}" for ms, k in rest)
            print(f"| {name} | {T} | {total:.2f} | {mm:.2f} | {100 * mm / total:.0f}% | "
                  f"{100 * ceiling / peak:.0f}% | {others} | {peak:.1f} |", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes: check it runs")
    parser.add_argument("--lengths", type=int, nargs="*", default=[1024, 4096, 16384])
    parser.add_argument(
        "--loop-max-len", type=int, default=4096, help="longest T for the step loop peer"
    )
    parser.add_argument(
        "--fla-loop-max-len", type=int, default=1024,
        help="longest T for fla's step-loop references (their backward is quadratic in T)",
    )  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3, help="best of this many, every path")
    parser.add_argument("--memory", action="store_true", help="peak memory against T instead")
    parser.add_argument("--profile", action="store_true",
                        help="where the chunkwise path's time goes instead")  # fmt: skip
    parser.add_argument(
        "--malloc", choices=["default", "heap"], default="default",
        help="heap: glibc's malloc keeps large tensors on its heap (speed and profile only)",
    )  # fmt: skip
    parser.add_argument("--memory-child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.malloc == "heap":
        if args.memory:
            parser.error("--malloc heap is for speed: peak memory would count what the heap keeps")
        rerun_with_heap_malloc(__file__)
    if args.memory_child:
        path, name, *dims = args.memory_child
        return memory_child(path, name, *map(int, dims))
    H, K, V = (2, 16, 16) if args.smoke else (8, 64, 64)
    lengths = [64] if args.smoke else args.lengths
    if args.memory:
        loop_max_len = 256 if args.smoke else args.loop_max_len
        return memory_table([256, 512] if args.smoke else lengths, H, K, V, loop_max_len)
    torch.manual_seed(0)
    if args.profile:
        return profile_table(lengths, H, K, V, 256 if args.smoke else 1024)
    check_peers()
    repeats = 1 if args.smoke else args.repeats
    peak_n = 256 if args.smoke else 1024
    speed_table(lengths, H, K, V, repeats, args.loop_max_len, args.fla_loop_max_len, peak_n)
    triton_vs_fla(lengths, H, K, V)


if __name__ == "__main__":
    main()
