"""The CUDA tests of `make gpu-check`: `pytest tests/scans tests/test_hf.py -m gpu` (the kernels,
and an exported model on the GPU), one process per test, side by
side, each with a time limit; outcomes and failures from their JUnit XML (or, for a process
killed before writing it, from its -v lines).

Not the unmarked tests: they are CPU tests (CI runs them), and on a CUDA machine the ones that
call `backend="triton"` on CPU tensors fail by design (tests/conftest.py sets TRITON_INTERPRET
only where CUDA is absent; 56 such failures in the 2026-12-04 run). The `gpu`-marked tests need
TRITON_INTERPRET unset: their environment drops it.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from gpu_common import ROOT, Run, kill_group

TESTS = "tests/scans tests/test_hf.py"


def pytest_env(env: dict, cache: str) -> dict:
    """The children's environment less TRITON_INTERPRET (tests/conftest.py sets it where CUDA is
    absent), with a compile cache of its own: its compile times are not the timings' concern."""
    out = dict(env, TRITON_CACHE_DIR=cache)
    out.pop("TRITON_INTERPRET", None)
    return out


def collect(env: dict) -> subprocess.Popen:
    """`pytest TESTS -m gpu --collect-only`, started now (it imports torch: seconds), read by
    `start_pytests`."""
    cmd = [sys.executable, "-m", "pytest", *TESTS.split(), "-m", "gpu", "--collect-only", "-q",
           "-p", "no:cacheprovider", "-o", "addopts="]  # fmt: skip
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def pytest_command(run: Run, tmp: Path, tag: str, node: str) -> list[str]:
    cmd = [sys.executable, "-m", "pytest", node, "-m", "gpu", "-p", "no:cacheprovider",
           "-o", "addopts=", "-v", "-rfE", "--durations=5",
           f"--junitxml={tmp / f'junit-{tag}.xml'}"]  # fmt: skip
    if importlib.util.find_spec("pytest_timeout"):
        cmd.append(f"--timeout={run.pytest_test_timeout:.0f}")
    return cmd


def start_pytests(run: Run, env: dict, tmp: Path, listing: subprocess.Popen) -> list[dict]:
    """One process per `gpu`-marked test, side by side, each with its own time limit (a compile
    that hangs in native code can outlast pytest-timeout's signal, and would stop the tests
    after it). Started beside the compiles: in the 2026-12-04 runs the old whole-state kernels
    took minutes to compile and 19 such processes on 16 cores slowed each other past the
    limits; the chunk-parallel kernels compile in seconds each."""
    try:
        out, err = listing.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        kill_group(listing)
        out, err = "", "the collection did not finish in 120 s"
    nodes = [x.strip() for x in out.splitlines() if "::" in x]
    if not nodes:
        run.log(f"no gpu-marked tests collected:\n{out[-1500:]}{err[-1500:]}")
    handles: list[dict] = []
    for i, node in enumerate(nodes):
        tag = f"gpu-{i}"
        cmd = pytest_command(run, tmp, tag, node)
        log = tmp / f"pytest-{tag}.log"
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log, "w"),
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        handles.append({"tag": tag, "proc": proc, "cmd": cmd, "log": log, "node": node,
                        "junit": tmp / f"junit-{tag}.xml", "start": time.monotonic()})  # fmt: skip
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
    total: dict = {"selection": f"{TESTS} -m gpu", "timeout_s_each": timeout_s, "processes": []}
    outcomes: dict[str, str] = {}
    failed: list[dict] = []
    logs = []
    for h in handles:
        proc, timed_out = h["proc"], False
        try:
            left = min(timeout_s - (time.monotonic() - h["start"]), run.left())
            proc.wait(timeout=max(left, 0.1))
        except subprocess.TimeoutExpired:
            timed_out = True
            kill_group(proc)
        text = h["log"].read_text() if h["log"].exists() else ""
        logs.append(f"===== {' '.join(h['cmd'][1:])}\n{text}")
        got = parse_pytest(text, h["junit"])
        limit = f"did not finish in {time.monotonic() - h['start']:.0f} s"
        if timed_out:
            for name, outcome in got["outcomes"].items():
                if outcome == "did not finish":
                    got["outcomes"][name] = limit
        name = h["node"].split("::")[-1]
        if name not in got["outcomes"]:  # killed before its -v line
            got["outcomes"][name] = limit if timed_out else f"no outcome (exit {proc.returncode})"
        outcomes.update(got["outcomes"])
        failed += got["failed"]
        total["processes"].append({
            "node": h["node"], "returncode": proc.returncode, "timed_out": timed_out,
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
        failure_kinds=dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
        failed=failed,
        outcomes=outcomes,
    )
    total["summary_line"] = ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "none ran"
    run.log(f"pytest: {total['summary_line']}")
    for kind, count in total["failure_kinds"].items():
        run.log(f"  {count} x {kind}")
    for name, outcome in outcomes.items():
        run.log(f"  {name}: {outcome}")
    return total
