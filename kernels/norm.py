"""RMSNorm and gated RMSNorm (the output norm of GLA, Mamba2, Gated DeltaNet) and the L2 norm
of the delta rule's queries and keys, computed in fp32 (float64 inputs in float64).

Both are one autograd function that keeps its inputs and one reciprocal RMS per row (and group)
and recomputes the rest in the backward: autograd of the formula would keep the normalised row,
its product with the weight and the gate's SiLU as well (3 more tensors of the input's size per
gated norm, 1 per plain one).

Legend: D the normalised width (the last dimension), split into G groups normalised alone (the
weight is D wide); any leading dimensions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rnnscale.kernels.common.recompute import covered


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """`x / sqrt(mean(x^2) + eps) * weight` over the last dim; fp32 inside, the dtype of x out
    (a bf16 mean of squares loses small rows)."""
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"weight must have shape [{x.shape[-1]}], got {tuple(weight.shape)}")
    return _Norm.apply(x, weight, None, eps, 1, True)


def gated_rms_norm(
    x: torch.Tensor,
    gate: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    *,
    groups: int = 1,
    norm_before_gate: bool = True,
) -> torch.Tensor:
    """`rms_norm(x) * silu(gate)`: the normalise-then-gate output of GLA and Gated DeltaNet;
    with norm_before_gate=False, `rms_norm(x * silu(gate))` (Mamba2's RMSNormGated). `groups`
    splits the last dim into that many groups, each normalised alone; the weight is applied
    over the full width after the norm."""
    if gate.shape != x.shape:
        raise ValueError(f"gate must have the shape of x {tuple(x.shape)}, got {tuple(gate.shape)}")
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"weight must have shape [{x.shape[-1]}], got {tuple(weight.shape)}")
    if x.shape[-1] % groups:
        raise ValueError(f"groups = {groups} must divide the normalised width {x.shape[-1]}")
    return _Norm.apply(x, weight, gate, eps, groups, norm_before_gate)


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """`x / sqrt(sum(x^2) + eps)` over the last dim (fla's l2norm), fp32 inside, the dtype of x
    out. Keeps its output (which the scan that reads it keeps too) and one scale per row, or
    its input instead where that is a recipe (`rnnscale.kernels.common.recompute`: the layer
    recomputes both)."""
    return _L2Norm.apply(x, eps)


class _L2Norm(torch.autograd.Function):
    """y = x r, r = rsqrt(sum x^2 + eps); dx = r (dy - y sum(y dy))."""

    @staticmethod
    def forward(ctx, x, eps):
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        r = torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + eps)
        y = (xf * r).to(x.dtype)
        ctx.keeps_input = covered(x)
        ctx.save_for_backward(x if ctx.keeps_input else y, r)
        return y

    @staticmethod
    def backward(ctx, dy):
        kept, r = ctx.saved_tensors
        y = (kept.to(r.dtype) * r).to(kept.dtype) if ctx.keeps_input else kept  # the forward's
        yf, dy = y.to(r.dtype), dy.to(r.dtype)
        return (r * (dy - yf * (yf * dy).sum(-1, keepdim=True))).to(y.dtype), None


def _silu_and_slope(gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """silu(g) and its derivative sigmoid(g) (1 + g (1 - sigmoid(g)))."""
    sig = torch.sigmoid(gate)
    return gate * sig, sig * (1 + gate * (1 - sig))


class _Norm(torch.autograd.Function):
    """y = n * w [* s] with n = u r per group, u = x [* s]; s = silu(gate); r = rsqrt(mean u^2
    + eps). Saves x, gate, w and r."""

    @staticmethod
    def forward(ctx, x, weight, gate, eps, groups, norm_before_gate):
        acc = torch.promote_types(x.dtype, torch.float32)  # fp32 at least; float64 stays
        u = x.to(acc)
        if gate is not None and not norm_before_gate:
            u = u * F.silu(gate.to(acc))
        ug = u.unflatten(-1, (groups, -1))
        r = torch.rsqrt(ug.pow(2).mean(-1, keepdim=True) + eps)  # (..., G, 1)
        y = (ug * r).flatten(-2) * weight.to(acc)
        if gate is not None and norm_before_gate:
            y = y * F.silu(gate.to(acc))
        ctx.save_for_backward(x, weight, gate, r)
        ctx.groups, ctx.norm_before_gate = groups, norm_before_gate
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, weight, gate, r = ctx.saved_tensors
        acc, after = r.dtype, gate is not None and ctx.norm_before_gate
        u, dy, w = x.to(acc), dy.to(acc), weight.to(acc)
        s, slope = _silu_and_slope(gate.to(acc)) if gate is not None else (None, None)
        if gate is not None and not after:
            u = u * s
        n = (u.unflatten(-1, (ctx.groups, -1)) * r).flatten(-2)  # the normalised rows
        dgate = None
        if after:
            dgate = dy * n * w * slope
            dy = dy * s
        dw = (dy * n).sum_to_size(w.shape) if ctx.needs_input_grad[1] else None
        dn = (dy * w).unflatten(-1, (ctx.groups, -1))
        ng = n.unflatten(-1, (ctx.groups, -1))
        du = (r * (dn - ng * (dn * ng).mean(-1, keepdim=True))).flatten(-2)
        dx = du
        if gate is not None and not after:
            dx, dgate = du * s, du * x.to(acc) * slope
        return (dx.to(x.dtype), None if dw is None else dw.to(weight.dtype),
                None if dgate is None else dgate.to(gate.dtype), None, None, None)  # fmt: skip
