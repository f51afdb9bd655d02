"""The Logger's sinks (metrics.jsonl, TensorBoard, wandb offline, events.jsonl) read back with
each tool's own reader, and the two commands that read run directories: `rnnscale status` and
`rnnscale dashboard` (TensorBoard's HTTP API, queried like a browser would)."""

import json
import math
import os
import signal
import socket
import struct
import subprocess
import time
import urllib.parse
import urllib.request
import zlib

import pytest
from test_cli import BIN, rnnscale

from rnnscale.launch.cli import main
from rnnscale.launch.monitor import dashboard_runs, link_runs, status_report
from rnnscale.train.config import ConfigError, dump_yaml, load_config
from rnnscale.train.console import best_eval
from rnnscale.train.logger import Logger, check_wandb_credentials, wandb_run_id

LOSSES = [5.61, 5.02, 4.71, 4.40, 4.25, 4.08]


def _metrics(step: int) -> dict:
    """What the trainer logs at one step, with made-up but plausible values."""
    m = {
        "loss": LOSSES[step - 1],
        "lr": 1e-3 * min(step, 4) / 4,
        "grad_norm": 1.5 / step,
        "tokens": 512,
        "tokens_per_s": 20_000.0 + step,
        "step_time_s": 0.025,
        "tokens_seen": 512 * step,
    }
    if step == len(LOSSES):
        m.update(eval_loss=4.31, eval_ppl=math.exp(4.31))
    return m


def _config(repo_root, run_dir, *overrides):
    return load_config(
        repo_root / "configs/debug_cpu.yaml",
        [f"run.dir={run_dir}", "run.name=mon test", f"train.max_steps={len(LOSSES)}", *overrides],
    )


def _log_run(cfg, run_dir, rank=0, offset=0.0):
    logger = Logger.for_rank(rank, cfg, run_dir)
    logger.event("start", step=0, world_size=1)
    for step in range(1, len(LOSSES) + 1):
        logger.log(step, {**_metrics(step), "loss": LOSSES[step - 1] + offset})
    logger.close()


def test_rank0_writes_jsonl_tensorboard_wandb_and_events(repo_root, tmp_path, monkeypatch, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("WANDB_MODE")  # conftest disables wandb for every other test
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _log_run(_config(repo_root, run_dir, "log.wandb.mode=offline"), run_dir)

    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records == [{"step": s, **_metrics(s)} for s in range(1, len(LOSSES) + 1)]
    # not a terminal: the progress as lines, each tenth of the run and the last step
    assert f"rnnscale: step {len(LOSSES)}/{len(LOSSES)}  loss 4.0800  " in capsys.readouterr().out

    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "train/loss" in tags and "train/tokens_per_s" in tags and "train/eval_loss" not in tags
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, len(LOSSES) + 1))
    assert [e.value for e in loss] == pytest.approx(LOSSES, rel=1e-6)  # float32
    assert [(e.step, e.value) for e in acc.Scalars("eval/loss")] == [(6, pytest.approx(4.31))]
    assert acc.Scalars("eval/ppl")[0].value == pytest.approx(math.exp(4.31), rel=1e-6)

    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    run, history = _wandb_run(offline)
    assert run.run_id == "mon-test" and run.display_name == "mon test"
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["train"]["max_steps"] == len(LOSSES)
    assert [h["step"] for h in history] == list(range(1, len(LOSSES) + 1))  # the x axis
    assert [h["loss"] for h in history] == pytest.approx(LOSSES)
    for step, h in enumerate(history, 1):  # every metric, eval ones at the last step only
        assert {k: v for k, v in h.items() if not k.startswith("_") and k != "step"} == (
            pytest.approx(_metrics(step))
        )

    (event,) = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
    assert event["event"] == "start" and event["step"] == 0 and event["world_size"] == 1
    assert abs(event["time"] - time.time()) < 600


def test_wandb_keeps_steps_logged_again(repo_root, tmp_path, monkeypatch):
    """After a rollback (or a resume) the run logs steps it logged before; wandb's x axis is
    our `step` metric, so those records are kept, not dropped as going back in time."""
    monkeypatch.delenv("WANDB_MODE")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    logger = Logger.for_rank(0, _config(repo_root, run_dir, "log.wandb.mode=offline"), run_dir)
    for step in (1, 2, 3, 2, 3):
        logger.log(step, _metrics(step))
    logger.close()
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    _, history = _wandb_run(offline)
    assert [h["step"] for h in history] == [1, 2, 3, 2, 3]


def _wandb_run(offline_dir):
    """The run record and the history rows of a .wandb file (a LevelDB-style log of protobuf
    Records; wandb >= 0.19 ships no Python reader, so this reads the documented framing)."""
    from wandb.proto import wandb_internal_pb2

    (path,) = offline_dir.glob("*.wandb")
    run, history = None, []
    for data in _leveldb_records(path.read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
        elif kind == "history":
            items = record.history.item
            history.append(
                {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}
            )
    return run, history


def _leveldb_records(data: bytes, block: int = 32768):
    """Payloads of a wandb datastore: a 7-byte header, then 32 KiB blocks of chunks, each
    (crc32 of type + payload, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    assert data[:7] == struct.pack("<4sHB", b":W&B", 0xBEE1, 0), "not a wandb datastore"
    pos, parts = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0:
            continue
        assert crc == zlib.crc32(chunk, zlib.crc32(bytes([kind]))), f"bad checksum at {pos}"
        parts += chunk
        if kind in (1, 4):
            yield parts
            parts = b""


def test_other_ranks_write_nothing(repo_root, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _log_run(_config(repo_root, run_dir, "log.wandb.mode=offline"), run_dir, rank=1)
    assert list(run_dir.iterdir()) == []


def test_online_wandb_without_a_key_is_refused_before_anything_opens(
    repo_root, tmp_path, monkeypatch
):
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    netrc = tmp_path / "netrc"
    netrc.write_text("machine example.com login user password secret\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = _config(repo_root, run_dir, "log.wandb.mode=online")
    with pytest.raises(ConfigError, match=r"log\.wandb\.mode: online .*WANDB_API_KEY.*offline"):
        Logger.for_rank(0, cfg, run_dir)
    assert list(run_dir.iterdir()) == []
    netrc.write_text("machine api.wandb.ai login user password " + "k" * 40 + "\n")
    check_wandb_credentials(cfg)  # a `wandb login` entry is enough
    monkeypatch.setenv("WANDB_MODE", "disabled")
    netrc.unlink()
    check_wandb_credentials(cfg)  # wandb is off: no key needed


def test_wandb_run_id_keeps_only_allowed_characters():
    assert wandb_run_id("gla 1.3B:v2") == "gla-1-3B-v2"
    assert wandb_run_id("debug_cpu-2") == "debug_cpu-2"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def test_dashboard_serves_each_run_of_a_folder_as_a_named_line(repo_root, tmp_path):
    names = ["gla", "mamba2"]
    for offset, name in enumerate(names):
        run_dir = tmp_path / "runs" / name
        run_dir.mkdir(parents=True)
        _log_run(_config(repo_root, run_dir, "log.progress_bar=false"), run_dir, offset=offset)
    (tmp_path / "runs" / "notes").mkdir()  # not a run: left out
    port, scratch = _free_port(), tmp_path / "tmp"
    scratch.mkdir()
    proc = subprocess.Popen(
        [str(BIN / "rnnscale"), "dashboard", str(tmp_path / "runs"), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "TMPDIR": str(scratch)},  # where the runs' links go
    )
    base = f"http://127.0.0.1:{port}"
    try:
        served, deadline = {}, time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                served = {run: _scalars(base, run, "train/loss")
                          for run in _get_json(f"{base}/data/runs")}  # fmt: skip
                if sorted(served) == names and all(len(v) == len(LOSSES) for v in served.values()):
                    break
            except (OSError, ValueError):  # not up, or no data loaded yet
                pass
            time.sleep(0.5)
        assert proc.poll() is None, proc.communicate()[0]
        assert sorted(served) == names, served
        for offset, name in enumerate(names):
            assert [step for _, step, _ in served[name]] == list(range(1, len(LOSSES) + 1))
            assert [value for _, _, value in served[name]] == (
                pytest.approx([x + offset for x in LOSSES], rel=1e-6)
            )
    finally:
        proc.send_signal(signal.SIGTERM)  # as Ctrl-C: the links go
        try:
            output = proc.communicate(timeout=30)[0]
        except subprocess.TimeoutExpired:
            proc.kill()
            output = proc.communicate()[0]
    assert f"{base}/" in output and f"run gla: {tmp_path / 'runs' / 'gla' / 'tb'}" in output
    assert "notes" not in output and list(scratch.iterdir()) == []  # the links went with it


def _scalars(base: str, run: str, tag: str) -> list:
    query = urllib.parse.urlencode({"run": run, "tag": tag})
    return _get_json(f"{base}/data/plugin/scalars/scalars?{query}")


def test_dashboard_names_each_run_of_a_folder(tmp_path):
    """A run is served as itself; a folder as each subdirectory with a tb/, by name, through
    a directory of links named after the runs (TensorBoard names a run after its directory)."""
    runs = tmp_path / "runs"
    for name in ("b-mamba2", "a:gla", "notes"):
        (runs / name).mkdir(parents=True)
    (runs / "b-mamba2" / "tb").mkdir()
    (runs / "a:gla" / "tb").mkdir()
    (runs / "README").write_text("not a run")
    assert dashboard_runs(runs / "a:gla") == [("a:gla", runs / "a:gla" / "tb")]
    found = dashboard_runs(runs)
    assert found == [("a:gla", runs / "a:gla" / "tb"), ("b-mamba2", runs / "b-mamba2" / "tb")]
    view = tmp_path / "view"
    view.mkdir()
    link_runs(found, view)
    assert sorted((p.name, p.resolve()) for p in view.iterdir()) == [
        ("a:gla", (runs / "a:gla" / "tb").resolve()),
        ("b-mamba2", (runs / "b-mamba2" / "tb").resolve()),
    ]


def test_dashboard_of_a_folder_without_runs_is_refused(tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    assert main(["dashboard", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no tb/ directory, nor has any of its subdirectories" in err
    assert main(["dashboard", str(tmp_path / "missing")]) == 2


def _write_run(run_dir, cfg, steps: int, starts: int):
    """A run directory as a run leaves it: config, metrics, events, some checkpoints."""
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    with open(run_dir / "metrics.jsonl", "w") as f:
        for step in range(1, steps + 1):
            # the ETA must use the last 20 records only: the 10 before them are slow
            m = {"loss": 6.0 - step / 10, "tokens_per_s": 20480.0, "step_time_s": 9.0}
            if step > steps - 20:
                m["step_time_s"] = 0.5
            if step == 20:
                m.update(eval_loss=4.25, eval_ppl=math.exp(4.25))
            f.write(json.dumps({"step": step, **m}) + "\n")
    with open(run_dir / "events.jsonl", "w") as f:
        for i in range(starts):
            f.write(json.dumps({"time": 1e9 + i, "event": "start", "step": 10 * i}) + "\n")
        f.write(json.dumps({"time": 2e9, "event": "checkpoint", "path": "x"}) + "\n")
    for name, finished in [("step_9", True), ("step_20", True), ("step_30", False)]:
        (run_dir / "checkpoints" / name).mkdir(parents=True)
        if finished:
            (run_dir / "checkpoints" / name / "manifest.json").write_text("{}")


def test_status_reports_where_the_run_stands(repo_root, tmp_path):
    run_dir = tmp_path / "run"
    _write_run(run_dir, _config(repo_root, run_dir, "train.max_steps=100"), steps=30, starts=2)
    r = rnnscale("status", str(run_dir), cwd=repo_root)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "step: 30 / 100" in lines
    assert "loss: 3.0000" in lines
    assert "eval loss: 4.2500 (ppl 70.11, step 20)" in lines
    assert "best eval loss: 4.2500 (ppl 70.11, step 20)" in lines
    assert "tokens/s: 20,480 over the last 20 logged steps, 20,480 over the run" in lines
    assert "parameters: unknown (an older run)" in lines
    assert "ETA: 0:00:35" in lines  # 70 steps x 0.5 s
    assert f"last checkpoint: {run_dir / 'checkpoints' / 'step_20'}" in lines
    assert "restarts: 1" in lines


def test_status_of_a_finished_run_and_of_no_run(repo_root, tmp_path):
    run_dir = tmp_path / "run"
    _write_run(run_dir, _config(repo_root, run_dir, "train.max_steps=30"), steps=30, starts=1)
    report = status_report(run_dir).splitlines()
    assert "ETA: done" in report and "restarts: 0" in report
    r = rnnscale("status", str(tmp_path), cwd=repo_root)
    assert r.returncode == 2 and "has no metrics.jsonl" in r.stderr and "Traceback" not in r.stderr


def test_only_real_restarts_count(repo_root, tmp_path):
    """A start after a `done` (train.max_steps raised) continues a finished run: no restart."""
    run_dir = tmp_path / "run"
    _write_run(run_dir, _config(repo_root, run_dir, "train.max_steps=30"), steps=30, starts=1)
    with open(run_dir / "events.jsonl", "a") as f:
        for name in ("done", "start", "start", "done"):  # continued, then killed and resumed
            f.write(json.dumps({"time": 3e9, "event": name, "step": 30}) + "\n")
    report = status_report(run_dir).splitlines()
    assert "restarts: 1" in report
    assert "continued after finishing: 1 time(s) (train.max_steps raised)" in report


def test_a_new_run_in_a_used_directory_keeps_the_old_logs_aside(repo_root, tmp_path):
    """A fresh run (nothing to resume) where another ran keeps that run's metrics and events
    beside its own, so `rnnscale status` counts no restart that belongs to the other run."""
    from rnnscale.train.run_dir import prepare_run_dir

    run_dir = tmp_path / "run"
    cfg = _config(repo_root, run_dir, "train.max_steps=30")
    _write_run(run_dir, cfg, steps=30, starts=2)
    prepare_run_dir(cfg, resuming=True)  # a resume appends
    assert not list(run_dir.glob("events.*.jsonl")) and "restarts: 1" in status_report(run_dir)
    prepare_run_dir(cfg, resuming=False)
    assert len(list(run_dir.glob("metrics.*.jsonl"))) == 1
    assert len(list(run_dir.glob("events.*.jsonl"))) == 1
    assert not (run_dir / "events.jsonl").exists() and not (run_dir / "metrics.jsonl").exists()


def test_a_resume_ends_a_line_cut_by_the_kill_and_loses_only_that_record(repo_root, tmp_path):
    """A SIGKILL mid-write leaves the last record cut; the resume gives it its newline before
    appending, so the next start's records stay readable (status counts the restart)."""
    from rnnscale.train.logger import append_event
    from rnnscale.train.run_dir import prepare_run_dir

    run_dir = tmp_path / "run"
    cfg = _config(repo_root, run_dir, "train.max_steps=30")
    _write_run(run_dir, cfg, steps=30, starts=1)
    for name in ("metrics", "events"):
        with open(run_dir / f"{name}.jsonl", "a") as f:
            f.write('{"step": 31, "lo')  # cut by the kill
    prepare_run_dir(cfg, resuming=True)
    append_event(run_dir / "events.jsonl", "start", step=20)
    lines = (run_dir / "events.jsonl").read_text().splitlines()
    assert lines[-2] == '{"step": 31, "lo' and json.loads(lines[-1])["event"] == "start"
    assert (run_dir / "metrics.jsonl").read_text().endswith('{"step": 31, "lo\n')
    assert "restarts: 1" in status_report(run_dir)
    (run_dir / "config.yaml").write_text("x")
    prepare_run_dir(cfg, resuming=True)  # config.yaml rewritten whole; nothing else left
    assert load_config(run_dir / "config.yaml").run_dir == cfg.run_dir
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".")) == []


def test_status_of_a_resumed_run_counts_each_step_once(repo_root, tmp_path):
    """Attempt 1 logs steps 1-30 at 1,024 tokens/s and dies; attempt 2 resumes from the
    checkpoint of step 20 and logs steps 21-45 at 4,096 tokens/s. Steps 21-30 of attempt 1
    (and its eval loss 2.0 at step 30) no longer count."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = _config(repo_root, run_dir, "train.max_steps=100")
    (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    evals = {(1, 10): 4.0, (1, 20): 3.0, (1, 30): 2.0, (2, 30): 3.5, (2, 40): 3.2}
    with open(run_dir / "metrics.jsonl", "w") as f:
        for attempt, steps, seconds in [(1, range(1, 31), 1.0), (2, range(21, 46), 0.25)]:
            for step in steps:
                m = {"step": step, "loss": 5 - step / 20, "tokens": 1024,
                     "tokens_per_s": 1024 / seconds, "step_time_s": seconds}  # fmt: skip
                if (attempt, step) in evals:
                    m["eval_loss"] = evals[attempt, step]
                f.write(json.dumps(m) + "\n")
    t0 = 1_000_000.0
    events = [{"time": t0, "event": "start", "step": 0, "parameters": 123_456},
              {"time": t0 + 40, "event": "checkpoint", "step": 20},
              {"time": t0 + 100, "event": "start", "step": 20, "parameters": 123_456}]  # fmt: skip
    (run_dir / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    os.utime(run_dir / "metrics.jsonl", (t0 + 3725, t0 + 3725))  # its last write

    lines = status_report(run_dir).splitlines()
    assert "step: 45 / 100" in lines
    assert "loss: 2.7500" in lines
    assert "eval loss: 3.2000 (ppl 24.53, step 40)" in lines
    assert "best eval loss: 3.0000 (ppl 20.09, step 20)" in lines  # not attempt 1's 2.0
    # 20 x 1,024 + 25 x 1,024 tokens in 20 x 1 s + 25 x 0.25 s, not the last step's 4,096
    assert "tokens/s: 4,096 over the last 20 logged steps, 1,755 over the run" in lines
    assert "parameters: 123,456" in lines
    assert "elapsed: 1:02:05" in lines  # from the first start to the last write
    assert "ETA: 0:00:14" in lines  # 55 steps x 0.25 s
    assert "restarts: 1" in lines
    # the trainer's end summary counts the evaluations the same way
    assert best_eval(run_dir / "metrics.jsonl") == {"last": 3.2, "best": 3.0, "best_step": 20}
