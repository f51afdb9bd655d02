"""Model FLOPs (train/model/flops.py) pinned to hand counts, one small config per mixer, and the
peak MFU divides by (train/measure.py). Counts are forward FLOPs per token, a multiply-add
being 2, every mixer in its recurrent (step) form: d_model 32, 2 heads of width 16."""

import pytest
import torch

from rnnscale.train import measure
from rnnscale.train.config import from_dict
from rnnscale.train.mixers import FAMILIES
from rnnscale.train.model import MIXERS, build_model

T = 64  # the sequence length every count is taken at (only attention depends on it)


def build(pattern, chunk=16, mlp_hidden=64, **options):
    """The model of `pattern` (d_model 32, 2 heads, vocab 97) with every scan family's chunk
    size `chunk` and `options` as the mixers' config sections."""
    model = {"vocab_size": 97, "d_model": 32, "num_layers": len(pattern), "num_heads": 2,
             "mixer_pattern": pattern, "mlp_hidden": mlp_hidden, **options}  # fmt: skip
    kernels = {"backend": "torch", "chunk_size": dict.fromkeys(FAMILIES, chunk)}
    cfg = from_dict({"model": model, "kernels": kernels})
    return build_model(cfg.model, cfg.kernels)


# (name, its options, hand count); K, V: key and value width per head
HAND_COUNTS = [
    ("gla", {"expand_k": 0.5, "expand_v": 1.0, "gate_low_rank_dim": 4},  # K 8, V 16
     2 * (2 * 32 * 16)  # q, k: 32 -> 2 x 8
     + 2 * (2 * 32 * 32)  # v, output gate: 32 -> 2 x 16
     + 2 * 32 * 32  # o: 32 -> 32
     + 2 * 32 * 4 + 2 * 4 * 16  # forget gate, low rank: 32 -> 4 -> 16
     + 2 * (2 * 8 * 16 + 2 * 8 * 16)),  # per head: write k v^T, read q^T S
    ("retnet", {"expand_k": 1.0, "expand_v": 2.0},  # K 16, V 32
     2 * (2 * 32 * 32)  # q, k: 32 -> 2 x 16
     + 2 * (2 * 32 * 64)  # v, output gate: 32 -> 2 x 32
     + 2 * 64 * 32  # o: 64 -> 32
     + 2 * (4 * 16 * 32)),  # per head: write and read of the 16 x 32 state
    ("mamba2", {"expand": 2, "head_dim": 8, "state_size": 16, "n_groups": 1, "conv_size": 4},
     2 * 32 * (64 + 64 + 16 + 16 + 8)  # in_proj: z, x (d_inner 64), B, C (16), dt (8 heads)
     + 2 * 64 * 32  # out_proj
     + 2 * (64 + 16 + 16) * 4  # depthwise conv, 4 taps, over x, B, C
     + 8 * (4 * 16 * 8)),  # 8 heads: write B (dt x)^T and read C^T h of the 16 x 8 state
    ("hgrn2", {"expand_ratio": 8},  # K 8, V 16
     2 * (2 * 32 * 16)  # q, f: 32 -> 2 x 8
     + 2 * (2 * 32 * 32)  # i, o: 32 -> 32
     + 2 * (4 * 8 * 16)),  # per head: write and read of the 8 x 16 state
    ("gated_deltanet", {"head_dim": 16, "expand_v": 2.0, "conv_size": 4,
                        "use_forget_gate": True, "num_householder": 1},  # K 16, V 32
     2 * (2 * 32 * 32)  # q, k: 32 -> 2 x 16
     + 2 * 32 * 64  # v: 32 -> 2 x 32
     + 2 * 32 * 2 + 2 * 32 * 2  # beta and decay: 32 -> 1 per head
     + 2 * 32 * 64 + 2 * 64 * 32  # output gate, o
     + 2 * (32 + 32 + 64) * 4  # short convs over q, k, v
     + 2 * (2 * 16 * 32 + 2 * 16 * 32 + 2 * 16 * 32)),  # per head: k^T S, rank-one write, q^T S
    ("gated_deltanet", {"head_dim": 16, "expand_v": 2.0, "conv_size": 4,
                        "use_forget_gate": False, "num_householder": 2},  # DeltaProduct
     2 * 32 * 32  # q
     + 2 * 32 * (2 * 32) + 2 * 32 * (2 * 64)  # k, v: 2 per token
     + 2 * 32 * (2 * 2)  # beta: 2 per token and head; no decay projection
     + 2 * 32 * 64 + 2 * 64 * 32  # output gate, o
     + 2 * (32 + 2 * 32 + 2 * 64) * 4  # short convs over q, both k, both v
     + 2 * (2 * (4 * 16 * 32) + 2 * 16 * 32)),  # per head: 2 delta steps, then one read
    ("mingru", {"expand": 2.0, "conv_size": 4},  # hidden 64
     2 * 32 * (64 + 64)  # in_proj: h~ and z
     + 2 * 64 * 32  # out_proj
     + 2 * 32 * 4  # depthwise conv over d_model
     + 2 * 64),  # h = a * h + b
    ("minlstm", {"expand": 2.0, "conv_size": 0},  # hidden 64, no conv
     2 * 32 * (64 + 64 + 64)  # in_proj: h~, f and i
     + 2 * 64 * 32  # out_proj
     + 2 * 64),  # h = a * h + b
    ("rglru", {"expand": 1.5, "conv_size": 4},  # width 48, 2 blocks of 24
     2 * (2 * 32 * 48)  # gate branch, input branch
     + 2 * 48 * 32  # out_proj
     + 2 * 48 * 4  # depthwise conv
     + 2 * 2 * (2 * 24 * 24)  # r and i: block-diagonal, 2 blocks of 24 x 24
     + 2 * 48),  # h = a * h + b
    ("attn", {},
     2 * 32 * 96 + 2 * 32 * 32  # qkv, o
     + 2 * 4 * 16 * (T + 1) // 2),  # per head: 4 D per key, (T + 1) / 2 keys on average
    ("swa", {"window": 8},
     2 * 32 * 96 + 2 * 32 * 32  # qkv, o
     # per head 4 D per key; tokens 1..8 see 1..8 keys (36), the other 56 see 8
     + 2 * 4 * 16 * (36 + 56 * 8) // T),
]  # fmt: skip


@pytest.mark.parametrize("name, options, count", HAND_COUNTS, ids=[c[0] for c in HAND_COUNTS])
def test_mixer_flops_match_the_hand_count(name, options, count):
    mixer = build([name], **{name: options}).blocks[0].mixer
    assert mixer.flops_per_token(T) == count


def test_hand_counts_cover_every_mixer():
    assert {name for name, _, _ in HAND_COUNTS} == set(MIXERS)


def test_model_flops_add_mlps_and_head():
    gla, attn = HAND_COUNTS[0][2], HAND_COUNTS[-2][2]
    mlp = 2 * (2 * 32 * 64) + 2 * 64 * 32  # SwiGLU: gate, up 32 -> 64; down 64 -> 32
    head = 2 * 32 * 97
    model = build(["gla", "attn"], gla=HAND_COUNTS[0][1])
    assert model.flops_per_token(T) == gla + attn + 2 * mlp + head


@pytest.mark.parametrize("name", [n for n in MIXERS if n not in ("attn", "swa")])
def test_flops_do_not_depend_on_the_chunk_size(name):
    small, large = (build([name], chunk=c).blocks[0].mixer for c in (16, 64))
    assert (small.settings.chunk_size, large.settings.chunk_size) == (16, 64)
    assert small.flops_per_token(T) == large.flops_per_token(T)


@pytest.mark.parametrize("device_name, dtype, tf32, tflops", [
    ("NVIDIA H100 80GB HBM3", "bf16", False, 989.5),
    ("NVIDIA H100 80GB HBM3", "fp32", True, 494.5),
    ("NVIDIA H100 80GB HBM3", "fp32", False, 67.0),
    ("NVIDIA H100 PCIe", "bf16", False, 756.5),
    ("NVIDIA H200", "bf16", False, 989.5),
    ("NVIDIA A100-SXM4-80GB", "bf16", False, 312.0),
    ("NVIDIA A100 80GB PCIe", "fp32", True, 156.0),
    ("NVIDIA H100 NVL", "bf16", False, None),
    ("NVIDIA GH200 480GB", "bf16", False, None),
    ("NVIDIA H100 80GB HBM3 MIG 1g.10gb", "bf16", False, None),
    ("NVIDIA GeForce RTX 4090", "bf16", False, None),
])  # fmt: skip
def test_datasheet_peak(device_name, dtype, tf32, tflops):
    found = measure.datasheet_peak(device_name, dtype, tf32)
    if tflops is None:
        assert found is None
    else:
        assert found[0] == pytest.approx(tflops * 1e12) and "datasheet" in found[1]


def test_peak_flops_uses_the_datasheet_on_a_known_gpu_else_measures(monkeypatch):
    monkeypatch.setattr(measure, "measure_peak_flops", lambda device, dtype: 1.5e12)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    cuda = torch.device("cuda")
    assert measure.peak_flops(cuda, "bf16") == (989.5e12, measure.datasheet_peak(
        "NVIDIA H200", "bf16")[1])  # fmt: skip
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU")
    flops, source = measure.peak_flops(cuda, "bf16")
    assert flops == 1.5e12 and source.startswith("measured") and "Some GPU" in source
    flops, source = measure.peak_flops(torch.device("cpu"), "fp32")
    assert flops == 1.5e12 and source.startswith("measured")
