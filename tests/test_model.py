"""The language model around the mixers (tests/test_mixers.py covers each mixer): layer
pattern, shapes, parameter count with tied or untied embeddings, packed-input checks."""

import pytest
import torch

from rnnscale.train.config import ModelSection, from_dict
from rnnscale.train.model import build_model


def tiny(**kw) -> ModelSection:
    model = {"vocab_size": 97, "d_model": 32, "num_layers": 3, "num_heads": 2, **kw}
    return from_dict({"model": model}).model


def test_pattern_tiles_over_layers():
    cfg = tiny(num_layers=5, mixer_pattern=["gla", "gla", "attn"])
    assert cfg.layer_types() == ["gla", "gla", "attn", "gla", "gla"]
    model = build_model(cfg)
    assert [type(b.mixer).__name__ for b in model.blocks] == [
        "GatedLinearAttention",
        "GatedLinearAttention",
        "Attention",
        "GatedLinearAttention",
        "GatedLinearAttention",
    ]


@pytest.mark.parametrize("tie", [True, False])
def test_forward_shapes_and_param_count(tie):
    torch.manual_seed(0)
    model = build_model(tiny(tie_embeddings=tie))
    ids = torch.randint(0, 97, (2, 21))
    logits, state = model(ids)
    assert logits.shape == (2, 21, 97)
    assert len(state) == 3
    assert state[0].shape == (2, 2, 8, 16)  # GLA: (N, H, K = 0.5 * 16, V = 16)
    assert state[1][0].shape == (2, 2, 21, 16)  # attention cache: (B, H, T, D)
    unique = {id(p): p.numel() for p in model.parameters()}
    assert model.num_params() == sum(unique.values())
    assert (model.head.weight is model.embed.weight) == tie
    expected_gap = 0 if tie else 97 * 32
    assert model.num_params() - build_model(tiny(tie_embeddings=True)).num_params() == expected_gap


def test_packed_input_must_be_one_row():
    model = build_model(tiny())
    with pytest.raises(ValueError, match="one row"):
        model(torch.zeros(2, 4, dtype=torch.long), cu_seqlens=torch.tensor([0, 8]))
