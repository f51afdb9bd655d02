"""rnnscale.train.model: token mixers, the one MIXERS registry, and the language model."""

from __future__ import annotations

from rnnscale.train.config import ModelSection
from rnnscale.train.model.attn import Attention
from rnnscale.train.model.gla import GatedLinearAttention
from rnnscale.train.model.lm import LanguageModel

MIXERS = {
    "gla": (GatedLinearAttention, "gla"),
    "attn": (Attention, "attn"),
}
"""Mixer name -> (module class, name of its options section in the model config).
Its keys are the names `rnnscale.train.config.MixerName` allows (tests/test_model.py checks)."""


def layer_types(cfg: ModelSection) -> list[str]:
    """The mixer of every layer: `mixer_pattern` tiled over `num_layers`."""
    pattern = cfg.mixer_pattern
    return [pattern[i % len(pattern)] for i in range(cfg.num_layers)]


def build_model(cfg: ModelSection) -> LanguageModel:
    """Build the language model described by the `model` section of the run config."""
    names = layer_types(cfg)
    mixers = []
    for name in names:
        cls, options = MIXERS[name]
        mixers.append(cls(cfg.d_model, cfg.num_heads, getattr(cfg, options), cfg.norm_eps))
    return LanguageModel(cfg, mixers, names)


__all__ = ["MIXERS", "LanguageModel", "build_model", "layer_types"]
