"""What a person watching a run reads (rank 0): a short start banner, a line per evaluation and
checkpoint (said where they happen), the progress display, and an end summary. Everything else
stays in files: the full config in config.yaml, the metrics in metrics.jsonl, and the notices
of DeepSpeed and torch (warning level and below) in <run.dir>/logs/rank_<N>.log.

    quiet = LibraryNotices.start()      # before DeepSpeed is imported
    quiet.to_file(run_dir, rank)        # once the run holds its directory
    notice(start_banner(cfg, facts))
    ...                                 # training
    notice(end_summary(cfg, summary, prompt_hint(...)))
    quiet.stop()
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from rnnscale.train.config import RunConfig
from rnnscale.train.logger import wandb_enabled

LIBRARY_LOGGERS = ("DeepSpeed", "torch", "py.warnings")
"""Loggers whose records at warning level and below go to the rank's log file, not the console
(errors still reach the console)."""


@dataclass
class StartFacts:
    """What the banner says that the config alone does not."""

    layer_types: list[str]
    parameters: int
    world: int
    sequence_parallel: int
    threads: int
    threads_why: str
    resumed_from: Path | None


def start_banner(cfg: RunConfig, facts: StartFacts) -> str:
    """Five lines: the run, the model, the data, the parallel layout, what it writes."""
    t, d = cfg.train, cfg.data
    tokens = t.global_batch_size * t.seq_len
    start = f"resuming from {facts.resumed_from.name}" if facts.resumed_from else "a new run"
    if d.source == "mds":
        paths = ", ".join(s.path for s in d.streams)
        data = f"mds shards {paths}" + (f" (validation: {len(d.val_streams)} set(s))"
                                        if d.val_streams else "")  # fmt: skip
    else:
        data = "synthetic documents"
    dp = facts.world // facts.sequence_parallel
    sinks = ["metrics.jsonl", *(["tb/"] if cfg.log.tensorboard else []),
             *([f"wandb ({cfg.log.wandb.mode})"] if wandb_enabled(cfg) else [])]  # fmt: skip
    every = cfg.checkpoint.interval
    saves = f"checkpoints every {every} steps" if every else "checkpoints by time/at the end"
    return "\n".join([
        f"run {cfg.run.name}: {start} in {cfg.run_dir.resolve()}",
        f"  model: {len(facts.layer_types)} layers {_pattern(facts.layer_types)}, d_model "
        f"{cfg.model.d_model}, {facts.parameters:,} parameters",
        f"  data: {data}; {t.max_steps} steps of {t.global_batch_size} rows x {t.seq_len} "
        f"tokens ({tokens:,} tokens/step)",
        f"  parallel: {facts.world} rank(s) = {dp} data x {facts.sequence_parallel} sequence, "
        f"ZeRO {cfg.parallel.zero_stage}, {cfg.parallel.dtype}, {facts.threads} thread(s) per "
        f"rank ({facts.threads_why})",
        f"  writes: config.yaml (the full config), {', '.join(sinks)}, {saves}, logs/",
    ])  # fmt: skip


def _pattern(layer_types: list[str]) -> str:
    """[gla x3, attn] style: runs of one mixer folded."""
    runs: list[list] = []
    for name in layer_types:
        if runs and runs[-1][0] == name:
            runs[-1][1] += 1
        else:
            runs.append([name, 1])
    return "[" + ", ".join(n if k == 1 else f"{n} x{k}" for n, k in runs) + "]"


def eval_line(step: int, metrics: dict) -> str:
    tokens = metrics.get("eval_tokens")
    count = f" over {int(tokens):,} tokens" if tokens else ""
    suites = "".join(f", {name.removeprefix('eval_')} {metrics[name]:.3f}" for name in
                     ("eval_recall_acc", "eval_loss_beyond_train_len", "eval_passkey_acc")
                     if name in metrics)  # fmt: skip
    return (f"eval at step {step}: loss {metrics['eval_loss']:.4f}, perplexity "
            f"{metrics['eval_ppl']:.2f}{count}{suites}")  # fmt: skip


def end_summary(cfg: RunConfig, summary: dict, prompt_hint: str) -> str:
    """The closing lines: losses, tokens, time, checkpoints, and the commands to go on with."""
    run_dir = cfg.run_dir
    best = best_eval(run_dir / "metrics.jsonl")
    lines = [f"done: {summary['steps']} steps, final train loss {summary['loss']:.4f}"]
    if best is not None:
        lines.append(f"  eval: last loss {best['last']:.4f} (perplexity {_ppl(best['last'])}), "
                     f"best {best['best']:.4f} at step {best['best_step']} "
                     f"(perplexity {_ppl(best['best'])})")  # fmt: skip
    minutes = summary["seconds"] / 60
    lines.append(f"  {summary['tokens_seen']:,} tokens trained on; this process ran "
                 f"{minutes:.1f} min")  # fmt: skip
    ckpts = sorted((cfg.checkpoint_dir).glob("step_*/manifest.json"))
    if ckpts:
        lines.append(f"  checkpoints: {len(ckpts)} kept, newest {ckpts[-1].parent}")
    lines += [
        f"  run directory: {run_dir.resolve()} (model.safetensors, config.yaml, metrics.jsonl)",
        f"  sample:    rnnscale generate {run_dir} {prompt_hint}",
        f"  status:    rnnscale status {run_dir}",
    ]
    if cfg.log.tensorboard:
        lines.append(f"  dashboard: rnnscale dashboard {run_dir}")
    if wandb_enabled(cfg) and cfg.log.wandb.mode == "offline":
        lines.append(f"  wandb:     wandb sync {run_dir}/wandb/offline-run-*")
    return "\n".join(lines)


def _ppl(loss: float) -> str:
    return f"{math.exp(min(loss, 700.0)):.2f}"


def best_eval(metrics_file: Path) -> dict | None:
    """{'last', 'best', 'best_step'} of eval_loss in a metrics.jsonl, or None without one. A
    resumed run logs again the steps after its checkpoint: a record of step s drops the
    evaluations of steps >= s before it (as `rnnscale status` counts them), so an abandoned
    attempt's evaluations do not count."""
    evals: list[tuple[int, float]] = []
    with contextlib.suppress(OSError):
        for line in metrics_file.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            step = record.get("step") if isinstance(record, dict) else None
            if not isinstance(step, int):
                continue
            while evals and evals[-1][0] >= step:
                evals.pop()
            loss = record.get("eval_loss")
            if isinstance(loss, (int, float)) and math.isfinite(loss):
                evals.append((step, loss))
    if not evals:
        return None
    best_step, best = min(evals, key=lambda e: e[1])
    return {"last": evals[-1][1], "best": best, "best_step": best_step}


def prompt_hint(tokenizer_file: Path, first_ids: list[int]) -> str:
    """The generate arguments to suggest: the first words of the data the run saw, decoded with
    its tokenizer (--prompt), or the first token ids when it trained on ids (--prompt-ids)."""
    ids = [int(i) for i in first_ids[:8]]
    if not tokenizer_file.is_file():
        return f"--prompt-ids '{' '.join(str(i) for i in ids[:4]) or '1'}'"
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_file))
    ids = [i for i in ids if i not in (sp.bos_id(), sp.eos_id(), sp.pad_id())]
    text = sp.decode(ids).strip().splitlines()
    words = (text[0] if text else "").split()
    text = " ".join(words[:-1] if len(words) > 1 else words)[:40]  # the last may be cut
    if not text:
        return "--prompt-ids 1"
    return "--prompt " + shlex.quote(text)


def first_ids(cfg: RunConfig, val_batches: list[dict]) -> list[int]:
    """A few token ids the run trained or evaluated on, for the sample prompt: the first
    validation row, else the first document of the first local shard stream; [] when neither
    is at hand (synthetic data without validation, a remote stream)."""
    if val_batches:
        return [int(i) for i in val_batches[0]["input_ids"].reshape(-1)[:8]]
    if cfg.data.source != "mds" or "://" in cfg.data.streams[0].path:
        return []
    path = Path(cfg.data.streams[0].path)
    with contextlib.suppress(Exception):  # a hint only: an unreadable shard is found elsewhere
        from streaming.base.format import reader_from_json

        shard = json.loads((path / "index.json").read_text())["shards"][0]
        tokens = reader_from_json(str(path), None, shard).get_item(0)["tokens"]
        return [int(i) for i in tokens[:8]]
    return []


class LibraryNotices(logging.Filter):
    """DeepSpeed's and torch's log records and Python warnings below error level, kept out of
    the console: held from `start()` (before DeepSpeed is imported: it speaks at import) until
    `to_file` names the rank's log file, then written there; errors still print.

    A filter, not a handler swap: DeepSpeed adds its console handler when it is imported, after
    this starts; a filter on its logger sees each record before any handler does, and one on
    torch's console handlers sees the records of torch's child loggers."""

    def __init__(self):
        super().__init__()
        self.held: list[logging.LogRecord] = []
        self.file: logging.Handler | None = None
        self.places: list = []

    @classmethod
    def start(cls) -> LibraryNotices:
        self = cls()
        for name in LIBRARY_LOGGERS:
            logger = logging.getLogger(name)
            # torch's console handler is its own class, not a StreamHandler
            self.places += [logger, *(h for h in logger.handlers
                                      if not isinstance(h, logging.FileHandler))]  # fmt: skip
        for place in self.places:
            place.addFilter(self)
        logging.captureWarnings(True)
        return self

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "rnnscale_kept", False):  # once, however many places see it
            record.rnnscale_kept = True
            self.file.handle(record) if self.file is not None else self.held.append(record)
        return record.levelno >= logging.ERROR  # errors print as well

    def keep_printed(self, name: str, text: str) -> None:
        """Lines a library printed (captured by the caller) kept as its INFO records."""
        for line in text.splitlines():  # past the logger's level: it may be above INFO
            if line.strip():
                self.filter(logging.LogRecord(name, logging.INFO, "", 0, line, None, None))

    def to_file(self, run_dir: Path, rank: int) -> None:
        """From now on into <run_dir>/logs/rank_<rank>.log, the held records first."""
        try:
            (run_dir / "logs").mkdir(parents=True, exist_ok=True)
            self.file = logging.FileHandler(run_dir / "logs" / f"rank_{rank}.log",
                                            encoding="utf-8")  # fmt: skip
        except OSError:  # a rank on a node without the run directory: they stay quiet
            self.file = logging.NullHandler()
        self.file.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        for record in self.held:
            self.file.handle(record)
        self.held = []

    def stop(self) -> None:
        logging.captureWarnings(False)
        for place in self.places:
            place.removeFilter(self)
        if self.file is not None:
            self.file.close()


TRACKER_QUIET = "ignore:resource_tracker:UserWarning"


def quiet_shared_memory_tracker() -> None:
    """After a kill -9, Python's resource tracker (a process of its own, started with the first
    shared memory: streaming's) frees the shared memory the killed run left and warns "There
    appear to be N leaked shared_memory objects" on the terminal, where it reads as a fault of
    the next start. The freeing is what should happen; the warning is noise. The tracker takes
    its warning filters from this process's -W options when it starts: add ours before."""
    if TRACKER_QUIET not in sys.warnoptions:
        sys.warnoptions.append(TRACKER_QUIET)
