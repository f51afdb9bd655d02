"""`rnnscale compare RUN RUN ...`: the final numbers of several runs side by side, and their loss
curves in one PNG. Reads only the run directories (through `monitor.summarize`), like
`rnnscale status`, so it works while runs train.

    rnnscale compare runs/gla runs/mamba2 --out compare.png
    rnnscale compare runs                    # every run of a folder of runs
"""

from __future__ import annotations

from pathlib import Path

from rnnscale.launch.monitor import RunSummary, clock, perplexity, summarize

COLUMNS = ["run", "mixers", "layers", "parameters", "steps", "loss", "eval loss", "eval ppl",
           "best eval", "best ppl", "tokens/s", "elapsed"]  # fmt: skip
LEFT = {"run", "mixers"}
"""Columns aligned left; numbers align right."""


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Each path is a run directory (it has a metrics.jsonl) or a folder of runs (its immediate
    subdirectories that have one, by name). Raises FileNotFoundError naming the first path that
    is neither."""
    runs: list[Path] = []
    for path in map(Path, paths):
        if (path / "metrics.jsonl").is_file():
            runs.append(path)
            continue
        inner = sorted(d for d in path.iterdir() if (d / "metrics.jsonl").is_file()) \
            if path.is_dir() else []  # fmt: skip
        if not inner:
            raise FileNotFoundError(
                f"{path} is not a run directory (no metrics.jsonl) nor a folder of runs (no "
                "subdirectory has one): pass run directories, i.e. the run.dir of each run"
            )
        runs.extend(inner)
    return runs


def run_names(runs: list[RunSummary]) -> list[str]:
    """Each run's directory name; the path as given where two runs share a name."""
    names = [r.run_dir.name for r in runs]
    return [str(r.run_dir) if names.count(n) > 1 else n for r, n in zip(runs, names)]


def table(runs: list[RunSummary]) -> str:
    """One row per run under the COLUMNS header, '-' where a run has no such number."""
    rows = [COLUMNS] + [_row(name, run) for name, run in zip(run_names(runs), runs)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = []
    for row in rows:
        cells = [cell.ljust(w) if col in LEFT else cell.rjust(w)
                 for col, cell, w in zip(COLUMNS, row, widths)]  # fmt: skip
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _row(name: str, run: RunSummary) -> list[str]:
    model = run.config.get("model", {})
    pattern = model.get("mixer_pattern")
    loss = run.history.last.get("loss")
    tokens_per_s, elapsed = run.history.tokens_per_s(), run.elapsed_s
    last, best = run.last_eval, run.best_eval
    return [
        name,
        ",".join(map(str, pattern)) if isinstance(pattern, list) else "-",
        str(model.get("num_layers", "-")),
        f"{run.parameters:,}" if run.parameters is not None else "-",
        str(run.step),
        f"{loss:.4f}" if isinstance(loss, (int, float)) else str(loss or "-"),  # "nan": text
        f"{last[1]:.4f}" if last else "-",
        f"{perplexity(last[1]):,.2f}" if last else "-",
        f"{best[1]:.4f}" if best else "-",
        f"{perplexity(best[1]):,.2f}" if best else "-",
        f"{tokens_per_s:,.0f}" if tokens_per_s is not None else "-",
        clock(elapsed) if elapsed is not None else "-",
    ]


def plot_losses(runs: list[RunSummary], out: str | Path) -> Path:
    """Train loss (left) and eval loss (right) against the step, one color per run, as a PNG.
    Raises ImportError with what to install when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(
            "rnnscale compare draws its PNG with matplotlib, which is not installed: "
            "pip install matplotlib"
        ) from None
    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    # fixed margins: a constrained layout takes longer than drawing the curves
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.12, top=0.92, wspace=0.22)
    train, evals = fig.subplots(1, 2)
    for i, (name, run) in enumerate(zip(run_names(runs), runs)):
        color = f"C{i % 10}"
        train.plot(run.history.steps, run.history.loss, color=color, lw=1.2, label=name)
        if run.history.evals:
            steps, losses = zip(*run.history.evals)
            evals.plot(steps, losses, color=color, marker="o", ms=4, lw=1.2, label=name)
    for ax, title in ((train, "train loss"), (evals, "eval loss")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel("nats per token")
        ax.grid(alpha=0.3)
    train.legend(fontsize="small")
    if not any(run.history.evals for run in runs):
        evals.text(0.5, 0.5, "no evaluations\n(train.eval_interval=0)", ha="center",
                   va="center", transform=evals.transAxes)  # fmt: skip
    else:
        evals.legend(fontsize="small")
    out = Path(out)
    fig.savefig(out)
    return out


def compare(paths: list[str | Path], out: str | Path) -> str:
    """The table of the runs under `paths` (see find_runs), and a line naming the PNG of their
    loss curves written to `out`. Raises FileNotFoundError for a path that holds no run."""
    runs = [summarize(path) for path in find_runs(paths)]
    written = plot_losses(runs, out)
    return f"{table(runs)}\n\nrnnscale: wrote the loss curves to {written}"
