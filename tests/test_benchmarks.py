"""The benchmark scripts run (tiny shapes); their timings are never asserted."""

import subprocess
import sys


def test_kernel_benchmark_runs(repo_root):
    r = subprocess.run(
        [sys.executable, "benchmarks/kernels.py", "--smoke"],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert [row.split("|")[1].strip() for row in rows[1:]] == ["gla", "simple_gla", "delta", "scan"]


def test_kernel_memory_benchmark_runs(repo_root):
    r = subprocess.run(
        [sys.executable, "benchmarks/kernels.py", "--memory", "--smoke"],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    rows = [line.split("|") for line in r.stdout.splitlines() if line.startswith("| ")]
    rows = [row for row in rows[1:] if "---" not in row[1]]
    assert [(row[1].strip(), int(row[2])) for row in rows] == [
        (name, T) for name in ("gla", "simple_gla", "delta", "scan") for T in (256, 512)
    ]
    assert all(float(row[3]) >= 0 for row in rows)
