"""Where a run stands, read from its directory: `rnnscale status RUN_DIR` and `rnnscale dashboard
RUN_DIR` (TensorBoard on <RUN_DIR>/tb). Both only read what the run's Logger and checkpoints
wrote, so they work while the run trains, after it ends, and on a copy of the directory.

    rnnscale status runs/debug_cpu
    rnnscale dashboard runs/debug_cpu --port 6006
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections import deque
from pathlib import Path

import yaml

ETA_WINDOW = 20
"""Records whose mean step_time_s gives the ETA."""


def status_report(run_dir: str | Path) -> str:
    """A few lines: step / max_steps, last loss and eval loss, tokens/s, ETA, last checkpoint,
    restarts. Raises FileNotFoundError when the directory has no metrics.jsonl."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(
            f"{run_dir} has no metrics.jsonl: not a run directory, or the run has not logged a "
            "step yet (rnnscale train writes it under run.dir)"
        )
    recent, last_eval, bad = _read_metrics(metrics)
    if not recent:
        raise FileNotFoundError(f"{metrics} holds no metrics yet: the run has not logged a step")
    last = recent[-1]
    max_steps = _max_steps(run_dir)
    lines = [
        f"run: {run_dir}",
        f"step: {last['step']} / {max_steps if max_steps is not None else '? (no config.yaml)'}",
        f"loss: {_fmt(last.get('loss'), '.4f')}",
        "eval loss: "
        + (
            f"{_fmt(last_eval['eval_loss'], '.4f')} (step {last_eval['step']})"
            if last_eval
            else "none"
        ),
        f"tokens/s: {_fmt(last.get('tokens_per_s'), ',.0f')}",
        f"ETA: {_eta(last['step'], max_steps, recent)}",
        f"last checkpoint: {last_checkpoint(run_dir) or 'none'}",
        f"restarts: {restarts(run_dir)}",
        *failure_lines(run_dir),
    ]
    if bad:
        lines.append(f"({bad} unreadable line(s) of metrics.jsonl skipped)")
    return "\n".join(lines)


def _read_metrics(path: Path) -> tuple[list[dict], dict | None, int]:
    """The last ETA_WINDOW records, the last one with an eval_loss, and how many lines did not
    parse (a line being written when the run died). Streams the file: memory stays flat."""
    recent: deque[dict] = deque(maxlen=ETA_WINDOW)
    last_eval, bad = None, 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if not isinstance(record, dict) or "step" not in record:
                bad += 1
                continue
            recent.append(record)
            if "eval_loss" in record:
                last_eval = record
    return list(recent), last_eval, bad


def _max_steps(run_dir: Path) -> int | None:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    cfg = yaml.safe_load(path.read_text()) or {}
    return cfg.get("train", {}).get("max_steps")


def _eta(step: int, max_steps: int | None, recent: list[dict]) -> str:
    if max_steps is None:
        return "unknown (no config.yaml)"
    if step >= max_steps:
        return "done"
    times = [r["step_time_s"] for r in recent if _number(r.get("step_time_s"))]
    if not times:
        return "unknown (no step_time_s logged)"
    seconds = round((max_steps - step) * statistics.fmean(times))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def last_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoints/step_* directory with the highest step that holds a manifest.json (one
    without it was not finished)."""
    done = []
    for path in (run_dir / "checkpoints").glob("step_*"):
        suffix = path.name[len("step_") :]
        if suffix.isdigit() and (path / "manifest.json").is_file():
            done.append((int(suffix), path))
    return max(done)[1] if done else None


def _events(run_dir: Path) -> list[dict]:
    """The readable records of events.jsonl (none without one)."""
    path, out = run_dir / "events.jsonl", []
    if not path.is_file():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def restarts(run_dir: Path) -> int:
    """Starts recorded in events.jsonl after the first one."""
    return max(sum(e.get("event") == "start" for e in _events(run_dir)) - 1, 0)


def failure_lines(run_dir: Path) -> list[str]:
    """A line for each kind of stop events.jsonl records, when there was one: preemptions
    (with the last one's step and notice), changes of the worker count (launch.min_workers),
    and hangs the watchdog detected (with the ranks it named)."""
    events, lines = _events(run_dir), []
    stops = [e for e in events if e.get("event") == "preempted"
             and "(resize:" not in str(e.get("notice"))]  # fmt: skip
    if stops:
        last = stops[-1]
        lines.append(f"preempted: {len(stops)} time(s), last after step {last.get('step')} "
                     f"({last.get('notice')})")  # fmt: skip
    resizes = [e for e in events if e.get("event") == "resize"]
    if resizes:
        sizes = " -> ".join([str(resizes[0].get("workers_before"))]
                            + [str(e.get("workers")) for e in resizes])  # fmt: skip
        lines.append(f"workers resized: {sizes} ({resizes[-1].get('why')})")
    hangs = [e for e in events if e.get("event") == "hang"]
    if hangs:
        last = hangs[-1]
        lines.append(f"hangs detected: {len(hangs)}, last after step {last.get('step')}: "
                     f"{last.get('behind') or 'no rank named'}")  # fmt: skip
    return lines


def run_dashboard(run_dir: str | Path, host: str = "127.0.0.1", port: int = 6006) -> None:
    """Serve TensorBoard on <run_dir>/tb and block until Ctrl-C. Raises FileNotFoundError when
    there is no tb/ directory, OSError when the port cannot be bound."""
    logdir = Path(run_dir) / "tb"
    if not logdir.is_dir():
        raise FileNotFoundError(
            f"{run_dir} has no tb/ directory: the run did not write TensorBoard events "
            "(log.tensorboard=false, or it has not started)"
        )
    from tensorboard import program

    tb = program.TensorBoard()
    tb.configure(argv=[None, "--logdir", str(logdir), "--port", str(port), "--host", host])
    try:
        url = tb.launch()
    except program.TensorBoardServerException as e:
        raise OSError(f"TensorBoard could not start on {host}:{port}: {e.msg}") from None
    print(f"rnnscale: TensorBoard for {logdir} at {url} (Ctrl-C stops it)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _fmt(v, spec: str) -> str:
    if v is None:
        return "none"
    return format(v, spec) if _number(v) else str(v)
