"""Gated linear attention (per-key decay): `S_t = diag(exp g_t) S_{t-1} + k_t v_t^T`."""

from rnnscale.kernels.gla.chunk_torch import chunk_gla
from rnnscale.kernels.gla.naive import naive_recurrent_gla
from rnnscale.kernels.gla.recurrent import gla_step

__all__ = ["chunk_gla", "gla_step", "naive_recurrent_gla"]
