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
  the elementwise scan; none under MIN_PIECE_BYTES), each piece forwarded as soon as it arrives
  (its send batched with the next piece's receive), so the last rank waits P - 1 piece hops plus
  one whole state, not P - 1 whole states. Sends are waited on at the next exchange
  (`rnnscale.parallel.p2p.settle`), so the ranks run as a wavefront and a pass pays the chain
  once, not once per layer. Every rank has run its own slice from a zero state before the exchange
  (the work that does not need S_in), and corrects its outputs once S_in is there. Forward values
  are the all-gather's bit for bit: both fold the same maps in the same order in fp32.
"""

from __future__ import annotations

import torch

from rnnscale.parallel.p2p import message_tag, post, settle
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


def _chain(shard: Shard, pieces: list[slice], into: torch.Tensor, frm: int | None,
           to: int | None, tag: int, make) -> None:  # fmt: skip
    """One direction of the chain, piece by piece: piece i arrives from rank `frm` into
    `into[piece]` (nothing arrives on the chain's first rank, `frm` None), then `make(piece)`
    gives what this rank passes on to rank `to` (`to` None on the chain's last rank). Each
    piece's send goes in one batch with the next piece's receive, so a rank forwards piece i while
    piece i + 1 travels to it, on NCCL too (`rnnscale.parallel.p2p.post`)."""

    def receive(i: int) -> list:
        return [] if frm is None or i >= len(pieces) else [(into[pieces[i]], frm, tag + i)]

    wait = post(shard, [], receive(0))
    for i, part in enumerate(pieces):
        wait()
        out = make(part)
        sends = [] if to is None else [(out, to, tag + i)]
        for tensor, _, _ in sends:  # counted by what is sent
            shard.stats.record("state", tensor.numel() * tensor.element_size())
        wait = post(shard, sends, receive(i + 1))


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

        def passed_on(part):  # this rank's S_out, the next rank's S_in (none on the last)
            if rank == P - 1:
                return None
            return (apply(A[part], S_in[part]) + S_last[part]).contiguous()

        _chain(shard, pieces, S_in, rank - 1 if rank > 0 else None,
               rank + 1 if rank < P - 1 else None, tag, passed_on)  # fmt: skip
        ctx.save_for_backward(A, S_in)
        return S_in

    @staticmethod
    def backward(ctx, grad):
        A, S_in = ctx.saved_tensors
        shard, apply = ctx.shard, ctx.map
        rank, P = shard.rank, shard.size
        settle()
        G_in = grad.clone()  # becomes the whole gradient of this rank's S_in
        G_out = torch.zeros_like(S_in)  # the gradient of S_out, from the next rank
        dA = torch.zeros_like(A)

        def passed_back(part):  # the gradient of this rank's S_in, the previous rank's S_out
            if rank < P - 1:  # G_out[part] has arrived: through the map to A and S_in
                with torch.enable_grad():
                    a = A[part].detach().requires_grad_()
                    s = S_in[part].detach().requires_grad_()
                    da, ds = torch.autograd.grad(apply(a, s), (a, s), G_out[part])
                dA[part] = da
                G_in[part] += ds
            return G_in[part].contiguous()

        _chain(shard, ctx.pieces, G_out, rank + 1 if rank < P - 1 else None,
               rank - 1 if rank > 0 else None, ctx.tag + MAX_BLOCKS, passed_back)  # fmt: skip
        return dA, G_out, G_in if rank == 0 else None, None, None


def scan_states(shard: Shard, A, S_last, S_init, apply) -> torch.Tensor:
    """This rank's incoming state (fp32, shaped like `S_last`) by the `scan` exchange: `A`, the
    slice's transition (`apply(A, S)` maps a state through it), `S_last` its state from zero,
    `S_init` the state rank 0 starts from (zeros when the caller passed none). The first two
    axes of `A` and `S_last` are shared (rows x heads, or rows x channels): the pieces."""
    flat_A, flat_S = A.float().flatten(0, 1), S_last.float().flatten(0, 1)
    S_in = _ScanStates.apply(flat_A, flat_S, S_init.float().flatten(0, 1), shard, apply)
    return S_in.view_as(S_last)
