"""Gated linear attention (per-key decay): `S_t = diag(exp g_t) S_{t-1} + k_t v_t^T`."""

from rnnscale.kernels.gla.chunk_torch import chunk_gla
from rnnscale.kernels.gla.naive import naive_recurrent_gla

__all__ = ["chunk_gla", "naive_recurrent_gla"]
