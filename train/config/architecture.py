"""The architecture sections of the config: `model` (sizes, the mixer pattern, each mixer's
options) and `kernels` (how the scans and the loss are computed, which a resume may change)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from rnnscale.train.config.fields import doc, require, section
from rnnscale.train.mixers import FAMILIES, REGISTRY

MixerName = Literal[tuple(REGISTRY)]  # type: ignore[valid-type]
"""Token mixers that `model.mixer_pattern` may name: the keys of the mixer registry."""


@dataclass
class GLASection:
    expand_k: float = doc(
        0.5, "Key width per head as a fraction of the head width (GLA uses 0.5).", gt=0
    )
    expand_v: float = doc(1.0, "Value width per head as a fraction of the head width.", gt=0)
    gate_low_rank_dim: int = doc(
        16, "Rank of the low-rank projection that makes the forget gate.", gt=0
    )
    gate_logit_normalizer: float = doc(
        16.0,
        "Divides logsigmoid(gate logits): keeps the decay near 1 at init (GLA paper: 16).",
        gt=0,
    )


@dataclass
class AttnSection:
    rope_theta: float = doc(10000.0, "Base of the rotary position embedding.", gt=0)


@dataclass
class SWASection:
    window: int = doc(
        2048, "Tokens each query sees, itself included (Mistral/Griffin local attention).", gt=0
    )
    rope_theta: float = doc(10000.0, "Base of the rotary position embedding.", gt=0)


@dataclass
class RetNetSection:
    expand_k: float = doc(1.0, "Key width per head as a fraction of the head width.", gt=0)
    expand_v: float = doc(
        2.0, "Value width per head as a fraction of the head width (RetNet: 2).", gt=0
    )
    rope_theta: float = doc(
        10000.0, "Base of the rotary embedding of queries and keys (xPos).", gt=0
    )


@dataclass
class Mamba2Section:
    expand: int = doc(2, "Inner width d_inner = expand * d_model.", gt=0)
    head_dim: int = doc(
        64, "Channels per SSM head; heads = d_inner / head_dim (not num_heads).", gt=0
    )
    state_size: int = doc(128, "SSM state size N per head (the width of B and C).", gt=0)
    n_groups: int = doc(1, "Groups sharing B and C (heads per group = heads / n_groups).", gt=0)
    conv_size: int = doc(4, "Width of the causal depthwise convolution over x, B and C.", gt=0)
    dt_min: float = doc(1e-3, "Smallest initial step size dt (log-uniform init).", gt=0)
    dt_max: float = doc(0.1, "Largest initial step size dt.")
    a_init_max: float = doc(16.0, "A = -exp(A_log) starts uniform in [-a_init_max, -1].", ge=1)

    def check(self, path: str) -> None:
        require(self.dt_max >= self.dt_min, f"{path}.dt_max", "must be >= dt_min")


@dataclass
class HGRN2Section:
    expand_ratio: int = doc(
        128, "Key (forget-gate) width per head: the state is this x head_dim.", gt=0
    )


@dataclass
class GatedDeltaNetSection:
    head_dim: int = doc(0, "Key width per head; 0: d_model / num_heads.", ge=0,
                        why="0: d_model / num_heads")  # fmt: skip
    expand_v: float = doc(2.0, "Value width per head as a multiple of head_dim (paper: 2).", gt=0)
    use_forget_gate: bool = doc(True, "The decay exp(g) of Gated DeltaNet; false: plain DeltaNet.")
    allow_neg_eigval: bool = doc(
        False, "beta in (0, 2) instead of (0, 1): transitions with negative eigenvalues."
    )
    num_householder: int = doc(1, "Householder steps per token; > 1 is DeltaProduct.", gt=0)
    conv_size: int = doc(4, "Width of the short convolutions over q, k and v.", gt=0)


@dataclass
class MinRNNSection:
    expand: float = doc(2.0, "Hidden width of the recurrence as a multiple of d_model.", gt=0)
    conv_size: int = doc(
        4, "Width of a causal convolution before the recurrence; 0: none.", ge=0, why="0: none"
    )


@dataclass
class RGLRUSection:
    expand: float = doc(
        4 / 3, "Width of the recurrence as a multiple of d_model (Griffin: 4/3).", gt=0
    )
    conv_size: int = doc(4, "Width of the causal convolution before the RG-LRU.", gt=0)
    c: float = doc(8.0, "The constant c of a_t = a^(c r_t).", gt=0)
    a_min: float = doc(0.9, "a^c starts uniform in [a_min, a_max] (Griffin: 0.9, 0.999).", gt=0)
    a_max: float = doc(0.999, "See a_min.", lt=1)

    def check(self, path: str) -> None:
        require(self.a_min <= self.a_max, f"{path}.a_min", "need 0 < a_min <= a_max < 1")


@dataclass
class ModelSection:
    vocab_size: int = doc(512, "Vocabulary size (rows of the embedding and the output head).", gt=0)
    d_model: int = doc(64, "Width of the residual stream.", gt=0)
    num_layers: int = doc(2, "Number of blocks (mixer + MLP).", gt=0)
    num_heads: int = doc(2, "Heads of every token mixer; d_model must divide by it.", gt=0)
    mixer_pattern: list[MixerName] = doc(
        ["gla", "attn"], "Token mixers, tiled over num_layers: [gla, gla, gla, attn] is 3:1. A "
        "length that does not divide num_layers is warned about, naming the layers it gives.",
        nonblank=True, why="name a mixer",
    )  # fmt: skip
    mlp_hidden: int = doc(
        0, "Hidden width of the SwiGLU MLP; 0: 8/3 d_model rounded up to 64.", ge=0,
        why="0: automatic",
    )  # fmt: skip
    tie_embeddings: bool = doc(True, "Share the input embedding with the output head.")
    norm_eps: float = doc(1e-6, "Epsilon of every RMSNorm.", gt=0)
    init_std: float = doc(
        0.02, "Standard deviation of the normal init of linear and embedding.", gt=0
    )
    init_from: str = doc(
        "", "Start a new run from these weights instead of the random init: a directory "
        "`rnnscale export --format hf` wrote, or a finished run directory (or its "
        "model.safetensors). Its architecture must be this section's (`rnnscale import-hf DIR` "
        "prints the section); a resumed run takes its checkpoint's weights instead.",
        why="empty: random init",
    )  # fmt: skip
    gla: GLASection = section(GLASection, "Options of the gla mixer (Gated Linear Attention).")
    retnet: RetNetSection = section(RetNetSection, "Options of the retnet mixer (retention).")
    mamba2: Mamba2Section = section(Mamba2Section, "Options of the mamba2 mixer (SSD).")
    hgrn2: HGRN2Section = section(HGRN2Section, "Options of the hgrn2 mixer.")
    gated_deltanet: GatedDeltaNetSection = section(
        GatedDeltaNetSection, "Options of the gated_deltanet mixer (DeltaNet, DeltaProduct)."
    )
    mingru: MinRNNSection = section(MinRNNSection, "Options of the mingru mixer.")
    minlstm: MinRNNSection = section(MinRNNSection, "Options of the minlstm mixer.")
    rglru: RGLRUSection = section(RGLRUSection, "Options of the rglru mixer (Griffin/Hawk).")
    attn: AttnSection = section(AttnSection, "Options of the attn mixer (softmax attention).")
    swa: SWASection = section(SWASection, "Options of the swa mixer (sliding-window attention).")

    def layer_types(self) -> list[str]:
        """The mixer of every layer: `mixer_pattern` tiled over `num_layers`."""
        return [self.mixer_pattern[i % len(self.mixer_pattern)] for i in range(self.num_layers)]

    def check(self, path: str) -> None:
        require(
            self.d_model % self.num_heads == 0,
            f"{path}.d_model",
            f"must divide by model.num_heads={self.num_heads} (got {self.d_model})",
        )


ChunkSizeSection = dataclasses.make_dataclass(
    "ChunkSizeSection",
    [(family, int, doc(chunk, text, gt=0)) for family, (chunk, text) in FAMILIES.items()],
)
ChunkSizeSection.__module__ = __name__  # make_dataclass(module=) needs Python 3.12
"""One chunk size per scan family, made from `rnnscale.train.mixers.FAMILIES`."""


@dataclass
class KernelsSection:
    backend: Literal["auto", "torch", "triton"] = doc(
        "auto",
        "Scan kernels: auto (Triton on CUDA tensors, the chunkwise PyTorch path otherwise), "
        "torch, or triton (CUDA only).",
    )
    chunk_size: ChunkSizeSection = section(
        ChunkSizeSection,
        "Chunk length C of each scan family's chunkwise kernels. A speed setting: a run may "
        "resume with other values. Powers of two >= 16 (what Triton's tl.dot needs) unless "
        "kernels.backend is torch.",
    )
    loss_chunk_tokens: int = doc(
        4096,
        "Tokens per chunk of the cross-entropy: the [tokens, vocab] logits are never held whole "
        "(train/model/loss.py).",
        gt=0,
    )
    recompute_activations: bool = doc(
        True,
        "Make cheap activations again in the backward instead of keeping them: the normalised "
        "rows every projection reads, SwiGLU's SiLU and product, the short convolutions' "
        "outputs, the gated norms' outputs (docs/architecture.md). The same gradients bit for "
        "bit; a forward keeps 32-45% less; a few per cent more time on CPU. Steps aside under "
        "train.activation_checkpointing and torch.compile. A run may resume with the other "
        "value.",
    )

    def check(self, path: str) -> None:
        if self.backend == "torch":
            return
        for f in dataclasses.fields(self.chunk_size):
            C = getattr(self.chunk_size, f.name)
            require(
                C >= 16 and C & (C - 1) == 0,
                f"{path}.chunk_size.{f.name}",
                f"must be a power of two >= 16 for the Triton kernels (got {C}); other sizes "
                f"need kernels.backend=torch",
            )
