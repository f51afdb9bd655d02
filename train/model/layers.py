"""Building blocks shared by the mixers and the model: RMSNorm, SwiGLU MLP, rotary embedding."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from rnnscale.kernels.norm import rms_norm


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 (a bf16 mean of squares loses the small rows)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) (Shazeer 2020)."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(d_model, hidden, bias=False)
        self.up = nn.Linear(d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


def mlp_hidden_size(d_model: int, requested: int) -> int:
    """The SwiGLU width: `requested`, or 8/3 d_model rounded up to a multiple of 64."""
    if requested > 0:
        return requested
    return 64 * -(-(8 * d_model) // (3 * 64))


def positions(B: int, T: int, cu_seqlens: torch.Tensor | None, offset: int, device) -> torch.Tensor:
    """Position of every token inside its own sequence: restarts at each packed document."""
    pos = torch.arange(T, device=device) + offset  # (T,)
    if cu_seqlens is None:
        return pos.expand(B, T)
    starts = cu_seqlens[:-1].to(device=device, dtype=torch.long)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(device=device, dtype=torch.long)
    doc_start = torch.repeat_interleave(starts, lengths, output_size=T)  # (T,)
    return (pos - doc_start).expand(B, T)


def apply_rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i + D/2}) of `x [B, T, H, D]` by pos * theta^(-2i/D) (fp32 angles)."""
    D = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, D // 2, device=x.device, dtype=torch.float32) / (D // 2))
    angle = pos[..., None].float() * inv_freq  # (B, T, D/2)
    cos, sin = angle.cos()[:, :, None, :], angle.sin()[:, :, None, :]  # (B, T, 1, D/2)
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
