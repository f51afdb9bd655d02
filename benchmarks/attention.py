"""Sliding-window and packed-document attention: rnnscale's blocked forms against SDPA under
the whole mask.

    .venv/bin/python benchmarks/attention.py [--seq-len T] [--heads H] [--head-dim D]
        [--window W] [--repeats N]

Forward and backward of the attention alone (queries, keys and values in, no projections) on
T tokens, in one process and one thread, fp32. Ours: `swa`'s `local_attention` (queries in
blocks of W against their own keys and the W - 1 before) and packed `attn`'s
`document_attention` (query blocks against their documents' keys). The peer: PyTorch's
`scaled_dot_product_attention` under the whole (T, T) boolean mask, as Hugging Face models do
for a window or packed documents on CPU. The two alternate, N repetitions each after one
warm-up; the table gives the medians, their ratio, and the largest difference of the outputs
(the forms compute the same thing). Nothing here is asserted on.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def documents(T: int, mean: int, gen) -> torch.Tensor:
    """Positions inside seeded random documents of mean length `mean` packed into T tokens."""
    lengths = []
    while sum(lengths) < T:
        lengths.append(int(torch.randint(mean // 4, 2 * mean - mean // 4, (), generator=gen)))
    lengths[-1] -= sum(lengths) - T
    starts = torch.tensor([0, *lengths]).cumsum(0)[:-1]
    return torch.arange(T) - torch.repeat_interleave(starts, torch.tensor(lengths))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from rnnscale.train.model.attn import document_attention, local_attention

    torch.set_num_threads(1)
    T, W, gen = args.seq_len, args.window, torch.Generator().manual_seed(0)
    t = torch.arange(T)[:, None]
    cases = []  # (name, ours, pos, the peer's mask)
    for name, pos in [("one document", torch.arange(T)),
                      ("documents of mean length 512", documents(T, 512, gen))]:  # fmt: skip
        causal = (t.T <= t) & (t.T >= t - pos[:, None])
        window = functools.partial(local_attention, window=W, pos=pos)
        cases.append((f"swa (window {W}), {name}", window, causal & (t.T > t - W)))
        packed = functools.partial(document_attention, pos=pos)
        cases.append((f"attn, packed, {name}", packed, causal))

    def peer(mask):
        def attend(q, k, v):
            qkv = (x.transpose(1, 2) for x in (q, k, v))
            return F.scaled_dot_product_attention(*qkv, attn_mask=mask).transpose(1, 2)

        return attend

    def once(fn) -> tuple[float, torch.Tensor]:
        q, k, v = (torch.randn(1, T, args.heads, args.head_dim, generator=torch.Generator()
                               .manual_seed(i), requires_grad=True) for i in range(3))  # fmt: skip
        start = time.perf_counter()
        o = fn(q, k, v)
        o.square().mean().backward()
        return time.perf_counter() - start, o.detach()

    print(
        f"T = {T}, {args.heads} heads of {args.head_dim}, fp32, one thread: forward and "
        f"backward, median of {args.repeats} alternating repetitions (ms)"
    )
    print()
    print(
        "| attention | peer: SDPA, whole mask (ms) | ours, blocked (ms) | ours / peer "
        "| largest output difference |"
    )
    print("|---|---|---|---|---|")
    for name, ours, mask in cases:
        forms = (peer(mask), ours)
        times = ([], [])
        outs = [once(fn)[1] for fn in forms]  # warm-up
        for _ in range(args.repeats):
            for i, fn in enumerate(forms):
                times[i].append(once(fn)[0])
        p, o = (statistics.median(x) for x in times)
        diff = (outs[0] - outs[1]).abs().max().item()
        print(f"| {name} | {p * 1e3:.1f} | {o * 1e3:.1f} | {o / p:.3f} | {diff:.1e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
