"""The four scan families described once, so every test runs over all of them.

Each family turns float64 random tensors into valid inputs (gates <= 0, unit-norm keys for the
delta rule, decays in (0, 1) for the scan) and names its functions."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rnnscale.kernels.common.checks import repeat_groups
from rnnscale.kernels.delta import (
    chunk_gated_delta_rule,
    gated_delta_rule_step,
    naive_recurrent_gated_delta_rule,
)
from rnnscale.kernels.gla import chunk_gla, gla_step, naive_recurrent_gla
from rnnscale.kernels.scan import linear_scan, linear_scan_step, naive_linear_scan
from rnnscale.kernels.simple_gla import (
    chunk_simple_gla,
    naive_recurrent_simple_gla,
    simple_gla_step,
)


@dataclass
class Family:
    name: str
    chunk: Callable
    naive: Callable
    step: Callable  # (per-token inputs..., state) -> (out, state); scale bound where needed
    make: Callable  # (B, T, H, K, V, gen) -> list of float64 inputs
    state_shape: Callable  # (N, H, K, V) -> tuple
    has_scale: bool = True


def _qkv(B, T, H, K, V, gen):
    q = torch.randn(B, T, H, K, generator=gen, dtype=torch.float64)
    k = torch.randn(B, T, H, K, generator=gen, dtype=torch.float64)
    v = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    return q, k, v


def _gla(B, T, H, K, V, gen):
    q, k, v = _qkv(B, T, H, K, V, gen)
    g = F.logsigmoid(torch.randn(B, T, H, K, generator=gen, dtype=torch.float64) + 2)
    return [q, k, v, g]


def _simple_gla(B, T, H, K, V, gen):
    q, k, v = _qkv(B, T, H, K, V, gen)
    g = F.logsigmoid(torch.randn(B, T, H, generator=gen, dtype=torch.float64) + 2)
    return [q, k, v, g]


def _delta(B, T, H, K, V, gen):
    q, k, v = _qkv(B, T, H, K, V, gen)
    k = F.normalize(k, dim=-1)
    g = F.logsigmoid(torch.randn(B, T, H, generator=gen, dtype=torch.float64) + 3)
    beta = 2 * torch.sigmoid(torch.randn(B, T, H, generator=gen, dtype=torch.float64))  # (0, 2)
    return [q, k, v, g, beta]


def _scan(B, T, H, K, V, gen):
    D = H * K
    a = torch.sigmoid(torch.randn(B, T, D, generator=gen, dtype=torch.float64) + 2)
    b = torch.randn(B, T, D, generator=gen, dtype=torch.float64)
    return [a, b]


FAMILIES = [
    Family("gla", chunk_gla, naive_recurrent_gla, gla_step, _gla, lambda N, H, K, V: (N, H, K, V)),
    Family(
        "simple_gla",
        chunk_simple_gla,
        naive_recurrent_simple_gla,
        simple_gla_step,
        _simple_gla,
        lambda N, H, K, V: (N, H, K, V),
    ),
    Family(
        "delta",
        chunk_gated_delta_rule,
        naive_recurrent_gated_delta_rule,
        gated_delta_rule_step,
        _delta,
        lambda N, H, K, V: (N, H, K, V),
    ),
    Family(
        "scan",
        linear_scan,
        naive_linear_scan,
        linear_scan_step,
        _scan,
        lambda N, H, K, V: (N, H * K),
        has_scale=False,
    ),
]


def grouped_simple_gla(groups: int) -> Family:
    """simple_gla with q and k shared by groups of H / `groups` heads (Mamba2's B and C); the
    step-loop reference reads them repeated to every head."""

    def make(B, T, H, K, V, gen):
        q, k, v, g = _simple_gla(B, T, H, K, V, gen)
        return [q[:, :, :groups].contiguous(), k[:, :, :groups].contiguous(), v, g]

    def naive(q, k, v, g, **kw):
        return naive_recurrent_simple_gla(repeat_groups(q, v), repeat_groups(k, v), v, g, **kw)

    return Family(f"simple_gla_{groups}_groups", chunk_simple_gla, naive, simple_gla_step, make,
                  lambda N, H, K, V: (N, H, K, V))  # fmt: skip
