"""`make bench`: every benchmark beside its peer, its tables written into docs/performance.md.

    .venv/bin/python benchmarks/suite.py            # about 28 minutes on the 2-core CPU machine
    .venv/bin/python benchmarks/suite.py --smoke --out /tmp/perf.md --img /tmp/img   # minutes
    .venv/bin/python benchmarks/suite.py --plots-only   # redraw docs/img from the page's tables

Each benchmark script runs as its own process, one after another (side by side they would slow
each other down on shared cores). Its stdout replaces the region of the page between
`<!-- bench:NAME -->` and `<!-- /bench:NAME -->`: first a line naming the date, the machine, the
exact command, the peer measured in the same run and how long it took, then the output (tables
as markdown), then its figure. Prose outside the regions is left as it is. The page is written
after each benchmark, so a later failure keeps the earlier results; a benchmark that fails
leaves its region as it was, and the suite ends with exit code 1 naming it.

The figures (PNG, matplotlib's Agg backend) are drawn from the tables in the page, so
`--plots-only` redraws them from whatever the page holds. zero3_capacity.py is not in the suite:
its table is a search that ends in the kernel's out-of-memory killer (docs/performance.md).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "performance.md"
HEADER = re.compile(
    r"^Measured (?P<date>\S+) on (?P<machine>.+?); command: `(?P<command>[^`]+)`; "
    r"peer in the same run: (?P<peer>.+?)(; ran in .*)?\.$",
    re.M,
)


@dataclass(frozen=True)
class Bench:
    name: str  # the page's region, and the figure's file name
    args: str  # the script and its full settings
    smoke: str  # the script and its tiny settings
    peer: str  # what it is measured against, in the same run
    minutes: float  # how long the full settings take on the 2-core CPU machine, about
    figure: str | None = None  # the figure drawn from its tables, if any
    figure_peer: str = ""  # the peer the figure shows, in a few words


BENCHES = [
    Bench(
        "kernels",
        "benchmarks/kernels.py --lengths 1024 4096 16384 --malloc heap",
        "benchmarks/kernels.py --smoke --malloc heap",
        "the step loop of linear cost (each family's one-token step over `unbind(1)` slices, one "
        "warm-up and best of 3 like the chunkwise path, up to T = 4096) and flash-linear-"
        "attention's PyTorch references (fla-core 0.6.0) on the same inputs, and a square fp32 "
        "matmul for the peak; flash-linear-attention's Triton kernels only on a CUDA device",
        3,
        "kernel throughput as a fraction of the fp32 matmul peak",
        "a square fp32 matmul's GFLOP/s, same run",
    ),
    Bench(
        "kernels-memory",
        "benchmarks/kernels.py --memory --lengths 1024 4096 16384 --loop-max-len 1024",
        "benchmarks/kernels.py --memory --smoke",
        "the step loop's peak memory on the same inputs, each in a fresh process "
        "(up to T = 1024: at 4096 its four runs add 2 minutes)",
        1.5,
    ),
    Bench(
        "models",
        "benchmarks/models.py --lengths 1024 2048 4096 8192 --mamba2-max-len 1024 --timeout 900",
        "benchmarks/models.py --smoke",
        "transformers' Llama (SDPA attention) and Mamba2 (its pure-PyTorch path) at equal "
        "width, depth and vocabulary (Mamba2 up to T = 1024: about 100 s a step at 2048)",
        16,
        "training tokens/s against T",
        "transformers Llama (sdpa) and Mamba2 (PyTorch path), same run",
    ),
    Bench(
        "data",
        "benchmarks/data.py",
        "benchmarks/data.py --smoke",
        "sentencepiece's raw encode of the same text in one process; a training step's tokens/s",
        1,
    ),
    Bench(
        "checkpoint",
        "benchmarks/checkpoint.py",
        "benchmarks/checkpoint.py --smoke --saves 2",
        "a raw sequential write + fsync and read of the same size on the same disk, beside each "
        "save; one training step",
        9,
        "checkpoint save and load bandwidth against the raw disk",
        "raw sequential write + fsync and read of the same size, same disk and run",
    ),
    Bench(
        "sequence_parallel",
        "benchmarks/sequence_parallel.py",
        "benchmarks/sequence_parallel.py --smoke",
        "DeepSpeed Ulysses' all-to-alls and an all-gather of K/V for attention of the same "
        "width (bytes); the same training on T tokens per rank by 1 rank and by 2 data-parallel "
        "ranks (weak scaling)",
        3,
        "bytes per layer against T: state passing (scan, all-gather), Ulysses, K/V all-gather",
        "DeepSpeed Ulysses and a K/V all-gather for attention of the same width",
    ),
]


def machine() -> str:
    """The CPU model, cores and threads, memory, torch and its threads, and the GPU if any."""
    cpu, cores, info = platform.processor() or platform.machine(), set(), {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (x.strip() for x in line.partition(":"))
            info[key] = value
            if key == "core id":
                cores.add((info.get("physical id"), value))
        cpu = info.get("model name", cpu)
        mem = int(Path("/proc/meminfo").read_text().split()[1]) / 2**20
        memory = f", {mem:.0f} GiB"
    except OSError:
        memory = ""
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {len(cores) or os.cpu_count()} cores / {os.cpu_count()} hardware threads"
        f"{memory}, {gpu}, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    )


def tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """The markdown tables in text: (header cells, body rows of cells), cells stripped."""
    out, block = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            block.append([cell.strip() for cell in line.strip()[1:-1].split("|")])
        elif block:
            out.append((block[0], block[2:]))
            block = []
    return out


def markdown(stdout: str) -> str:
    """A script's output as markdown: each table one block, every other line a paragraph."""
    blocks: list[list[str]] = []
    for line in stdout.splitlines():
        if not line.strip():
            continue
        if line.startswith("|") and blocks and blocks[-1][0].startswith("|"):
            blocks[-1].append(line)
        else:
            blocks.append([line])
    return "\n\n".join("\n".join(b) for b in blocks)


def region(page: str, name: str) -> re.Match:
    found = re.search(rf"<!-- bench:{name} -->\n(.*?)<!-- /bench:{name} -->", page, re.S)
    if not found:
        raise SystemExit(
            f"no region `<!-- bench:{name} -->` ... `<!-- /bench:{name} -->` in the page: add "
            "the two markers where its tables go (docs/performance.md has them)"
        )
    return found


def replace_region(page: str, name: str, body: str) -> str:
    found = region(page, name)
    return page[: found.start(1)] + body.rstrip("\n") + "\n" + page[found.end(1) :]


def run(bench: Bench, smoke: bool, timeout: float) -> tuple[str, str, float]:
    """(the command as a user types it, its stdout, seconds); SystemExit if it fails."""
    args = (bench.smoke if smoke else bench.args).split()
    python = os.path.relpath(sys.executable, ROOT)
    python = sys.executable if python.startswith("..") else python
    start = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                           timeout=timeout)  # fmt: skip
    except subprocess.TimeoutExpired as e:
        raise SystemExit(f"{bench.name}: over {timeout:.0f} s") from e
    if r.returncode != 0:
        raise SystemExit(f"{bench.name}: exit code {r.returncode}\n{r.stderr[-3000:]}")
    return shlex.join([python, *args]), r.stdout, time.perf_counter() - start


def body(bench: Bench, command: str, stdout: str, seconds: float, host: str, link: str) -> str:
    date = datetime.date.today().isoformat()
    head = (
        f"Measured {date} on {host}; command: `{command}`; peer in the same run: {bench.peer}; "
        f"ran in {seconds / 60:.1f} minutes."
    )
    parts = [head, markdown(stdout)]
    if bench.figure:
        parts += [f"![{bench.figure}]({link})",
                  f"*Figure: {bench.figure} ({date}, {host}); peer: {bench.figure_peer}. Drawn "
                  "by `make bench` from the table above.*"]  # fmt: skip
    return "\n\n".join(parts) + "\n"


def run_all(benches: list[Bench], smoke: bool, out: Path, img: Path) -> list[str]:
    """Run each benchmark, write its region and figure; the names of those that failed."""
    host, failed, total = machine(), [], 0.0
    print(f"machine: {host}", flush=True)
    for i, bench in enumerate(benches, 1):
        print(f"[{i}/{len(benches)}] {bench.name} (about {bench.minutes:g} min)...", flush=True)
        try:
            command, stdout, seconds = run(bench, smoke, 900 if smoke else 60 * 3 * bench.minutes)
            link = os.path.relpath(img / f"{bench.name}.png", out.parent)
            page = replace_region(out.read_text(), bench.name,
                                  body(bench, command, stdout, seconds, host, link))  # fmt: skip
            out.write_text(page)
            if bench.figure:
                draw(bench.name, region(page, bench.name).group(1), img)
        except SystemExit as e:
            print(f"FAILED {e}", file=sys.stderr, flush=True)
            failed.append(bench.name)
            continue
        total += seconds
        print(f"    {seconds / 60:.1f} min", flush=True)
    print(f"suite: {total / 60:.1f} min; written to {out} and {img}", flush=True)
    return failed


def draw(name: str, text: str, img: Path) -> None:
    """The figure of one region, from its tables, to img/NAME.png; its title names the peer,
    the machine and the date."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    head = HEADER.search(text)
    where = f"{head['machine']}, {head['date']}" if head else "machine and date not stated"
    plot = {"models": plot_models, "kernels": plot_kernels, "checkpoint": plot_checkpoint,
            "sequence_parallel": plot_sequence_parallel}[name]  # fmt: skip
    figure, title = plot(text, plt)
    figure.suptitle(f"{title}\n{where}", fontsize=9)
    img.mkdir(parents=True, exist_ok=True)
    figure.savefig(img / f"{name}.png", dpi=100)
    plt.close(figure)


def log2_axis(ax, values) -> None:
    """A log-2 x axis ticked at the values themselves (T = 1024, not 2^10)."""
    ticks = sorted(set(values))
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [str(v) for v in ticks])
    ax.minorticks_off()


def number(cell: str) -> float | None:
    """The last number in a cell ("1,049" and "8.7%" included), None if there is none."""
    found = re.findall(r"-?\d[\d,]*\.?\d*", cell)
    return float(found[-1].replace(",", "")) if found else None


def table(text: str, first: str) -> tuple[list[str], list[list[str]]]:
    """The first table whose first header cell is `first`."""
    for head, rows in tables(text):
        if head[0] == first:
            return head, rows
    raise SystemExit(f"no table with a first column `{first}` in the region")


def plot_models(text: str, plt):
    _, rows = table(text, "model")
    series: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        if not row[2].startswith("not run") and number(row[3]) is not None:
            series.setdefault(row[0], []).append((int(row[1]), number(row[3])))
    figure, ax = plt.subplots(figsize=(7, 4.8), layout="constrained")
    for name, points in series.items():
        peer = name.startswith("transformers")
        ax.plot(*zip(*points), "--" if peer else "-", marker="s" if peer else "o",
                color="black" if "Llama" in name else None, label=name)  # fmt: skip
    log2_axis(ax, [T for points in series.values() for T, _ in points])
    ax.set(xlabel="T (tokens per row)", ylabel="tokens/s, fp32 training step", yscale="log")
    ax.legend(fontsize=8)
    return figure, "Training tokens/s against T; peers: transformers Llama (sdpa), Mamba2"


def plot_kernels(text: str, plt):
    head, rows = table(text, "family")
    share = head.index("% of matmul peak")
    peak = re.search(r"matmul peak ([\d.]+) GFLOP/s", text)
    figure, ax = plt.subplots(figsize=(7, 4.8), layout="constrained")
    for family in dict.fromkeys(row[0] for row in rows):
        points = [(int(r[1]), number(r[share])) for r in rows if r[0] == family]
        points = [(T, y) for T, y in points if y is not None]
        if points:  # scan is elementwise: no matmul FLOPs to count
            ax.plot(*zip(*points), "-o", label=family)
    log2_axis(ax, [int(row[1]) for row in rows])
    ax.set(xlabel="T", ylabel="% of the fp32 matmul peak, fwd+bwd", ylim=(0, None))
    ax.legend(fontsize=8)
    peak = f"{peak[1]} GFLOP/s" if peak else "not stated"
    return figure, (f"Chunkwise scans as a fraction of the peer, a square fp32 matmul in the same "
                    f"run ({peak})")  # fmt: skip


def plot_sequence_parallel(text: str, plt):
    head, rows = table(text, "layer")
    columns = [i for i, h in enumerate(head) if h.startswith("T=")]
    scale = {"K": 2**10, "M": 2**20}
    lengths = [int(head[i][2:-1]) * scale[head[i][-1]] for i in columns]
    sizes = list(dict.fromkeys(row[1] for row in rows))
    figure, axes = plt.subplots(1, len(sizes), figsize=(12, 4.8), sharey=True, layout="constrained")
    styles = {", scan": ("-o", 6), ", allgather": ("-.^", 5), "Ulysses": ("--s", 9),
              "K/V": (":D", 5)}  # fmt: skip
    for ax, P in zip(axes, sizes):
        for row in (r for r in rows if r[1] == P):
            style, size = next(v for k, v in styles.items() if k in row[0])
            ax.plot(lengths, [number(row[i]) for i in columns], style, markersize=size,
                    label=row[0])  # fmt: skip
        ax.set(xscale="log", yscale="log", xlabel="T (tokens)", title=f"P = {P}")
    axes[0].set_ylabel("MB one rank sends per layer, fwd+bwd")
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncol=3, fontsize=8)
    return figure, ("Sequence parallelism, bytes per layer against T: state passing by the scan "
                    "(solid) and the all-gather (dash-dot) vs the peers, attention under Ulysses "
                    "and a K/V all-gather")  # fmt: skip


def plot_checkpoint(text: str, plt):
    _, rows = table(text, "measure")
    pairs = {r[0].split(" bandwidth")[0]: (number(r[1]), number(r[2])) for r in rows
             if "bandwidth" in r[0]}  # fmt: skip
    figure, ax = plt.subplots(figsize=(7, 4.8), layout="constrained")
    x = list(range(len(pairs)))
    ours = ax.bar([i - 0.2 for i in x], [v[0] for v in pairs.values()], 0.4, label="rnnscale")
    peer = ax.bar([i + 0.2 for i in x], [v[1] for v in pairs.values()], 0.4, color="grey",
                  label="peer: raw sequential write + fsync / read")  # fmt: skip
    for bars in (ours, peer):
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks(x, [f"{k} (GB/s)" for k in pairs])
    ax.set(ylabel="GB/s", ylim=(0, 1.25 * max(max(v) for v in pairs.values())))
    ax.legend(fontsize=8, loc="upper left")
    return figure, ("Checkpoint save and load against the peer, the raw disk: the same size, "
                    "same disk, same run")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="every script's --smoke: minutes")
    parser.add_argument("--out", type=Path, default=PAGE, help="the page to write the tables in "
                        "(when missing, a copy of docs/performance.md)")  # fmt: skip
    parser.add_argument("--img", type=Path, default=PAGE.parent / "img", help="figures' folder")
    parser.add_argument("--only", nargs="*", choices=[b.name for b in BENCHES],
                        help="these benchmarks only")  # fmt: skip
    parser.add_argument("--plots-only", action="store_true",
                        help="draw the figures from the page's tables; run nothing")  # fmt: skip
    args = parser.parse_args()
    benches = [b for b in BENCHES if not args.only or b.name in args.only]
    if not args.out.exists():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(PAGE.read_text())
    if args.plots_only:
        for bench in (b for b in benches if b.figure):
            draw(bench.name, region(args.out.read_text(), bench.name).group(1), args.img)
        return 0
    for bench in benches:  # every region is there before anything runs for minutes
        region(args.out.read_text(), bench.name)
    failed = run_all(benches, args.smoke, args.out, args.img)
    if failed:
        print(f"failed: {', '.join(failed)} (their regions are unchanged)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
