"""`make gpu-check`: rnnscale on one CUDA GPU, in one call of under 8 minutes.

    make gpu-wheels                                                 # here: wheels/ (network)
    python3 benchmarks/gpu_check.py --out runs/gpu-check            # on the GPU machine
    python3 benchmarks/gpu_check.py --dry-run --out /tmp/gpu-check  # CPU: tiny shapes, interpreter

Runs with a bare python3 that has torch, triton and transformers (no network, no install):
rnnscale is made importable from this checkout (a folder of links built from pyproject.toml's
`[tool.setuptools.package-dir]`), and the pure-Python wheels of wheels/ (`make gpu-wheels`:
fla-core, einops, pytest) that this Python lacks are unpacked into a temporary folder; both go
on sys.path and on the children's PYTHONPATH. The device call must carry `wheels`.

What it measures, each part guarded so that one failure leaves the others:
  a. the environment: GPU, driver, torch, triton, CUDA, the packages and where they came from;
  b. the yardsticks: a bf16 matmul 8192^3 (TFLOP/s) and a 1 GiB device-to-device copy (GB/s);
  c. the compiles, side by side (CPU work): the kernel cases' Triton kernels, fla's kernels at
     the 1.3B recipes' head shapes, one layer of each 1.3B model; and beside them `pytest
     tests/scans -m gpu`, one process per test (benchmarks/gpu_pytest.py);
  d. with the GPU quiet, one child at a time: ours beside fla's chunk kernels at the 1.3B
     recipes' head shapes (benchmarks/gpu_fla.py), a bf16 training step of the gla,
     gated_deltanet and mamba2 1.3B recipes beside transformers' Llama (benchmarks/gpu_train.py),
     and every recipe's head shape through backend="triton" beside backend="torch"
     (benchmarks/gpu_kernels.py).
Every child has a time limit, and none runs past --budget-s (450 s): what did not fit says
"not measured" and why.

Output under --out: gpu_check.json (everything), gpu_check.md (the tables, as
docs/performance.md takes them in), gpu_check.log (what was printed) and pytest.log.
"""

from __future__ import annotations

import argparse
import atexit
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import gpu_fla
import gpu_kernels
import gpu_pytest
import gpu_train
from gpu_common import (
    ROOT,
    Run,
    bench_ms,
    child_env,
    emitter,
    error_text,
    finish_child,
    make_importable,
    run_one,
    start_child,
    unpack_wheels,
)

PHASES = ("pytest", "fla", "train", "kernels")
PACKAGES = {  # import name: distribution, for the environment part
    "transformers": "transformers", "fla": "fla-core", "einops": "einops", "pytest": "pytest",
    "yaml": "PyYAML", "safetensors": "safetensors", "sentencepiece": "sentencepiece",
    "numpy": "numpy",
}  # fmt: skip
CHILDREN = {  # --child MODE: the phase module that runs it
    "precompile": gpu_kernels, "time": gpu_kernels, "fla-precompile": gpu_fla,
    "fla-time": gpu_fla, "train-precompile": gpu_train, "train-time": gpu_train,
}  # fmt: skip


def environment(run: Run, wheels: dict, site: Path) -> dict:
    import torch

    info = {
        "python": platform.python_version(),
        "executable": sys.executable,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as e:  # noqa: BLE001
        info["triton"] = error_text(e)
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                    memory_gib=round(p.total_memory / 2**30, 1),
                    l2_mib=round(getattr(p, "L2_cache_size", 0) / 2**20, 1))  # fmt: skip
        try:
            q = "name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw,power.limit"
            r = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv"],
                               capture_output=True, text=True, timeout=30)  # fmt: skip
            info["nvidia_smi"] = r.stdout.strip() or r.stderr.strip()
        except Exception as e:  # noqa: BLE001
            info["nvidia_smi"] = error_text(e)
    info["bf16_peak_tflops"], info["bf16_peak_source"] = gpu_train.datasheet_peak(info.get("gpu"))
    info["wheels"] = wheels or "no wheels/ folder (`make gpu-wheels`)"
    info["packages"] = {name: package_origin(name, dist, site) for name, dist in PACKAGES.items()}
    for key, value in info.items():
        run.log(f"{key}: {value}")
    return info


def package_origin(name: str, dist: str, site: Path) -> str:
    from importlib.metadata import PackageNotFoundError, version

    spec = importlib.util.find_spec(name)
    if spec is None:
        return "missing"
    try:
        v = version(dist)
    except PackageNotFoundError:
        v = "?"
    where = "wheels/" if str(spec.origin or "").startswith(str(site)) else "this Python"
    return f"{v} ({where})"


def yardsticks(run: Run) -> dict:
    """bf16 matmul 8192^3 on random data (twice) and a 1 GiB device-to-device copy."""
    import torch

    if not torch.cuda.is_available():
        run.log("no CUDA: yardsticks skipped")
        return {"skipped": "no CUDA device"}
    out, n = {}, 8192

    def matmul_ms() -> list[float]:  # the inputs freed on return
        a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        return [bench_ms(lambda: torch.matmul(a, b)) for _ in range(2)]

    def copy_ms(numel: int) -> float:
        x = torch.randn(numel, device="cuda")
        y = torch.empty_like(x)
        return bench_ms(lambda: y.copy_(x))

    ms = matmul_ms()
    out["matmul_bf16_8192_ms"] = ms
    out["matmul_bf16_8192_tflops"] = [2 * n**3 / (m * 1e-3) / 1e12 for m in ms]
    numel = 2**28  # 1 GiB of fp32
    m = copy_ms(numel)
    out["copy_1gib_ms"] = m
    out["copy_gb_s"] = 2 * numel * 4 / (m * 1e-3) / 1e9  # bytes read + written
    torch.cuda.empty_cache()
    run.log(f"matmul bf16 8192^3: {', '.join(f'{t:.0f}' for t in out['matmul_bf16_8192_tflops'])}"
            f" TFLOP/s; copy 1 GiB: {out['copy_gb_s']:.0f} GB/s")  # fmt: skip
    return out


# ------------------------------------------------------------------------------------------
# the schedule: compiles side by side, then the timings one child at a time


class Schedule:
    """The phases' cases and what their children returned (run.results["cases" | "fla" |
    "train"]: lists of {"case", "precompile", "timing"})."""

    def __init__(self, run: Run, args, env: dict, tmp: Path):
        self.run, self.args, self.env, self.tmp = run, args, env, tmp
        dry, info = args.dry_run, run.results.get("environment", {})
        y = run.results.get("yardsticks", {})
        yardstick = max(y.get("matmul_bf16_8192_tflops") or [0]) or None
        peak = {
            "peak_tflops": info.get("bf16_peak_tflops"),
            "peak_source": info.get("bf16_peak_source"),
            "yardstick_tflops": yardstick,
        }
        kernels = gpu_kernels.DRY_CASES if dry else gpu_kernels.CASES
        if args.cases:
            kernels = [c for c in kernels if c["name"] in args.cases]
        self.cases = {
            "kernels": kernels if "kernels" in args.phases else [],
            "fla": gpu_fla.cases(dry) if "fla" in args.phases else [],
            "train": gpu_train.cases(dry, peak) if "train" in args.phases else [],
        }
        self.entries = {phase: [{"case": c} for c in cases] for phase, cases in self.cases.items()}
        for key, phase in (("cases", "kernels"), ("fla", "fla"), ("train", "train")):
            run.results[key] = self.entries[phase]

    def limit(self, handle: dict, limit: float) -> float:
        """`limit` seconds from the child's start, cut at the end of the budget."""
        return min(limit, time.monotonic() - handle["start"] + self.run.left())

    def compiles(self) -> None:
        """Every compile child and every CUDA test at once (CPU work on 16 cores: the
        chunk-parallel kernels compile in seconds each), each with its time limit."""
        run, args, tmp = self.run, self.args, self.tmp
        env = dict(self.env, FLA_CACHE_RESULTS="0")  # no autotuning choice kept from here
        dry, tests = args.dry_run, []
        fla_ok = importlib.util.find_spec("fla") is not None
        fla = gpu_fla.precompile_cases(dry) if "fla" in args.phases and fla_ok else []
        train = gpu_train.precompile_cases(dry) if "train" in args.phases else []
        kernels = self.entries["kernels"]
        run.log(f"--- compiles side by side: {len(kernels)} kernel cases, {len(fla)} fla children"
                f", {len(train)} one-layer models; the CUDA tests beside them")  # fmt: skip
        start = lambda mode, cases, tag: [  # noqa: E731
            start_child(run, mode, c, env, tmp, f"{tag}{i}") for i, c in enumerate(cases)
        ]
        f_handles = start("fla-precompile", fla, "f")  # the longest first
        k_handles = start("precompile", [e["case"] for e in kernels], "k")
        t_handles = start("train-precompile", train, "t")
        if "pytest" in args.phases:
            run.pytest_env = gpu_pytest.pytest_env(env, str(tmp / "triton-cache-pytest"))
            try:
                listing = gpu_pytest.collect(run.pytest_env)
                tests = gpu_pytest.start_pytests(run, run.pytest_env, tmp, listing)
            except Exception as e:  # noqa: BLE001
                run.results["pytest"] = {"error": error_text(e)}
        for entry, h in zip(kernels, k_handles):
            limit = self.limit(h, args.compile_timeout)
            run.log(gpu_kernels.after_precompile(entry, finish_child(h, limit), limit))
            run.save()
        for name, handles, cases, timeout in (
            ("fla", f_handles, fla, args.fla_compile_timeout),
            ("train", t_handles, train, args.compile_timeout),
        ):
            got = [finish_child(h, self.limit(h, timeout)) for h in handles]
            run.results[f"{name}_precompile"] = [{"case": c, **g} for c, g in zip(cases, got)]
            for c, g in zip(cases, got):
                state = "killed at its limit" if g["timed_out"] else f"exit {g['returncode']}"
                run.log(f"compile {c['name']} ({name}): {state} in {g['wall_s']} s")
            run.save()
        if tests:
            run.log("--- waiting for pytest (the GPU must be quiet for the timings)")
            run.part("pytest", lambda: gpu_pytest.finish_pytests(run, tests, args.pytest_timeout))

    def timings(self) -> None:
        """One child at a time on a quiet GPU. Triton keeps each autotuning choice on disk
        (TRITON_CACHE_AUTOTUNING; fla's FLA_CACHE_RESULTS): a kernel is tuned once per key,
        by the first timing child that runs it (benchmarks/gpu_fla.py)."""
        run, args, tmp = self.run, self.args, self.tmp
        env = dict(self.env, TRITON_CACHE_AUTOTUNING="1", FLA_CACHE_RESULTS="1")
        plan = [
            ("fla", "fla-time", gpu_fla, args.fla_timeout, lambda e: e["case"]),
            ("train", "train-time", gpu_train, args.train_timeout, lambda e: e["case"]),
            ("kernels", "time", gpu_kernels, args.time_timeout, gpu_kernels.timing_case),
        ]
        for phase, mode, module, limit, case_of in plan:
            if self.entries[phase]:
                run.log(f"--- timings: {phase}, one child at a time")
            for i, entry in enumerate(self.entries[phase]):
                got = run_one(run, mode, case_of(entry), env, tmp, f"{phase}{i}", limit)
                entry["timing"] = got
                run.log(f"time {entry['case']['name']}: {module.describe(got)}")
                run.save()


# ------------------------------------------------------------------------------------------
# the files docs/performance.md takes in


def markdown(run: Run, schedule: Schedule) -> str:
    r, info = run.results, run.results.get("environment", {})
    y = r.get("yardsticks", {})
    gpu = f"{info.get('gpu', 'no GPU (dry run)')} ({info.get('sms', '?')} SMs)"
    versions = (
        f"Python {info.get('python')}, torch {info.get('torch')}, Triton {info.get('triton')}"
    )
    head = [
        f"GPU check of {r['date']} on {gpu}, {versions}, {info.get('cpus')} CPU cores; "
        f"command: `{r['command']}`; wall {r.get('wall_s', '?')} s of a {run.budget_s:.0f} s "
        f"budget; do_bench median, warm-up {r['do_bench']['warmup_ms']} ms, repetitions "
        f"{r['do_bench']['rep_ms']} ms, the same for both sides."
    ]
    if "matmul_bf16_8192_tflops" in y:
        head.append(f"Yardsticks: bf16 matmul 8192^3 "
                    f"{', '.join(f'{t:.0f}' for t in y['matmul_bf16_8192_tflops'])} TFLOP/s; "
                    f"1 GiB copy {y['copy_gb_s']:.0f} GB/s.")  # fmt: skip
    head.append(f"bf16 dense peak for MFU: {info.get('bf16_peak_tflops')} TFLOP/s "
                f"({info.get('bf16_peak_source')}); packages: {info.get('packages')}.")  # fmt: skip
    skipped = "not run: not among --phases"
    p = r.get("pytest", {"summary_line": skipped})
    tests = [f"- `{gpu_pytest.TESTS} -m gpu`: {p.get('summary_line', p.get('error'))}"]
    tests += [f"  - {name}: {outcome}" for name, outcome in p.get("outcomes", {}).items()]
    parts = [*head, ""]
    for title, module, phase in (
        ("Ours beside flash-linear-attention (fwd, fwd + bwd)", gpu_fla, "fla"),
        ("Training steps of the 1.3B recipes beside transformers' Llama", gpu_train, "train"),
        ("Kernel cases: backend=triton beside backend=torch", gpu_kernels, "kernels"),
    ):
        entries = schedule.entries[phase]
        parts += [f"### {title}", "", *(module.table(entries) if entries else [skipped]), ""]
    return "\n".join([*parts, "### CUDA tests", "", *tests, ""])


def child_main(args) -> int:
    """One child: its phase module's `child`, whose error (out of memory included) is recorded
    verbatim as the stage "error"."""
    emit = emitter(Path(args.result))
    try:
        CHILDREN[args.child].child(args.child, json.loads(args.case), emit, args.dry_run)
    except Exception as e:  # noqa: BLE001
        emit(stage="error", error=error_text(e), traceback=traceback.format_exc()[-2000:])
        return 1
    return 0


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/gpu-check", help="folder for the results")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU check of the script: tiny shapes, Triton's interpreter")  # fmt: skip
    ap.add_argument("--budget-s", type=float, default=450,
                    help="every child is stopped by this many seconds into the run")  # fmt: skip
    ap.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    ap.add_argument("--wheels", default=str(ROOT / "wheels"), help="`make gpu-wheels`' folder")
    ap.add_argument("--compile-timeout", type=float, default=180)
    ap.add_argument("--fla-compile-timeout", type=float, default=240)
    ap.add_argument("--time-timeout", type=float, default=60, help="a kernel case's timing")
    ap.add_argument("--fla-timeout", type=float, default=90)
    ap.add_argument("--train-timeout", type=float, default=120)
    ap.add_argument("--pytest-timeout", type=float, default=180)
    ap.add_argument("--cases", nargs="*", help="names of the kernel cases to run (default: all)")
    ap.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    return ap.parse_args()


def main() -> int:
    args = parse_args()
    shim = make_importable(ROOT)
    if args.child:  # the parent put the shim and the wheels on PYTHONPATH already
        return child_main(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="gpu-check-"))  # wheels, compile caches, records
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    site = tmp / "wheels"
    wheels = unpack_wheels(Path(args.wheels), site)
    run = Run(out, args.dry_run, args.budget_s)
    run.pytest_test_timeout = max(args.pytest_timeout - 15, 10)  # pytest-timeout, inside it
    run.log(f"gpu_check: out={out} dry_run={args.dry_run} shim={shim} phases={args.phases}")
    run.part("environment", lambda: environment(run, wheels, site))
    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError as e:
        run.log(f"torch does not import ({e}): nothing more to check")
        return 1
    if not cuda and not args.dry_run:
        run.log("no CUDA device: the GPU parts are skipped (use --dry-run for a CPU check of "
                "this script at tiny shapes in Triton's interpreter)")  # fmt: skip
        run.results["skipped"] = "no CUDA device"
        run.save()
        return 0
    run.part("yardsticks", lambda: yardsticks(run))
    (tmp / "triton-cache").mkdir()
    env = child_env([shim, str(site)], str(tmp / "triton-cache"), args.dry_run)
    schedule = Schedule(run, args, env, tmp)
    for step in (schedule.compiles, schedule.timings):
        try:
            step()
        except Exception as e:  # noqa: BLE001
            run.results.setdefault("errors", []).append(error_text(e))
            run.log(f"{step.__name__} failed: {error_text(e)}")
    run.results["wall_s"] = round(run.elapsed(), 1)
    text = markdown(run, schedule)
    (out / "gpu_check.md").write_text(text)
    run.results["markdown"] = text
    run.log("--- summary (also in gpu_check.md)")
    print(text, flush=True)
    run.log(f"done in {run.elapsed():.0f} s; results in {out}")
    run.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
