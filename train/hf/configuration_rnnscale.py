"""The configuration of an exported rnnscale model (`rnnscale export --format hf`): rnnscale's
`model` section, with transformers' names for the sizes that tools read (hidden_size,
num_hidden_layers, num_attention_heads). Imports nothing from rnnscale."""

from __future__ import annotations

from transformers import PretrainedConfig


class RnnscaleConfig(PretrainedConfig):
    """`layer_types`: the mixer of every layer (rnnscale's `model.mixer_pattern` tiled);
    `mixers`: the options section of every mixer used (`model.<mixer>`); `chunk_sizes`: the
    chunk of each scan family (`kernels.chunk_size`); `mlp_hidden`: the SwiGLU width, resolved."""

    model_type = "rnnscale"
    attribute_map = {
        "hidden_size": "d_model",
        "num_hidden_layers": "num_layers",
        "num_attention_heads": "num_heads",
    }

    def __init__(
        self,
        vocab_size: int = 512,
        d_model: int = 64,
        num_layers: int = 2,
        num_heads: int = 2,
        layer_types: list | None = None,
        mixers: dict | None = None,
        mlp_hidden: int = 192,
        norm_eps: float = 1e-6,
        init_std: float = 0.02,
        chunk_sizes: dict | None = None,
        tie_word_embeddings: bool = True,
        use_cache: bool = True,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        **kwargs,
    ):
        self.vocab_size, self.d_model = vocab_size, d_model
        self.num_layers, self.num_heads = num_layers, num_heads
        self.layer_types = list(layer_types or ["gla"] * num_layers)
        self.mixers = dict(mixers or {})
        self.use_cache = use_cache
        self.mlp_hidden, self.norm_eps, self.init_std = mlp_hidden, norm_eps, init_std
        self.chunk_sizes = dict(chunk_sizes or {"gla": 16, "simple_gla": 64, "delta": 64,
                                                "scan": 32})  # fmt: skip
        super().__init__(
            tie_word_embeddings=tie_word_embeddings,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            **kwargs,
        )
