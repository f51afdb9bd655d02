"""Running training commands from tests: to the end (`run_ranks`, with one narrow allowance
for a crash outside our code), or killed with SIGKILL once a condition holds (`kill_when`,
`past`); `losses` reads what a run logged.

Once in CI (1 of about 40 two-rank torchrun starts in a suite run; 0 of 20 tried alone on
this machine), a rank aborted about two seconds after starting, while the process group was
being set up, with only `terminate called without an active exception` from C++ (no Python
traceback: std::terminate inside torch's gloo/TCPStore threads). A run that dies that way
is started once more, with a note on stderr; any other failure, and a second abort, fail the
test as before. The resumed or repeated run must still match the run that never stopped bit
for bit, so the allowance cannot hide a wrong result."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

ABORT = "terminate called without an active exception"


def run_ranks(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    """`subprocess.run(cmd, capture_output=True, text=True, **kwargs)`, started once more if
    it died of the C++ abort above."""
    r = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if (
        r.returncode != 0
        and ABORT in r.stderr
        and "Traceback (most recent call last)" not in (r.stderr.split(ABORT)[0])
    ):
        print(f"note: a rank aborted in C++ ({ABORT!r}); starting the run once more",
              file=sys.stderr)  # fmt: skip
        r = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    return r


def records(path: Path) -> list[dict]:
    """The records of a JSON-lines file (metrics.jsonl, events.jsonl) as its readers in the
    package see them: a line cut short is skipped, as a live run's last line can be read
    before its write ends (at a page boundary), and a SIGKILL can leave one for good (the next
    start ends it with a newline: train/run_dir.py). Nothing is hidden by it: every step a
    test compares is logged again after its resume."""
    out = []
    for line in Path(path).read_text().splitlines() if Path(path).exists() else []:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def losses(run_dir: Path) -> dict[int, float]:
    """Step -> loss, the last record of each step (a resumed run logs its steps again)."""
    return {r["step"]: r["loss"] for r in records(run_dir / "metrics.jsonl")}


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (torchrun's workers run in their own process
    groups, so killing torchrun's group would leave them training)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    for proc in procs:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def kill_when(cmd: list[str], cwd, ready, env=None) -> bool:
    """Start `cmd`, SIGKILL it with every process under it once `ready()` holds; False if the
    run finished first."""
    proc = subprocess.Popen(cmd, cwd=cwd,
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True, env=env)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            if ready():
                kill_tree(proc.pid)
                proc.wait()
                return True
            time.sleep(0.02)
        return False
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
            proc.wait()


def starts(run_dir: Path) -> int:
    """Start events so far (one per run that got as far as its first log line), with those of
    the logs a fresh start moved aside (events.<time>.<pid>.jsonl)."""
    count = 0
    for path in Path(run_dir).glob("events*.jsonl"):
        try:
            count += path.read_text().count('"event": "start"')
        except OSError:  # moved aside between the listing and the read
            pass
    return count


def past(run_dir: Path, step: int):
    """Once the run now starting has begun and the log has reached `step` (the earlier runs'
    lines count too, so a run that starts past `step` is killed at once, after its start)."""
    before = starts(run_dir)

    def ready() -> bool:
        try:
            return starts(run_dir) > before and max(losses(run_dir), default=0) >= step
        except (OSError, ValueError):  # not written yet, or a line half written
            return False

    return ready
