"""Chunkwise gated linear attention in plain PyTorch: the CPU production path and the spec.

Legend: B batch, T time, H heads, K key width, V value width, N sequences, C chunk size,
M chunks (kernels/common/chunks.py lays sequences out in chunks that never straddle two).
The steps (kernels/gla/README.md), for one chunk with entering state S and in-chunk cumulative
log-gates b_r = g_1 + ... + g_r (a K-vector per row):
  1. intra-chunk scores A_rs = sum_k q_rk k_sk exp(b_rk - b_sk) for s <= r
  2. chunk-local state dS = (k * exp(b_C - b))^T v and chunk decay exp(b_C)
  3. states entering each chunk: S_next = exp(b_C) * S + dS (the scan over chunks)
  4. o = scale * ((q * exp(b)) S + A v)
Step 1 is two matmuls in the factorised form `(q exp(b - b_m)) (k exp(b_m - b))^T` around the
chunk's middle row m wherever the chunk's gates span at most SAFE_SPAN (60) in log space, and
the C x C x K tensor of pairwise differences (every exponent <= 0: no overflow at any decay)
in the chunks where they span more. Gates accumulate in fp32 or wider. Steps 2-4 and every
gradient are `ChunkLinearAttention` (kernels/common/chunk_autograd.py): the backward keeps only
the unchunked inputs and the initial states and recomputes the rest: the chunks, the entering
states and the scores (`PerKeyDecayScores.grads`).
"""

from __future__ import annotations

import torch

from rnnscale.kernels.common.checks import check_linear_attention
from rnnscale.kernels.common.chunk_autograd import ChunkLinearAttention, StateLink
from rnnscale.kernels.common.chunks import chunk_layout, from_chunks, to_chunks


def _pairwise_decay(b: torch.Tensor, causal: torch.Tensor) -> torch.Tensor:
    """exp(b_r - b_s) for s <= r, else 0: (M, H, C, K) -> (M, H, C, C, K)."""
    diff = b[:, :, :, None, :] - b[:, :, None, :, :]
    return torch.where(causal[..., None], diff, float("-inf")).exp()


class PairwiseScores(torch.autograd.Function):
    """Step 1, `A_rs = sum_k q_rk k_sk exp(b_rk - b_sk)` for s <= r, with the gradients
    `dq = [dA * decay] k`, `dk = [dA * decay]^T q`, and `db = q dq - k dk` (b_r enters with +,
    b_s with -; on the diagonal the two cancel)."""

    @staticmethod
    def forward(ctx, q, k, b, causal):
        ctx.save_for_backward(q, k, b, causal)
        return torch.einsum("mhrk,mhsk,mhrsk->mhrs", q, k, _pairwise_decay(b, causal))

    @staticmethod
    def backward(ctx, dA):
        q, k, b, causal = ctx.saved_tensors
        dq, dk = pairwise_grads(dA, q, k, b, causal)
        return dq, dk, q * dq - k * dk, None


def pairwise_grads(dA, q, k, b, causal):
    """`(dq, dk)` of the pairwise scores, their C x C x K decays recomputed."""
    decay = _pairwise_decay(b, causal)
    dq = torch.einsum("mhrs,mhsk,mhrsk->mhrk", dA, k, decay)
    dk = torch.einsum("mhrs,mhrk,mhrsk->mhsk", dA, q, decay)
    return dq, dk


# Largest in-chunk gate span (max over keys of b_1 - b_C) scored in factorised form: its factors
# stay within exp(+-SAFE_SPAN) of 1 (exp(+-SAFE_SPAN / 2) only when the decay is spread evenly
# about the middle row), inside fp32's range (overflow past exp(88)).
SAFE_SPAN = 60.0


class PerKeyDecayScores:
    """Step 1 for (M, H, C, K) chunks. Where a chunk's gates span at most SAFE_SPAN, the
    factorised `(q exp(b - b_m)) (k exp(b_m - b))^T` around its middle row m is exact up to
    rounding and is two matmuls; only the other chunks (strong decay) form the pairwise
    C x C x K tensor, in the forward and again in the backward. Exponents are clamped to
    +-SAFE_SPAN so the factorised scores of those chunks, discarded, stay finite."""

    @staticmethod
    def scores(q, k, b, causal):
        return _scores(q, k, b, causal)[0]

    @staticmethod
    def grads(dA, q, k, b, causal):
        A, up, strong = _scores(q, k, b, causal)
        dq = (dA @ (k * (-up).exp())) * up.exp()  # (M, H, C, K)
        dk = (dA.transpose(-1, -2) @ (q * up.exp())) * (-up).exp()
        if strong[0].numel():
            dq_s, dk_s = pairwise_grads(*(x[strong][:, None] for x in (dA, q, k, b)), causal)
            dq.index_put_(strong, dq_s[:, 0])
            dk.index_put_(strong, dk_s[:, 0])
        return A, dq, dk


def _scores(q, k, b, causal):
    """`(A (M, H, C, C), the clamped exponents up = b - b_m (M, H, C, K), the (m, h) indices of
    the chunks whose gates span more than SAFE_SPAN)`."""
    C = b.shape[2]
    up = (b - b[:, :, C // 2 : C // 2 + 1]).clamp(-SAFE_SPAN, SAFE_SPAN)
    A = ((q * up.exp()) @ (k * (-up).exp()).transpose(-1, -2)) * causal
    strong = ((b[:, :, 0] - b[:, :, -1]).amax(-1) > SAFE_SPAN).nonzero(as_tuple=True)
    if strong[0].numel():
        pairwise = PairwiseScores.apply(*(x[strong][:, None] for x in (q, k, b)), causal)
        A.index_put_(strong, pairwise[:, 0])
    return A, up, strong


def chunk_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    state_link: StateLink | None = None,
    chunk_size: int = 32,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated linear attention: `S_t = diag(exp g_t) S_{t-1} + k_t v_t^T`, `o_t = scale q_t^T S_t`.

    Args:
        q, k: `[B, T, H, K]`. v: `[B, T, H, V]`.
        g: `[B, T, H, K]` log-space forget gates (<= 0), accumulated in fp32.
        scale: multiplies q; default `K ** -0.5`.
        initial_state: `[N, H, K, V]` state before the first token of each sequence.
        output_final_state: also return the state after the last token, `[N, H, K, V]`
            (fp32, or float64 for float64 inputs).
        cu_seqlens: int `[N + 1]` offsets of packed documents in a `B = 1` batch; the state
            resets at each offset and N counts documents instead of batch rows.
        chunk_size: C, the chunk length.
        state_link: the initial states as a function of the final ones (a
            `rnnscale.kernels.common.chunk_autograd.StateLink`: sequence parallelism's chain,
            `rnnscale.parallel.state_passing`), with initial_state the caller's.
    Returns:
        `(o [B, T, H, V] in the dtype of v, final_state or None)`.
    """
    gates = {"g": (g, True)}
    B, T, H, K = check_linear_attention(q, k, v, gates, initial_state, cu_seqlens, chunk_size)
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    acc = torch.promote_types(q.dtype, torch.float32)  # fp32 at least; float64 stays float64
    layout = chunk_layout(B, T, cu_seqlens, chunk_size, q.device)

    def prep(q, k, v, g):
        # (M, H, C, D): padded keys are 0 and padded gates 0 (decay 1): the state passes unchanged
        qc, kc, vc, gc = (to_chunks(x, layout, acc).transpose(1, 2).contiguous()
                          for x in (q, k, v, g))  # fmt: skip
        return qc, kc, vc, gc.cumsum(dim=2)  # b: (M, H, C, K) in-chunk cumulative log-gates

    S0 = q.new_zeros(layout.N, H, K, V, dtype=acc) if initial_state is None else initial_state
    o, final = ChunkLinearAttention.apply(
        prep, S0.to(acc), layout, scale, PerKeyDecayScores, state_link, q, k, v, g
    )  # (M, H, C, V), (N, H, K, V)
    o = from_chunks(o.transpose(1, 2), layout)  # (B, T, H, V)
    return o.to(v.dtype), (final if output_final_state else None)
