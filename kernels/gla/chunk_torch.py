"""Chunkwise gated linear attention in plain PyTorch: the CPU production path and the spec.

Legend: B batch, T time, H heads, K key width, V value width, N sequences, C chunk size,
M number of chunks. The steps (SCANS.md section 2, kernels/gla/README.md) for one chunk with
entering state S and in-chunk cumulative log-gates b_r = g_1 + ... + g_r (a K-vector per row):
  1. intra-chunk scores A_rs = sum_k q_rk k_sk exp(b_rk - b_sk) for s <= r
  2. chunk-local state  dS = (k * exp(b_C - b))^T v, chunk decay exp(b_C)
  3. states entering each chunk: S_{m+1} = exp(b_C) * S_m + dS_m (a scan over M chunks)
  4. o = scale * ((q * exp(b)) S_m + A v)
Step 1 forms the C x C x K tensor of pairwise gate differences instead of the factorised
(q exp b)(k exp -b)^T: every exponent is then <= 0, so nothing overflows however strong the
decay (the factorised form overflows fp32 once b < -80). Gates accumulate in fp32.
Gradients come from autograd through these ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
    chunk_size: int = 16,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated linear attention: `S_t = diag(exp g_t) S_{t-1} + k_t v_t^T`, `o_t = scale q_t^T S_t`.

    Args:
        q, k: `[B, T, H, K]`. v: `[B, T, H, V]`.
        g: `[B, T, H, K]` log-space forget gates (<= 0), accumulated in fp32.
        scale: multiplies q; default `K ** -0.5`.
        initial_state: `[N, H, K, V]` state before the first token of each sequence.
        output_final_state: also return the state after the last token, `[N, H, K, V]` fp32.
        cu_seqlens: int `[N + 1]` offsets of packed documents in a `B = 1` batch; the state
            resets at each offset and N counts documents instead of batch rows.
        chunk_size: C, the chunk length.
    Returns:
        `(o [B, T, H, V] in the dtype of v, final_state or None)`.
    """
    B, T, H, K = q.shape
    scale = K**-0.5 if scale is None else scale
    if cu_seqlens is None:
        o, final = _chunk_gla_dense(q, k, v, g, scale, initial_state, chunk_size)
        return o, (final if output_final_state else None)
    if B != 1:
        raise ValueError(f"cu_seqlens needs a packed batch with B = 1, got B = {B}")
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != T or any(a > b for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"cu_seqlens must rise from 0 to T = {T}, got {bounds}")
    outs, finals = [], []
    for n, (t0, t1) in enumerate(zip(bounds[:-1], bounds[1:])):
        h0 = None if initial_state is None else initial_state[n : n + 1]
        part = slice(t0, t1)
        o, final = _chunk_gla_dense(
            q[:, part], k[:, part], v[:, part], g[:, part], scale, h0, chunk_size
        )
        outs.append(o)
        finals.append(final)
    o = torch.cat(outs, dim=1)
    return o, (torch.cat(finals) if output_final_state else None)


def _chunk_gla_dense(q, k, v, g, scale, initial_state, C):
    B, T, H, K = q.shape
    V = v.shape[-1]
    acc = torch.promote_types(q.dtype, torch.float32)  # fp32 at least; float64 stays float64
    S = q.new_zeros(B, H, K, V, dtype=acc) if initial_state is None else initial_state.to(acc)
    if T == 0:  # an empty document passes its state through
        return v.new_zeros(B, 0, H, V), S
    M = -(-T // C)
    pad = M * C - T  # padded keys are 0 and padded gates 0 (decay 1): the state is unchanged

    def blocks(x):  # (B, T, H, D) -> (B, H, M, C, D) in acc
        x = F.pad(x.to(acc), (0, 0, 0, 0, 0, pad))
        return x.view(B, M, C, H, -1).permute(0, 3, 1, 2, 4)

    qc, kc, vc, gc = blocks(q), blocks(k), blocks(v), blocks(g)
    b = gc.cumsum(dim=-2)  # (B, H, M, C, K) in-chunk cumulative log-gates
    b_last = b[..., -1:, :]  # (B, H, M, 1, K)

    # 1. intra-chunk scores with pairwise differences: every exponent <= 0 on and below the diagonal
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    diff = b[..., :, None, :] - b[..., None, :, :]  # (B, H, M, C, C, K)
    decay = torch.where(causal[..., None], diff, float("-inf")).exp()
    A = torch.einsum("bhmrk,bhmsk,bhmrsk->bhmrs", qc, kc, decay)  # (B, H, M, C, C)

    # 2. chunk-local states and chunk decays
    dS = (kc * (b_last - b).exp()).transpose(-1, -2) @ vc  # (B, H, M, K, V)
    chunk_decay = b_last.squeeze(-2).exp()  # (B, H, M, K)

    # 3. scan the M chunk states (fp32 or wider): the only sequential part
    entering = []
    for m in range(M):
        entering.append(S)
        S = chunk_decay[:, :, m, :, None] * S + dS[:, :, m]
    S_in = torch.stack(entering, dim=2)  # (B, H, M, K, V)

    # 4. outputs: inter-chunk through the entering state plus intra-chunk
    o = (qc * b.exp()) @ S_in + A @ vc  # (B, H, M, C, V)
    o = (scale * o).permute(0, 2, 3, 1, 4).reshape(B, M * C, H, V)[:, :T]
    return o.to(v.dtype), S
