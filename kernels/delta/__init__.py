"""Gated delta rule: DeltaNet, Gated DeltaNet, negative eigenvalues, DeltaProduct."""

from rnnscale.kernels.delta.chunk_torch import chunk_gated_delta_rule
from rnnscale.kernels.delta.naive import naive_recurrent_gated_delta_rule
from rnnscale.kernels.delta.product import chunk_delta_product
from rnnscale.kernels.delta.recurrent import gated_delta_rule_step

__all__ = [
    "chunk_delta_product",
    "chunk_gated_delta_rule",
    "gated_delta_rule_step",
    "naive_recurrent_gated_delta_rule",
]
