"""Chunkwise linear attention with decay as one autograd function that saves little.

Legend: M chunks, H heads, C chunk size, K key width, V value width, N sequences, G gate width
(1 for scalar decay per head, K for per-key decay). The head axis may be two, `(groups, R)`,
with q and k of size 1 on R (R heads share them, as Mamba2's B and C): everything broadcasts,
scores that need only q and k are formed once per group, and dq, dk sum over R.
For one chunk with entering state S and in-chunk cumulative log-gates b (a G-vector per row,
broadcast over K):
  forward   o = scale ((q exp(b)) S + A v),  S_next = exp(b_C) S + (k exp(b_C - b))^T v
  backward  the states are passed in reverse: dS = exp(b_C) dS_next + scale (q exp(b))^T do,
            from the final state's gradient back to the initial state's; then, chunk by chunk,
            dq = scale exp(b) (do S^T) + [dA]k,  dk = [dA]^T q + exp(b_C - b) (v dS_next^T),
            dv = scale A^T do + (k exp(b_C - b)) dS_next, with dA = scale (do v^T) on and
            below the diagonal, and db = q dq - k dk (q enters as q exp(b_r), k as
            k exp(-b_s)) plus, on the last row, what exp(b_C) receives from the state.
Saved for backward: the inputs as the caller gave them, unchunked (`[B, T, ...]`, tensors the
layers around keep anyway), and the initial states S0 [N, H, K, V]. The chunked q, k, v, b
(`chunked_again`: the caller's `prep`, run again with autograd, whose graph carries the chunk
gradients back: padding dropped, packed gathers scattered, the in-chunk cumsum reversed), the
states entering each chunk S_in [M, H, K, V] (one more pass of the chunk recurrence, as fla's
chunk kernels recompute h), the intra-chunk scores A [M, H, C, C] and every per-chunk product
are recomputed. The family supplies A and its gradients (`Intra`): scalar decay scores
`(q k^T) * Gamma`, per-key decay needs care for strong decay (kernels/gla/chunk_torch.py).
"""

from __future__ import annotations

from typing import Protocol

import torch

from rnnscale.kernels.common.chunks import ChunkLayout, scan_chunks


class Intra(Protocol):
    """A family's intra-chunk scores `A_rs = sum_k q_rk k_sk exp(b_r - b_s)` for s <= r."""

    def scores(self, q, k, b, causal) -> torch.Tensor:
        """(M, H, C, K) x2, (M, H, C, G), (C, C) bool -> A (M, H, C, C)."""

    def grads(self, dA, q, k, b, causal) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(A, dq, dk)` for the gradient dA of the scores (zero above the diagonal)."""


def causal_mask(C: int, device) -> torch.Tensor:
    return torch.ones(C, C, dtype=torch.bool, device=device).tril()  # (C, C)


def decay_matrix(b: torch.Tensor, causal: torch.Tensor) -> torch.Tensor:
    """Gamma_rs = exp(b_r - b_s) for s <= r, else 0, from in-chunk cumulative scalar log-gates:
    (..., C) -> (..., C, C). Every exponent kept is <= 0."""
    return torch.where(causal, b[..., :, None] - b[..., None, :], float("-inf")).exp()


def _sum_to(x: torch.Tensor, G: int) -> torch.Tensor:
    """Sum the last dim of a per-key gradient down to the gate width G (1 or K)."""
    return x if x.shape[-1] == G else x.sum(-1, keepdim=True)


def chunk_blocks(M: int, per_chunk: int, budget: int = 2**18) -> list[slice]:
    """Slices of the M chunks, each about `budget` elements of C x C (or C x K) work at
    `per_chunk` elements a chunk: the backward's transients stay that size, not M times it."""
    n = max(1, budget // max(per_chunk, 1))
    return [slice(i, min(i + n, M)) for i in range(0, M, n)]


def _chunk_grads(intra: Intra, do, q, k, v, b, S_in, dS_out):
    """`(dq, dk, dv, db)` of some chunks, from the scaled output gradient `do`, the states
    entering them and the gradients of the states leaving them."""
    causal = causal_mask(q.shape[-2], q.device)
    b_last = b[..., -1:, :]  # (m, H, 1, G)
    q_decay, k_decay = b.exp(), (b_last - b).exp()  # (m, H, C, G)
    A, dq, dk = intra.grads((do @ v.transpose(-1, -2)) * causal, q, k, b, causal)
    dq = dq + (do @ S_in.transpose(-1, -2)) * q_decay
    dk_state = (v @ dS_out.transpose(-1, -2)) * k_decay  # (m, H, C, K)
    dk = dk + dk_state
    dv = A.transpose(-1, -2) @ do + (k * k_decay) @ dS_out
    G = b.shape[-1]
    db = _sum_to(q * dq - k * dk, G)  # (m, H, C, G)
    into_last = (S_in * dS_out).sum(-1) * b_last[..., 0, :].exp() + (k * dk_state).sum(-2)
    db[..., -1, :] += _sum_to(into_last, G)  # (m, H, G): exp(b_C) of the state update
    return dq.sum_to_size(q.shape), dk.sum_to_size(k.shape), dv, db  # shared q, k: sum over R


class StateLink(Protocol):
    """Initial states that depend on this call's own final states: a sequence-parallel rank's
    incoming states (`rnnscale.parallel.state_passing`), which its predecessors hand on once
    they have this slice's final states from zero. With one, the costly chunk updates are
    formed once: the states from zero are a cheap pass over them, and so are the true states
    after `incoming`; the backward mirrors it with the gradients."""

    def incoming(self, final: torch.Tensor, S0: torch.Tensor) -> torch.Tensor:
        """The initial states `[N, ...]` from the final states reached from zero and the
        caller's initial states S0 (both `[N, ...]`, as the call shapes its states)."""

    def outgoing(self, dS0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`(extra gradient of the final states, gradient of the caller's S0)` from the
        gradient the initial states get from this call with the final states' own."""


def _updates(k, v, b):
    """The chunk-local state updates `(k exp(b_C - b))^T v` [M, H, K, V] and decays exp(b_C)
    [M, H, G, 1]: the costly part of the states' pass, formed once per call."""
    b_last = b[..., -1:, :]  # (M, H, 1, G)
    return b_last.transpose(-1, -2).exp(), (k * (b_last - b).exp()).transpose(-1, -2) @ v


def _entering_states(updates, S0, layout: ChunkLayout):
    """`(S_in [M, H, K, V], final [N, H, K, V])`: the state entering each chunk, and each
    sequence's last, from the chunk updates and S0."""
    return scan_chunks(layout, S0, lambda S, decay, dS: (decay * S + dS, S), updates)


def chunked_again(prep, raw, needs) -> tuple[list[torch.Tensor], tuple[torch.Tensor, ...]]:
    """`(leaves, chunked)`: `prep(*raw)` run again with autograd on, from detached copies of
    the saved unchunked inputs that require grad where `needs` says."""
    with torch.enable_grad():
        leaves = [x.detach().requires_grad_(bool(n)) for x, n in zip(raw, needs)]
        return leaves, tuple(prep(*leaves))


def unchunked_grads(leaves, chunked, grads) -> tuple[torch.Tensor | None, ...]:
    """The gradients of the unchunked inputs from those of the chunked operands, through the
    chunking's own graph (None for an input that needs none)."""
    pairs = [(c, g) for c, g in zip(chunked, grads) if c.requires_grad]
    wanted = [x for x in leaves if x.requires_grad]
    got = iter(torch.autograd.grad([c for c, _ in pairs], wanted, [g for _, g in pairs],
                                   allow_unused=True) if wanted else ())  # fmt: skip
    return tuple(next(got) if x.requires_grad else None for x in leaves)


class ChunkLinearAttention(torch.autograd.Function):
    """`(o [M, H, C, V], final [N, H, K, V])` from unchunked inputs `raw` and `prep(*raw)`, which
    chunks them into `q, k [M, H, C, K]`, `v [M, H, C, V]` and cumulative gates `b [M, H, C, G]`,
    all in one float dtype as the initial states `S0 [N, H, K, V]`; `layout` orders the chunks,
    `intra` scores them; `link` (a `StateLink`, or None) makes the initial states depend on
    the final ones. Gradients for S0 and every input in `raw`."""

    @staticmethod
    def forward(ctx, prep, S0, layout: ChunkLayout, scale: float, intra: Intra, link, *raw):
        q, k, v, b = prep(*raw)
        updates = _updates(k, v, b)
        # the intra-chunk part needs no state: before a link's wait for its incoming states
        o_intra = intra.scores(q, k, b, causal_mask(q.shape[-2], q.device)) @ v  # (M, H, C, V)
        if link is not None:
            S0 = link.incoming(_entering_states(updates, torch.zeros_like(S0), layout)[1], S0)
        S_in, final = _entering_states(updates, S0, layout)  # (M, H, K, V), (N, H, K, V)
        o = scale * ((q * b.exp()) @ S_in + o_intra)  # (M, H, C, V)
        ctx.save_for_backward(S0, *raw)
        ctx.prep, ctx.layout, ctx.scale, ctx.intra, ctx.link = prep, layout, scale, intra, link
        return o, final

    @staticmethod
    def backward(ctx, do, dfinal):
        S0, *raw = ctx.saved_tensors
        leaves, chunked = chunked_again(ctx.prep, raw, ctx.needs_input_grad[6:])
        q, k, v, b = (x.detach() for x in chunked)
        updates = _updates(k, v, b)
        S_in, _ = _entering_states(updates, S0, ctx.layout)
        do = ctx.scale * do  # (M, H, C, V)
        per_chunk = (updates[0], (q * b.exp()).transpose(-1, -2) @ do)

        def states_back(dfinal):  # (gradient of the state leaving each chunk, dS0)
            return scan_chunks(ctx.layout, dfinal, lambda dS, decay, x: (decay * dS + x, dS),
                               per_chunk, reverse=True)  # fmt: skip

        dS0_caller = None
        if ctx.link is not None:  # the final states' gradient from the link, then the whole pass
            extra, dS0_caller = ctx.link.outgoing(states_back(dfinal)[1])
            dfinal = dfinal + extra
        dS_out, dS0 = states_back(dfinal)  # (M, H, K, V), (N, H, K, V)
        dS0 = dS0 if ctx.link is None else dS0_caller
        grads = tuple(torch.empty_like(x) for x in (q, k, v, b))  # dq, dk, dv, db
        C, K, V = q.shape[-2], q.shape[-1], v.shape[-1]
        for sl in chunk_blocks(v.shape[0], v[0].numel() // V * max(C, K, V)):
            parts = _chunk_grads(ctx.intra, *(x[sl] for x in (do, q, k, v, b, S_in, dS_out)))
            for grad, part in zip(grads, parts):
                grad[sl] = part
        return None, dS0, None, None, None, None, *unchunked_grads(leaves, chunked, grads)
