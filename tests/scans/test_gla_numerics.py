"""Numerics specific to per-key decay."""

import torch
import torch.nn.functional as F

from rnnscale.kernels.gla import chunk_gla, naive_recurrent_gla


def test_strong_decay_does_not_overflow():
    # in-chunk cumulative gates far below -80: the factorised form would give inf/nan in fp32
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 64, 2, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    g = 40 * F.logsigmoid(torch.randn(1, 64, 2, 8, generator=gen, dtype=torch.float64))
    o, s = chunk_gla(*(x.float() for x in (q, k, v, g)), output_final_state=True, chunk_size=64)
    o_ref, s_ref = naive_recurrent_gla(q, k, v, g, output_final_state=True)
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    torch.testing.assert_close(o.double(), o_ref, atol=2e-4, rtol=2e-3)
    torch.testing.assert_close(s.double(), s_ref, atol=2e-4, rtol=2e-3)
