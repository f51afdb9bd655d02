"""What every part of `make gpu-check` shares: rnnscale and the brought wheels made importable,
the run's log and JSON, children with time limits, and the timing and comparison helpers.

Imported by benchmarks/gpu_check.py (the parent and every child it starts), gpu_fla.py,
gpu_train.py and gpu_pytest.py; nothing here imports torch at module level.
"""

from __future__ import annotations

import atexit
import datetime
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).resolve().parent / "gpu_check.py"  # every child runs it with --child

# do_bench settings (milliseconds of warm-up and of timed repetitions), the same for every side
WARMUP_MS, REP_MS = 25, 100


# ------------------------------------------------------------------------------------------
# rnnscale and the wheels importable without installing anything


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


def _top_level(wheel: zipfile.ZipFile) -> set[str]:
    """The importable names a wheel holds: its top-level folders and modules."""
    names = set()
    for name in wheel.namelist():
        first = name.split("/")[0]
        if not first.endswith((".dist-info", ".data")):
            names.add(first[:-3] if first.endswith(".py") else first)
    return names


def _installed(dist: str, modules: set[str]) -> str | None:
    """The version of `dist` this Python has, "importable" when only its modules are found."""
    for name in (dist, dist.replace("_", "-")):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    if modules and all(importlib.util.find_spec(m) is not None for m in modules):
        return "importable"
    return None


def unpack_wheels(folder: Path, dest: Path) -> dict[str, str]:
    """The pure-Python wheels in `folder` (`make gpu-wheels`) whose distribution this Python
    lacks, unpacked into `dest` (a wheel is a zip of its packages and its metadata); dest goes
    last on sys.path. Returns {wheel file: what became of it}. The device's own packages win:
    a wheel it already has is left packed."""
    out: dict[str, str] = {}
    wheels = sorted(folder.glob("*.whl")) if folder.is_dir() else []
    for path in wheels:
        dist = path.name.split("-")[0]
        if not path.name.endswith("-none-any.whl"):
            out[path.name] = "left packed: not a pure-Python wheel"
            continue
        with zipfile.ZipFile(path) as wheel:
            have = _installed(dist, _top_level(wheel))
            if have:
                out[path.name] = f"left packed: this Python has {dist} {have}"
                continue
            wheel.extractall(dest)
            out[path.name] = "unpacked"
    if any(v == "unpacked" for v in out.values()):
        sys.path.append(str(dest))
        importlib.invalidate_caches()
    return out


# ------------------------------------------------------------------------------------------
# helpers


def error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:3000]


def first_line(text: str, n: int = 200) -> str:
    return (text or "").strip().splitlines()[0][:n] if (text or "").strip() else ""


def rel_rms(got, want) -> float:
    """RMS of the difference over the RMS of the reference (as tests/scans/test_families.py)."""
    if got.shape != want.shape:
        return float("inf")
    got, want = got.double(), want.double()
    scale = want.pow(2).mean().sqrt().item()
    return (got - want).pow(2).mean().sqrt().item() / (scale if scale > 0 else 1.0)


def bench_ms(fn, grad_to_none=None) -> float:
    """Median milliseconds of `fn`: do_bench on CUDA; on CPU (a dry run, which checks the code
    path, not the speed) one call."""
    import torch

    if torch.cuda.is_available():
        from triton.testing import do_bench

        return float(
            do_bench(
                fn, warmup=WARMUP_MS, rep=REP_MS, grad_to_none=grad_to_none, return_mode="median"
            )
        )
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def emitter(result_path: Path):
    """emit(**record): one JSON line appended to result_path (a killed child keeps its lines)."""

    def emit(**record) -> None:
        with open(result_path, "a") as f:
            f.write(json.dumps(record, default=str) + "\n")

    return emit


def by_stage(records: list[dict]) -> dict:
    return {r["stage"]: r for r in records if "stage" in r}


# ------------------------------------------------------------------------------------------
# the parent's run: log, results, time budget


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
            "budget_s": budget_s,
            "do_bench": {"warmup_ms": WARMUP_MS, "rep_ms": REP_MS, "return_mode": "median"},
        }

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        """Seconds until the budget ends: no child runs past it."""
        return self.budget_s - self.elapsed()

    def log(self, text: str = "") -> None:
        line = f"[{self.elapsed():6.1f}s] {text}" if text else ""
        print(line, flush=True)
        with open(self.log_path, "a") as f:
            f.write(line + "\n")

    def save(self) -> None:
        (self.out / "gpu_check.json").write_text(json.dumps(self.results, indent=1, default=str))

    def part(self, key: str, fn) -> None:
        """Run one part; its result, or its error verbatim, goes under results[key]."""
        import traceback

        self.log(f"--- {key}")
        try:
            self.results[key] = fn()
        except Exception as e:  # noqa: BLE001
            self.results[key] = {"error": error_text(e), "traceback": traceback.format_exc()}
            self.log(f"{key} failed: {error_text(e)}")
        self.save()


# ------------------------------------------------------------------------------------------
# children: `gpu_check.py --child MODE --case JSON --result FILE`, each with a time limit


def child_env(paths: list[str], cache: str, dry: bool) -> dict:
    """The children's environment: `paths` (the shim, the unpacked wheels) first on PYTHONPATH,
    their own Triton cache, Triton's interpreter only in a dry run."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*paths, *filter(None, [env.get("PYTHONPATH")])])
    env["TRITON_CACHE_DIR"] = cache
    env["PYTHONUNBUFFERED"] = "1"
    if dry:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    return env


def start_child(run: Run, mode: str, case: dict, env: dict, tmp: Path, tag: str) -> dict:
    result = tmp / f"{mode}-{tag}.jsonl"
    errlog = tmp / f"{mode}-{tag}.stderr"
    cmd = [sys.executable, str(SCRIPT), "--child", mode, "--case", json.dumps(case),
           "--result", str(result)]  # fmt: skip
    if run.dry:
        cmd.append("--dry-run")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=open(errlog, "w"), start_new_session=True)  # fmt: skip
    return {"proc": proc, "result": result, "stderr": errlog, "start": time.monotonic()}


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


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
        kill_group(proc)
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


def run_one(run: Run, mode: str, case: dict, env: dict, tmp: Path, tag: str, limit: float):
    """A timing child, alone on the GPU, stopped at `limit` seconds or at the end of the
    budget; not started when under 15 s of the budget are left (then {"skipped": why})."""
    timeout = min(limit, run.left())
    if timeout < 15:
        return {"skipped": f"not measured: the run's time budget ({run.budget_s:.0f} s) was spent"}
    got = finish_child(start_child(run, mode, case, env, tmp, tag), timeout)
    if got["timed_out"]:
        got["note"] = f"killed after {timeout:.0f} s"
    return got
