"""RMSNorm and gated RMSNorm (the output norm of GLA, Mamba2, Gated DeltaNet), computed in fp32.

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
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


def gated_rms_norm(
    x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """`rms_norm(x) * silu(gate)`: the normalise-then-gate output of GLA and Gated DeltaNet."""
    if gate.shape != x.shape:
        raise ValueError(f"gate must have the shape of x {tuple(x.shape)}, got {tuple(gate.shape)}")
    return (rms_norm(x, weight, eps).float() * F.silu(gate.float())).to(x.dtype)
