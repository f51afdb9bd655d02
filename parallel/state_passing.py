"""The chunkwise scans over a sequence split across the ranks of a sequence group, by passing
recurrent states (docs/scans.md section 5).

Each rank runs the kernel on its slice from a zero state and gets its slice's affine map of
the incoming state, `S_out = A(S_in) + S_loc`: A is exp(sum of g) per head (scalar decay), per
key (GLA), the product of a (elementwise scan), or a K x K matrix (delta rule), and zero when a
document starts inside the slice. The maps compose in fp32, from the caller's initial state on
rank 0 (or zero), into each rank's true incoming state S_in (`rnnscale.parallel.
state_exchange`: a chain that passes one state from rank to rank, or one all-gather of every
rank's (A, S_loc)); each rank then corrects its outputs by the term S_in adds, which is linear
in S_in:

    scalar / per-key decay:  o_t += scale (q_t * exp(c_t))^T S_in   c_t: sum of g up to t
    elementwise scan:        h_t += (a_1 ... a_t) * h_in
    delta rule:              o_t += (scale q_t^T M_t ... M_1) S_in   M: the token transitions

The delta rule's row vectors and its A come from the kernel itself: K more value columns of
zeros whose initial state is the identity (the state's columns evolve independently) give
`scale q^T M_t..M_1` as output and A as final state, in the same call as the values on the
PyTorch path and in a second call on the Triton path (the alternative in docs/scans.md section
5 is a second pass with S_in; this needs no wait for S_in). Only the first document of a slice
receives S_in; the correction is written in torch ops, so autograd carries the gradients to q,
the gates, k and beta, and through the exchange's backward to the earlier ranks. On the
PyTorch path the decay families form no correction: the exchange runs inside the kernel
(`_Link`, the kernel's `state_link`), between a cheap pass over its chunk updates from zero
and a second one from S_in, and mirrored in its backward (docs/scans.md section 5). Every
function takes and returns what its kernel does (`(out, final_state)`, final state `[N, ...]`
per local sequence).
"""

from __future__ import annotations

import torch

from rnnscale.kernels.common.backend import resolve_backend
from rnnscale.kernels.delta import chunk_delta_product, chunk_gated_delta_rule
from rnnscale.kernels.gla import chunk_gla
from rnnscale.kernels.gla import chunk_torch as gla_torch
from rnnscale.kernels.scan import linear_scan
from rnnscale.kernels.simple_gla import chunk_simple_gla
from rnnscale.kernels.simple_gla import chunk_torch as simple_gla_torch
from rnnscale.parallel.sequence import Shard, gather_states
from rnnscale.parallel.state_exchange import scan_states

# the PyTorch paths that take a `state_link`: the exchange runs inside them (`_Link`)
LINKED = {chunk_gla: gla_torch.chunk_gla, chunk_simple_gla: simple_gla_torch.chunk_simple_gla}


def _first_length(T: int, cu_seqlens: torch.Tensor | None, shard: Shard) -> int:
    """Tokens of the slice's first sequence (the one the incoming state reaches); the shard
    knows it without a device sync when cu_seqlens are its own."""
    if cu_seqlens is None:
        return T
    return shard.first_length if cu_seqlens is shard.cu_seqlens else int(cu_seqlens[1])


def _check_state(shard: Shard, initial_state, cu_seqlens) -> bool:
    """Whether this rank's first sequence receives a state: it continues the previous rank's,
    or it is the first rank's and the caller passed one."""
    if initial_state is not None and cu_seqlens is not None:
        raise ValueError(
            "a caller's initial_state with packed documents is not supported under sequence "
            "parallelism: pass plain rows, or no initial_state"
        )
    return shard.continues or (shard.rank == 0 and initial_state is not None)


def _incoming(shard: Shard, A, S_last, initial_state, apply, receives: bool) -> torch.Tensor:
    """This rank's true incoming state (fp32) from every rank's `(A, S_last)`, or zeros when
    its first sequence receives none. `apply(A, S)` is the family's map. The shard's
    `state_exchange` passes the states: a `scan` along the ranks, or an `allgather`.

    Every rank's result depends on the gathered tensor, so the all-gather's backward (itself a
    collective) runs on every rank, and every rank builds the same graph."""
    A, S_last = A.float(), S_last.float()
    if shard.state_exchange == "scan":
        S_init = torch.zeros_like(S_last) if initial_state is None else initial_state.float()
        S_in = scan_states(shard, A, S_last, S_init, apply)
        return S_in * float(receives)
    parts = gather_states(shard, torch.cat([A.reshape(-1), S_last.reshape(-1)]))  # (P, n)
    S_in = torch.zeros_like(S_last) if initial_state is None else initial_state.float()
    for j in range(shard.rank):
        A_j = parts[j, : A.numel()].view_as(A)
        S_j = parts[j, A.numel() :].view_as(S_last)
        S_in = apply(A_j, S_in) + S_j
    return (S_in + 0.0 * parts.sum()) * float(receives)


def _last(final: torch.Tensor, cu_seqlens) -> torch.Tensor:
    """The states that reach the slice's end: every row's, or the last packed document's."""
    return final if cu_seqlens is None else final[-1:]


class _Link:
    """The state exchange as a kernel's state link (`rnnscale.kernels.common.chunk_autograd.
    StateLink`): it runs between the kernel's pass from zero and its pass from the true
    incoming states, and its backward between the two passes of the gradients, so that no
    correction term is formed. The exchange is `_incoming` (either way), as a graph of its own
    whose backward `outgoing` runs. `A` `[n, H(, K)]`: the slice's decay (zero unless its first
    sequence is also its last); n: the sequences that pass a state (every row, or one)."""

    def __init__(self, shard: Shard, A, apply, receives: bool, rows: bool):
        self.shard, self.A, self.apply, self.receives, self.rows = shard, A, apply, receives, rows

    @staticmethod
    def _flat(x):  # [N, ...] as the kernel shapes it -> [N, H, K, V]
        return x.reshape(x.shape[0], -1, *x.shape[-2:])

    def incoming(self, final, S0):
        ends, starts = self._flat(final), self._flat(S0)
        last, first = (ends, starts) if self.rows else (ends[-1:], starts[:1])
        with torch.enable_grad():
            self.leaves = [x.detach().float().requires_grad_() for x in (last, first)]
            self.S_in = _incoming(self.shard, self.A, self.leaves[0], self.leaves[1],
                                  self.apply, self.receives)  # fmt: skip
        true = torch.zeros_like(starts)
        true[: len(last)] = self.S_in.detach()
        return true.view_as(S0)

    def outgoing(self, dS0):
        grads = self._flat(dS0)
        n = len(self.S_in)
        G_out, G_init = torch.autograd.grad(self.S_in, self.leaves, grads[:n].float(),
                                            allow_unused=True)  # fmt: skip
        extra = torch.zeros_like(grads)
        if G_out is not None:
            extra[len(grads) - n :] = G_out  # into the states this slice hands on
        caller = None  # a caller's initial state: rows only
        if self.rows and G_init is not None:
            caller = G_init.to(dS0.dtype).view_as(dS0)
        return extra.view_as(dS0), caller


def _linked_decay_scan(kernel, inputs, shard, initial_state, cu_seqlens, options):
    """`_decay_scan` on the PyTorch path: the exchange inside the kernel."""
    q, k, v, g = inputs
    receives = _check_state(shard, initial_state, cu_seqlens)
    n = _first_length(q.shape[1], cu_seqlens, shard)
    whole = receives and (cu_seqlens is None or len(cu_seqlens) == 2)
    total = g[:, :n].float().sum(1)  # (B, H[, K]): the log-decay of the slice's first sequence
    A = total.exp() if whole else torch.zeros_like(total)
    per_key = g.dim() == 4

    def apply(A, S):  # flattened: A (n H[, K]), S (n H, K, V)
        return (A[..., None] if per_key else A[..., None, None]) * S

    link = _Link(shard, A, apply, receives, rows=cu_seqlens is None)
    options = {k: v for k, v in options.items() if k != "backend" and v is not None}
    return LINKED[kernel](q, k, v, g, initial_state=initial_state, output_final_state=True,
                          cu_seqlens=cu_seqlens, state_link=link, **options)  # fmt: skip


def _decay_scan(kernel, inputs, shard, initial_state, cu_seqlens, options):
    """Scalar-decay (g `[B, T, H]`; q and k may be grouped, `[B, T, G, K]`, as the kernel
    takes them) and per-key-decay (g `[B, T, H, K]`) linear attention."""
    q, k, v, g = inputs
    backend = resolve_backend(options.get("backend", "auto"), q)
    if backend == "torch" and kernel in LINKED:
        return _linked_decay_scan(kernel, inputs, shard, initial_state, cu_seqlens, options)
    o, final = kernel(q, k, v, g, initial_state=None, output_final_state=True,
                      cu_seqlens=cu_seqlens, **options)  # fmt: skip
    scale = options.get("scale")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    receives = _check_state(shard, initial_state, cu_seqlens)
    n = _first_length(q.shape[1], cu_seqlens, shard)
    c = g[:, :n].float().cumsum(1)  # (B, n, H[, K]): log-decay from the slice start
    per_key = g.dim() == 4
    whole = receives and (cu_seqlens is None or len(cu_seqlens) == 2)
    A = c[:, -1].exp() if whole else torch.zeros_like(c[:, -1])  # (B, H[, K])

    def apply(A, S):  # S: (B, H, K, V)
        return (A[..., None] if per_key else A[..., None, None]) * S

    S_in = _incoming(shard, A, _last(final, cu_seqlens), initial_state, apply, receives)
    if per_key:
        extra = torch.einsum("bthk,bhkv->bthv", q[:, :n].float() * c.exp(), S_in)
    else:  # q may be grouped, [B, n, G, K] read by H / G heads each (Mamba2): never repeated
        G, H = q.shape[2], S_in.shape[1]
        read = torch.einsum("btgk,bgjkv->btgjv", q[:, :n].float(), S_in.unflatten(1, (G, H // G)))
        extra = read.flatten(2, 3) * c.exp()[..., None]  # (B, n, H, V)
    extra = scale * extra
    o = torch.cat([o[:, :n] + extra.to(o.dtype), o[:, n:]], dim=1)
    reached = apply(c[:, -1].exp(), S_in)  # the first sequence's final state gains A_0 S_in
    return o, _add_first(final, reached, cu_seqlens)


def _elementwise_scan(kernel, inputs, shard, initial_state, cu_seqlens, options):
    """`h_t = a_t * h_{t-1} + b_t` over `[B, T, D]`."""
    a, b = inputs
    h, final = kernel(a, b, initial_state=None, output_final_state=True,
                      cu_seqlens=cu_seqlens, **options)  # fmt: skip
    receives = _check_state(shard, initial_state, cu_seqlens)
    n = _first_length(b.shape[1], cu_seqlens, shard)
    prod = a[:, :n].float().cumprod(1)  # (B, n, D)
    whole = receives and (cu_seqlens is None or len(cu_seqlens) == 2)
    A = prod[:, -1] if whole else torch.zeros_like(prod[:, -1])
    S_in = _incoming(shard, A, _last(final, cu_seqlens), initial_state, torch.mul, receives)
    extra = prod * S_in[:, None]  # (B, n, D)
    h = torch.cat([h[:, :n] + extra.to(h.dtype), h[:, n:]], dim=1)
    return h, _add_first(final, prod[:, -1] * S_in, cu_seqlens)


def _delta(kernel, inputs, shard, initial_state, cu_seqlens, options):
    """The gated delta rule (and DeltaProduct, whose k, v, beta have a Householder axis)."""
    q, k, v, g, beta = inputs
    receives = _check_state(shard, initial_state, cu_seqlens)
    B, _, H, K = q.shape
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    # K value columns of zeros starting from the identity carry q^T M_t..M_1 and A
    first = N if cu_seqlens is None else 1  # the sequences whose incoming state is passed
    V = v.shape[-1]
    eye = torch.zeros(N, H, K, K, dtype=torch.float32, device=q.device)
    if receives:  # else A = 0 and the rows are zero: nothing reaches this slice
        eye[:first] = torch.eye(K, device=q.device)
    zeros = v.new_zeros(*v.shape[:-1], K)
    if resolve_backend(options.get("backend", "auto"), q) == "torch":
        # one call with V + K value columns from [0 | I]: the columns evolve independently,
        # and the chunks' WY factors (the costly part) are computed once for both
        start = torch.cat([eye.new_zeros(N, H, K, V), eye], dim=-1)
        out, last = kernel(q, k, torch.cat([v, zeros], dim=-1), g, beta, initial_state=start,
                           output_final_state=True, cu_seqlens=cu_seqlens, **options)  # fmt: skip
        o, rows, final, A_all = out[..., :V], out[..., V:], last[..., :V], last[..., V:]
    else:  # Triton: a second call, so that the tiles keep their size
        o, final = kernel(q, k, v, g, beta, initial_state=None, output_final_state=True,
                          cu_seqlens=cu_seqlens, **options)  # fmt: skip
        rows, A_all = kernel(q, k, zeros, g, beta, initial_state=eye, output_final_state=True,
                             cu_seqlens=cu_seqlens, **options)  # fmt: skip
    # rows: (B, T, H, K), zero past the first doc; A_all: (N, H, K, K)
    A = _last(A_all, cu_seqlens)  # zero when the last sequence is not the first
    S_in = _incoming(shard, A, _last(final, cu_seqlens), initial_state, torch.matmul, receives)
    o = o + torch.einsum("bthk,bhkv->bthv", rows.float(), S_in).to(o.dtype)
    reached = torch.matmul(A_all[:first].float(), S_in)
    return o, _add_first(final, reached, cu_seqlens)


def _add_first(final, extra, cu_seqlens):
    """`final` with `extra` added to the first sequence's state (every row's, unpacked)."""
    if cu_seqlens is None:
        return final + extra.to(final.dtype)
    return torch.cat([final[:1] + extra.to(final.dtype), final[1:]])


def _sequence_parallel(kernel, runner, name: str):
    """The SP form of `kernel`: the kernel's inputs and options (scale, chunk_size, backend),
    plus the `shard`; every rank of the group passes the same `initial_state` (plain rows
    only), which the first rank's slice starts from."""

    def scan(*inputs, shard: Shard, initial_state=None, output_final_state=True,
             cu_seqlens=None, **options):  # fmt: skip
        out, final = runner(kernel, inputs, shard, initial_state, cu_seqlens, options)
        return out, final if output_final_state else None

    scan.__name__ = scan.__qualname__ = f"{kernel.__name__}_sp"
    scan.__doc__ = f"`{name}` over this rank's slice of a sequence-parallel group. {__doc__}"
    return scan


chunk_gla_sp = _sequence_parallel(chunk_gla, _decay_scan, "rnnscale.kernels.gla.chunk_gla")
chunk_simple_gla_sp = _sequence_parallel(
    chunk_simple_gla, _decay_scan, "rnnscale.kernels.simple_gla.chunk_simple_gla"
)
linear_scan_sp = _sequence_parallel(
    linear_scan, _elementwise_scan, "rnnscale.kernels.scan.linear_scan"
)
chunk_gated_delta_rule_sp = _sequence_parallel(
    chunk_gated_delta_rule, _delta, "rnnscale.kernels.delta.chunk_gated_delta_rule"
)
chunk_delta_product_sp = _sequence_parallel(
    chunk_delta_product, _delta, "rnnscale.kernels.delta.chunk_delta_product"
)
