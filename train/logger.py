"""One Logger with sinks (DESIGN.md section 8): metrics.jsonl always, then a console progress
bar, TensorBoard event files and wandb as the config asks.

    logger = Logger.for_rank(rank, cfg, run_dir, initial_step=step)
    logger.event("start", step=step, world_size=world_size)
    logger.log(step, {"loss": 3.2, "lr": 3e-4, ...})
    logger.close()

Only rank 0 writes; every other rank gets a Logger with no sinks, so callers never branch.
TensorBoard and wandb are imported only when a run turns them on.
"""

from __future__ import annotations

import json
import math
import netrc
import os
import re
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

from tqdm import tqdm

from rnnscale.train.config import ConfigError, RunConfig, to_dict
from rnnscale.train.notice import notice


class JsonlSink:
    """One JSON object per logged step in <run.dir>/metrics.jsonl, flushed at once."""

    def __init__(self, path: Path):
        self.file = open(path, "a", encoding="utf-8")

    def write(self, step: int, metrics: dict) -> None:
        # strict JSON has no NaN/Infinity: write non-finite numbers as strings ("nan", "inf")
        clean = {k: v if _finite(v) else str(v) for k, v in metrics.items()}
        self.file.write(json.dumps({"step": step, **clean}) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


_BAR = {
    "loss": ("loss", ".4f"),
    "eval_loss": ("eval_loss", ".4f"),
    "tokens_per_s": ("tok_s", ".0f"),
}
"""Metrics shown beside the progress bar: name -> (label, format)."""


class ConsoleSink:
    """A tqdm progress bar: step / total, loss, tokens/s and ETA (tqdm's, from the steps done
    since `initial`, so a resumed run does not count the steps it skipped as instant)."""

    def __init__(self, total_steps: int, initial: int = 0):
        self.bar = tqdm(total=total_steps, initial=initial, desc="train", unit="step")

    def write(self, step: int, metrics: dict) -> None:
        self.bar.n = step
        postfix = {label: format(metrics[k], f) for k, (label, f) in _BAR.items() if k in metrics}
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


class LineProgress:
    """The progress display where output is not a terminal (a log file, a batch job): a line
    at each tenth of the run, at least every `every_s` seconds, and at the last step, instead
    of a bar redrawn with carriage returns."""

    def __init__(self, total_steps: int, initial: int = 0, every_s: float = 60.0):
        self.total, self.initial, self.every_s = total_steps, initial, every_s
        self.start = self.last = time.monotonic()
        self.tenth = initial * 10 // max(total_steps, 1)

    def write(self, step: int, metrics: dict) -> None:
        now, tenth = time.monotonic(), step * 10 // max(self.total, 1)
        if tenth == self.tenth and now - self.last < self.every_s and step != self.total:
            return
        self.tenth, self.last = tenth, now
        done = step - self.initial
        eta = (now - self.start) / done * (self.total - step) if done > 0 else 0.0
        parts = [f"step {step}/{self.total}"]
        if isinstance(metrics.get("loss"), float):
            parts.append(f"loss {metrics['loss']:.4f}")
        if isinstance(metrics.get("tokens_per_s"), float):
            parts.append(f"{metrics['tokens_per_s']:,.0f} tokens/s")
        parts.append(f"ETA {int(eta) // 60}:{int(eta) % 60:02d}")
        notice("  ".join(parts))

    def close(self) -> None:
        pass


class TensorBoardSink:
    """Scalars in event files under <run dir>/tb: `train/<name>`, and `eval/<name>` for the
    eval_ metrics (eval_loss -> eval/loss). Flushed after every step so a dashboard is live."""

    def __init__(self, log_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ConfigError(
                f"log.tensorboard: TensorBoard is not installed ({e}): pip install tensorboard, "
                "or set log.tensorboard=false"
            ) from None
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def write(self, step: int, metrics: dict) -> None:
        for name, value in metrics.items():
            if _number(value) and math.isfinite(value):
                self.writer.add_scalar(tensorboard_tag(name), value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def tensorboard_tag(name: str) -> str:
    """eval_loss -> eval/loss, everything else -> train/<name>."""
    return f"eval/{name[len('eval_') :]}" if name.startswith("eval_") else f"train/{name}"


class WandbSink:
    """A wandb run whose id is the run name, so every restart continues the same run.

    wandb must never stop training: a failed start or a failed log is reported once on stderr
    and the run goes on without wandb (metrics.jsonl has every number)."""

    def __init__(self, cfg: RunConfig, run_dir: Path):
        try:
            import wandb
        except ImportError as e:
            raise ConfigError(
                f"log.wandb.mode: wandb is not installed ({e}): pip install wandb, or set "
                "log.wandb.mode=disabled"
            ) from None
        self.run = None
        try:
            self.run = wandb.init(
                project=cfg.log.wandb.project,
                entity=cfg.log.wandb.entity or None,
                name=cfg.run.name,
                id=wandb_run_id(cfg.run.name),
                resume="allow",
                dir=str(run_dir),
                mode=cfg.log.wandb.mode,
                config=to_dict(cfg),
                settings=wandb.Settings(silent=True),
            )
            # the x axis is our step, logged as a metric: a resumed or rolled-back run logs
            # steps again, which wandb's own step (only ever increasing) would drop
            self.run.define_metric("step")
            self.run.define_metric("*", step_metric="step")
        except Exception as e:  # any wandb failure, by the contract above
            _warn(f"wandb did not start ({type(e).__name__}: {e}); training goes on without it")

    def write(self, step: int, metrics: dict) -> None:
        if self.run is None:
            return
        try:
            self.run.log({**{k: v for k, v in metrics.items() if _number(v)}, "step": step})
        except Exception as e:
            _warn(f"wandb log failed ({type(e).__name__}: {e}); no more metrics go to wandb")
            self.close()

    def close(self) -> None:
        run, self.run = self.run, None
        if run is None:
            return
        try:
            run.finish()
        except Exception as e:
            _warn(f"wandb finish failed ({type(e).__name__}: {e})")


def wandb_run_id(name: str) -> str:
    """The run name with every character outside [A-Za-z0-9_-] replaced by '-'."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", name)


def wandb_enabled(cfg: RunConfig) -> bool:
    """log.wandb.mode is not disabled, and WANDB_MODE=disabled is not set in the environment
    (an explicit mode would otherwise win over it; the test suite relies on the variable)."""
    return cfg.log.wandb.mode != "disabled" and os.environ.get("WANDB_MODE") != "disabled"


def check_wandb_credentials(cfg: RunConfig) -> None:
    """Online mode needs an API key; without one wandb would prompt or fail mid-start."""
    if not wandb_enabled(cfg) or cfg.log.wandb.mode != "online":
        return
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return
    host = urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).netloc
    path = Path(os.environ.get("NETRC", "~/.netrc")).expanduser()
    try:
        if path.is_file() and netrc.netrc(path).authenticators(host):
            return
    except (netrc.NetrcParseError, OSError):
        pass
    raise ConfigError(
        f"log.wandb.mode: online needs a wandb API key, and there is none (no WANDB_API_KEY, no "
        f"entry for {host} in {path}): set WANDB_API_KEY (or run `wandb login`), or use "
        "log.wandb.mode=offline and upload later with `wandb sync`"
    )


class Logger:
    def __init__(self, sinks: list, events_path: Path | None = None):
        self.sinks = sinks
        self.events_path = events_path

    @classmethod
    def for_rank(cls, rank: int, cfg: RunConfig, run_dir: Path, initial_step: int = 0) -> Logger:
        """Rank 0: metrics.jsonl, and the progress bar, TensorBoard and wandb sinks that
        `cfg.log` turns on; any other rank: a Logger that does nothing. Raises ConfigError for
        log.wandb.mode=online without credentials, before anything is opened."""
        if rank != 0:
            return cls([])
        run_dir = Path(run_dir)
        check_wandb_credentials(cfg)
        sinks: list = [JsonlSink(run_dir / "metrics.jsonl")]
        if cfg.log.tensorboard:
            sinks.append(TensorBoardSink(run_dir / "tb"))
        if wandb_enabled(cfg):
            sinks.append(WandbSink(cfg, run_dir))
        if cfg.log.progress_bar:  # last: its clock (the ETA) starts after wandb's slow start
            # a bar redrawn in place on a terminal; periodic lines in a log file or a job's output
            bar = ConsoleSink if sys.stderr.isatty() else LineProgress
            sinks.append(bar(cfg.train.max_steps, initial=initial_step))
        return cls(sinks, events_path=run_dir / "events.jsonl")

    def log(self, step: int, metrics: dict) -> None:
        for sink in self.sinks:
            sink.write(step, metrics)

    def event(self, name: str, **fields) -> None:
        """Append {"time", "event": name, **fields} to <run dir>/events.jsonl (rank 0 only):
        starts of the run, checkpoints; `rnnscale status` reads them."""
        if self.events_path is not None:
            append_event(self.events_path, name, **fields)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def append_event(events_file: Path, name: str, /, **fields) -> None:
    """One line {"time", "event": name, **fields} appended to an events.jsonl (the run's rank 0,
    or the Ray driver: a line is one write, whole). Positional-only: any field name (`path`)
    may be a field."""
    with open(events_file, "a", encoding="utf-8") as f:
        f.write(json.dumps({"time": time.time(), "event": name, **fields}, default=str) + "\n")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _finite(v) -> bool:
    return not isinstance(v, float) or math.isfinite(v)


def _warn(message: str) -> None:
    notice(message, warning=True)
