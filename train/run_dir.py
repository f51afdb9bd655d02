"""The run directory: made (and an earlier run's logs kept aside) at the start, and the
closing lines that say where everything is."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from rnnscale.train.config import ConfigError, RunConfig, dump_yaml
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
    (run_dir / "config.yaml").write_text(dump_yaml(cfg))
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


def done_message(run_dir: Path, steps: int, loss: float) -> str:
    hint = '--prompt "def "' if (run_dir / "tokenizer.model").exists() else "--prompt-ids 1"
    return (
        f"done: {steps} steps, final loss {loss:.4f}\n"
        f"run directory: {run_dir.resolve()} (config.yaml, metrics.jsonl, tb/, "
        f"model.safetensors)\n"
        f"dashboard: rnnscale dashboard {run_dir}\n"
        f"sample from it: rnnscale generate {run_dir} {hint}"
    )
