"""Where runs stand, read from their directories: `rnnscale status RUN_DIR`, `rnnscale dashboard
DIR` (TensorBoard on DIR/tb, or on every run of a folder of runs) and the numbers that
`rnnscale compare` (launch/compare.py) tabulates. All only read what the runs' Logger and
checkpoints wrote, so they work while a run trains, after it ends, and on a copy of the
directory.

    rnnscale status runs/debug_cpu
    rnnscale dashboard runs/debug_cpu --port 6006
    rnnscale dashboard runs              # every runs/*/tb, one named line per run
"""

from __future__ import annotations

import json
import math
import os
import signal
import tempfile
import time
from array import array
from bisect import bisect_left
from dataclasses import dataclass, field
from pathlib import Path

import yaml

WINDOW = 20
"""The last logged steps whose speed is the recent tokens/s and whose step_time_s gives the ETA."""


@dataclass
class History:
    """The records of metrics.jsonl that count, in step order. A resumed or rolled-back run logs
    again the steps after its checkpoint: a record of step s drops every kept record of step
    >= s, so the last record of a step counts and the steps of an abandoned attempt beyond the
    current one go too. Arrays (NaN where a record lacks the number) keep memory small on runs
    of a million logged steps."""

    steps: array = field(default_factory=lambda: array("q"))
    loss: array = field(default_factory=lambda: array("d"))
    seconds: array = field(default_factory=lambda: array("d"))  # step_time_s
    tokens: array = field(default_factory=lambda: array("d"))  # of the step, all ranks
    evals: list[tuple[int, float]] = field(default_factory=list)  # (step, eval_loss)
    last: dict | None = None  # the newest record, whole
    bad: int = 0  # lines that did not parse (one being written when the run died)

    def add(self, record: dict) -> None:
        step = record["step"]
        cut = bisect_left(self.steps, step)
        for column in (self.steps, self.loss, self.seconds, self.tokens):
            del column[cut:]
        while self.evals and self.evals[-1][0] >= step:
            self.evals.pop()
        seconds = _float(record.get("step_time_s"))
        tokens = _float(record.get("tokens"))
        if math.isnan(tokens):  # older records: the speed times the time is the same count
            tokens = _float(record.get("tokens_per_s")) * seconds
        self.steps.append(step)
        self.loss.append(_float(record.get("loss")))
        self.seconds.append(seconds)
        self.tokens.append(tokens)
        if _number(record.get("eval_loss")):
            self.evals.append((step, float(record["eval_loss"])))
        self.last = record

    def tokens_per_s(self, last: int | None = None) -> float | None:
        """Tokens over seconds of the last `last` logged steps (all of them by default) that
        logged both: the steps' own speed, without startup, evaluation, checkpoint stalls or
        the time between a stop and its restart."""
        start = 0 if last is None else max(len(self.steps) - last, 0)
        pairs = [(n, t) for n, t in zip(self.tokens[start:], self.seconds[start:])
                 if math.isfinite(n) and math.isfinite(t)]  # fmt: skip
        seconds = sum(t for _, t in pairs)
        return sum(n for n, _ in pairs) / seconds if seconds > 0 else None


def read_history(path: Path) -> History:
    """metrics.jsonl streamed into a History (memory stays small)."""
    history = History()
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                history.bad += 1
                continue
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                history.bad += 1
                continue
            history.add(record)
    return history


@dataclass
class RunSummary:
    """One run as `rnnscale status` and `rnnscale compare` show it."""

    run_dir: Path
    config: dict  # config.yaml as the run wrote it; {} without one
    history: History
    events: list[dict]  # the readable records of events.jsonl

    @property
    def step(self) -> int:
        return self.history.steps[-1]

    @property
    def max_steps(self) -> int | None:
        return self.config.get("train", {}).get("max_steps")

    @property
    def parameters(self) -> int | None:
        """The model's parameter count from the newest `start` event that carries it."""
        counts = [e["parameters"] for e in self.events
                  if e.get("event") == "start" and _number(e.get("parameters"))]  # fmt: skip
        return int(counts[-1]) if counts else None

    @property
    def elapsed_s(self) -> float | None:
        """Wall time from the first `start` event to the run's last write (its newest event or
        metrics.jsonl's modification time): stops between restarts count, a finished run's
        clock stops. None without a start event."""
        starts = [e["time"] for e in self.events
                  if e.get("event") == "start" and _number(e.get("time"))]  # fmt: skip
        if not starts:
            return None
        times = [e["time"] for e in self.events if _number(e.get("time"))]
        last_write = max([*times, os.path.getmtime(self.run_dir / "metrics.jsonl")])
        return max(last_write - starts[0], 0.0)

    @property
    def last_eval(self) -> tuple[int, float] | None:
        return self.history.evals[-1] if self.history.evals else None

    @property
    def best_eval(self) -> tuple[int, float] | None:
        return min(self.history.evals, key=lambda e: e[1]) if self.history.evals else None

    def starts(self) -> tuple[int, int]:
        """(restarts, continuations) from events.jsonl. A restart is a start that continues a
        start which did not end (no `done` event between them): a kill, a failure, a
        preemption. A start after a `done` (the run continued with a larger train.max_steps)
        is a continuation, no restart."""
        restarts = continued = 0
        running = finished = False
        for e in self.events:
            if e.get("event") == "start":
                restarts += running
                continued += finished and not running
                running = True
            elif e.get("event") == "done":
                running, finished = False, True
        return restarts, continued

    def eta(self) -> str:
        """The remaining steps times the mean step_time_s of the last WINDOW logged steps."""
        if self.max_steps is None:
            return "unknown (no config.yaml)"
        if self.step >= self.max_steps:
            return "done"
        times = [t for t in self.history.seconds[-WINDOW:] if math.isfinite(t)]
        if not times:
            return "unknown (no step_time_s logged)"
        return clock((self.max_steps - self.step) * sum(times) / len(times))


def summarize(run_dir: str | Path) -> RunSummary:
    """Read a run directory. Raises FileNotFoundError when it has no metrics.jsonl, or one
    without a step in it."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(
            f"{run_dir} has no metrics.jsonl: not a run directory, or the run has not logged a "
            "step yet (rnnscale train writes it under run.dir)"
        )
    history = read_history(metrics)
    if history.last is None:
        raise FileNotFoundError(f"{metrics} holds no metrics yet: the run has not logged a step")
    path = run_dir / "config.yaml"
    config = (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}
    return RunSummary(run_dir, config, history, _events(run_dir))


def status_report(run_dir: str | Path) -> str:
    """A few lines: step / max_steps, last loss, last and best eval loss with perplexity,
    tokens/s (recent and over the run), parameters, elapsed, ETA, last checkpoint, restarts
    and the stops events.jsonl records. Raises FileNotFoundError as `summarize` does."""
    run = summarize(run_dir)
    last, max_steps = run.history.last, run.max_steps
    recent, mean = run.history.tokens_per_s(WINDOW), run.history.tokens_per_s()
    count = min(len(run.history.steps), WINDOW)
    elapsed, parameters = run.elapsed_s, run.parameters
    restarts, continued = run.starts()
    parameters = f"{parameters:,}" if parameters is not None else "unknown (an older run)"
    lines = [
        f"run: {run.run_dir}",
        f"step: {run.step} / {max_steps if max_steps is not None else '? (no config.yaml)'}",
        f"loss: {_fmt(last.get('loss'), '.4f')}",
        f"eval loss: {eval_text(run.last_eval) if run.last_eval else 'none'}",
        *([f"best eval loss: {eval_text(run.best_eval)}"] if run.best_eval else []),
        f"tokens/s: {_fmt(recent, ',.0f')} over the last {count} logged steps, "
        f"{_fmt(mean, ',.0f')} over the run",
        f"parameters: {parameters}",
        f"elapsed: {clock(elapsed) if elapsed is not None else 'unknown (no start event)'}",
        f"ETA: {run.eta()}",
        f"last checkpoint: {last_checkpoint(run.run_dir) or 'none'}",
        f"restarts: {restarts}",
        *(
            [f"continued after finishing: {continued} time(s) (train.max_steps raised)"]
            if continued
            else []
        ),  # fmt: skip
        *failure_lines(run.run_dir),
    ]
    if run.history.bad:
        lines.append(f"({run.history.bad} unreadable line(s) of metrics.jsonl skipped)")
    return "\n".join(lines)


def eval_text(evaluation: tuple[int, float]) -> str:
    """(step, eval_loss) -> '4.2054 (ppl 67.04, step 20)'."""
    step, loss = evaluation
    return f"{loss:.4f} (ppl {perplexity(loss):,.2f}, step {step})"


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


def clock(seconds: float) -> str:
    """Seconds as H:MM:SS."""
    s = round(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


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


def dashboard_runs(path: str | Path) -> list[tuple[str, Path]]:
    """(name, tb directory) of each run `rnnscale dashboard PATH` serves: PATH itself when it
    has a tb/ (named after PATH), else every immediate subdirectory with a tb/, by name.
    Raises FileNotFoundError when there is no run."""
    path = Path(path)
    if (path / "tb").is_dir():
        return [(path.resolve().name, path / "tb")]
    subdirs = sorted(path.iterdir()) if path.is_dir() else []
    runs = [(d.name, d / "tb") for d in subdirs if (d / "tb").is_dir()]
    if not runs:
        raise FileNotFoundError(
            f"{path} has no tb/ directory, nor has any of its subdirectories: not a run that "
            "wrote TensorBoard events (log.tensorboard=false, or it has not started), nor a "
            "folder of such runs"
        )
    return runs


def link_runs(runs: list[tuple[str, Path]], view: Path) -> None:
    """A symlink per run in `view`, named after the run, to its tb/. TensorBoard's --logdir on
    `view` shows each run as one line named after it; --logdir_spec would name it 'name/.',
    and --logdir on the folder 'name/tb'."""
    for name, tb in runs:
        (view / name).symlink_to(tb.resolve(), target_is_directory=True)


def run_dashboard(path: str | Path, host: str = "127.0.0.1", port: int = 6006) -> None:
    """Serve TensorBoard on a run's tb/, or on every run of a folder of runs, and block until
    Ctrl-C. Raises FileNotFoundError as `dashboard_runs` does, OSError when the port cannot be
    bound."""
    runs = dashboard_runs(path)
    from tensorboard import program

    with tempfile.TemporaryDirectory(prefix="rnnscale-dashboard-") as view:
        link_runs(runs, Path(view))
        tb = program.TensorBoard()
        tb.configure(argv=[None, "--logdir", view, "--port", str(port), "--host", host])
        try:
            url = tb.launch()
        except program.TensorBoardServerException as e:
            raise OSError(f"TensorBoard could not start on {host}:{port}: {e.msg}") from None
        for name, tb_dir in runs:
            print(f"rnnscale: run {name}: {tb_dir}", flush=True)
        print(f"rnnscale: TensorBoard for {len(runs)} run(s) at {url} (Ctrl-C stops it)",
              flush=True)  # fmt: skip
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` too removes the links
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _float(v) -> float:
    """A logged number as a float; NaN for anything else (missing, "nan" written as text)."""
    return float(v) if _number(v) else math.nan


def _fmt(v, spec: str) -> str:
    if v is None:
        return "none"
    return format(v, spec) if _number(v) else str(v)
