"""Ray launch on this machine: `rnnscale train` with launch.num_workers=2 runs the workers under
Ray Train on an embedded local Ray; a worker killed with SIGKILL mid-run is restarted with its
group, the run resumes from its last committed checkpoint by itself, and the losses equal those
of the 2-rank run that never stopped, exactly. The same holds on a cluster of three Ray nodes in
network namespaces when a whole node's raylet is killed and a replacement node joins, when one
worker is stopped (SIGSTOP: the watchdog names it and the group restarts), and after SIGTERM to
the driver (a checkpoint, exit 75, the same command goes on). Ray Train V1 is refused. Everything
an embedded Ray run starts, and a one-process run, listens on the loopback only."""

import contextlib
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from launcher import losses, records
from listening import listeners, process_tree
from netns_cluster import NetnsCluster, remove_leftovers, unavailable
from privileged import cannot

from rnnscale.train import trainer
from rnnscale.train.config import load_config
from rnnscale.train.run_lock import RunLock, RunLocked

BIN = Path(sys.executable).parent
MAX_STEPS = 24  # 20 steps (seconds) after step 4: time to see its checkpoint and kill
COMMON = ["log.progress_bar=false", "log.wandb.mode=disabled", "log.tensorboard=false",
          "train.seq_len=512", f"train.max_steps={MAX_STEPS}", "checkpoint.interval=2",
          "checkpoint.keep=2"]  # fmt: skip


def events(run_dir: Path, kind: str) -> list[dict]:
    """The `kind` events of a run, live or ended."""
    return [e for e in records(run_dir / "events.jsonl") if e.get("event") == kind]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Step -> loss of the COMMON run on one process that never stopped."""
    run_dir = tmp_path_factory.mktemp("whole")
    config = Path(__file__).resolve().parents[1] / "configs/debug_cpu.yaml"
    trainer.run(load_config(config, [f"run.dir={run_dir}", *COMMON]))
    return losses(run_dir)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Step -> loss of the COMMON run on two torchrun ranks that never stopped: what a 2-worker
    Ray run must equal exactly (the same gloo group, the same ranks)."""
    from launcher import run_ranks

    run_dir = tmp_path_factory.mktemp("two")
    r = run_ranks([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m",
                   "rnnscale.train", "configs/debug_cpu.yaml", f"run.dir={run_dir}", *COMMON],
                  cwd=Path(__file__).resolve().parents[1], timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return losses(run_dir)


def test_the_listener_check_sees_every_address(repo_root):
    """The check below is not blind: a socket on every interface counts, one on 127.0.0.1
    does not."""
    with socket.socket() as wide, socket.socket() as local:
        wide.bind(("0.0.0.0", 0))
        local.bind(("127.0.0.1", 0))
        for s in (wide, local):
            s.listen()
        found = {(x.port, x.loopback) for x in listeners({os.getpid()})}
        assert (wide.getsockname()[1], False) in found
        assert (local.getsockname()[1], True) in found


def test_a_dashboard_port_in_use_is_refused_naming_the_option(repo_root, tmp_path, capsys):
    from rnnscale.launch.ray_launch import train_with_ray

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        overrides = [f"run.dir={tmp_path}", "launch.num_workers=2",
                     f"launch.dashboard_port={port}"]  # fmt: skip
        cfg = load_config(repo_root / "configs/debug_cpu.yaml", overrides)
        with pytest.raises(SystemExit) as stop:
            train_with_ray(cfg)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"rnnscale: launch.dashboard_port={port}: 127.0.0.1:{port} is in use")
    assert "launch.dashboard_port=0" in err and len(err.splitlines()) == 1


def test_a_killed_ray_worker_is_restarted_and_the_run_resumes(repo_root, tmp_path, uninterrupted,
                                                              two_ranks):  # fmt: skip
    """Also: nothing of the run listens beyond 127.0.0.1 (the one-process run of `uninterrupted`
    in this process, the embedded Ray's processes, its workers and their process group), and the
    dashboard finds a free port while 8265 is taken."""
    want = uninterrupted
    alone = [x for x in listeners({os.getpid()}) if not x.loopback]
    assert not alone, f"this process (a one-process run's) listens beyond 127.0.0.1: {alone}"
    run_dir = tmp_path / "ray"
    cmd = [str(BIN / "rnnscale"), "train", "configs/debug_cpu.yaml", f"run.dir={run_dir}",
           "launch.num_workers=2", "launch.max_failures=2", *COMMON]  # fmt: skip
    env = {**os.environ, "RAY_DEDUP_LOGS": "0"}
    for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):  # as a fresh shell has them
        env.pop(name, None)
    blocker = socket.socket()  # Ray's default dashboard port, taken (if not already)
    try:
        blocker.bind(("127.0.0.1", 8265))
        blocker.listen()
    except OSError:
        pass
    proc = subprocess.Popen(cmd, cwd=repo_root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not [e for e in events(run_dir, "checkpoint") if e["step"] >= 4]:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.2)
        listening = listeners(process_tree(proc.pid))  # every process of the run is up
        worker = events(run_dir, "start")[-1]["pid"]  # rank 0, a Ray Train worker process
        os.kill(worker, signal.SIGKILL)
        out, _ = proc.communicate(timeout=300)
    finally:
        blocker.close()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-4000:]
    names = {x.name for x in listening}
    assert {"gcs_server", "raylet", "ray::RayTrainWo"} <= names, names  # the check saw them
    wide = [x for x in listening if not x.loopback]
    assert not wide, f"listening beyond 127.0.0.1: {wide}"
    starts = events(run_dir, "start")
    assert len(starts) == 2 and starts[1]["resumed_from"], starts  # restarted once, resumed
    assert losses(run_dir) == two_ranks  # exact: the uninterrupted run of 2 ranks
    assert losses(run_dir) == pytest.approx(want, abs=1e-4)  # and close to 1 rank's
    status = subprocess.run([str(BIN / "rnnscale"), "status", str(run_dir)],
                            capture_output=True, text=True)  # fmt: skip
    assert "restarts: 1" in status.stdout, status.stdout
    dashboard = re.search(r"Ray dashboard: http://127\.0\.0\.1:(\d+)", out)
    assert dashboard and dashboard[1] != "8265", out[-4000:]


def test_submit_to_a_local_head_and_read_the_job_logs(repo_root, tmp_path):
    """`ray start --head` on this machine, `rnnscale submit` a run to it, follow it with
    `rnnscale jobs`, and see the training output in `rnnscale jobs logs`. One worker: Ray Train
    workers under a submitted job are the multi-node test's."""
    # Ray's token authentication (on by default for local clusters since Ray 2.59): the head,
    # its jobs and `rnnscale submit`/`jobs` read the token from the environment
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}  # fmt: skip
    address = "http://127.0.0.1:8296"
    head = [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1",
            "--port=6391", "--dashboard-host=127.0.0.1", "--dashboard-port=8296",
            "--num-cpus=2", "--disable-usage-stats"]  # fmt: skip
    r = subprocess.run(head, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]

    def rnnscale(*args, check=True):
        r = subprocess.run([str(BIN / "rnnscale"), *args], cwd=repo_root, env=env,
                           capture_output=True, text=True, timeout=120)  # fmt: skip
        assert not check or r.returncode == 0, r.stderr[-3000:]
        return r.stdout

    try:
        out = rnnscale("submit", "configs/debug_cpu.yaml", "--address", address,
                       "--job-id", "rnnscale-test", f"run.dir={tmp_path / 'run'}",
                       "train.max_steps=4", "log.progress_bar=false",
                       "log.wandb.mode=disabled")  # fmt: skip
        assert "submitted rnnscale-test" in out and "jobs logs rnnscale-test --follow" in out
        deadline, status = time.monotonic() + 300, ""
        while not any(end in status for end in ("SUCCEEDED", "FAILED", "STOPPED")):
            assert time.monotonic() < deadline, status
            time.sleep(2)
            status = rnnscale("jobs", "status", "rnnscale-test", "--address", address)
        logs = rnnscale("jobs", "logs", "rnnscale-test", "--address", address)
        assert "SUCCEEDED" in status, logs[-4000:]
        assert "rnnscale: done: 4 steps" in logs
        assert "rnnscale-test\tSUCCEEDED" in rnnscale("jobs", "list", "--address", address)
        assert (tmp_path / "run" / "model.safetensors").exists()
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True)


@contextlib.contextmanager
def three_nodes(repo_root):
    """A Ray head (no CPUs: it runs the job's driver) and two worker nodes of 1 CPU, each in
    its own network namespace with its own address; yields (cluster, rnnscale) where
    `rnnscale(*args)` runs the CLI on the head against the cluster's dashboard address."""
    reason = unavailable()
    if reason:
        cannot(f"multi-node Ray test needs network namespaces: {reason}")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
           "RAY_DEDUP_LOGS": "0",
           # the head declares a node dead after 5 missed health checks a second apart, each
           # given 3 s (Ray's default takes about 30 s); slack for 2 busy cores
           "RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "3000",
           "RAY_health_check_failure_threshold": "5"}  # fmt: skip
    temp = Path(tempfile.mkdtemp(prefix="rsray", dir="/tmp"))  # Ray's sockets: a short path
    remove_leftovers()
    cluster = NetnsCluster(BIN, temp, env)  # makes nothing until the first node
    try:
        head = cluster.start_head("head", "--num-cpus=0")
        cluster.start_worker("w1", "--num-cpus=1")
        cluster.start_worker("w2", "--num-cpus=1")
        address = f"http://{head}:8265"

        def rnnscale(*args, extra_env=None, check=True):
            return cluster.run("head", str(BIN / "rnnscale"), *args, "--address", address,
                               cwd=repo_root, extra_env=extra_env, check=check).stdout  # fmt: skip

        cluster.head, cluster.address = head, address
        yield cluster, rnnscale
    finally:
        cluster.close()
        shutil.rmtree(temp, ignore_errors=True)


def test_a_node_lost_mid_run_is_replaced_and_the_job_finishes(repo_root, tmp_path,
                                                               two_ranks):  # fmt: skip
    """A head and two worker nodes, each in its own network namespace with its own address;
    `rnnscale submit` a 2-worker run (one worker per node); SIGKILL one worker node's raylet
    mid-run and start a replacement node: Ray declares the node dead, restarts the worker group
    on the survivor and the new node, the run resumes from its last committed checkpoint, and
    the job finishes with the losses of a run that never stopped."""
    run_dir = tmp_path / "run"
    with three_nodes(repo_root) as (cluster, rnnscale):
        # gloo would take the host name's address (127.0.0.1 here): the job names the interface
        out = rnnscale("submit", "configs/debug_cpu.yaml", "--job-id", "multinode",
                       "--env", "GLOO_SOCKET_IFNAME", f"run.dir={run_dir}",
                       "launch.num_workers=2", "launch.max_failures=3",
                       "launch.placement=STRICT_SPREAD", *COMMON,
                       extra_env={"GLOO_SOCKET_IFNAME": "eth0"})  # fmt: skip
        assert "submitted multinode" in out, out
        deadline = time.monotonic() + 300
        while not [e for e in events(run_dir, "checkpoint") if e["step"] >= 4]:
            if time.monotonic() > deadline:
                logs = rnnscale("jobs", "logs", "multinode", check=False)
                raise AssertionError(f"no checkpoint of step 4 in 300 s:\n{logs[-4000:]}")
            time.sleep(0.1)
        cluster.kill("w1", "raylet")  # the node and its worker are gone
        cluster.start_worker("w3", "--num-cpus=1")  # the replacement
        deadline, status = time.monotonic() + 300, ""
        while not any(end in status for end in ("SUCCEEDED", "FAILED", "STOPPED")):
            assert time.monotonic() < deadline, status
            time.sleep(2)
            status = rnnscale("jobs", "status", "multinode")
        logs = rnnscale("jobs", "logs", "multinode")
        assert "SUCCEEDED" in status, logs[-6000:]
    assert f"rnnscale: done: {MAX_STEPS} steps" in logs
    assert "ip=10.77.0.4" in logs  # a worker ran on the replacement node
    # on a cluster, the addresses in use are said: Ray's, then the process group's store
    assert (
        "rnnscale: joined the Ray cluster at " in logs and f"its GCS at {cluster.head}:6379" in logs
    )
    assert "the process group's TCP store (torch c10d) listens on every interface" in logs
    starts = events(run_dir, "start")  # a busy machine may cost a second restart
    assert len(starts) >= 2 and starts[-1]["resumed_from"], starts
    assert losses(run_dir) == two_ranks  # exact: the uninterrupted run of 2 ranks


def test_cluster_files_parse(repo_root):
    import yaml

    job = yaml.safe_load((repo_root / "docs/cluster/rayjob.yaml").read_text())
    assert job["kind"] == "RayJob" and job["spec"]["entrypoint"].startswith("rnnscale train ")
    config, *overrides = shlex.split(job["spec"]["entrypoint"])[2:]
    cfg = load_config(repo_root / config, overrides)  # the job's config loads as written
    assert cfg.checkpoint.interval > 0 and cfg.data.source == "mds"  # a restart resumes
    r = subprocess.run(["bash", "-n", str(repo_root / "docs/cluster/slurm.sbatch")],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr


def ray_run(repo_root, run_dir: Path, *extra: str) -> subprocess.Popen:
    """`rnnscale train` of the COMMON run on 2 Ray workers, started; once it has committed the
    checkpoint of step 4."""
    cmd = [str(BIN / "rnnscale"), "train", "configs/debug_cpu.yaml", f"run.dir={run_dir}",
           "launch.num_workers=2", "launch.max_failures=2", *COMMON, *extra]  # fmt: skip
    env = {**os.environ, "RAY_DEDUP_LOGS": "0"}
    proc = subprocess.Popen(cmd, cwd=repo_root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    deadline = time.monotonic() + 240
    while not [e for e in events(run_dir, "checkpoint") if e["step"] >= 4]:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(proc.stdout.read()[-4000:])
        time.sleep(0.1)
    return proc


def test_a_stopped_ray_worker_is_found_hung_and_the_run_resumes(repo_root, tmp_path, two_ranks):
    """SIGSTOP to rank 1 mid-run: rank 0's watchdog names it within train.hang_timeout_s and
    ends rank 0, Ray restarts the group, the run resumes and ends with the losses of the run
    that never stopped, exactly; `rnnscale status` reports the hang."""
    run_dir = tmp_path / "ray"
    proc = ray_run(repo_root, run_dir, "train.hang_timeout_s=5")
    try:
        rank0 = events(run_dir, "start")[-1]["pid"]
        import psutil

        workers = [p for p in process_tree(proc.pid) if p != rank0
                   and psutil.Process(p).name().startswith("ray::RayTrainWo")]  # fmt: skip
        assert len(workers) == 1, workers
        os.kill(workers[0], signal.SIGSTOP)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-4000:]
    (hang,) = events(run_dir, "hang")
    assert hang["rank"] == 0 and hang["behind"].startswith("ranks behind: rank 1 (step "), hang
    assert "no progress for" in out and "train.hang_timeout_s=5" in out, out[-4000:]
    starts = events(run_dir, "start")
    assert len(starts) == 2 and starts[1]["resumed_from"], starts
    assert losses(run_dir) == two_ranks  # exact
    status = subprocess.run([str(BIN / "rnnscale"), "status", str(run_dir)],
                            capture_output=True, text=True)  # fmt: skip
    assert "hangs detected: 1, last after step" in status.stdout, status.stdout


def test_sigterm_to_the_ray_driver_stops_with_a_checkpoint(repo_root, tmp_path, two_ranks):
    """The driver writes the notice file, the workers stop after their step with a checkpoint,
    the driver exits with 75; the same command ends with the uninterrupted losses, exactly."""
    run_dir = tmp_path / "ray"
    proc = ray_run(repo_root, run_dir)
    # the driver holds the run directory: a second start there is refused (tests/test_run_start
    # runs the command; starting one here took longer than the rest of the run on a fast machine)
    with pytest.raises(RunLocked, match=rf"run.dir {run_dir} is in use by pid {proc.pid} "):
        RunLock.take(run_dir)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 75, out[-4000:]
    (stop,) = events(run_dir, "preempted")
    assert stop["notice"] == f"{run_dir / 'PREEMPT'} (SIGTERM)" and stop["checkpoint"], stop
    assert f"rnnscale: preempted ({run_dir / 'PREEMPT'} (SIGTERM)) after step {stop['step']}" in out
    assert max(losses(run_dir)) == stop["step"] < MAX_STEPS
    proc = ray_run(repo_root, run_dir)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]
    assert losses(run_dir) == two_ranks  # exact
    assert events(run_dir, "start")[-1]["resumed_from"] == stop["checkpoint"]


def test_ray_train_v1_is_refused_naming_the_setting(repo_root, tmp_path, monkeypatch, capsys):
    from rnnscale.launch.ray_launch import train_with_ray

    monkeypatch.setenv("RAY_TRAIN_V2_ENABLED", "0")
    cfg = load_config(repo_root / "configs/debug_cpu.yaml",
                      [f"run.dir={tmp_path}", "launch.num_workers=2"])  # fmt: skip
    with pytest.raises(SystemExit) as stop:
        train_with_ray(cfg)
    assert stop.value.code == 2 and not list(tmp_path.iterdir())  # nothing started
    err = capsys.readouterr().err
    assert err.startswith("rnnscale: Ray Train V2 is off (RAY_TRAIN_V2_ENABLED='0'")
    assert "unset RAY_TRAIN_V2_ENABLED or set it to 1" in err and len(err.splitlines()) == 1


# Steps of the elastic run. The run must still be training when capacity comes back: it trains
# on 1 worker only from its resume until the driver sees the new node and stops it. On a quiet
# machine (2026-12-06) that was steps 4 to 5, after which every step up to this one ran at 2
# workers (about 1.5 s a step: 300 steps made the test 13 minutes); 80 leaves 75 steps of
# slack (2 minutes or more at 1 worker) for a loaded one.
ELASTIC_STEPS = 80


def test_a_node_lost_for_good_the_run_goes_on_with_fewer_and_grows_back(repo_root, tmp_path):
    """launch.min_workers=1: a head and two worker nodes in network namespaces, a 2-worker
    run; one node's raylet killed and no replacement: after Ray's restart waits in vain, the
    run resumes on 1 worker; a new node joins: the driver stops the run with a checkpoint and
    resumes it on 2. `rnnscale status` tells the sizes. (That every document is read exactly
    once across another worker count is shown by tests/test_resume_streaming.py.)"""
    run_dir = tmp_path / "run"
    with three_nodes(repo_root) as (cluster, rnnscale):

        def wait_for(what, seconds=300):
            deadline = time.monotonic() + seconds
            while not what():
                if time.monotonic() > deadline:
                    logs = rnnscale("jobs", "logs", "elastic", check=False)
                    raise AssertionError(f"waited {seconds} s in vain:\n{logs[-6000:]}")
                time.sleep(0.2)

        out = rnnscale("submit", "configs/debug_cpu.yaml", "--job-id", "elastic",
                       "--env", "GLOO_SOCKET_IFNAME", f"run.dir={run_dir}",
                       "launch.num_workers=2", "launch.min_workers=1", "launch.max_failures=1",
                       "launch.worker_wait_s=5", "launch.resize_check_s=2",
                       "launch.placement=SPREAD", *COMMON, f"train.max_steps={ELASTIC_STEPS}",
                       extra_env={"GLOO_SOCKET_IFNAME": "eth0"})  # fmt: skip
        assert "submitted elastic" in out, out
        wait_for(lambda: [e for e in events(run_dir, "checkpoint") if e["step"] >= 4])
        cluster.kill("w1", "raylet")  # gone for good
        wait_for(lambda: events(run_dir, "resize"))
        wait_for(lambda: events(run_dir, "start")[-1]["world_size"] == 1)
        cluster.start_worker("w3", "--num-cpus=1")  # capacity comes back
        wait_for(lambda: len(events(run_dir, "resize")) == 2)
        status = ""
        while not any(end in status for end in ("SUCCEEDED", "FAILED", "STOPPED")):
            time.sleep(2)
            status = rnnscale("jobs", "status", "elastic")
        logs = rnnscale("jobs", "logs", "elastic")
        assert "SUCCEEDED" in status, logs[-6000:]
    sizes = [(e["workers_before"], e["workers"]) for e in events(run_dir, "resize")]
    assert sizes == [(2, 1), (1, 2)], sizes
    worlds = [e["world_size"] for e in events(run_dir, "start")]
    assert worlds[0] == 2 and 1 in worlds and worlds[-1] == 2, worlds
    assert f"rnnscale: done: {ELASTIC_STEPS} steps" in logs
    assert sorted(losses(run_dir)) == list(range(1, ELASTIC_STEPS + 1))
    status = subprocess.run([str(BIN / "rnnscale"), "status", str(run_dir)],
                            capture_output=True, text=True)  # fmt: skip
    assert "workers resized: 2 -> 1 -> 2" in status.stdout, status.stdout


@pytest.mark.parametrize("overrides,want", [
    (["launch.num_workers=4", "launch.min_workers=1", "train.global_batch_size=8",
      "train.micro_batch_size=2"], [4, 2, 1]),  # 3 ranks cannot split 8 rows of 2
    (["launch.num_workers=4", "launch.min_workers=2", "parallel.sequence_parallel_size=2",
      "train.global_batch_size=4", "train.micro_batch_size=2"], [4, 2]),  # multiples of P
    (["launch.num_workers=2", "launch.min_workers=2"], [2]),
])  # fmt: skip
def test_the_worker_counts_a_run_may_shrink_to(repo_root, tmp_path, overrides, want):
    from rnnscale.launch.elastic import allowed_sizes

    cfg = load_config(repo_root / "configs/debug_cpu.yaml", [f"run.dir={tmp_path}", *overrides])
    assert allowed_sizes(cfg) == want
