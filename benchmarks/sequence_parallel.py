"""Sequence parallelism: bytes per layer against the two ways attention is split, and measured
weak scaling on this machine.

    .venv/bin/python benchmarks/sequence_parallel.py [--smoke] [--steps N] [--rounds R]

1. **Bytes per layer** (one rank, forward and backward), from the accounting functions the
   training collectives record with (`rnnscale.parallel.sequence`, `.state_exchange`): our
   state passing for the recurrent layers of the 1.3B recipes (GLA, Gated DeltaNet, Mamba2;
   fp32 states), by the `scan` exchange (the most any rank sends) and the `allgather`, beside
   DeepSpeed Ulysses' all-to-alls and an all-gather of keys and values for an attention layer
   of the same width (16 heads of 128, bf16, one row), at T = 16K, 64K and 1M tokens and
   P = 2, 4 and 8 ranks per sequence. Formulas, so they hold at any scale; the runtime counts
   are checked against them in tests/test_sequence_parallel.py.
2. **Weak scaling, measured**: `rnnscale.train.run` under torchrun, P = 2 on 2T tokens (2
   processes, each one thread, ZeRO-2, fp32, one row per step) with each state exchange,
   against two peers on T tokens per rank: 1 rank alone, and 2 data-parallel ranks (the same
   two processes sharing the machine's two cores and memory, the same gradient reductions),
   for a recurrent model (4 GLA layers) and a hybrid (Gated DeltaNet, sliding-window
   attention, Mamba2, GLA). Efficiency = the peer's step time / P = 2's (1.0: the longer
   sequence costs nothing more per rank), in each of several rounds of the four runs
   (`--rounds`, 3; each round starts one run later, and its runs follow one another, so its
   ratio sees one state of this shared machine) from the median of the steps after the
   first: the median of the rounds' ratios, with the lowest and highest.

Nothing here is asserted on; tests/test_benchmarks.py runs `--smoke`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LENGTHS = {"16K": 16 * 1024, "64K": 64 * 1024, "1M": 1024 * 1024}
SIZES = (2, 4, 8)
ATTENTION = {"H": 16, "D": 128, "itemsize": 2, "B": 1}  # a 2048-wide layer in bf16, one row
MODELS = {
    "gla x4": ["model.mixer_pattern=[gla]", "model.num_layers=4"],
    "gdn+swa+mamba2+gla": ["model.mixer_pattern=[gated_deltanet,swa,mamba2,gla]",
                           "model.num_layers=4", "model.swa.window=128",
                           "model.mamba2.head_dim=32"],
}  # fmt: skip
COMMON = [
    "configs/debug_cpu.yaml",
    "model.d_model=128",
    "model.num_heads=4",
    "kernels.chunk_size.gla=64",
    "train.micro_batch_size=1",
    "train.log_interval=1",
    "parallel.zero_stage=2",
    "log.progress_bar=false",
    "log.wandb.mode=disabled",
    "log.tensorboard=false",
    "train.eval_interval=0",
    "schedule.warmup_steps=0",
    "train.peak_tflops=1",
    "launch.threads_per_rank=1",
]  # fmt: skip  (P = 1 would take both cores otherwise)


def mixer_state(mixer) -> tuple[str, int, int] | None:
    """(description, transition elements, state elements) of one row of a gla, gated_deltanet
    or mamba2 layer; None for other mixers."""
    if hasattr(mixer, "head_v_dim"):  # gated_deltanet: a K x K transition per head
        H, K, V = mixer.num_heads, mixer.head_dim, mixer.head_v_dim
        return f"gated_deltanet (H={H}, K={K}, V={V})", H * K * K, H * K * V
    if hasattr(mixer, "state_size"):  # mamba2: a decay per head
        H, N, Pd = mixer.num_heads, mixer.state_size, mixer.head_dim
        return f"mamba2 (H={H}, N={N}, P={Pd})", H, H * N * Pd
    if hasattr(mixer, "key_dim"):  # gla: a decay per key
        H, K, V = (
            mixer.num_heads,
            mixer.key_dim // mixer.num_heads,
            mixer.value_dim // mixer.num_heads,
        )
        return f"gla (H={H}, K={K}, V={V})", H * K, H * K * V
    return None


def recurrent_shapes() -> dict[str, tuple[int, int]]:
    """(transition, state) elements of one layer per sequence for the 1.3B recipes."""
    import torch

    from rnnscale.train.config import load_config
    from rnnscale.train.model import build_model

    shapes = {}
    for name in ("gla", "gated_deltanet", "mamba2"):
        cfg = load_config(ROOT / f"configs/recipes/{name}-1.3b.yaml", ["model.num_layers=1"])
        with torch.device("meta"):
            mixer = build_model(cfg.model, cfg.kernels).blocks[0].mixer
        label, transition, state = mixer_state(mixer)
        shapes[label] = (transition, state)
    return shapes


def bytes_table() -> None:
    from rnnscale.parallel.sequence import kv_gather_bytes, state_passing_bytes, ulysses_bytes
    from rnnscale.parallel.state_exchange import scan_bytes

    a = ATTENTION
    print("bytes one rank sends per layer, forward + backward (MB = 1e6 bytes); attention: "
          f"{a['H']} heads of {a['D']}, bf16, {a['B']} row")  # fmt: skip
    print()
    head = " | ".join(f"T={t}" for t in LENGTHS)
    print(f"| layer | P | {head} | ours / Ulysses at 64K | peer: Ulysses at 64K, same P (MB) |")
    print("|---|---|" + "---|" * len(LENGTHS) + "---|---|")
    shapes = recurrent_shapes()
    for P in SIZES:
        uly = {
            t: ulysses_bytes(P, a["B"], n, a["H"], a["D"], a["itemsize"])
            for t, n in LENGTHS.items()
        }
        kv = {
            t: kv_gather_bytes(P, a["B"], n, a["H"], a["D"], a["itemsize"])
            for t, n in LENGTHS.items()
        }
        peer = f"{uly['64K'] / 1e6:.1f}"
        for name, (transition, state) in shapes.items():
            for way, ours in (
                ("scan", max(scan_bytes(P, r, state) for r in range(P))),
                ("allgather", state_passing_bytes(P, transition, state)),
            ):
                cells = " | ".join(f"{ours / 1e6:.2f}" for _ in LENGTHS)
                print(f"| {name}, {way} | {P} | {cells} | {ours / uly['64K']:.2%} | {peer} |")
        print(
            f"| attention, Ulysses all-to-all | {P} | "
            + " | ".join(f"{uly[t] / 1e6:.1f}" for t in LENGTHS)
            + f" | 100% | {peer} |"
        )
        print(f"| attention, all-gather of K/V | {P} | "
              + " | ".join(f"{kv[t] / 1e6:.1f}" for t in LENGTHS) + f" | - | {peer} |")  # fmt: skip


def step_times(run_dir: Path) -> list[float]:
    """Every step's time after the first (which builds and warms up)."""
    return [json.loads(line)["step_time_s"] for line in (run_dir / "metrics.jsonl").open()][1:]


def spread(times: list[float]) -> str:
    return f"{statistics.median(times):.3f} ({min(times):.3f}-{max(times):.3f})"


def train_steps(tmp: str, name: str, model: list[str], run: tuple, steps: int,
                round_: int) -> list[float]:  # fmt: skip
    """Step times of `rnnscale.train` under torchrun; `run` is (ranks, P, T, exchange): `ranks`
    processes, sequence groups of P, one row of T tokens per sequence group per step."""
    ranks, P, T, way = run
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    run_dir = Path(tmp) / f"{name.replace(' ', '_')}-{ranks}-{P}-{way}-{round_}"
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", str(ranks), "-m", "rnnscale.train",
           *COMMON, *model, f"train.seq_len={T}", f"parallel.sequence_parallel_size={P}",
           f"train.global_batch_size={ranks // P}", f"train.max_steps={steps}",
           f"parallel.sp_state_exchange={way}", f"run.dir={run_dir}"]  # fmt: skip
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{name} ({ranks} ranks, P={P}) failed:\n{r.stderr[-3000:]}")
    return step_times(run_dir)


def efficiency(peer: list[list[float]], ours: list[list[float]]) -> str:
    """The ratio of the peer's median step to ours in each round (a round's runs ran one after
    another, so its ratio sees one state of the machine): their median, lowest and highest."""
    rounds = [statistics.median(a) / statistics.median(b) for a, b in zip(peer, ours, strict=True)]
    if len(rounds) == 1:
        return f"{rounds[0]:.2f}"
    return f"{statistics.median(rounds):.2f} ({min(rounds):.2f}-{max(rounds):.2f})"


def weak_scaling(T: int, steps: int, models: dict[str, list[str]], rounds: int) -> None:
    print()
    print(f"weak scaling on this machine: P = 2 on T = {2 * T} against 1 rank on T = {T} and "
          f"against 2 data-parallel ranks on T = {T} each (the same 2 processes on the 2 cores, "
          f"the same ZeRO-2 reductions); one thread per process, fp32, one row per sequence "
          f"group; {rounds} round(s) of the four runs one after another, each round starting "
          f"one run later; step times: median (lowest-highest) of steps 2-{steps} of every "
          f"round; efficiency: the ratio of the peer's median step to P = 2's in each round, "
          f"the median of the rounds' ratios (lowest-highest)")  # fmt: skip
    print()
    print(
        f"| model | peer: 1 rank, T={T} (s) | peer: 2 data-parallel ranks, T={T} (s) | "
        f"exchange | P=2, T={2 * T} (s) | efficiency vs 1 rank | vs 2 data-parallel ranks |"
    )
    print("|---|---|---|---|---|---|---|")
    runs = {"one": (1, 1, T, "scan"), "data": (2, 1, T, "scan"),
            "scan": (2, 2, 2 * T, "scan"), "allgather": (2, 2, 2 * T, "allgather")}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="rnnscale-sp-bench-") as tmp:
        for name, model in models.items():
            times: dict[str, list[list[float]]] = {key: [] for key in runs}
            for r in range(rounds):  # no run always first: the machine drifts within a round
                order = list(runs)[r % len(runs) :] + list(runs)[: r % len(runs)]
                for key in order:
                    times[key].append(train_steps(tmp, name, model, runs[key], steps, r))
            one, data = sum(times["one"], []), sum(times["data"], [])
            for way in ("scan", "allgather"):
                print(
                    f"| {name} | {spread(one)} | {spread(data)} | {way} | "
                    f"{spread(sum(times[way], []))} | {efficiency(times['one'], times[way])} | "
                    f"{efficiency(times['data'], times[way])} |"
                )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="one model, short, 2 steps")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=4096, help="T of the P = 1 run")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the four runs")
    args = parser.parse_args()
    bytes_table()
    if args.smoke:  # the first model only
        weak_scaling(256, 2, dict(list(MODELS.items())[:1]), 1)
    else:
        weak_scaling(args.seq_len, args.steps, MODELS, args.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
