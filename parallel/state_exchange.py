"""How the ranks of a sequence group hand each other the recurrent state at their slice
boundaries (docs/parallelism.md, "Passing the states"): `parallel.sp_state_exchange`.

Each rank r holds its slice's affine map of the incoming state, `S_out = A_r(S_in) + S_r`, from
its own kernel pass (`rnnscale.parallel.state_passing`); rank r needs
`S_in(r) = S_r-1 + A_r-1(S_r-2 + A_r-2(... S_0 + A_0(S_init)))`.

- `allgather` (LASP-2's design): one all-gather of every rank's (A, S); each rank folds the
  maps of the ranks before it. One collective, but a rank sends (P - 1) (|A| + |S|) fp32
  elements forward and as many backward: the volume grows with P.
- `scan` (ZeCO's All-Scan, arXiv 2507.01004): a chain. Rank r receives S_in from rank r - 1,
  computes `A_r(S_in) + S_r` and sends that one state to rank r + 1; the backward runs the mirror
  chain from the last rank to the first with the gradient of each S_in. A rank sends |S| elements
  in each direction in which it has a neighbour, at any P and T, and never A. The state travels in
  up to `shard.scan_blocks` pieces along its first two axes (rows x heads, or rows x channels for
  the elementwise scan; none under MIN_PIECE_BYTES), all their receives posted at once and each
  piece forwarded as soon as it arrives, so the last rank waits P - 1 piece hops plus one whole
  state, not P - 1 whole states. Sends are waited on at the next exchange
  (`rnnscale.parallel.p2p.settle`), so the ranks run as a wavefront and a pass pays the chain
  once, not once per layer. Every rank has run its own slice from a zero state before the exchange
  (the work that does not need S_in), and corrects its outputs once S_in is there. Forward values
  are the all-gather's bit for bit: both fold the same maps in the same order in fp32.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from rnnscale.parallel.p2p import PENDING, message_tag, settle
from rnnscale.parallel.sequence import Shard

MAX_BLOCKS = 64  # pieces per exchange: the backward's tags start MAX_BLOCKS after the forward's
# a piece smaller than this costs more in message latency than pipelining saves: a state of
# fewer bytes travels whole (GPU links: ~5-10 us per message, ~1 MB in that time on NVLink)
MIN_PIECE_BYTES = 256 * 1024


def scan_bytes(P: int, rank: int, state_numel: int, itemsize: int = 4) -> int:
    """Bytes rank `rank` of P sends for one recurrent layer under the `scan` exchange, forward
    (to rank + 1) and backward (to rank - 1): |S| each way it has a neighbour. At most
    2 x itemsize x |S| at any P (the first and last ranks send half), at any sequence length."""
    return itemsize * state_numel * (int(rank < P - 1) + int(rank > 0))


def _pieces(state: torch.Tensor, blocks: int, P: int) -> list[slice]:
    """Contiguous ranges of the state's first axis covering it: `blocks` of them, or fewer
    when the state is small (no piece under MIN_PIECE_BYTES) or has fewer rows, and one at
    P = 2 (a single hop: pieces would only add messages)."""
    n, nbytes = state.shape[0], state.numel() * state.element_size()
    most = nbytes // MIN_PIECE_BYTES if MIN_PIECE_BYTES > 0 else n
    most = most if P > 2 else 1
    blocks = max(1, min(blocks, most, n, MAX_BLOCKS))
    bounds = [n * i // blocks for i in range(blocks + 1)]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _send(shard: Shard, tensor: torch.Tensor, peer: int, tag: int):
    """Start sending `tensor`, counted by what it holds: the handle, and the tensor to keep
    alive until the handle is waited on."""
    shard.stats.record("state", tensor.numel() * tensor.element_size())
    return dist.isend(tensor, group=shard.group, group_dst=peer, tag=tag), tensor


def _receives(shard: Shard, into: torch.Tensor, pieces, peer: int, tag: int) -> list:
    """Every piece's receive posted at once (the sender's pieces then match at once): the
    handles, in piece order."""
    return [dist.irecv(into[part], group=shard.group, group_src=peer, tag=tag + i)
            for i, part in enumerate(pieces)]  # fmt: skip


class _ScanStates(torch.autograd.Function):
    """`S_in` of this rank from the chain; inputs and output flattened to `[n, ...]` (n: rows
    x heads), A `[n, ...]` as `apply(A, S)` takes it. The backward receives the gradient of
    the next rank's S_in (= this rank's S_out), adds this rank's own, and passes it on."""

    @staticmethod
    def forward(ctx, A, S_last, S_init, shard: Shard, apply):
        rank, P = shard.rank, shard.size
        settle()
        tag = message_tag(shard)
        ctx.shard, ctx.map, ctx.tag = shard, apply, tag
        ctx.pieces = pieces = _pieces(S_last, shard.scan_blocks, P)
        S_in = S_init.clone() if rank == 0 else torch.empty_like(S_last)
        receives = _receives(shard, S_in, pieces, rank - 1, tag) if rank > 0 else []
        sends = []
        for i, part in enumerate(pieces):
            if receives:
                receives[i].wait()
            if rank < P - 1:
                out = (apply(A[part], S_in[part]) + S_last[part]).contiguous()
                sends.append(_send(shard, out, rank + 1, tag + i))
        PENDING.extend(sends)  # waited at the next exchange
        ctx.save_for_backward(A, S_in)
        return S_in

    @staticmethod
    def backward(ctx, grad):
        A, S_in = ctx.saved_tensors
        shard, apply, tag = ctx.shard, ctx.map, ctx.tag + MAX_BLOCKS
        rank, P = shard.rank, shard.size
        settle()
        G_in = grad.clone()  # becomes the whole gradient of this rank's S_in
        G_out = torch.zeros_like(S_in)  # the gradient of S_out, from the next rank
        dA = torch.zeros_like(A)
        receives = _receives(shard, G_out, ctx.pieces, rank + 1, tag) if rank < P - 1 else []
        sends = []
        for i, part in enumerate(ctx.pieces):
            if receives:
                receives[i].wait()
                with torch.enable_grad():
                    a = A[part].detach().requires_grad_()
                    s = S_in[part].detach().requires_grad_()
                    da, ds = torch.autograd.grad(apply(a, s), (a, s), G_out[part])
                dA[part] = da
                G_in[part] += ds
            if rank > 0:
                piece = G_in[part].contiguous()
                sends.append(_send(shard, piece, rank - 1, tag + i))
        PENDING.extend(sends)
        return dA, G_out, G_in if rank == 0 else None, None, None


def scan_states(shard: Shard, A, S_last, S_init, apply) -> torch.Tensor:
    """This rank's incoming state (fp32, shaped like `S_last`) by the `scan` exchange: `A`, the
    slice's transition (`apply(A, S)` maps a state through it), `S_last` its state from zero,
    `S_init` the state rank 0 starts from (zeros when the caller passed none). The first two
    axes of `A` and `S_last` are shared (rows x heads, or rows x channels): the pieces."""
    flat_A, flat_S = A.float().flatten(0, 1), S_last.float().flatten(0, 1)
    S_in = _ScanStates.apply(flat_A, flat_S, S_init.float().flatten(0, 1), shard, apply)
    return S_in.view_as(S_last)
