"""Scalar-decay linear attention (one decay per head): RetNet, Mamba2/SSD, lightning attention."""

from rnnscale.kernels.simple_gla.chunk_torch import chunk_simple_gla
from rnnscale.kernels.simple_gla.naive import naive_recurrent_simple_gla
from rnnscale.kernels.simple_gla.recurrent import simple_gla_step

__all__ = ["chunk_simple_gla", "naive_recurrent_simple_gla", "simple_gla_step"]
