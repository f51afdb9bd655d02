"""The benchmark scripts run (tiny shapes); their timings are never asserted."""

import subprocess
import sys


def table(repo_root, *args) -> list[list[str]]:
    """Run a benchmark script; return its markdown table rows (header and rule dropped) as
    stripped cells."""
    r = subprocess.run(
        [sys.executable, *args], cwd=repo_root, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr
    rows = [line.split("|")[1:-1] for line in r.stdout.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in row] for row in rows[1:] if not row[0].startswith("---")]


def test_kernel_benchmark_runs(repo_root):
    rows = table(repo_root, "benchmarks/kernels.py", "--smoke")
    assert [row[0] for row in rows] == ["gla", "simple_gla", "delta", "scan"]


def test_kernel_memory_benchmark_runs(repo_root):
    rows = table(repo_root, "benchmarks/kernels.py", "--memory", "--smoke")
    assert [(row[0], int(row[1])) for row in rows] == [
        (name, T) for name in ("gla", "simple_gla", "delta", "scan") for T in (256, 512)
    ]
    assert all(float(row[2]) >= 0 for row in rows)


def test_model_benchmark_runs_with_its_peers(repo_root):
    rows = table(repo_root, "benchmarks/models.py", "--smoke")
    assert [row[0] for row in rows] == [
        "rnnscale mamba2",
        "rnnscale gla",
        "rnnscale gated_deltanet",
        "rnnscale gdn+attn 3:1",
        "transformers Mamba2",
        "transformers Llama (sdpa)",
    ]
    assert not [row for row in rows if row[2].startswith("not run")], rows  # all measured


def test_data_benchmark_runs(repo_root):
    rows = table(repo_root, "benchmarks/data.py", "--smoke")
    assert [row[0] for row in rows[:3]] == [
        "sentencepiece encode, 1 process",
        "data prepare, 1 worker",
        "data prepare, 2 workers",
    ]
    assert all(float(row[1]) > 0 for row in rows[:3])
    debug = [row for row in rows if row[0].startswith("vs debug_cpu step")]
    assert len(debug) == 1 and debug[0][2].endswith("x")


def test_checkpoint_benchmark_runs(repo_root):
    rows = table(repo_root, "benchmarks/checkpoint.py", "--smoke", "--saves", "2")
    assert [row[0] for row in rows] == [
        "save bandwidth (sync, GB/s)",
        "load bandwidth (GB/s)",
        "sync save, step loop held up (s)",
        "async save, step loop held up + slower steps (s)",
    ]
    assert all(float(row[3]) > 0 for row in rows)


def test_sequence_parallel_benchmark_runs(repo_root):
    rows = table(repo_root, "benchmarks/sequence_parallel.py", "--smoke")
    names = [row[0] for row in rows]
    assert names.count("attention, Ulysses all-to-all") == 3  # P = 2, 4, 8
    recurrent = [row for row in rows if row[0].endswith("state passing")]
    assert len(recurrent) == 9 and all(len(set(row[2:5])) == 1 for row in recurrent)  # no T
    assert names[-1] == "gla x4" and float(rows[-1][3]) > 0
