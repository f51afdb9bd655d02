"""Preemption notices: SIGTERM to a lone run, SIGUSR1 to one rank of two, the notice file, and
SIGTERM to the Ray driver each stop the run after the step it is in, with a committed
checkpoint of that step and exit code 75; the same command then ends with the losses of the
run that never stopped, bit for bit. A notice whose checkpoint cannot be committed within the
grace period exits with 75 at once, saying what a resume starts from."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from launcher import losses, past, records, run_ranks
from test_checkpoint import command

from rnnscale.train.preemption import EXIT_PREEMPTED, NOTICE_FILE, post_notice

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """ranks -> the losses of the run that never stopped."""
    out = {}
    for ranks in (1, 2):
        run_dir = tmp_path_factory.mktemp(f"whole{ranks}")
        r = run_ranks(command(run_dir, ranks), cwd=ROOT, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        out[ranks] = losses(run_dir)
    return out


def notify(how: str, proc: subprocess.Popen, run_dir: Path) -> None:
    if how == "SIGTERM":
        proc.send_signal(signal.SIGTERM)
    elif how == "file":
        post_notice(run_dir, "test")
    else:  # SIGUSR1 to rank 1 only, a child of torchrun
        ranks = [p for p in psutil.Process(proc.pid).children() if "rnnscale.train" in p.cmdline()]
        rank1 = [p for p in ranks if p.environ().get("RANK") == "1"]
        rank1[0].send_signal(signal.SIGUSR1)


def events(run_dir: Path) -> list[dict]:
    return records(run_dir / "events.jsonl")


@pytest.mark.parametrize("ranks,how", [(1, "SIGTERM"), (2, "SIGUSR1"), (1, "file")])
def test_a_notice_commits_its_step_and_the_run_goes_on(repo_root, tmp_path, uninterrupted,
                                                        ranks, how):  # fmt: skip
    run_dir, step = tmp_path / "run", random.Random(how).randrange(3, 20)
    cmd = command(run_dir, ranks)
    proc = subprocess.Popen(cmd, cwd=repo_root, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    ready, deadline = past(run_dir, step), time.monotonic() + 300
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    notify(how, proc, run_dir)
    stderr = proc.communicate(timeout=300)[1]
    if ranks == 1:
        assert proc.returncode == EXIT_PREEMPTED, stderr[-3000:]
        assert "Traceback" not in stderr and "run the same command again" in stderr, stderr
    stopped = events(run_dir)[-1]
    assert stopped["event"] == "preempted" and stopped["step"] >= step, stopped
    assert stopped["checkpoint"].endswith(f"step_{stopped['step']:09d}")
    assert (Path(stopped["checkpoint"]) / "manifest.json").exists()  # committed
    assert max(losses(run_dir)) == stopped["step"] < 24 and not (run_dir / NOTICE_FILE).exists()
    status = subprocess.run([str(Path(sys.executable).parent / "rnnscale"), "status",
                             str(run_dir)], capture_output=True, text=True)  # fmt: skip
    assert f"preempted: 1 time(s), last after step {stopped['step']}" in status.stdout
    r = run_ranks(cmd, cwd=repo_root, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert losses(run_dir) == uninterrupted[ranks]  # exact
    assert any(e.get("resumed_from") == stopped["checkpoint"] for e in events(run_dir))


def test_a_notice_past_its_grace_period_exits_at_once(tmp_path):
    """A step that never ends (here: nothing runs): the grace timer exits with 75."""
    script = (
        "import time\n"
        "from rnnscale.train.preemption import Preemption\n"
        "p = Preemption('none', 0.5, lambda: 'the newest committed checkpoint, X, is intact')\n"
        "p.notice('SIGTERM')\n"
        "time.sleep(60)\n"
    )
    start = time.monotonic()
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=120, env={**os.environ})  # fmt: skip
    assert r.returncode == EXIT_PREEMPTED and time.monotonic() - start < 30
    assert r.stderr.strip() == (
        "rnnscale: preempted (SIGTERM), and no checkpoint was committed within "
        "checkpoint.preempt_grace_s=0.5 s: exiting now; the newest committed checkpoint, X, "
        "is intact"
    )


def test_the_notice_file_appears_whole(tmp_path, monkeypatch):
    """Rank 0 may stat the notice file at any moment: it must appear with its reason already in
    it (a plain write is seen empty first; CI once read the Ray driver's notice without its
    "(SIGTERM)"), so it comes by renaming a whole temporary file over the name."""
    import rnnscale.train.files as files

    seen, replace = [], os.replace

    def spy(src, dst):
        seen.append((Path(dst).exists(), Path(src).read_text()))
        replace(src, dst)

    monkeypatch.setattr(files.os, "replace", spy)
    post_notice(tmp_path, "SIGTERM")
    assert seen == [(False, "SIGTERM\n")] and (tmp_path / NOTICE_FILE).read_text() == "SIGTERM\n"
    assert [p.name for p in tmp_path.iterdir()] == [NOTICE_FILE]


def test_two_threads_writing_the_notice_never_share_a_temporary_file(tmp_path):
    """The Ray driver's signal handler and its resize watcher may write the notice at once:
    each write has its own temporary file, so neither truncates nor loses the other's."""
    import threading

    from rnnscale.train.preemption import post_notice

    errors = []

    def write(why):
        try:
            for _ in range(100):
                post_notice(tmp_path, why)
        except OSError as e:
            errors.append(e)

    threads = [threading.Thread(target=write, args=(w,)) for w in ("SIGTERM", "resize: 4")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and (tmp_path / NOTICE_FILE).read_text() in ("SIGTERM\n", "resize: 4\n")
    assert [p.name for p in tmp_path.iterdir()] == [NOTICE_FILE]
