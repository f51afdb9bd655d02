"""rnnscale.train.model: token mixers, the one MIXERS registry, and the language model.

A mixer is an `nn.Module` built as `cls(options, dims)` from its own options section (the
`model` config section of the same name) and a `MixerDims` (d_model, num_heads, norm_eps,
layer_idx, num_layers, and the `kernels` section its scan runs with), with

    forward(x [B, T, d_model], *, cu_seqlens=None, state=None, shard=None)
        -> (y [B, T, d_model], state)
    flops_per_token(seq_len) -> int      forward FLOPs per token (train/model/flops.py)

where `state` (whatever the mixer needs: recurrent state, convolution tails, a key/value
cache) continues every sequence, or every packed document, exactly where the call stopped, and
`shard` (a `rnnscale.parallel.sequence.Shard`) says that x is this rank's slice of longer rows
under sequence parallelism (docs/parallelism.md).
"""

from __future__ import annotations

import importlib

from rnnscale.train.config import KernelsSection, ModelSection
from rnnscale.train.mixers import REGISTRY
from rnnscale.train.model.layers import MixerDims
from rnnscale.train.model.lm import LanguageModel


def _mixer_class(path: str) -> type:
    module, name = path.split(":")
    return getattr(importlib.import_module(f"rnnscale.train.model.{module}"), name)


MIXERS = {name: _mixer_class(entry.cls) for name, entry in REGISTRY.items()}
"""Mixer name -> module class, from the one registry (`rnnscale.train.mixers.REGISTRY`, whose
names `rnnscale.train.config.MixerName` allows); its options are the model config section of
the same name."""


def build_model(cfg: ModelSection, kernels: KernelsSection | None = None) -> LanguageModel:
    """Build the language model described by the `model` section of the run config, its scans
    and loss run as the `kernels` section says (default: the defaults)."""
    kernels = KernelsSection() if kernels is None else kernels
    names = cfg.layer_types()
    mixers = []
    for i, name in enumerate(names):
        dims = MixerDims(cfg.d_model, cfg.num_heads, cfg.norm_eps, i, len(names), kernels)
        mixers.append(MIXERS[name](getattr(cfg, name), dims))
    return LanguageModel(cfg, mixers, names, loss_chunk_tokens=kernels.loss_chunk_tokens,
                         recompute_activations=kernels.recompute_activations)  # fmt: skip


__all__ = ["MIXERS", "LanguageModel", "MixerDims", "build_model"]
