"""The 20 losses of configs/debug_cpu.yaml, pinned (STYLE.md habit 10).

A change that alters the math regenerates the file in the same commit, with the reason:
    RNNSCALE_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden.py
"""

import json
import os
from pathlib import Path

import pytest

from rnnscale.train import run
from rnnscale.train.config import load_config

GOLDEN = Path(__file__).parent / "golden" / "debug_cpu_losses.json"
# fp32 on CPU: the same ops in the same order, but the thread count may change how a matmul
# splits its sums (~1e-7 relative per step); twenty Adam steps keep that well under 1e-4.
TOLERANCE = dict(rel=0, abs=1e-4)


def test_debug_cpu_losses_match_golden(repo_root, tmp_path):
    cfg = load_config(
        repo_root / "configs" / "debug_cpu.yaml",
        [f"run.dir={tmp_path}/run", "log.progress_bar=false"],
    )
    run(cfg)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 21))
    for x in lines:
        assert {"loss", "lr", "tokens_per_s", "grad_norm"} <= x.keys()
    losses = [x["loss"] for x in lines]
    if os.environ.get("RNNSCALE_UPDATE_GOLDEN"):
        GOLDEN.write_text(
            json.dumps({"config": "configs/debug_cpu.yaml", "losses": losses}, indent=1) + "\n"
        )
    golden = json.loads(GOLDEN.read_text())["losses"]
    assert losses == pytest.approx(golden, **TOLERANCE)
    # and the run learns: the Markov chain's structure is easy to pick up
    assert losses[-1] < losses[0] - 0.5
