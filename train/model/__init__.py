"""rnnscale.train.model: token mixers, the one MIXERS registry, and the language model.

A mixer is an `nn.Module` built as `cls(options, dims)` from its own options section (the
`model` config section of the same name) and a `MixerDims` (d_model, num_heads, norm_eps,
layer_idx, num_layers), with

    forward(x [B, T, d_model], *, cu_seqlens=None, state=None, shard=None)
        -> (y [B, T, d_model], state)
    flops_per_token(seq_len) -> int      forward FLOPs per token (train/model/flops.py)

where `state` (whatever the mixer needs: recurrent state, convolution tails, a key/value
cache) continues every sequence, or every packed document, exactly where the call stopped, and
`shard` (a `rnnscale.parallel.sequence.Shard`) says that x is this rank's slice of longer rows
under sequence parallelism (docs/parallelism.md).
"""

from __future__ import annotations

from rnnscale.train.config import ModelSection
from rnnscale.train.model.attn import Attention, SlidingWindowAttention
from rnnscale.train.model.gated_deltanet import GatedDeltaNet
from rnnscale.train.model.gla import GatedLinearAttention
from rnnscale.train.model.hgrn2 import HGRN2
from rnnscale.train.model.layers import MixerDims
from rnnscale.train.model.lm import LanguageModel
from rnnscale.train.model.mamba2 import Mamba2
from rnnscale.train.model.minrnn import MinGRU, MinLSTM
from rnnscale.train.model.retnet import MultiScaleRetention
from rnnscale.train.model.rglru import RGLRUBlock

MIXERS = {
    "gla": GatedLinearAttention,
    "retnet": MultiScaleRetention,
    "mamba2": Mamba2,
    "hgrn2": HGRN2,
    "gated_deltanet": GatedDeltaNet,
    "mingru": MinGRU,
    "minlstm": MinLSTM,
    "rglru": RGLRUBlock,
    "attn": Attention,
    "swa": SlidingWindowAttention,
}
"""Mixer name -> module class; its options are the model config section of the same name.
Its keys are the names `rnnscale.train.config.MixerName` allows (tests/test_model.py checks)."""


def layer_types(cfg: ModelSection) -> list[str]:
    """The mixer of every layer: `mixer_pattern` tiled over `num_layers`."""
    pattern = cfg.mixer_pattern
    return [pattern[i % len(pattern)] for i in range(cfg.num_layers)]


def build_model(cfg: ModelSection) -> LanguageModel:
    """Build the language model described by the `model` section of the run config."""
    names = layer_types(cfg)
    mixers = []
    for i, name in enumerate(names):
        dims = MixerDims(cfg.d_model, cfg.num_heads, cfg.norm_eps, i, len(names))
        mixers.append(MIXERS[name](getattr(cfg, name), dims))
    return LanguageModel(cfg, mixers, names)


__all__ = ["MIXERS", "LanguageModel", "MixerDims", "build_model", "layer_types"]
