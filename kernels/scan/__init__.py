"""Elementwise linear scan `h_t = a_t * h_{t-1} + b_t`: minGRU, minLSTM, HGRN, RG-LRU, LRU."""

from rnnscale.kernels.scan.chunk_torch import linear_scan
from rnnscale.kernels.scan.naive import naive_linear_scan
from rnnscale.kernels.scan.recurrent import linear_scan_step

__all__ = ["linear_scan", "linear_scan_step", "naive_linear_scan"]
