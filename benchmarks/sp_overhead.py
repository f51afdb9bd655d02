"""What sequence parallelism adds to each layer's compute, without the noise of two processes.

    .venv/bin/python benchmarks/sp_overhead.py [--seq-len T] [--repeats N]

The weak-scaling hybrid of benchmarks/sequence_parallel.py (Gated DeltaNet, sliding-window
attention, Mamba2, GLA; d_model 128), forward and backward of each block and of the whole
model on T tokens, in one process and one thread: the plain form (the peer) against the
sequence-parallel form on a gloo group of one rank whose slice continues a sequence (so every
correction by the incoming state and every halo is computed, and nothing is sent). The two
alternate, N repetitions each after one warm-up; the table gives the medians and their ratio.
Nothing here is asserted on.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from sequence_parallel import COMMON, MODELS  # noqa: E402

HYBRID = "gdn+swa+mamba2+gla"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from rnnscale.parallel.sequence import Shard
    from rnnscale.train.config import load_config
    from rnnscale.train.model import build_model

    torch.set_num_threads(1)
    with socket.socket() as free:  # a free loopback port for the group of one
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    overrides = [x for x in COMMON[1:] if x.startswith(("model.", "kernels."))]
    cfg = load_config(ROOT / COMMON[0], [*overrides, *MODELS[HYBRID]])
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.kernels)
    T = args.seq_len
    ids = torch.randint(0, cfg.model.vocab_size, (1, T))

    def shard():  # a group of one whose slice continues a sequence: the SP work, no peer
        s = Shard.of(dist.group.WORLD, 0, 1, T)
        s.continues = True
        return s

    def once(sp: bool, block: int | None) -> float:
        x = torch.randn(1, T, cfg.model.d_model, requires_grad=True)
        start = time.perf_counter()
        if block is None:
            loss = model(ids, labels=ids, shard=shard() if sp else None)
        else:
            out = model.blocks[block](x, shard=shard() if sp else None)
            loss = (out[0] if isinstance(out, tuple) else out).float().square().mean()
        loss.backward()
        return time.perf_counter() - start

    print(f"{HYBRID}, T = {T}, one thread: forward and backward, median of {args.repeats} "
          "alternating repetitions (ms)")  # fmt: skip
    print()
    print("| layer | peer: plain (ms) | SP form, group of one (ms) | SP / plain |")
    print("|---|---|---|---|")
    for block in [*range(len(model.blocks)), None]:
        times = {False: [], True: []}
        for sp in (False, True):
            once(sp, block)  # warm-up
        for _ in range(args.repeats):
            for sp in (False, True):
                times[sp].append(once(sp, block))
        plain, sp = (statistics.median(times[k]) for k in (False, True))
        name = "the whole model" if block is None else type(model.blocks[block].mixer).__name__
        print(f"| {name} | {plain * 1e3:.1f} | {sp * 1e3:.1f} | {sp / plain:.3f} |")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
