"""Causal depthwise convolution over time, `y_t = sum_j w_j * x_{t - (W-1) + j}` per channel.

Legend: B batch, T time, D channels, W kernel width, N sequences.
The state of a sequence is its last W - 1 inputs, `[N, D, W - 1]` (oldest first), so a later
call (the next slice in sequence parallelism, the next token in generation) continues it.
Inputs before a sequence's start come from its row of `initial_state`, or are zero; a packed
document never sees the previous document's tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rnnscale.kernels.common.checks import check_sequences, check_shape, check_state
from rnnscale.kernels.common.naive import step_loop
from rnnscale.kernels.common.recompute import active, memoized


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    with_recipe: bool = False,
):
    """Args: x `[B, T, D]`; weight `[D, W]`; bias `[D]` or None; activation None or "silu";
    initial_state `[N, D, W - 1]`; cu_seqlens int `[N + 1]` (B = 1).
    Returns `(y [B, T, D], final_state [N, D, W - 1] or None)`, and with `with_recipe` a third:
    a function that makes y again, bit for bit, from what the convolution keeps for its
    backward and copies of the weight and bias (`rnnscale.kernels.common.recompute`), or None
    where no recipe would be used (`recompute.active()` false)."""
    check_shape("x", x, (None, None, None), "[B, T, D]")
    B, T, D = x.shape
    check_shape("weight", weight, (D, None), "[D, W]")
    W = weight.shape[1]
    if bias is not None:
        check_shape("bias", bias, (D,), "[D]")
    if activation not in (None, "silu"):
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")
    N = check_sequences(B, T, cu_seqlens)
    check_state(initial_state, (N, D, W - 1), "[N, D, W - 1]")
    edge, taps, tail = _sources(B, T, W, cu_seqlens, x.device)
    # one buffer: the inputs, then every sequence's carried inputs, then a zero row
    if initial_state is None:
        past = x.new_zeros(N * (W - 1), D)
    else:
        past = initial_state.to(x.dtype).transpose(1, 2).reshape(N * (W - 1), D)
    buf = torch.cat([x.reshape(B * T, D), past, x.new_zeros(1, D)])  # (B*T + N*(W-1) + 1, D)
    bias = None if bias is None else bias.to(x.dtype)
    y = _Taps.apply(buf, B * T, edge, taps, weight.to(x.dtype), bias, activation == "silu")
    final = buf[tail].permute(0, 2, 1) if output_final_state else None  # (N, D, W-1)
    if not with_recipe:
        return y.view(B, T, D), final
    if not active():  # nothing would use it (torch.compile, recomputing off, no autograd)
        return y.view(B, T, D), final, None
    w = weight.to(x.dtype).detach().clone()  # ZeRO-3 partitions the weight after the forward
    b = None if bias is None else bias.detach().clone()
    kept, silu = buf.detach(), activation == "silu"

    def again():
        return _Taps.activate(_Taps.sum(kept, B * T, edge, taps, w, b), silu).view(B, T, D)

    return y.view(B, T, D), final, memoized(again)


class _Taps(torch.autograd.Function):
    """`y_t = act(sum_j w_j * x_{t - lag_j} + bias)` per channel, lag_j = W - 1 - j, on the
    buffer's first B*T rows (the inputs). Each tap is a shifted slice of the inputs, one
    multiply-add over all rows; the `edge` rows (the first W - 1 of each sequence, whose
    windows reach before its start) are then computed again from their `taps`, rows of the
    buffer (the carried states and the zero row included), and overwritten. Autograd of
    gathered windows would keep W copies of the input, and the SiLU its input; this keeps the
    buffer and the edge's indices, and recomputes the sum in the backward."""

    @staticmethod
    def forward(ctx, buf, BT, edge, taps, weight, bias, silu):  # edge (E,), taps (E, W)
        y = _Taps.sum(buf, BT, edge, taps, weight, bias)
        ctx.save_for_backward(buf, edge, taps, weight, bias)
        ctx.silu = silu
        return _Taps.activate(y, silu)  # (B*T, D)

    @staticmethod
    def activate(y, silu):
        return F.silu(y) if silu else y

    @staticmethod
    def sum(buf, BT, edge, taps, weight, bias):
        W, x = weight.shape[1], buf[:BT]
        y = buf.new_empty(BT + 1, buf.shape[1])  # row BT: the edge's scratch row
        torch.mul(x, weight[:, W - 1], out=y[:BT])
        for j in range(max(W - BT, 0), W - 1):  # tap j reads lag = W - 1 - j rows earlier
            lag = W - 1 - j
            y[lag:BT].addcmul_(x[: BT - lag], weight[:, j])
        if len(edge):
            y[edge] = (buf[taps] * weight.T).sum(1)  # (E, W, D) -> (E, D)
        y = y[:BT]
        return y if bias is None else y.add_(bias)

    @staticmethod
    def backward(ctx, dy):
        buf, edge, taps, weight, bias = ctx.saved_tensors
        if ctx.silu:  # silu'(y) = sigmoid(y) (1 + y (1 - sigmoid(y)))
            y = _Taps.sum(buf, len(dy), edge, taps, weight, bias)
            sig = torch.sigmoid(y)
            dy = dy * sig * (1 + y * (1 - sig))
        W, BT = weight.shape[1], len(dy)
        dy = torch.cat([dy, dy.new_zeros(1, dy.shape[1])])  # the scratch row: no gradient
        inner = dy.index_fill(0, edge, 0)[:BT]  # the rows the shifted slices computed
        x, dbuf, dw = buf[:BT], torch.zeros_like(buf), torch.zeros_like(weight)
        for j in range(max(W - BT, 0), W):  # a lag of BT or more reads only the edge
            lag = W - 1 - j
            dbuf[: BT - lag].addcmul_(inner[lag:], weight[:, j])
            dw[:, j] = (inner[lag:] * x[: BT - lag]).sum(0)
        if len(edge):  # the edge through its taps (one tap's real rows are distinct; the
            # slots past a short sequence add zeros to the zero row)
            de = dy[edge]  # (E, D)
            for j in range(W):
                dbuf.index_add_(0, taps[:, j], de * weight[:, j])
            dw += (de[:, None, :] * buf[taps]).sum(0).T
        return dbuf, None, None, None, dw, None if bias is None else dy[:BT].sum(0), None


def _sources(B, T, W, cu_seqlens, device):
    """The edge: every sequence's first W - 1 rows, `[N * (W - 1)]`, whose windows reach before
    its start, with the rows of the buffer each of their taps reads, `[N * (W - 1), W]`; and
    each sequence's last W - 1 inputs, `[N, W - 1]`. Row B*T + n*(W-1) + i is input i of
    sequence n's carried state. Slots past a sequence shorter than W - 1 write to row B*T (a
    scratch row after the outputs) and read the buffer's zero row: fixed shapes, no
    data-dependent indexing (the meta device runs it too)."""
    if cu_seqlens is None:
        bounds = torch.arange(B + 1, device=device) * T
    else:
        bounds = cu_seqlens.to(device=device, dtype=torch.long)
    starts, ends = bounds[:-1], bounds[1:]
    N = len(starts)
    step = torch.arange(W - 1, device=device)  # the row's place in its sequence
    inside = step < (ends - starts)[:, None]  # (N, W-1)
    edge = torch.where(inside, starts[:, None] + step, B * T).reshape(-1)
    lag = torch.arange(W - 1, -1, -1, device=device)  # tap j reads t - lag_j
    before = (step[:, None] - lag).expand(N, W - 1, W)  # < 0: before the sequence starts
    # sequence n's carried input `before` (< 0) rows before its start
    carried = B * T + torch.arange(N, device=device) * (W - 1) + (W - 1)  # (N,) + before
    zero = B * T + N * (W - 1)  # the buffer's zero row
    taps = torch.where(before >= 0, starts[:, None, None], carried[:, None, None]) + before
    taps = torch.where(inside[..., None], taps, zero).reshape(N * (W - 1), W)
    ends_src = ends[:, None] - torch.arange(W - 1, 0, -1, device=device)  # (N, W-1)
    before_end = ends_src - starts[:, None]
    tail = torch.where(before_end >= 0, starts[:, None], carried[:, None]) + before_end
    return edge, taps, tail


def naive_causal_conv1d(
    x,
    weight,
    bias=None,
    *,
    activation=None,
    initial_state=None,
    output_final_state=False,
    cu_seqlens=None,
):
    """The step-by-step definition (a rolling window per sequence), any dtype: the reference."""
    B, T, D = x.shape
    W = weight.shape[1]

    def step(xs, window):  # xs: [x_t (1, D)], window: (1, D, W - 1), oldest first
        full = torch.cat([window, xs[0][..., None]], dim=-1)  # (1, D, W)
        out = (full * weight).sum(-1) + (0 if bias is None else bias)
        return (F.silu(out) if activation == "silu" else out), full[..., 1:]

    return step_loop(
        step,
        [x],
        x.new_zeros(D, W - 1),
        initial_state,
        cu_seqlens,
        output_final_state,
        out_shape=(B, T, D),
    )
