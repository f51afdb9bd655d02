"""Building blocks shared by the mixers and the model: RMSNorm, SwiGLU MLP, rotary embedding."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from rnnscale.kernels.common.recompute import active, with_recipes
from rnnscale.kernels.conv import causal_conv1d
from rnnscale.kernels.norm import gated_rms_norm, rms_norm
from rnnscale.parallel.sequence import halo_state
from rnnscale.train.config import KernelsSection
from rnnscale.train.model.scan import ScanSettings


@dataclass(frozen=True)
class MixerDims:
    """The explicit scalars every mixer gets beside its own options section."""

    d_model: int
    num_heads: int
    norm_eps: float
    layer_idx: int  # 0-based position of the layer in the model
    num_layers: int
    kernels: KernelsSection = field(default_factory=KernelsSection)  # chunk sizes, backend

    def scan_settings(self, family: str) -> ScanSettings:
        """The chunk size of `family` and the backend, for `rnnscale.train.model.scan.scan`."""
        k = self.kernels
        return ScanSettings(getattr(k.chunk_size, family), k.backend)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 (a bf16 mean of squares loses the small rows).
    `forward(x, *, with_recipe=False)`: with it, `(y, recipe)`, the recipe a function that
    makes y again, bit for bit, with a copy of the weight taken inside the forward (where
    ZeRO-3 has it whole; `rnnscale.kernels.common.recompute`), or None where none would be
    used."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, *, with_recipe: bool = False):
        return normed(rms_norm, (x,), self.weight, self.eps, with_recipe=with_recipe)


class GatedRMSNorm(RMSNorm):
    """`rms_norm(x) * weight * silu(gate)` per head (GLA, RetNet, Gated DeltaNet outputs). A
    module, so the weight is used inside its own forward (ZeRO-3 gathers it there)."""

    def forward(self, x: torch.Tensor, gate: torch.Tensor, *, with_recipe: bool = False):
        return normed(gated_rms_norm, (x, gate), self.weight, self.eps, with_recipe=with_recipe)


def normed(fn, inputs: tuple, weight: torch.Tensor, eps: float, *, with_recipe: bool,
           **options):  # fmt: skip
    """`fn(*inputs, weight, eps, **options)`, a norm of `rnnscale.kernels.norm`; with
    `with_recipe`, `(y, recipe)`: a function that makes y again, bit for bit, with a copy of
    the weight taken now (call it inside the module's forward, where ZeRO-3 has the weight
    whole), or None where no recipe would be used (`recompute.active()` false)."""
    y = fn(*inputs, weight, eps, **options)
    if not with_recipe:
        return y
    if not active():  # torch.compile, recomputing off, no autograd
        return y, None
    weight, kept = weight.detach().clone(), [t.detach() for t in inputs]
    return y, lambda: fn(*kept, weight, eps, **options)


def gated_output(norm: GatedRMSNorm, proj: nn.Linear, o: torch.Tensor, gate: torch.Tensor):
    """`proj(norm(o, gate))` over `[B, T, H, V]` heads: the projection's backward keeps the
    recipe of the norm's output, not the rows (`rnnscale.kernels.common.recompute`)."""
    y, again = norm(o, gate, with_recipe=True)
    return with_recipes({y: again}, proj, y.flatten(-2))


class ShortConvolution(nn.Module):
    """Causal depthwise convolution over time (Mamba2, DeltaNet, Griffin, minGRU use one).

    `forward(x [B, T, D], *, cu_seqlens=None, state=None, shard=None) -> (y, state)`: state is
    the last W - 1 inputs of every sequence, `[N, D, W - 1]`; packed documents never see each
    other. Under sequence parallelism (`shard`) the slice starts from the previous rank's last
    W - 1 inputs (a halo exchange). Initialised as `nn.Conv1d` is (uniform in +-1/sqrt(W)).
    """

    def __init__(self, dim: int, size: int, *, bias: bool = False, activation: str | None = "silu"):
        super().__init__()
        bound = size**-0.5
        self.weight = nn.Parameter(torch.empty(dim, size).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(dim).uniform_(-bound, bound)) if bias else None
        self.activation = activation

    def forward(self, x: torch.Tensor, *, cu_seqlens=None, state=None, shard=None,
                with_recipe: bool = False):  # fmt: skip
        """`(y, state)`, and with `with_recipe` the function that makes y again
        (`causal_conv1d`)."""
        if shard is not None and self.weight.shape[1] > 1:
            state = halo_state(shard, x, self.weight.shape[1] - 1, cu_seqlens)
        return causal_conv1d(
            x,
            self.weight,
            self.bias,
            activation=self.activation,
            initial_state=state,
            output_final_state=True,
            cu_seqlens=cu_seqlens,
            with_recipe=with_recipe,
        )


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) (Shazeer 2020)."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(d_model, hidden, bias=False)
        self.up = nn.Linear(d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The backward keeps gate(x) and up(x) only, and makes their SiLU and product again
        (`rnnscale.kernels.common.recompute`), as fla's and Liger's SwiGLU do."""
        g, u = self.gate(x), self.up(x)
        g_, u_ = g.detach(), u.detach()
        s = F.silu(g)
        p = with_recipes({s: lambda: F.silu(g_)}, torch.mul, s, u)
        return with_recipes({p: lambda: F.silu(g_) * u_}, self.down, p)


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
    acc = torch.promote_types(x.dtype, torch.float32)  # fp32 angles at least
    inv_freq = theta ** (-torch.arange(0, D // 2, device=x.device, dtype=acc) / (D // 2))
    angle = pos[..., None].to(acc) * inv_freq  # (B, T, D/2)
    cos, sin = angle.cos()[:, :, None, :], angle.sin()[:, :, None, :]  # (B, T, 1, D/2)
    x1, x2 = x.to(acc).chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
