"""RMSNorm and gated RMSNorm (the output norm of GLA, Mamba2, Gated DeltaNet), computed in fp32
(float64 inputs in float64).

Legend: D the normalised width (the last dimension); any leading dimensions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """`x / sqrt(mean(x^2) + eps) * weight` over the last dim; fp32 inside, the dtype of x out
    (a bf16 mean of squares loses small rows)."""
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"weight must have shape [{x.shape[-1]}], got {tuple(weight.shape)}")
    acc = torch.promote_types(x.dtype, torch.float32)  # fp32 at least; float64 stays float64
    xf = x.to(acc)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.to(acc)).to(x.dtype)


def gated_rms_norm(
    x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """`rms_norm(x) * silu(gate)`: the normalise-then-gate output of GLA and Gated DeltaNet."""
    if gate.shape != x.shape:
        raise ValueError(f"gate must have the shape of x {tuple(x.shape)}, got {tuple(gate.shape)}")
    acc = torch.promote_types(x.dtype, torch.float32)
    return (rms_norm(x, weight, eps).to(acc) * F.silu(gate.to(acc))).to(x.dtype)
