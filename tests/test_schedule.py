import math

import pytest

from rnnscale.train.config import ScheduleSection
from rnnscale.train.schedule import lr_multiplier


def curve(max_steps=100, **kw):
    f = lr_multiplier(ScheduleSection(**kw), max_steps)
    return [f(s) for s in range(max_steps)]


@pytest.mark.parametrize("kind", ["cosine", "linear", "wsd", "constant"])
def test_warmup_rises_linearly_to_peak(kind):
    c = curve(kind=kind, warmup_steps=10)
    assert c[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert c[10] == pytest.approx(1.0)


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_decays_end_at_the_floor(kind):
    c = curve(kind=kind, warmup_steps=10, min_lr_ratio=0.1)
    assert c[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(c[10:], c[11:]))


def test_cosine_midpoint():
    c = curve(max_steps=101, kind="cosine", warmup_steps=0, min_lr_ratio=0.0)
    assert c[50] == pytest.approx(0.5)
    assert c[25] == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_wsd_is_stable_then_decays():
    c = curve(kind="wsd", warmup_steps=10, min_lr_ratio=0.0, decay_fraction=0.2)
    assert c[10:80] == pytest.approx([1.0] * 70)
    assert c[-1] == pytest.approx(0.0)
    assert c[90] == pytest.approx(1 - 10 / 19)


def test_constant():
    assert curve(kind="constant") == pytest.approx([1.0] * 100)
