"""`make gpu-check`: the compiled Triton kernels on a CUDA GPU, in one call of a few minutes.

    python3 benchmarks/gpu_check.py --out runs/gpu-check          # on the GPU machine
    python3 benchmarks/gpu_check.py --dry-run --out /tmp/gpu-check  # CPU: tiny shapes, interpreter

Runs with any python3 that has torch, triton and pytest; rnnscale need not be installed: the
script makes it importable from this checkout (a folder of links built from pyproject.toml's
`[tool.setuptools.package-dir]`, put first on sys.path and on the children's PYTHONPATH).

What it measures, each part guarded so that one failure leaves the others:
  a. the environment: GPU, driver, torch, triton, CUDA;
  d. the yardsticks: a bf16 matmul 8192^3 (TFLOP/s) and a 1 GiB device-to-device copy (GB/s);
  b. pytest on tests/scans/test_families.py, every test (the `gpu`-marked one included): one
     process for the unmarked tests, beside (c)'s compiles, then one per `gpu`-marked test, side
     by side, each with a time limit; outcomes and failures from their JUnit XML;
  c. for each case (a recipe's head shape, configs/recipes/*.yaml and the config's
     defaults), the public op with backend="torch" and backend="triton": forward and
     forward + backward, timed with triton.testing.do_bench (median, the same warm-up and
     repetitions for both), tokens/s, the torch/triton time ratio, the relative RMS difference
     of triton against torch (output and every gradient), and each Triton kernel's compiled
     metadata (registers, spills, shared memory). Errors (OutOfResources, ...) are kept verbatim.
     Each case runs in a child process with a time limit: first all compiles side by side
     (tiny T, same kernels: T is no compile-time constant), then the timings one at a time.

Output under --out: gpu_check.json (everything), gpu_check.log (what was printed) and pytest.log
(the pytest processes' output). The summary table is printed last.
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# do_bench settings (milliseconds of warm-up and of timed repetitions), the same for both paths
WARMUP_MS, REP_MS = 25, 100

# Head shapes of the recipes. K, V and C follow the config's defaults at the time (2026-12-04):
#   gla: K = 0.5 d/H, V = d/H, C = 16; mamba2: H = 2d/64, K = state_size 128, V = head_dim 64,
#   C = 64, scale 1; gated_deltanet: K = head_dim, V = 2 K, C = 64; rglru: D = H round(4/3 d/H),
#   C = 32, scanned in fp32 by the mixer; hgrn2 has no recipe: K = expand_ratio 128 and
#   V = d/H = 128 (d 2048, 16 heads) is an assumed shape, not one of configs/.
# Order: the cases expected to run first, the ones whose compiles may not finish last.
CASES = [
    dict(
        name="mamba2-1.3b",
        family="simple_gla",
        B=2,
        T=2048,
        H=64,
        K=128,
        V=64,
        C=64,
        scale=1.0,
        source="configs/recipes/mamba2-1.3b.yaml (d_model 2048)",
    ),
    dict(
        name="gated_deltanet-attn-7b",
        family="delta",
        B=2,
        T=4096,
        H=32,
        K=80,
        V=160,
        C=64,
        source="configs/recipes/gated_deltanet-attn-7b.yaml (head_dim 80)",
    ),
    dict(
        name="gla-340m",
        family="gla",
        B=2,
        T=2048,
        H=4,
        K=128,
        V=256,
        C=16,
        source="configs/recipes/gla-340m.yaml (d_model 1024, 4 heads)",
    ),
    dict(
        name="griffin-1.3b fp32",
        family="scan",
        B=2,
        T=2048,
        D=2394,
        C=32,
        dtype="float32",
        source="configs/recipes/griffin-1.3b.yaml (rglru width 14 x 171)",
    ),
    dict(
        name="griffin-1.3b bf16",
        family="scan",
        B=2,
        T=2048,
        D=2394,
        C=32,
        source="configs/recipes/griffin-1.3b.yaml (rglru width 14 x 171)",
    ),
    dict(
        name="gla-1.3b",
        family="gla",
        B=2,
        T=2048,
        H=4,
        K=256,
        V=512,
        C=16,
        source="configs/recipes/gla-1.3b.yaml (d_model 2048, 4 heads)",
    ),
    dict(
        name="gated_deltanet-1.3b",
        family="delta",
        B=2,
        T=2048,
        H=8,
        K=192,
        V=384,
        C=64,
        source="configs/recipes/gated_deltanet-1.3b.yaml (head_dim 192; 340m and 2.7b too)",
    ),
    dict(
        name="gated_deltanet-attn-1.3b",
        family="delta",
        B=2,
        T=2048,
        H=8,
        K=208,
        V=416,
        C=64,
        source="configs/recipes/gated_deltanet-attn-1.3b.yaml (head_dim 208)",
    ),
    dict(
        name="hgrn2 (assumed)",
        family="gla",
        B=2,
        T=2048,
        H=16,
        K=128,
        V=128,
        C=64,
        source="no recipe: expand_ratio 128 default, d_model 2048 / 16 heads assumed",
    ),
    dict(
        name="gla-2.7b",
        family="gla",
        B=2,
        T=2048,
        H=4,
        K=320,
        V=640,
        C=16,
        source="configs/recipes/gla-2.7b.yaml (d_model 2560, 4 heads)",
    ),
]

DRY_CASES = [  # --dry-run: the same code paths at tiny shapes (CPU, Triton's interpreter)
    dict(name="dry simple_gla", family="simple_gla", B=1, T=40, H=2, K=16, V=8, C=16, scale=1.0),
    dict(name="dry delta", family="delta", B=1, T=40, H=2, K=16, V=12, C=16),
    dict(name="dry gla", family="gla", B=1, T=40, H=2, K=8, V=16, C=16),
    dict(name="dry scan", family="scan", B=1, T=40, D=24, C=16, dtype="float32"),
]


# ------------------------------------------------------------------------------------------
# rnnscale importable without installing it


def _package_dirs(root: Path) -> dict[str, str]:
    """pyproject.toml's `[tool.setuptools.package-dir]`: {"rnnscale.kernels": "kernels", ...}."""
    text = (root / "pyproject.toml").read_text()
    try:
        import tomllib

        return dict(tomllib.loads(text)["tool"]["setuptools"]["package-dir"])
    except ImportError:  # Python 3.10: read the table's `"a" = "b"` lines
        table = re.search(r"^\[tool\.setuptools\.package-dir\]\n(.*?)(?:^\[|\Z)", text, re.M | re.S)
        return dict(re.findall(r'^"([\w.]+)"\s*=\s*"([^"]+)"', table.group(1), re.M))


def make_importable(root: Path = ROOT) -> str:
    """A temporary folder holding `rnnscale/<name>` -> `<root>/<dir>` links (a namespace package,
    as installed), first on sys.path; returns the folder for the children's PYTHONPATH."""
    shim = Path(tempfile.mkdtemp(prefix="rnnscale-shim-"))
    atexit.register(shutil.rmtree, shim, ignore_errors=True)
    (shim / "rnnscale").mkdir()
    for package, folder in _package_dirs(root).items():
        top, _, name = package.partition(".")
        if top != "rnnscale" or not name or "." in name:
            continue  # nested packages live inside their parent's folder
        (shim / "rnnscale" / name).symlink_to(root / folder, target_is_directory=True)
    sys.path.insert(0, str(shim))
    return str(shim)


# ------------------------------------------------------------------------------------------
# helpers


def error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:3000]


def rel_rms(got, want) -> float:
    """RMS of the difference over the RMS of the reference (as tests/scans/test_families.py)."""
    if got.shape != want.shape:
        return float("inf")
    got, want = got.double(), want.double()
    scale = want.pow(2).mean().sqrt().item()
    return (got - want).pow(2).mean().sqrt().item() / (scale if scale > 0 else 1.0)


def bench_ms(fn, grad_to_none=None) -> float:
    """Median milliseconds of `fn`: do_bench on CUDA; on CPU (dry run) a median of 3 calls."""
    import torch

    if torch.cuda.is_available():
        from triton.testing import do_bench

        return float(
            do_bench(
                fn, warmup=WARMUP_MS, rep=REP_MS, grad_to_none=grad_to_none, return_mode="median"
            )
        )
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[1]


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------
# one case, in a child process: `--child precompile|time --case JSON --result FILE`


def case_inputs(case: dict, T: int, B: int, device, dtype):
    """Valid random inputs as tests/scans/families.py draws them (model-like: normalised q, k
    for the delta rule), made in fp32 on the device and rounded to dtype."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator(device=device).manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32)

    fam = case["family"]
    if fam == "scan":
        D = case["D"]
        xs = [torch.sigmoid(r(B, T, D) + 2), r(B, T, D)]
    else:
        H, K, V = case["H"], case["K"], case["V"]
        q, k, v = r(B, T, H, K), r(B, T, H, K), r(B, T, H, V)
        if fam == "gla":
            xs = [q, k, v, F.logsigmoid(r(B, T, H, K) + 2)]
        elif fam == "simple_gla":
            xs = [q, k, v, F.logsigmoid(r(B, T, H) + 2)]
        else:
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
            xs = [q, k, v, F.logsigmoid(r(B, T, H) + 3), torch.sigmoid(r(B, T, H))]
    return [x.to(dtype).contiguous() for x in xs]


def case_op(case: dict):
    fam = case["family"]
    if fam == "gla":
        from rnnscale.kernels.gla import chunk_gla as op
    elif fam == "simple_gla":
        from rnnscale.kernels.simple_gla import chunk_simple_gla as op
    elif fam == "delta":
        from rnnscale.kernels.delta import chunk_gated_delta_rule as op
    else:
        from rnnscale.kernels.scan import linear_scan as op
    kw = {"chunk_size": case["C"]}
    if fam != "scan":
        kw["scale"] = case.get("scale")
    return op, kw


def kernel_metadata(case: dict) -> list[dict]:
    """Every compiled variant of the family's Triton kernels in this process: name, warps,
    stages, shared memory (bytes), and registers and spills once the kernel was loaded (a kernel
    refused at launch, e.g. for shared memory, has its shared size but no registers)."""
    fam = case["family"]
    if fam in ("gla", "simple_gla"):
        from rnnscale.kernels.common import linear_attention_triton as m

        fns = {"_la_fwd": m._la_fwd, "_la_bwd": m._la_bwd}
    elif fam == "delta":
        from rnnscale.kernels.delta import chunk_triton as m

        fns = {"_delta_fwd": m._delta_fwd, "_delta_bwd": m._delta_bwd}
    else:
        from rnnscale.kernels.scan import chunk_triton as m

        fns = {"_scan_fwd": m._scan_fwd, "_scan_bwd": m._scan_bwd}
    out = []
    for label, fn in fns.items():
        caches = getattr(fn, "device_caches", None)
        if not caches:  # the interpreter, or another Triton: nothing compiled to read
            out.append({"kernel": label, "note": f"no device_caches on {type(fn).__name__}"})
            continue
        for entry in list(caches.values()):
            parts = entry if isinstance(entry, tuple) else (entry,)
            cache = next((p for p in parts if isinstance(p, dict)), {})
            for compiled in list(cache.values()):
                md = getattr(compiled, "metadata", None)
                row = {"kernel": label}
                for field in ("num_warps", "num_stages", "shared"):
                    row[field] = getattr(md, field, None)
                row["n_regs"] = getattr(compiled, "n_regs", None)
                row["n_spills"] = getattr(compiled, "n_spills", None)
                row["loaded"] = getattr(compiled, "module", None) is not None
                out.append(row)
    return out


def child(mode: str, case: dict, result_path: Path, dry: bool) -> None:
    """Writes one JSON object per line to result_path as it goes (a killed child keeps what it
    had written)."""
    import torch

    def emit(**record):
        with open(result_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, case.get("dtype", "bfloat16"))
    op, kw = case_op(case)
    B, T = (1, 2 * case["C"]) if mode == "precompile" else (case["B"], case["T"])
    xs = case_inputs(case, T, B, device, dtype)
    gen = torch.Generator(device=device).manual_seed(1)
    do = torch.randn(
        xs[-1].shape if case["family"] == "scan" else xs[2].shape,
        generator=gen,
        device=device,
        dtype=torch.float32,
    ).to(dtype)
    emit(stage="start", mode=mode, device=device, dtype=str(dtype), B=B, T=T)
    backends = ["triton"] if mode == "precompile" else ["torch", "triton"]
    if mode == "time" and case.get("skip_triton"):
        emit(stage="triton fwd", backend="triton", error=case["skip_triton"], skipped=True)
        backends = ["torch"]
    outs: dict[str, dict] = {}
    for backend in backends:
        # forward only (no autograd graph)
        try:
            start = time.perf_counter()
            with torch.no_grad():
                o, _ = op(*xs, backend=backend, **kw)
            sync()
            first_s = time.perf_counter() - start
            bad = int((~torch.isfinite(o.float())).sum())
            rec = dict(stage=f"{backend} fwd", backend=backend, first_call_s=first_s, nonfinite=bad)
            if mode == "time":
                with torch.no_grad():
                    rec["ms"] = bench_ms(lambda b=backend: op(*xs, backend=b, **kw))
            outs.setdefault(backend, {})["o"] = o.float()
            emit(**rec)
        except Exception as e:  # noqa: BLE001 (recorded verbatim)
            emit(
                stage=f"{backend} fwd",
                backend=backend,
                error=error_text(e),
                traceback=traceback.format_exc()[-2000:],
            )
            if backend == "triton":
                break  # the backward needs the forward kernel
        # forward + backward
        if backend == "triton" and mode == "time" and case.get("skip_triton_bwd"):
            emit(
                stage="triton fwd+bwd",
                backend="triton",
                error=case["skip_triton_bwd"],
                skipped=True,
            )
            continue
        try:
            leaves = [x.clone().requires_grad_() for x in xs]
            start = time.perf_counter()
            o, _ = op(*leaves, backend=backend, **kw)
            o.backward(do)
            sync()
            first_s = time.perf_counter() - start
            # copies: do_bench's untimed calls below accumulate into .grad in place
            grads = [x.grad.float().clone() for x in leaves]
            for x in leaves:
                x.grad = None
            bad = sum(int((~torch.isfinite(g)).sum()) for g in grads)
            rec = dict(
                stage=f"{backend} fwd+bwd", backend=backend, first_call_s=first_s, nonfinite=bad
            )

            def step(leaves=leaves, backend=backend):
                out, _ = op(*leaves, backend=backend, **kw)
                out.backward(do)

            if mode == "time":
                rec["ms"] = bench_ms(step, grad_to_none=leaves)
            outs.setdefault(backend, {})["grads"] = grads
            emit(**rec)
        except Exception as e:  # noqa: BLE001
            emit(
                stage=f"{backend} fwd+bwd",
                backend=backend,
                error=error_text(e),
                traceback=traceback.format_exc()[-2000:],
            )
    if mode == "precompile":  # small check at the compile shape: triton against torch
        try:
            with torch.no_grad():
                ref, _ = op(*xs, backend="torch", **kw)
            if "o" in outs.get("triton", {}):
                emit(stage="compare", output=rel_rms(outs["triton"]["o"], ref.float()))
        except Exception as e:  # noqa: BLE001
            emit(stage="compare", error=error_text(e))
    elif "torch" in outs and "triton" in outs:
        cmp = {}
        if "o" in outs["torch"] and "o" in outs["triton"]:
            cmp["output"] = rel_rms(outs["triton"]["o"], outs["torch"]["o"])
        if "grads" in outs["torch"] and "grads" in outs["triton"]:
            names = ["a", "b"] if case["family"] == "scan" else ["q", "k", "v", "g", "beta"]
            for name, got, want in zip(names, outs["triton"]["grads"], outs["torch"]["grads"]):
                cmp[f"d{name}"] = rel_rms(got, want)
        emit(stage="compare", **cmp)
    try:
        emit(stage="kernels", kernels=kernel_metadata(case))
    except Exception as e:  # noqa: BLE001
        emit(stage="kernels", error=error_text(e))


# ------------------------------------------------------------------------------------------
# the parent


class Run:
    def __init__(self, out: Path, dry: bool, budget_s: float):
        self.out, self.dry, self.budget_s = out, dry, budget_s
        self.t0 = time.monotonic()
        self.log_path = out / "gpu_check.log"
        self.log_path.write_text("")
        self.results: dict = {
            "date": datetime.date.today().isoformat(),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "dry_run": dry,
            "do_bench": {"warmup_ms": WARMUP_MS, "rep_ms": REP_MS, "return_mode": "median"},
        }

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def log(self, text: str = "") -> None:
        line = f"[{self.elapsed():6.1f}s] {text}" if text else ""
        print(line, flush=True)
        with open(self.log_path, "a") as f:
            f.write(line + "\n")

    def save(self) -> None:
        (self.out / "gpu_check.json").write_text(json.dumps(self.results, indent=1, default=str))

    def part(self, key: str, fn) -> None:
        """Run one part; its result, or its error verbatim, goes under results[key]."""
        self.log(f"--- {key}")
        try:
            self.results[key] = fn()
        except Exception as e:  # noqa: BLE001
            self.results[key] = {"error": error_text(e), "traceback": traceback.format_exc()}
            self.log(f"{key} failed: {error_text(e)}")
        self.save()


def environment(run: Run) -> dict:
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
        info.update(
            gpu=p.name,
            capability=f"{p.major}.{p.minor}",
            sms=p.multi_processor_count,
            memory_gib=round(p.total_memory / 2**30, 1),
            l2_mib=round(getattr(p, "L2_cache_size", 0) / 2**20, 1),
        )
        try:
            q = "name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw,power.limit"
            r = subprocess.run(
                ["nvidia-smi", f"--query-gpu={q}", "--format=csv"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            info["nvidia_smi"] = r.stdout.strip() or r.stderr.strip()
        except Exception as e:  # noqa: BLE001
            info["nvidia_smi"] = error_text(e)
    for key, value in info.items():
        run.log(f"{key}: {value}")
    return info


def yardsticks(run: Run) -> dict:
    """bf16 matmul 8192^3 on random data (twice) and a 1 GiB device-to-device copy."""
    import torch

    if not torch.cuda.is_available():
        run.log("no CUDA: yardsticks skipped")
        return {"skipped": "no CUDA device"}
    out = {}
    n = 8192

    def matmul_ms() -> list[float]:
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
    run.log(
        f"matmul bf16 8192^3: {', '.join(f'{t:.0f}' for t in out['matmul_bf16_8192_tflops'])}"
        f" TFLOP/s; copy 1 GiB: {out['copy_gb_s']:.0f} GB/s"
    )
    return out


def child_env(shim: str, cache: str, dry: bool) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = (
        os.pathsep.join([shim, env["PYTHONPATH"]]) if env.get("PYTHONPATH") else shim
    )
    env["TRITON_CACHE_DIR"] = cache
    env["PYTHONUNBUFFERED"] = "1"
    if dry:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    return env


def start_child(run: Run, mode: str, case: dict, env: dict, tmp: Path, index: int):
    result = tmp / f"{mode}-{index}.jsonl"
    errlog = tmp / f"{mode}-{index}.stderr"
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        mode,
        "--case",
        json.dumps(case),
        "--result",
        str(result),
    ]
    if run.dry:
        cmd.append("--dry-run")
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(errlog, "w"),
        start_new_session=True,
    )
    return {"proc": proc, "result": result, "stderr": errlog, "start": time.monotonic()}


def finish_child(handle: dict, timeout_s: float) -> dict:
    """Wait up to timeout_s (from the child's start), kill its process group past that; the
    records it wrote, its exit code, and the tail of its stderr."""
    proc = handle["proc"]
    left = timeout_s - (time.monotonic() - handle["start"])
    timed_out = False
    try:
        proc.wait(timeout=max(left, 0.1))
    except subprocess.TimeoutExpired:
        timed_out = True
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    records = []
    if handle["result"].exists():
        for line in handle["result"].read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    stderr = handle["stderr"].read_text()[-3000:] if handle["stderr"].exists() else ""
    return {
        "records": records,
        "returncode": proc.returncode,
        "timed_out": timed_out,
        "wall_s": round(time.monotonic() - handle["start"], 1),
        "stderr_tail": stderr,
    }


TEST_FILE = "tests/scans/test_families.py"


def pytest_command(run: Run, tmp: Path, tag: str, selection: list[str]) -> list[str]:
    import importlib.util

    cmd = [sys.executable, "-m", "pytest", *selection, "-p", "no:cacheprovider",
           "-o", "addopts=", "-v", "-rfE", "--durations=5",
           f"--junitxml={tmp / f'junit-{tag}.xml'}"]  # fmt: skip
    if importlib.util.find_spec("pytest_timeout"):
        cmd.append(f"--timeout={run.pytest_test_timeout:.0f}")
    return cmd


def start_pytests(run: Run, env: dict, tmp: Path, part: str) -> list[dict]:
    """part "not-gpu": one process for the tests that are not `gpu`-marked (started beside the
    compiles: they run on the CPU, in seconds); part "gpu": one process per `gpu`-marked test,
    side by side, each with its own time limit (a compile that hangs in native code can outlast
    pytest-timeout's signal, and would stop the tests after it). The gpu part starts after the
    compiles: beside them, 19 compiling processes on 16 cores slowed each other past the limits
    (2026-12-04)."""
    handles: list[dict] = []

    def start(tag: str, selection: list[str]) -> None:
        cmd = pytest_command(run, tmp, tag, selection)
        log = tmp / f"pytest-{tag}.log"
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log, "w"),
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        handles.append({"tag": tag, "proc": proc, "cmd": cmd, "log": log,
                        "junit": tmp / f"junit-{tag}.xml", "start": time.monotonic()})  # fmt: skip

    if part == "not-gpu":
        dry = ["-k", "longer_sequence"] if run.dry else []
        start("not-gpu", [TEST_FILE, "-m", "not gpu", *dry])
        return handles
    listing = subprocess.run(
        [sys.executable, "-m", "pytest", TEST_FILE, "-m", "gpu", "--collect-only", "-q",
         "-p", "no:cacheprovider", "-o", "addopts="],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    nodes = [x.strip() for x in listing.stdout.splitlines() if "::" in x]
    if not nodes:
        run.log(
            "no gpu-marked tests collected:\n" + listing.stdout[-1500:] + listing.stderr[-1500:]
        )
    for i, node in enumerate(nodes):
        start(f"gpu-{i}", [node])
        handles[-1]["node"] = node.split("::")[-1]
    return handles


def parse_pytest(text: str, junit: Path) -> dict:
    """Counts and failures of one pytest process: its JUnit XML, or (killed before writing it)
    the -v lines it printed."""
    res: dict = {}
    summary = [x for x in text.splitlines() if re.match(r"^=*\s*\d+ (passed|failed|error)", x)]
    if summary:
        res["summary_line"] = summary[-1].strip("= ")
    outcomes: dict[str, str] = {}
    failed = []
    if junit.exists():
        root = ET.parse(junit).getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        for case in suite.iter("testcase"):
            name = case.get("name")
            bad = case.find("failure") if case.find("failure") is not None else case.find("error")
            if bad is not None:
                outcomes[name] = "failed"
                message = (bad.get("message") or bad.text or "").strip()
                failed.append({"test": name, "message": message[:1500]})
            elif case.find("skipped") is not None:
                outcomes[name] = "skipped"
            else:
                outcomes[name] = "passed"
    else:
        res["note"] = "no JUnit XML (killed): outcomes from the -v lines"
        for name, outcome in re.findall(r"::(\S+) (PASSED|FAILED|SKIPPED|ERROR)", text):
            outcomes[name] = "failed" if outcome in ("FAILED", "ERROR") else outcome.lower()
        started = re.findall(r"::(\S+) ?$", text, re.M)
        if started and started[-1] not in outcomes:
            outcomes[started[-1]] = "did not finish"
    res["outcomes"] = outcomes
    res["failed"] = failed
    return res


def finish_pytests(run: Run, handles: list[dict], timeout_s: float) -> dict:
    total: dict = {"file": TEST_FILE, "timeout_s_each": timeout_s, "processes": []}
    outcomes: dict[str, str] = {}
    failed: list[dict] = []
    logs = []
    for h in handles:
        proc, timed_out = h["proc"], False
        try:
            proc.wait(timeout=max(timeout_s - (time.monotonic() - h["start"]), 0.1))
        except subprocess.TimeoutExpired:
            timed_out = True
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        text = h["log"].read_text() if h["log"].exists() else ""
        logs.append(f"===== {' '.join(h['cmd'][1:])}\n{text}")
        got = parse_pytest(text, h["junit"])
        if timed_out:
            for name, outcome in got["outcomes"].items():
                if outcome == "did not finish":
                    got["outcomes"][name] = f"did not finish in {timeout_s:.0f} s"
        if h.get("node") and h["node"] not in got["outcomes"]:  # killed before its -v line
            got["outcomes"][h["node"]] = (
                f"did not finish in {timeout_s:.0f} s"
                if timed_out
                else f"no outcome (exit {proc.returncode})"
            )
        outcomes.update(got["outcomes"])
        failed += got["failed"]
        total["processes"].append({
            "tag": h["tag"], "selection": [c for c in h["cmd"][3:] if not c.startswith("-")][:1],
            "returncode": proc.returncode, "timed_out": timed_out,
            "done_or_killed_by_s": round(time.monotonic() - h["start"], 1),
            "summary_line": got.get("summary_line", ""), "note": got.get("note", ""),
        })  # fmt: skip
    (run.out / "pytest.log").write_text("\n".join(logs))
    counts: dict[str, int] = {}
    for outcome in outcomes.values():
        counts[outcome] = counts.get(outcome, 0) + 1
    kinds: dict[str, int] = {}
    for f in failed:
        first = f["message"].splitlines()[0][:200] if f["message"] else "(no message)"
        first = re.sub(r"\d\.\d+e[-+]\d+", "<x>", first)
        kinds[first] = kinds.get(first, 0) + 1
    total.update(
        counts=counts,
        gpu_marked={n: o for n, o in outcomes.items() if "test_triton_on_cuda" in n},
        failure_kinds=dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
        failed=failed,
        outcomes=outcomes,
    )
    total["summary_line"] = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
    run.log(f"pytest: {total['summary_line']}")
    for kind, count in total["failure_kinds"].items():
        run.log(f"  {count} x {kind}")
    for name, outcome in total["gpu_marked"].items():
        run.log(f"  {name}: {outcome}")
    return total


def by_stage(records: list[dict]) -> dict:
    return {r["stage"]: r for r in records if "stage" in r}


def case_label(case: dict) -> str:
    dt = {"float32": "fp32"}.get(case.get("dtype", "bfloat16"), "bf16")
    if case["family"] == "scan":
        shape = f"D={case['D']}"
    else:
        shape = f"H={case['H']} K={case['K']} V={case['V']}"
    return f"B={case['B']} T={case['T']} {shape} C={case['C']} {dt}"


def cases_phase(
    run: Run,
    cases: list[dict],
    env: dict,
    tmp: Path,
    pytest_handle,
    compile_timeout: float,
    time_timeout: float,
    pytest_timeout: float,
) -> None:
    results = run.results.setdefault("cases", [])
    for case in cases:
        results.append({"case": case, "label": case_label(case)})
    run.save()
    # 1. every case's kernels compiled side by side (CPU work), pytest running beside them
    run.log(f"--- compiles: {len(cases)} children side by side, {compile_timeout:.0f} s each")
    handles = [start_child(run, "precompile", c, env, tmp, i) for i, c in enumerate(cases)]
    for entry, handle in zip(results, handles):
        got = finish_child(handle, compile_timeout)
        entry["precompile"] = got
        st = by_stage(got["records"])
        fwd, bwd = st.get("triton fwd", {}), st.get("triton fwd+bwd", {})
        if got["timed_out"] and "error" not in fwd and "first_call_s" not in fwd:
            entry["triton_unavailable"] = (
                f"compile/launch did not finish in {compile_timeout:.0f} s (forward)"
            )
        elif "error" in fwd:
            entry["triton_unavailable"] = fwd["error"]
        elif got["timed_out"] and "first_call_s" not in bwd and "error" not in bwd:
            entry["triton_bwd_unavailable"] = (
                f"compile/launch did not finish in {compile_timeout:.0f} s (backward)"
            )
        text = "ok" if not entry.get("triton_unavailable") else entry["triton_unavailable"][:160]
        if entry.get("triton_bwd_unavailable"):
            text = "fwd ok; " + entry["triton_bwd_unavailable"]
        elif "error" in bwd:
            text = "fwd ok; bwd: " + bwd["error"][:160]
        run.log(
            f"compile {case_label(entry['case'])} [{entry['case']['name']}]: {text} "
            f"(fwd {fwd.get('first_call_s', float('nan')):.1f} s, "
            f"fwd+bwd {bwd.get('first_call_s', float('nan')):.1f} s)"
        )
        run.save()
    if pytest_handle is not None:
        run.log("--- pytest: the gpu-marked tests, one process each, side by side")
        try:
            pytest_handle += start_pytests(run, run.pytest_env, tmp, "gpu")
        except Exception as e:  # noqa: BLE001
            run.log(f"the gpu-marked tests did not start: {error_text(e)}")
        run.log("--- waiting for pytest (the GPU must be quiet for the timings)")
        run.part("pytest", lambda: finish_pytests(run, pytest_handle, pytest_timeout))
    # 2. the timings, one child at a time
    run.log("--- timings, one case at a time")
    for i, entry in enumerate(results):
        case = dict(entry["case"])
        left = run.budget_s - run.elapsed()
        if left < 20:
            entry["timing"] = {"skipped": f"the run's time budget ({run.budget_s:.0f} s) was spent"}
            run.log(f"time {entry['case']['name']}: skipped, budget spent")
            continue
        if entry.get("triton_unavailable"):
            case["skip_triton"] = entry["triton_unavailable"]
        elif entry.get("triton_bwd_unavailable"):
            # the forward compiled; a backward compile would run into the same limit again
            case["skip_triton_bwd"] = entry["triton_bwd_unavailable"]
        got = finish_child(start_child(run, "time", case, env, tmp, i), min(time_timeout, left))
        if got["timed_out"]:
            got["note"] = f"killed after {min(time_timeout, left):.0f} s"
        entry["timing"] = got
        run.log(f"time {entry['case']['name']}: " + "; ".join(describe(by_stage(got["records"]))))
        run.save()


def describe(st: dict) -> list[str]:
    out = []
    for stage in ("torch fwd", "torch fwd+bwd", "triton fwd", "triton fwd+bwd"):
        r = st.get(stage)
        if r is None:
            continue
        if "ms" in r:
            out.append(f"{stage} {r['ms']:.3f} ms")
        elif "error" in r:
            out.append(f"{stage} ERROR {r['error'][:120]}")
    if "compare" in st:
        out.append(
            "relRMS "
            + ", ".join(f"{k} {v:.1e}" for k, v in st["compare"].items() if isinstance(v, float))
        )
    return out


def fmt_ms(r: dict | None) -> str:
    if not r:
        return "not run"
    if "ms" in r:
        return f"{r['ms']:.3f}"
    if r.get("error"):
        return "error"
    return "not timed"


def summary(run: Run) -> None:
    """The table, printed last (and kept in the JSON as text)."""
    lines = [
        "| case | shape | torch fwd ms | triton fwd ms | torch/triton fwd | torch f+b ms | "
        "triton f+b ms | torch/triton f+b | triton f+b tok/s | rel RMS o | max rel RMS "
        "grads | triton kernels (regs/spills/shared B) | error |",
        "|" + "---|" * 13,
    ]
    for entry in run.results.get("cases", []):
        case = entry["case"]
        timing = entry.get("timing", {})
        st = by_stage(timing.get("records", []))
        pre = by_stage(entry.get("precompile", {}).get("records", []))
        tf, tb = st.get("triton fwd"), st.get("triton fwd+bwd")
        pf, pb = st.get("torch fwd"), st.get("torch fwd+bwd")

        def ratio(a, b):
            return f"{a['ms'] / b['ms']:.2f}" if a and b and "ms" in a and "ms" in b else ""

        toks = ""
        if tb and "ms" in tb:
            toks = f"{case['B'] * case['T'] / (tb['ms'] * 1e-3):.3g}"
        cmp = st.get("compare", {})
        grads = [v for k, v in cmp.items() if k.startswith("d") and isinstance(v, float)]
        out_err = f"{cmp['output']:.1e}" if isinstance(cmp.get("output"), float) else ""
        grad_err = f"{max(grads):.1e}" if grads else ""
        kernels = (st.get("kernels") or pre.get("kernels") or {}).get("kernels", [])
        ks = "; ".join(
            f"{k['kernel']} {k.get('n_regs')}/{k.get('n_spills')}/{k.get('shared')}"
            for k in kernels
            if "num_warps" in k
        )
        errors = [
            r["error"]
            for r in (tf, tb, pf, pb, pre.get("triton fwd"), pre.get("triton fwd+bwd"))
            if r and r.get("error")
        ]
        for key in ("triton_unavailable", "triton_bwd_unavailable"):
            if entry.get(key):
                errors.append(entry[key])
        if timing.get("timed_out"):
            errors.append(timing.get("note", "timing child killed"))
        if timing.get("skipped"):
            errors.append(timing["skipped"])
        err = " / ".join(dict.fromkeys(e.splitlines()[0][:200] for e in errors))
        lines.append(
            f"| {case['name']} | {entry['label']} | {fmt_ms(pf)} | {fmt_ms(tf)} | "
            f"{ratio(pf, tf)} | {fmt_ms(pb)} | {fmt_ms(tb)} | {ratio(pb, tb)} | {toks} | "
            f"{out_err} | {grad_err} | {ks} | {err} |"
        )
    table = "\n".join(lines)
    run.results["summary_table"] = table
    run.save()
    run.log("--- summary")
    for line in lines:
        print(line, flush=True)
    with open(run.log_path, "a") as f:
        f.write(table + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/gpu-check", help="folder for the JSON and the logs")
    ap.add_argument(
        "--dry-run",
        action="store_true",
        help="CPU check of the script: tiny shapes, Triton's interpreter",
    )
    ap.add_argument(
        "--budget-s",
        type=float,
        default=400,
        help="no timing child starts past this many seconds of the run",
    )
    ap.add_argument("--compile-timeout", type=float, default=120)
    ap.add_argument("--time-timeout", type=float, default=60)
    ap.add_argument("--pytest-timeout", type=float, default=150)
    ap.add_argument("--no-pytest", action="store_true")
    ap.add_argument("--cases", nargs="*", help="names of the cases to run (default: all)")
    ap.add_argument("--child", choices=["precompile", "time"], help=argparse.SUPPRESS)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()

    shim = make_importable(ROOT)
    if args.child:
        child(args.child, json.loads(args.case), Path(args.result), args.dry_run)
        return 0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run = Run(out, args.dry_run, args.budget_s)
    run.pytest_test_timeout = max(args.pytest_timeout - 15, 10)  # pytest-timeout, inside it
    run.log(f"gpu_check: out={out} dry_run={args.dry_run} shim={shim}")
    run.part("environment", lambda: environment(run))
    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError as e:
        run.log(f"torch does not import ({e}): nothing more to check")
        return 1
    if not cuda and not args.dry_run:
        run.log(
            "no CUDA device: the GPU parts are skipped (use --dry-run for a CPU check of "
            "this script at tiny shapes in Triton's interpreter)"
        )
        run.results["skipped"] = "no CUDA device"
        run.save()
        return 0
    run.part("yardsticks", lambda: yardsticks(run))

    tmp = Path(tempfile.mkdtemp(prefix="gpu-check-"))  # compile caches, children's records
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    cache = tmp / "triton-cache"
    cache.mkdir()
    env = child_env(shim, str(cache), args.dry_run)
    cases = DRY_CASES if args.dry_run else CASES
    if args.cases:
        cases = [c for c in cases if c["name"] in args.cases]
    pytest_handle = None
    if not args.no_pytest:
        # its own compile cache: its compile times are not the cases' concern
        pytest_env = dict(env, TRITON_CACHE_DIR=str(tmp / "triton-cache-pytest"))
        if args.dry_run:
            pytest_env.pop("TRITON_INTERPRET")  # tests/conftest.py sets it without CUDA
        try:
            run.pytest_env = pytest_env
            pytest_handle = start_pytests(run, pytest_env, tmp, "not-gpu")
            run.log("--- pytest started: the tests not marked gpu, in one process")
        except Exception as e:  # noqa: BLE001
            run.results["pytest"] = {"error": error_text(e)}
    try:
        cases_phase(
            run,
            cases,
            env,
            tmp,
            pytest_handle,
            args.compile_timeout,
            args.time_timeout,
            args.pytest_timeout,
        )
    except Exception as e:  # noqa: BLE001
        run.results["cases_error"] = {"error": error_text(e), "traceback": traceback.format_exc()}
        run.log(f"cases failed: {error_text(e)}")
        if pytest_handle is not None and "pytest" not in run.results:
            run.part("pytest", lambda: finish_pytests(run, pytest_handle, args.pytest_timeout))
    run.results["wall_s"] = round(run.elapsed(), 1)
    try:
        summary(run)
    except Exception as e:  # noqa: BLE001
        run.log(f"summary failed: {error_text(e)}")
    y = run.results.get("yardsticks", {})
    if "matmul_bf16_8192_tflops" in y:
        run.log(
            f"peak: matmul bf16 {max(y['matmul_bf16_8192_tflops']):.0f} TFLOP/s, "
            f"copy {y['copy_gb_s']:.0f} GB/s"
        )
    p = run.results.get("pytest", {})
    if p:
        run.log(f"pytest: {p.get('summary_line', p.get('error'))}")
    run.log(f"done in {run.elapsed():.0f} s; results in {out}")
    run.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
