"""One way for every mixer to run its recurrence: `scan(family, *inputs, state=..., ...)`
picks the form (DESIGN.md section 3):

- the sequence-parallel form when x is this rank's slice of longer rows (`shard`);
- one step of the recurrence when one token of plain rows comes in (generation: O(1) per
  token, no padding to a chunk);
- the chunkwise kernel otherwise (training, prefill, packed documents), with the chunk size
  and backend of the `kernels` config section.

A family is one `SCANS` entry: its chunkwise op (rnnscale.kernels.<family>), its one-step
adapter, and its sequence-parallel form (rnnscale.parallel.state_passing). Every form returns
`(out, final_state)`. The matrix states are fp32 or wider whatever the inputs' dtype; the
elementwise scan's state is in b's dtype (its mixers make a and b in fp32 or wider).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from rnnscale.kernels.common.checks import repeat_groups
from rnnscale.kernels.delta import chunk_delta_product, chunk_gated_delta_rule
from rnnscale.kernels.delta.recurrent import gated_delta_rule_step
from rnnscale.kernels.gla import chunk_gla
from rnnscale.kernels.gla.recurrent import gla_step
from rnnscale.kernels.scan import linear_scan
from rnnscale.kernels.scan.recurrent import linear_scan_step
from rnnscale.kernels.simple_gla import chunk_simple_gla
from rnnscale.kernels.simple_gla.recurrent import simple_gla_step
from rnnscale.parallel.state_passing import (
    chunk_delta_product_sp,
    chunk_gated_delta_rule_sp,
    chunk_gla_sp,
    chunk_simple_gla_sp,
    linear_scan_sp,
)


@dataclass(frozen=True)
class ScanSettings:
    """A mixer's share of the `kernels` config section: its family's chunk size (None: the
    kernel's default) and the backend."""

    chunk_size: int | None = None
    backend: str = "auto"


@dataclass(frozen=True)
class ScanFamily:
    chunk: Callable  # (*inputs, [scale,] initial_state, output_final_state, cu_seqlens, ...)
    step: Callable  # (inputs [B, 1, ...], state | None, options) -> (out [B, 1, ...], state)
    sequence_parallel: Callable  # chunk's inputs and options plus `shard`
    scaled: bool = True  # takes `scale` (linear attention); the elementwise scan does not


def _matrix_step(kernel_step: Callable) -> Callable:
    """One token of a matrix-state recurrence (q, k, v, gates...) through `kernel_step`, in the
    state's dtype: fp32 or wider, as the chunkwise kernels accumulate (a state that starts at
    None starts at zeros in the widest of q's and the gates' dtypes and fp32)."""

    def step(inputs, S, options):
        q, k, v, g, *rest = inputs
        if S is None:
            acc = torch.promote_types(torch.promote_types(q.dtype, g.dtype), torch.float32)
            S = q.new_zeros(q.shape[0], q.shape[2], q.shape[3], v.shape[-1], dtype=acc)
        dt = S.dtype  # S: (B, H, K, V)
        token = [x[:, 0].to(dt) for x in inputs]
        o, S = kernel_step(*token, S, options["scale"])
        return o[:, None].to(v.dtype), S  # o: (B, 1, H, V)

    return step


def _delta_product_step(inputs, S, options):
    """DeltaProduct: k, v, beta carry n Householder steps per token `[B, 1, n, ...]`; the
    token decays the state once, then takes its n delta steps."""
    q, k, v, g, beta = inputs
    one = _matrix_step(gated_delta_rule_step)
    decay = g
    for j in range(k.shape[2]):
        o, S = one((q, k[:, :, j], v[:, :, j], decay, beta[:, :, j]), S, options)
        decay = torch.zeros_like(decay)
    return o, S


def _elementwise_step(inputs, h, options):
    a, b = inputs
    h = b.new_zeros(b.shape[0], b.shape[2]) if h is None else h.to(b.dtype)  # (B, D)
    h, _ = linear_scan_step(a[:, 0], b[:, 0], h)
    return h[:, None], h


SCANS = {
    "gla": ScanFamily(chunk_gla, _matrix_step(gla_step), chunk_gla_sp),
    "simple_gla": ScanFamily(chunk_simple_gla, _matrix_step(simple_gla_step), chunk_simple_gla_sp),
    "delta": ScanFamily(
        chunk_gated_delta_rule, _matrix_step(gated_delta_rule_step), chunk_gated_delta_rule_sp
    ),
    "delta_product": ScanFamily(chunk_delta_product, _delta_product_step, chunk_delta_product_sp),
    "scan": ScanFamily(linear_scan, _elementwise_step, linear_scan_sp, scaled=False),
}
"""Scan family -> its chunkwise, one-step and sequence-parallel forms."""


DEFAULT = ScanSettings()


@torch.compiler.disable  # a compiled block (train.compile) calls our kernels as they are
def scan(family: str, *inputs: torch.Tensor, state=None, cu_seqlens=None,
         settings: ScanSettings = DEFAULT, shard=None, scale: float | None = None):  # fmt: skip
    """Run `family`'s recurrence over `inputs` (the kernel's tensors, `[B, T, ...]`) from
    `state`, in the form that fits: see the module docstring. Returns `(out, final_state)`.
    q and k may have fewer heads than v, each shared by a group of consecutive heads (Mamba2):
    simple_gla's chunkwise op and its sequence-parallel form score them once per group; every
    other form gets them repeated."""
    f = SCANS[family]
    if f.scaled and scale is None:
        scale = inputs[0].shape[-1] ** -0.5  # the kernels' default: K ** -0.5
    options = {"scale": scale} if f.scaled else {}
    T = inputs[-1].shape[1]
    chunkwise = shard is None and not (T == 1 and cu_seqlens is None)
    grouped = family == "simple_gla" and (chunkwise or shard is not None)
    if f.scaled and not grouped:  # grouped q, k: one per head
        q, k, v, *rest = inputs
        inputs = (repeat_groups(q, v), repeat_groups(k, v), v, *rest)
    if shard is not None:
        return f.sequence_parallel(*inputs, shard=shard, initial_state=state,
                                   cu_seqlens=cu_seqlens, chunk_size=settings.chunk_size,
                                   backend=settings.backend, **options)  # fmt: skip
    if T == 1 and cu_seqlens is None:
        return f.step(inputs, state, options)
    return f.chunk(*inputs, initial_state=state, output_final_state=True, cu_seqlens=cu_seqlens,
                   chunk_size=settings.chunk_size, backend=settings.backend, **options)  # fmt: skip
