"""Every recipe in configs/recipes/ builds on the meta device (no memory, no init cost) with
the parameter count its name states, within 3%; the table of parameters and FLOPs per token is
printed (pytest -s shows it)."""

import re
from pathlib import Path

import pytest
import torch

from rnnscale.train.config import load_config
from rnnscale.train.model import build_model

RECIPES = sorted((Path(__file__).resolve().parents[1] / "configs" / "recipes").glob("*.yaml"))
EXPECTED = {  # the recipes the model issue promises
    "gla-340m", "gla-1.3b", "gla-2.7b",
    "mamba2-340m", "mamba2-1.3b", "mamba2-2.7b",
    "gated_deltanet-340m", "gated_deltanet-1.3b", "gated_deltanet-2.7b",
    "gated_deltanet-attn-1.3b", "gated_deltanet-attn-7b",
    "griffin-1.3b", "mamba2-attn-2.7b",
}  # fmt: skip


def stated_size(name: str) -> float:
    match = re.search(r"-(\d+(?:\.\d+)?)([mb])$", name)
    assert match, f"recipe {name} must end in its size, e.g. -340m or -1.3b"
    return float(match[1]) * (1e6 if match[2] == "m" else 1e9)


def test_every_promised_recipe_exists():
    assert {p.stem for p in RECIPES} == EXPECTED


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_has_its_stated_size(path):
    cfg = load_config(path)
    assert cfg.run.name == path.stem
    with torch.device("meta"):
        model = build_model(cfg.model, cfg.kernels)
    params = model.num_params()
    flops = model.flops_per_token(cfg.train.seq_len)
    target = stated_size(path.stem)
    print(
        f"\n{path.stem:28s} {params / 1e9:6.3f} B params ({100 * (params / target - 1):+.1f}%)  "
        f"{flops / 1e9:6.2f} GFLOP/token fwd at T={cfg.train.seq_len}  "
        f"pattern {cfg.model.mixer_pattern} over {cfg.model.num_layers} layers"
    )
    assert abs(params / target - 1) <= 0.03, f"{path.stem}: {params:,} parameters"
