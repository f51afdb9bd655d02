"""Evaluation: a token-weighted mean loss over fixed held-out batches, logged with its
perplexity at every train.eval_interval and at the end; the validation data is not the
training data; mds runs without validation streams are refused at config time."""

import json
import math

import pytest
import torch

from rnnscale.train.batches import RowShape, make_batches, make_val_batches
from rnnscale.train.config import ConfigError, load_config
from rnnscale.train.model import build_model
from rnnscale.train.trainer import evaluate, lm_loss, run


def _validation(cfg):
    return make_val_batches(cfg.data, RowShape.of(cfg), cfg.run.seed, cfg.train.eval_batches)


@pytest.fixture
def cfg(repo_root, tmp_path):
    return load_config(
        repo_root / "configs/debug_cpu.yaml",
        [
            "train.max_steps=6",
            "train.eval_interval=4",
            "train.eval_batches=3",
            f"run.dir={tmp_path / 'run'}",
            "log.progress_bar=false",
        ],  # fmt: skip
    )


def test_evaluate_is_the_token_weighted_mean(cfg, tmp_path):
    model = build_model(cfg.model, cfg.kernels)
    val = _validation(cfg)
    assert len(val) == 3
    got = evaluate(model, val, torch.device("cpu"))
    with torch.no_grad():
        losses = [(lm_loss(model, b, "cpu").item(), b["labels"].numel()) for b in val]
    want = sum(loss * n for loss, n in losses) / sum(n for _, n in losses)
    assert got["eval_loss"] == pytest.approx(want, rel=1e-12)
    assert got["eval_ppl"] == pytest.approx(math.exp(want), rel=1e-12)
    assert model.training  # evaluate restores the mode
    train = next(make_batches(cfg.data, RowShape.of(cfg), cfg.run.seed, tmp_path))
    assert not torch.equal(train["input_ids"], val[0]["input_ids"])  # held-out documents
    assert all(torch.equal(a["input_ids"], b["input_ids"])
               for a, b in zip(val, _validation(cfg), strict=True))  # fmt: skip


def test_run_logs_eval_at_the_interval_and_the_end(cfg):
    run(cfg)
    records = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").open()]
    evals = {m["step"]: m for m in records if "eval_loss" in m}
    assert sorted(evals) == [4, 6]
    for m in evals.values():
        assert m["eval_ppl"] == pytest.approx(math.exp(m["eval_loss"]))
    assert evals[6]["eval_loss"] < evals[4]["eval_loss"] < math.log(cfg.model.vocab_size)


def test_mds_eval_needs_validation_streams(repo_root):
    with pytest.raises(ConfigError, match="data.val_streams: train.eval_interval > 0"):
        load_config(repo_root / "configs/debug_cpu.yaml",
                    ["data.source=mds", "data.streams=[{path: x}]", "data.tokenizer=t",
                     "train.eval_interval=5"])  # fmt: skip
