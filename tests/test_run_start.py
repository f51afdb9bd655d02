"""What a run does before it trains: one run per directory (an exclusive lock the OS drops
when its holder dies, a second start refused in one line naming the holder), threads per rank
from the cores and the ranks on the node, and the library notices kept out of the console."""

import logging
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from rnnscale.launch.cli import main
from rnnscale.train.config import load_config
from rnnscale.train.console import LibraryNotices
from rnnscale.train.distributed import set_threads
from rnnscale.train.run_lock import LOCK_FILE, RunLock, RunLocked

HOLD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from rnnscale.train.run_lock import RunLock
    lock = RunLock.take(Path(sys.argv[1]))
    print("locked", flush=True)
    time.sleep(600)
""")


def _holder(run_dir) -> subprocess.Popen:
    """A process that takes the run directory's lock and keeps it."""
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE,
                             text=True)  # fmt: skip
    assert child.stdout.readline().strip() == "locked"
    return child


def test_a_second_start_is_refused_naming_the_holder_and_a_kill_frees_the_lock(tmp_path):
    run_dir = tmp_path / "run"
    child = _holder(run_dir)
    try:
        with pytest.raises(RunLocked, match=rf"run.dir {run_dir} is in use by pid {child.pid} "):
            RunLock.take(run_dir)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    with RunLock.take(run_dir) as lock:  # the kernel dropped the dead holder's lock
        assert (run_dir / LOCK_FILE).exists()
        with pytest.raises(RunLocked, match=f"pid {os.getpid()} "):
            RunLock.take(run_dir)  # another open file of the same process is refused too
    assert lock.fd == -1
    RunLock.take(run_dir).release()


def test_train_into_a_locked_directory_exits_2_with_one_line(repo_root, tmp_path, capsys):
    run_dir = tmp_path / "run"
    child = _holder(run_dir)
    try:
        code = main(["train", str(repo_root / "configs/debug_cpu.yaml"), f"run.dir={run_dir}",
                     "log.progress_bar=false", "train.max_steps=2"])  # fmt: skip
    finally:
        child.kill()
        child.wait()
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"in use by pid {child.pid}" in err[0], err
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "config.yaml").exists()


def test_threads_per_rank_divide_the_cores_among_the_local_ranks(monkeypatch):
    before = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0))
    try:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(cores))
        assert set_threads(0)[0] == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
        threads, why = set_threads(0)
        assert threads == cores and f"{cores} core(s) / 1 rank(s)" in why
        assert set_threads(3) == (3, "launch.threads_per_rank") and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
    cfg = load_config("configs/debug_cpu.yaml", ["launch.threads_per_rank=2"])
    assert cfg.launch.threads_per_rank == 2


def test_library_notices_go_to_the_rank_log_and_errors_still_print(tmp_path):
    import deepspeed  # noqa: F401  (its logger and console handler, as in a run)

    seen = []  # what reaches DeepSpeed's handlers (its console handler among them)
    console = logging.Handler()
    console.emit = lambda record: seen.append(record.getMessage())
    deepspeed_log = logging.getLogger("DeepSpeed")
    deepspeed_log.addHandler(console)
    quiet = LibraryNotices.start()
    try:
        deepspeed_log.warning("held before the file is named")
        quiet.keep_printed("DeepSpeed", "a printed line\n")
        quiet.to_file(tmp_path, 3)
        logging.getLogger("torch.some.module").warning("a torch notice")
        deepspeed_log.error("an error")
        import warnings

        warnings.warn("a python warning", UserWarning, stacklevel=1)
    finally:
        quiet.stop()
        deepspeed_log.removeHandler(console)
    log = (tmp_path / "logs" / "rank_3.log").read_text()
    for text in ("held before the file is named", "a printed line", "a torch notice",
                 "a python warning", "an error"):  # fmt: skip
        assert text in log
    assert seen == ["an error"]
    torch_console = [h for h in logging.getLogger("torch").handlers if h.filters]
    assert not torch_console and not deepspeed_log.filters  # nothing left behind


SHM = textwrap.dedent("""
    import sys
    from multiprocessing import shared_memory
    if sys.argv[1] == "quiet":
        from rnnscale.train.console import quiet_shared_memory_tracker
        quiet_shared_memory_tracker()
    memory = shared_memory.SharedMemory(create=True, size=4096)
    print(memory.name, flush=True)
    sys.stdin.read()
""")


@pytest.mark.parametrize("mode", ["quiet", "default"])
def test_a_killed_run_leaves_no_shared_memory_warning(mode):
    """kill -9 of a run (its resource tracker lives on): the tracker frees the shared memory,
    and says nothing of it when the run quieted it (the default shows the warning is real)."""
    child = subprocess.Popen([sys.executable, "-c", SHM, mode], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    name = child.stdout.readline().strip()
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    err = child.stderr.read()  # to EOF: the tracker holds the pipe until it has cleaned up
    assert not os.path.exists(f"/dev/shm/{name}")
    assert ("leaked shared_memory" in err) == (mode == "default"), err
