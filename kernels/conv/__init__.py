"""Causal depthwise short convolution (Mamba2, DeltaNet, GLA variants) with packed documents
and a carried tail state."""

from rnnscale.kernels.conv.short_conv import causal_conv1d, naive_causal_conv1d

__all__ = ["causal_conv1d", "naive_causal_conv1d"]
