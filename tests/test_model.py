import typing

import pytest
import torch

from rnnscale.train.config import MixerName, ModelSection, from_dict
from rnnscale.train.model import MIXERS, build_model, layer_types


def tiny(**kw) -> ModelSection:
    model = {"vocab_size": 97, "d_model": 32, "num_layers": 3, "num_heads": 2, **kw}
    return from_dict({"model": model}).model


def test_registry_matches_the_config_names():
    assert set(MIXERS) == set(typing.get_args(MixerName))


def test_pattern_tiles_over_layers():
    cfg = tiny(num_layers=5, mixer_pattern=["gla", "gla", "attn"])
    assert layer_types(cfg) == ["gla", "gla", "attn", "gla", "gla"]
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


@pytest.mark.parametrize("pattern", [["gla"], ["attn"], ["gla", "attn"]])
def test_state_continues_the_sequence(pattern):
    """Two calls with the state carried give the logits of one call over the whole sequence."""
    torch.manual_seed(0)
    model = build_model(tiny(mixer_pattern=pattern)).double()
    ids = torch.randint(0, 97, (2, 40))
    full, _ = model(ids)
    first, state = model(ids[:, :17])
    second, _ = model(ids[:, 17:], state=state)
    torch.testing.assert_close(torch.cat([first, second], 1), full, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("pattern", [["gla"], ["attn"], ["gla", "attn"]])
def test_packed_documents_equal_separate_sequences(pattern):
    torch.manual_seed(0)
    model = build_model(tiny(mixer_pattern=pattern)).double()
    lengths = [7, 20, 1, 12]
    docs = [torch.randint(0, 97, (1, n)) for n in lengths]
    cu = torch.tensor([0, 7, 27, 28, 40], dtype=torch.int32)
    packed, _ = model(torch.cat(docs, 1), cu_seqlens=cu)
    alone = torch.cat([model(d)[0] for d in docs], 1)
    torch.testing.assert_close(packed, alone, atol=1e-10, rtol=1e-10)


def test_packed_input_must_be_one_row():
    model = build_model(tiny())
    with pytest.raises(ValueError, match="one row"):
        model(torch.zeros(2, 4, dtype=torch.long), cu_seqlens=torch.tensor([0, 8]))


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = build_model(tiny())
    logits, _ = model(torch.randint(0, 97, (2, 19)))
    logits.sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert missing == []
