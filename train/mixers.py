"""The one registry of token mixers: each name, the class that implements it, and the scan
family it runs on (whose chunk size `kernels.chunk_size.<family>` sets; None: attention).

Torch-free, so that the config takes from here the names `model.mixer_pattern` allows and
the chunk-size fields `kernels.chunk_size.*`; `rnnscale.train.model.MIXERS` imports the
classes. A new mixer is one entry here, its module under train/model/, and its options
section in the config schema (`model.<name>`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mixer:
    cls: str  # "module:Class" under rnnscale.train.model
    family: str | None  # the scan family: gla, simple_gla, delta, scan; None for attention


REGISTRY = {
    "gla": Mixer("gla:GatedLinearAttention", "gla"),
    "retnet": Mixer("retnet:MultiScaleRetention", "simple_gla"),
    "mamba2": Mixer("mamba2:Mamba2", "simple_gla"),
    "hgrn2": Mixer("hgrn2:HGRN2", "gla"),
    "gated_deltanet": Mixer("gated_deltanet:GatedDeltaNet", "delta"),
    "mingru": Mixer("minrnn:MinGRU", "scan"),
    "minlstm": Mixer("minrnn:MinLSTM", "scan"),
    "rglru": Mixer("rglru:RGLRUBlock", "scan"),
    "attn": Mixer("attn:Attention", None),
    "swa": Mixer("attn:SlidingWindowAttention", None),
}
"""Mixer name -> its class and scan family."""

FAMILIES = {
    "gla": (16, "The gla family (per-key decay): the gla and hgrn2 mixers."),
    "simple_gla": (64, "The simple_gla family (one decay per head): the retnet and mamba2 mixers."),
    "delta": (64, "The delta family: the gated_deltanet mixer."),
    "scan": (32, "The elementwise scan: the mingru, minlstm and rglru mixers."),
}
"""The scan families (rnnscale.kernels.<family>), each with the default and the documentation
of its chunk size `kernels.chunk_size.<family>` (the config's ChunkSizeSection is made from
this table); their forms are `rnnscale.train.model.scan.SCANS`."""
