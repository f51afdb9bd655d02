"""The run directory: made (and an earlier run's logs kept aside) at the start, and the
closing lines that say where everything is."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from rnnscale.train.config import ConfigError, RunConfig, dump_yaml
from rnnscale.train.files import end_torn_line, write_atomic
from rnnscale.train.notice import notice


def prepare_run_dir(cfg: RunConfig, resuming: bool = False) -> Path:
    """Create the run directory and save the resolved config.yaml in it. A new run (nothing to
    resume) in a used directory keeps the old metrics.jsonl and events.jsonl beside as
    metrics.<time>.jsonl and events.<time>.jsonl (so its starts are not counted as this run's
    restarts); a resumed run appends to them (steps after the checkpoint are logged again: the
    last record of a step is the one that counts)."""
    run_dir = cfg.run_dir
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test.{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"run.dir {run_dir}: cannot write there ({e.strerror}): choose a "
                          f"writable run.dir or fix its permissions") from e  # fmt: skip
    stamp = f"{time.strftime('%Y%m%d-%H%M%S')}.{os.getpid()}"
    for name in ("metrics", "events"):
        old = run_dir / f"{name}.jsonl"
        if old.exists() and not resuming:
            kept = run_dir / f"{name}.{stamp}.jsonl"
            old.rename(kept)
            notice(f"{run_dir} held an earlier run; its {name} are now in {kept.name}")
    if resuming:  # a line cut by the kill that stopped the last start ends here, on its own
        for name in ("metrics", "events"):
            end_torn_line(run_dir / f"{name}.jsonl")
    write_atomic(run_dir / "config.yaml", dump_yaml(cfg))  # `rnnscale status` may read it now
    return run_dir


def last_logged_loss(run_dir: Path) -> float:
    """The loss of the last step in metrics.jsonl (nan when none was logged)."""
    path, loss = run_dir / "metrics.jsonl", float("nan")
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                loss = json.loads(line).get("loss", loss)
            except ValueError:  # a line torn by a kill: the message only, nothing is lost
                continue
    return loss


def finished_message(cfg: RunConfig) -> str | None:
    """What to say instead of training when the run in cfg.run_dir is finished: its last event
    is `done` at train.max_steps or beyond and model.safetensors is there (a run killed while
    exporting has no `done`: it resumes and exports). None: there is work to do. Only with
    checkpoint.resume=auto: a named checkpoint or `none` asks for a run."""
    if cfg.checkpoint.resume != "auto" or not (cfg.run_dir / "model.safetensors").is_file():
        return None
    last = last_event(cfg.run_dir / "events.jsonl")
    if last.get("event") != "done" or int(last.get("step", -1)) < cfg.train.max_steps:
        return None
    return (
        f"run {cfg.run.name} in {cfg.run_dir} is finished (step {last['step']}, train.max_steps="
        f"{cfg.train.max_steps}, model.safetensors written): nothing to do. Raise "
        f"train.max_steps to train on, or set checkpoint.resume=none to start over in this "
        f"directory"
    )


def last_event(events_file: Path) -> dict:
    """The last readable record of an events.jsonl ({} without one)."""
    last = {}
    if events_file.is_file():
        for line in events_file.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:  # a line torn by a kill
                continue
            last = record if isinstance(record, dict) else last
    return last
