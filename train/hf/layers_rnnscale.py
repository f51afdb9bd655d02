"""The building blocks of an exported rnnscale model, in plain PyTorch: norms, the short
convolution, rotary positions, and the recurrences in their chunkwise and one-step forms.

This file is copied as it is into every model directory `rnnscale export --format hf` writes,
beside `modeling_rnnscale.py`, and it imports nothing but torch: transformers loads it with
`trust_remote_code=True` on a machine without rnnscale. Its results equal rnnscale's own PyTorch
paths (tests/test_hf.py); the recurrences are the chunkwise forms of docs/scans.md:

- `linear_attention`: S_t = Diag(exp g_t) S_{t-1} + k_t v_t^T, o_t = scale q_t^T S_t, with a decay
  per key channel (gla, hgrn2) or one per head (retnet, mamba2: g of width 1);
- `delta_rule`: S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T (gated_deltanet);
- `elementwise_scan`: h_t = a_t h_{t-1} + b_t (mingru, minlstm, rglru).

One token (generation) takes the step form, O(1) per token; longer inputs the chunkwise form.
States are fp32 or wider. Legend: B batch, T time, H heads, K key width, V value width, C chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def acc_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32, or float64 for float64 inputs: where gates, norms and states are computed."""
    return torch.promote_types(x.dtype, torch.float32)


def rms_norm(x, weight, eps, gate=None, groups=1, norm_before_gate=True):
    """`x / rms(x) * weight` over the last dim in fp32 (per group), optionally gated by
    silu(gate) after the norm, or before it (norm_before_gate=False, Mamba2's RMSNormGated)."""
    acc = acc_dtype(x)
    u = x.to(acc)
    if gate is not None and not norm_before_gate:
        u = u * F.silu(gate.to(acc))
    ug = u.unflatten(-1, (groups, -1))
    r = torch.rsqrt(ug.pow(2).mean(-1, keepdim=True) + eps)
    y = (ug * r).flatten(-2) * weight.to(acc)
    if gate is not None and norm_before_gate:
        y = y * F.silu(gate.to(acc))
    return y.to(x.dtype)


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    xf = x.to(acc_dtype(x))
    return (xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + eps)).to(x.dtype)


def short_conv(x, weight, bias, state, activation):
    """Causal depthwise convolution `[B, T, D]` by `weight [D, W]`, continuing `state` (the last
    W - 1 inputs, `[B, D, W - 1]`, zeros at a sequence start). Returns `(y, new state)`. Summed
    tap by tap in x's dtype, oldest first, then the bias: rnnscale's order, so bf16 agrees too."""
    B, T, D = x.shape
    W = weight.shape[1]
    past = x.new_zeros(B, D, W - 1) if state is None else state.to(x.dtype)
    window = torch.cat([past, x.transpose(1, 2)], dim=2)  # (B, D, W - 1 + T)
    w = weight.to(x.dtype)
    y = window[:, :, :T] * w[:, :1]
    for j in range(1, W):
        y = y.addcmul_(window[:, :, j : j + T], w[:, j : j + 1])
    if bias is not None:
        y = y.add_(bias.to(x.dtype)[:, None])
    y = y.transpose(1, 2)
    if activation == "silu":
        y = F.silu(y)
    return y, window[:, :, window.shape[2] - (W - 1) :]


def apply_rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i + D/2}) of `x [B, T, H, D]` by pos * theta^(-2i/D)."""
    D = x.shape[-1]
    acc = acc_dtype(x)
    inv_freq = theta ** (-torch.arange(0, D // 2, device=x.device, dtype=acc) / (D // 2))
    angle = pos[..., None].to(acc) * inv_freq  # (B, T, D/2)
    cos, sin = angle.cos()[:, :, None, :], angle.sin()[:, :, None, :]
    x1, x2 = x.to(acc).chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def _zero_state(q, v, g):
    acc = torch.promote_types(torch.promote_types(q.dtype, g.dtype), torch.float32)
    return q.new_zeros(q.shape[0], q.shape[2], q.shape[3], v.shape[-1], dtype=acc)


def _chunks(x: torch.Tensor, C: int, dtype) -> torch.Tensor:
    """`[B, T, H, ...]` zero-padded to whole chunks, as `[B, H, N, C, ...]`."""
    B, T, H = x.shape[:3]
    n = -(-T // C)
    x = x.to(dtype).reshape(B, T, H, -1)
    x = F.pad(x, (0, 0, 0, 0, 0, n * C - T))
    return x.view(B, n, C, H, -1).permute(0, 3, 1, 2, 4)


def _unchunk(o: torch.Tensor, T: int) -> torch.Tensor:
    """`[B, H, N, C, V]` back to `[B, T, H, V]`."""
    B, H, n, C, V = o.shape
    return o.permute(0, 2, 3, 1, 4).reshape(B, n * C, H, V)[:, :T]


def linear_attention(q, k, v, g, scale, state=None, chunk_size=64):
    """q, k `[B, T, H, K]`, v `[B, T, H, V]`, g `[B, T, H, K]` or `[B, T, H, 1]` (log decays,
    <= 0), state `[B, H, K, V]` or None. Returns `(o [B, T, H, V] in v's dtype, state)`."""
    S = _zero_state(q, v, g) if state is None else state
    acc, T = S.dtype, q.shape[1]
    if T == 1:
        q1, k1, v1, g1 = (x[:, 0].to(acc) for x in (q, k, v, g))
        S = g1.exp()[..., None] * S + k1[..., None] * v1[..., None, :]
        return (scale * torch.einsum("bhk,bhkv->bhv", q1, S))[:, None].to(v.dtype), S
    C = chunk_size
    q, k, vc, g = (_chunks(x, C, acc) for x in (q, k, v, g))  # (B, H, N, C, *)
    b = g.cumsum(-2)  # decay from the chunk's start, inclusive
    future = ~torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    outs = []
    for i in range(q.shape[2]):  # one chunk at a time: C x C (x K) scores, not N of them
        qi, ki, vi, bi = q[:, :, i], k[:, :, i], vc[:, :, i], b[:, :, i]  # (B, H, C, *)
        if g.shape[-1] == 1:  # one decay per head: a C x C decay matrix
            decay = (bi[..., :, None, 0] - bi[..., None, :, 0]).masked_fill(future, -torch.inf)
            A = (qi @ ki.transpose(-1, -2)) * decay.exp()
        else:  # a decay per key channel: C x C x K, differences only (never exp of a positive)
            diff = bi[..., :, None, :] - bi[..., None, :, :]
            diff = diff.masked_fill(future[..., None], -torch.inf)
            A = torch.einsum("bhik,bhjk,bhijk->bhij", qi, ki, diff.exp())
        # inside the chunk, then the state at its start; the state decayed to its end
        outs.append((scale * A) @ vi + (scale * qi * bi.exp()) @ S)
        S = bi[..., -1, :].exp()[..., None] * S
        S = S + (ki * (bi[..., -1:, :] - bi).exp()).transpose(-1, -2) @ vi
    return _unchunk(torch.stack(outs, 2), T).to(v.dtype), S


def delta_rule(q, k, v, g, beta, scale, state=None, chunk_size=64):
    """The gated delta rule. q, k `[B, T, H, K]`, v `[B, T, H, V]`, g, beta `[B, T, H]`, state
    `[B, H, K, V]` or None. Returns `(o [B, T, H, V] in v's dtype, state)`. Chunkwise in the WY
    form: inside a chunk the corrected values U solve (I + L) U = beta V - beta e^b K S_0 with
    L[t, s] = beta_t e^(b_t - b_s) k_t . k_s (s < t), a unit lower-triangular system."""
    S = _zero_state(q, v, g) if state is None else state
    acc, T = S.dtype, q.shape[1]
    if T == 1:
        q1, k1, v1, g1, b1 = (x[:, 0].to(acc) for x in (q, k, v, g, beta))
        S = g1.exp()[..., None, None] * S
        delta = b1[..., None] * (v1 - torch.einsum("bhk,bhkv->bhv", k1, S))
        S = S + k1[..., None] * delta[..., None, :]
        return (scale * torch.einsum("bhk,bhkv->bhv", q1, S))[:, None].to(v.dtype), S
    C = chunk_size
    q, k, vc = (_chunks(x, C, acc) for x in (q, k, v))  # (B, H, N, C, *)
    g, beta = (_chunks(x[..., None], C, acc)[..., 0] for x in (g, beta))  # (B, H, N, C)
    b = g.cumsum(-1)
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    decay = (b[..., :, None] - b[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    kb = k * beta[..., None]
    L = ((kb @ k.transpose(-1, -2)) * decay).tril(-1)
    system = L + torch.eye(C, dtype=acc, device=q.device)
    u = torch.linalg.solve_triangular(system, vc * beta[..., None], upper=False,
                                      unitriangular=True)  # fmt: skip
    w = torch.linalg.solve_triangular(system, kb * b.exp()[..., None], upper=False,
                                      unitriangular=True)  # fmt: skip
    A = scale * (q @ k.transpose(-1, -2)) * decay
    q_in = scale * q * b.exp()[..., None]
    k_out = k * (b[..., -1:] - b).exp()[..., None]
    last = b[..., -1].exp()[..., None, None]  # (B, H, N, 1, 1)
    outs = []
    for i in range(q.shape[2]):
        ui = u[:, :, i] - w[:, :, i] @ S
        outs.append(q_in[:, :, i] @ S + A[:, :, i] @ ui)
        S = last[:, :, i] * S + k_out[:, :, i].transpose(-1, -2) @ ui
    return _unchunk(torch.stack(outs, 2), T).to(v.dtype), S


def delta_product(q, k, v, g, beta, scale, state=None, chunk_size=64):
    """DeltaProduct: k `[B, T, n, H, K]`, v `[B, T, n, H, V]`, beta `[B, T, n, H]` give n delta
    steps per token, after the token's decay exp(g_t); q reads the state after the last. That is
    the gated delta rule over n T steps with the decay on each token's first step and q on its
    last."""
    B, T, n, H, K = k.shape
    flat = lambda x: x.reshape(B, T * n, *x.shape[3:])  # noqa: E731
    steps_g = torch.zeros(B, T, n, H, dtype=g.dtype, device=g.device)
    steps_g[:, :, 0] = g
    steps_q = torch.zeros(B, T, n, H, K, dtype=q.dtype, device=q.device)
    steps_q[:, :, -1] = q
    o, S = delta_rule(flat(steps_q), flat(k), flat(v), flat(steps_g), flat(beta), scale, state,
                      chunk_size)  # fmt: skip
    return o.view(B, T, n, H, -1)[:, :, -1], S


def elementwise_scan(a, b, state=None, chunk_size=32):
    """h_t = a_t h_{t-1} + b_t over `[B, T, D]` from `state [B, D]` (zeros: None). Returns
    `(h [B, T, D], h_T)`, in b's dtype. Chunkwise: every chunk scans from zero (all chunks at
    once, C steps), then adds its entering state times the running product of a (N steps)."""
    B, T, D = b.shape
    h = b.new_zeros(B, D) if state is None else state.to(b.dtype)
    C = min(chunk_size, T)
    n = -(-T // C)
    a = F.pad(a.to(b.dtype), (0, 0, 0, n * C - T), value=1.0).view(B, n, C, D)
    bc = F.pad(b, (0, 0, 0, n * C - T)).view(B, n, C, D)
    local, prod = torch.zeros_like(bc[:, :, 0]), torch.ones_like(bc[:, :, 0])
    locals_, prods = [], []
    for t in range(C):
        local = a[:, :, t] * local + bc[:, :, t]
        prod = prod * a[:, :, t]
        locals_.append(local)
        prods.append(prod)
    local, prod = torch.stack(locals_, 2), torch.stack(prods, 2)  # (B, N, C, D)
    outs = []
    for i in range(n):
        outs.append(local[:, i] + prod[:, i] * h[:, None])
        h = outs[-1][:, -1]
    return torch.cat(outs, 1)[:, :T], h
