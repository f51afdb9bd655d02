"""Sequence parallelism modelled to 256 GPUs: step time and weak-scaling efficiency of the 1.3B
recipes with their states passed by the scan (ours) or an all-gather (LASP-2's design), and of
their attention layers under DeepSpeed Ulysses or ring attention, from an alpha-beta model.

    .venv/bin/python benchmarks/sp_model.py [--mfu 0.4] [--per-gpu 16384] [--no-plot]

**Modelled, not measured.** One row of T tokens split over P GPUs (L = T / P each), bf16
activations, fp32 states, every layer forward and backward, nothing overlapped with compute
except ring attention's block passing (which is built to overlap). Per layer and rank:

- compute: 3 x the layer's model FLOPs per token (its own `flops_per_token`, the MLP included)
  x L, at `--mfu` of `--peak-tflops`; attention's FLOPs grow with T (Ulysses and ring both give
  each rank 1/P of the causal T x T work); at P > 1 a recurrent layer also corrects its outputs
  by S_in (2 |S| per token; the delta rule also runs K more value columns, 6 H K^2);
- scan: a chain of P - 1 hops each way (forward states, backward gradients), the state of
  4 |S| bytes in `--blocks` pieces (one at P = 2): sum over hops of (alpha + piece /
  bandwidth) plus (blocks - 1) pieces on the slowest hop. As built, a rank waits for its sends
  only at its next exchange, so rank r runs r hops behind rank 0 through all the layers (a
  wavefront) and a step pays the chain once each way; `lockstep` (the scan before that, for
  comparison): every exchange waits for its own sends, i.e. for the next rank, so every
  layer pays the whole chain;
- all-gather: a ring all-gather of 4 (|A| + |S|) bytes forward and its mirror backward:
  (P - 1) x (alpha + bytes / bandwidth) each, on the slowest link the ring crosses;
- Ulysses: 4 all-to-alls forward and 4 backward of the L x d slice (bf16); only when the heads
  divide by P (rnnscale falls back to a key/value all-gather otherwise);
- ring attention: P steps forward (K, V blocks passed on while the block attends) and P
  backward (K, V, dK, dV), each max(block compute, alpha + bytes / bandwidth).

Links (assumed, vendor figures, not measured: no GPU cluster here): 8 GPUs per node on NVLink 4
(450 GB/s per direction), one 400 Gb/s InfiniBand NDR port (50 GB/s) per GPU between nodes,
latencies 5 us (NVLink) and 10 us (InfiniBand). Compute: `--mfu` (default 0.4) of the H100's
989 bf16 dense TFLOP/s: an assumption, not a measured kernel rate (the GPU kernels' rates are
not measured: no GPU was lent to a session yet; `make gpu-check` measures them).

Efficiency = step time at P = 1 on L tokens / step time at P on P x L tokens (weak scaling).
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from sequence_parallel import COMMON, MODELS, mixer_state  # noqa: E402

IMG = ROOT / "docs" / "img" / "sp_model.png"
RECIPES = ("gla-1.3b", "gated_deltanet-1.3b", "mamba2-1.3b", "gated_deltanet-attn-1.3b")
SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass
class Links:
    per_node: int = 8
    alpha_intra: float = 5e-6
    alpha_inter: float = 10e-6
    bw_intra: float = 450e9
    bw_inter: float = 50e9

    def hop(self, rank: int, P: int) -> tuple[float, float]:
        """(alpha, bytes/s) from rank to rank + 1 (mod P): across nodes at a node boundary."""
        inter = P > self.per_node and (rank + 1) % self.per_node == 0
        return (self.alpha_inter, self.bw_inter) if inter else (self.alpha_intra, self.bw_intra)

    def slowest(self, P: int) -> tuple[float, float]:
        return (self.alpha_inter, self.bw_inter) if P > self.per_node else (
            self.alpha_intra, self.bw_intra)  # fmt: skip


@dataclass
class Layer:
    """One block of a recipe: FLOPs per token at a sequence length, and what SP passes."""

    kind: str  # "recurrent", "attention", "local" (swa) or "head" (output projection)
    flops: object  # seq_len -> forward FLOPs per token (mixer + MLP)
    transition: int = 0  # |A| elements per row
    state: int = 0  # |S| elements per row
    width: int = 0  # attention: d (heads x head dim)
    heads: int = 0
    sp_flops: int = 0  # recurrent, P > 1: forward FLOPs per token of the state's correction


def chain(links: Links, P: int, nbytes: float, blocks: int) -> float:
    """The scan's P - 1 hops one way, the state in `blocks` pieces forwarded as they arrive."""
    if P == 1:
        return 0.0
    blocks = blocks if P > 2 else 1  # one hop: one piece (parallel/state_exchange.py)
    piece = nbytes / blocks
    hops = [links.hop(r, P) for r in range(P - 1)]
    slowest = max(a + piece / bw for a, bw in hops)  # each further piece: one more message
    return sum(a + piece / bw for a, bw in hops) + (blocks - 1) * slowest


def ring_allgather(links: Links, P: int, nbytes: float) -> float:
    alpha, bw = links.slowest(P)
    return (P - 1) * (alpha + nbytes / bw)


def all_to_all(links: Links, P: int, nbytes: float) -> float:
    """Each rank sends 1/P of `nbytes` to every other rank; the pieces to other nodes share
    the InfiniBand port, the rest NVLink."""
    if P == 1:
        return 0.0
    local = min(P, links.per_node) - 1
    remote = P - 1 - local
    alpha = links.alpha_inter if remote else links.alpha_intra
    return alpha * (P - 1) + nbytes / P * (local / links.bw_intra + remote / links.bw_inter)


def layer_time(layer: Layer, P: int, T: int, way: str, rate: float, links: Links,
               blocks: int) -> float | None:  # fmt: skip
    """Seconds one rank spends on one layer, forward and backward (None: not possible)."""
    L = T // P
    compute = 3 * layer.flops(T) * L / rate
    if layer.kind in ("head", "local"):  # a halo's few tokens are left out
        return compute
    if layer.kind == "recurrent":
        compute += 3 * layer.sp_flops * L / rate if P > 1 else 0.0
        if way == "lockstep":
            return compute + 2 * chain(links, P, 4 * layer.state, blocks)
        if way == "scan":  # a wavefront: the chain is charged once per step, in step_time
            return compute
        return compute + 2 * ring_allgather(links, P, 4 * (layer.transition + layer.state))
    if way == "ulysses":
        if layer.heads % P:
            return None
        return compute + 8 * all_to_all(links, P, L * layer.width * 2)
    # ring attention: the attention part passes K, V (and dK, dV back) around the ring
    flat = 3 * layer.flops(1) * L / rate  # the projections and the MLP, no scores
    scores = compute - flat
    alpha, bw = links.slowest(P)
    fwd = max(scores / 3 / P, alpha + 2 * L * layer.width * 2 / bw) * (P - 1) + scores / 3 / P
    bwd = max(2 * scores / 3 / P, alpha + 4 * L * layer.width * 2 / bw) * (P - 1)
    return flat + fwd + bwd + 2 * scores / 3 / P


def step_time(layers: list[Layer], P: int, T: int, ways: dict, rate, links, blocks):
    """One rank's step. `scan` as built: sends are waited on at the next exchange, so rank r
    runs r hops behind rank 0 through all the layers (a wavefront) and the step pays the chain
    once each way (the largest state's), and once more after every attention layer, whose
    collectives bring the ranks back into step; `lockstep`: each exchange waiting for its own
    sends (and so for the next rank), every layer paying the whole chain."""
    total = 0.0
    if ways.get("recurrent") == "scan":
        states = [x.state for x in layers if x.kind == "recurrent"]
        resyncs = 1 + sum(x.kind == "attention" for x in layers)
        total += 2 * resyncs * chain(links, P, 4 * max(states), blocks) if states else 0.0
    for layer in layers:
        t = layer_time(layer, P, T, ways.get(layer.kind, "-"), rate, links, blocks)
        if t is None:
            return None
        total += t
    return total


def _block_flops(mixer, mlp: int, seq_len: int) -> int:
    return mixer.flops_per_token(seq_len) + mlp


def recipe_layers(path: Path, overrides: list[str] = ()) -> list[Layer]:
    """The layers of a config, built on the meta device (no memory): FLOPs and state shapes."""
    import torch

    from rnnscale.train.config import load_config
    from rnnscale.train.model import build_model
    from rnnscale.train.model import flops as F

    cfg = load_config(path, list(overrides))
    with torch.device("meta"):
        model = build_model(cfg.model, cfg.kernels)
    d = cfg.model.d_model
    hidden = model.blocks[0].mlp.up.out_features
    mlp = 2 * F.linear(d, hidden) + F.linear(hidden, d)
    layers = []
    for block in model.blocks:
        m = block.mixer
        flops = functools.partial(_block_flops, m, mlp)
        if (shape := mixer_state(m)) is not None:
            _, transition, state = shape
            # the read of S_in (2 |S|); the delta rule also runs K more value columns (6 H K^2:
            # its read and write along the key, and the query's read), 6 x its transition
            extra = 2 * state + (6 * transition if hasattr(m, "head_v_dim") else 0)
            layers.append(Layer("recurrent", flops, transition, state, sp_flops=extra))
        elif getattr(m, "window", None) is not None:  # swa: a halo of window - 1 tokens
            layers.append(Layer("local", flops))
        else:  # attention
            layers.append(Layer("attention", flops, width=m.num_heads * m.head_dim,
                                heads=m.num_heads))  # fmt: skip
    head = F.linear(d, cfg.model.vocab_size)
    return [*layers, Layer("head", lambda T: head)]


def attention_only(layers: list[Layer]) -> list[Layer]:
    """The peer: every block of the hybrid an attention block (same width, heads and MLP)."""
    attn = next(x for x in layers if x.kind == "attention")
    return [attn if x.kind != "head" else x for x in layers]


def efficiency(layers, P, per_gpu, ways, rate, links, blocks) -> float | None:
    one = step_time(layers, 1, per_gpu, ways, rate, links, blocks)
    many = step_time(layers, P, P * per_gpu, ways, rate, links, blocks)
    return None if many is None else one / many


def series(rate: float, links: Links, blocks: int) -> dict[str, tuple[list[Layer], dict]]:
    """Every modelled line: a recipe and how each kind of layer is split."""
    out = {}
    for name in RECIPES:
        layers = recipe_layers(ROOT / f"configs/recipes/{name}.yaml")
        attn = any(x.kind == "attention" for x in layers)
        for way in ("scan", "allgather") if attn else ("scan", "lockstep", "allgather"):
            for attention in ("ulysses", "ring") if attn else ("-",):
                label = f"{name}, {way}" + (f" + {attention}" if attn else "")
                out[label] = (layers, {"recurrent": way, "attention": attention})
        if attn:
            peer = attention_only(layers)
            for attention in ("ulysses", "ring"):
                out[f"attention only ({name}'s shape), {attention}"] = (
                    peer,
                    {"attention": attention},
                )
    return out


def _pingpong(rank: int, port: int, out) -> None:
    import time

    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)  # fmt: skip
    times = []
    for numel, reps in ((2, 200), (1 << 20, 20)):  # 8 bytes, 4 MiB
        x = torch.zeros(numel)
        for i in range(reps + 2):
            if i == 2:
                dist.barrier()
                start = time.perf_counter()
            if rank == 0:
                dist.send(x, 1)
                dist.recv(x, 1)
            else:
                dist.recv(x, 0)
                dist.send(x, 0)
        times.append((time.perf_counter() - start) / reps / 2)  # one way
    if rank == 0:
        out.put(times)
    dist.destroy_process_group()


def loopback_links() -> Links:
    """alpha and bandwidth of one gloo message between two processes of this machine, measured
    by a ping-pong (8 bytes, 4 MiB)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_pingpong, args=(port, queue), nprocs=2)
    small, big = queue.get()
    bw = 4 * (1 << 20) / max(big - small, 1e-9)
    return Links(per_node=1 << 30, alpha_intra=small, alpha_inter=small, bw_intra=bw,
                 bw_inter=bw)  # fmt: skip


def measured_here() -> tuple[int, list[list[str]]]:
    """The weak-scaling rows benchmarks/sequence_parallel.py last wrote to docs/performance.md
    (model, P = 1 step, exchange, P = 2 step, efficiency), and T at P = 1."""
    from suite import tables

    text = (ROOT / "docs" / "performance.md").read_text()
    start = text.index("<!-- bench:sequence_parallel -->")
    region = text[start : text.index("<!-- /bench:sequence_parallel -->")]
    for head, rows in tables(region):
        if head[0] == "model" and "exchange" in head:
            return int(head[1].split("T=")[1].split()[0]), rows
    return 0, []


def here_table(blocks: int) -> list[tuple[str, float, float]]:
    """This machine at P = 2: the model (links measured by ping-pong, compute calibrated to the
    step of 2 data-parallel ranks on T tokens each: the same two processes sharing the cores)
    against the measured efficiency of the same runs against those ranks."""
    T, rows = measured_here()
    if not rows:
        print("\nno measured weak-scaling rows in docs/performance.md: run "
              "benchmarks/sequence_parallel.py (make bench) first")  # fmt: skip
        return []
    links = loopback_links()
    print(f"\nthis machine, P = 2: modelled with gloo links measured by a ping-pong (alpha "
          f"{links.alpha_intra * 1e6:.0f} us, {links.bw_intra / 1e9:.2f} GB/s) and compute "
          "calibrated to the measured step of 2 data-parallel ranks on T tokens each; measured: "
          "docs/performance.md, benchmarks/sequence_parallel.py")  # fmt: skip
    print()
    print("| model | exchange | T per rank | measured efficiency vs 2 data-parallel ranks | "
          "modelled |")  # fmt: skip
    print("|---|---|---|---|---|")
    out = []
    for model, _one, data, way, _two, _vs_one, measured in rows:
        layers = recipe_layers(ROOT / COMMON[0], [*COMMON[1:], *MODELS[model]])
        ways = {"recurrent": way, "attention": "ring"}
        flops = sum(3 * x.flops(T) * T for x in layers)
        rate = flops / float(data.split()[0])  # compute as fast as the data-parallel ranks
        modelled = efficiency(layers, 2, T, ways, rate, links, blocks)
        measured = float(measured.split()[0])  # the rounds' median ratio, not their range
        print(f"| {model} | {way} | {T} | {measured:.2f} | {modelled:.3f} |")
        out.append((f"{model}, {way}", measured, modelled))
    return out


def weak_table(lines: dict, per_gpu: int, rate: float, links: Links, blocks: int) -> dict:
    print(f"\nweak scaling, modelled: efficiency = step at P = 1 on {per_gpu} tokens / step at P "
          f"on P x {per_gpu} tokens (-: Ulysses needs the heads to divide by P)")  # fmt: skip
    print()
    print("| line | " + " | ".join(f"P={P}" for P in SIZES[1:]) + " |")
    print("|---|" + "---|" * (len(SIZES) - 1))
    curves = {}
    for label, (layers, ways) in lines.items():
        effs = [efficiency(layers, P, per_gpu, ways, rate, links, blocks) for P in SIZES[1:]]
        curves[label] = effs
        cells = " | ".join("-" if e is None else f"{e:.3f}" for e in effs)
        print(f"| {label} | {cells} |")
    return curves


def time_table(lines: dict, rate: float, links: Links, blocks: int) -> None:
    """Step time of one row of T tokens at the largest P, and the share of it that passes
    states or activations (against the same step on links that cost nothing)."""
    free = Links(alpha_intra=0, alpha_inter=0, bw_intra=math.inf, bw_inter=math.inf)
    print("\nstep time of one row, modelled (s; in brackets the share spent communicating)")
    print()
    cases = [(1 << 20, 64), (1 << 23, 128), (1 << 23, 256)]
    print("| line | " + " | ".join(f"T={T >> 20}M, P={P}" for T, P in cases) + " |")
    print("|---|" + "---|" * len(cases))
    for label, (layers, ways) in lines.items():
        cells = []
        for T, P in cases:
            t = step_time(layers, P, T, ways, rate, links, blocks)
            t0 = step_time(layers, P, T, ways, rate, free, blocks)
            cells.append("-" if t is None else f"{t:.3f} ({1 - t0 / t:.1%})")
        print(f"| {label} | {' | '.join(cells)} |")


def published(lines: dict, rate: float, links: Links, blocks: int) -> None:
    """ZeCO's two headline claims (its abstract, arXiv 2507.01004; 1B GLA models) beside what
    this model says for gla-1.3b with our scan and with the all-gather (LASP-2's exchange)."""
    layers, _ = lines["gla-1.3b, scan"]

    def time(way, P, T):
        return step_time(layers, P, T, {"recurrent": way}, rate, links, blocks)

    ways = ("scan", "lockstep", "allgather")
    weak = {way: time(way, 64, 1 << 20) / time(way, 1, 1 << 14) for way in ways}
    speedup = {way: time("allgather", 256, 1 << 23) / time(way, 256, 1 << 23) for way in ways}
    print("\nbeside ZeCO's published claims (its abstract, arXiv 2507.01004; 1B GLA models)")
    print()
    print("| claim | published (ZeCO) | modelled here, gla-1.3b |")
    print("|---|---|---|")
    print(f"| 1M tokens on 64 GPUs vs 16K on one: time ratio | about 1 | scan {weak['scan']:.2f}, "
          f"lockstep {weak['lockstep']:.2f}, all-gather {weak['allgather']:.2f} |")  # fmt: skip
    print(
        f"| 256 GPUs, 8M tokens: speed of the scan over the previous best (LASP-2's all-gather) "
        f"| 1.6x | scan {speedup['scan']:.2f}x, lockstep {speedup['lockstep']:.2f}x |"
    )


def plot(curves: dict, here: list, per_gpu: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (ax, bx) = plt.subplots(1, 2, figsize=(13, 5), layout="constrained",
                                    gridspec_kw={"width_ratios": [3, 1.2]})  # fmt: skip
    for label, effs in curves.items():
        points = [(P, e) for P, e in zip(SIZES[1:], effs, strict=True) if e is not None]
        styles = {", scan": "-o", "lockstep": "-.", "allgather": "--"}
        style = next((v for k, v in styles.items() if k in label), ":s")
        ax.plot(*zip(*points, strict=True), style, markersize=4, label=label)
    ax.set(xscale="log", xlabel="GPUs per sequence (P)", ylabel="weak-scaling efficiency",
           ylim=(0, 1.05), title=f"modelled: {per_gpu // 1024}K tokens per GPU, H100 links "
           "assumed")  # fmt: skip
    ax.set_xticks(SIZES[1:], [str(P) for P in SIZES[1:]])
    ax.legend(fontsize=6, ncol=2)
    if here:
        x = range(len(here))
        bx.bar([i - 0.2 for i in x], [h[1] for h in here], 0.4, label="measured")
        bx.bar([i + 0.2 for i in x], [h[2] for h in here], 0.4, label="modelled")
        bx.set_xticks(list(x), [h[0] for h in here], rotation=30, ha="right", fontsize=7)
        bx.legend(fontsize=7)
    bx.set(ylim=(0, 1.05), title="this machine, P = 2 (CPU, gloo)")
    figure.savefig(path, dpi=110)
    print(f"\nwrote {path.relative_to(ROOT)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mfu", type=float, default=0.4, help="assumed fraction of the peak")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="H100 bf16 dense")
    parser.add_argument("--per-gpu", type=int, default=16384, help="tokens per GPU, weak scaling")
    parser.add_argument("--blocks", type=int, default=4, help="parallel.sp_scan_blocks")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--no-here", action="store_true", help="skip this machine's ping-pong")
    args = parser.parse_args()
    rate, links = args.peak_tflops * 1e12 * args.mfu, Links()
    print(f"modelled (not measured): {args.mfu:.0%} of {args.peak_tflops:.0f} TFLOP/s per GPU, "
          f"{links.per_node} GPUs per node, NVLink {links.bw_intra / 1e9:.0f} GB/s + "
          f"{links.alpha_intra * 1e6:.0f} us, InfiniBand {links.bw_inter / 1e9:.0f} GB/s + "
          f"{links.alpha_inter * 1e6:.0f} us per hop, state pieces: {args.blocks}")  # fmt: skip
    lines = series(rate, links, args.blocks)
    curves = weak_table(lines, args.per_gpu, rate, links, args.blocks)
    time_table(lines, rate, links, args.blocks)
    published(lines, rate, links, args.blocks)
    here = [] if args.no_here else here_table(args.blocks)
    if not args.no_plot:
        plot(curves, here, args.per_gpu, IMG)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
