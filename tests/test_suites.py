"""`rnnscale eval --suite recall|length`: a tiny model trained on associative recall recalls
well above chance where it was trained, and both suites write their JSON and PNG."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rnnscale.launch.cli import main as cli
from rnnscale.train.config import load_config
from rnnscale.train.suites import recall_trained_run

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def recall_run(tmp_path_factory):
    """configs/tiny/gla.yaml trained on recall rows of 4 pairs (16 tokens), as a finished run."""
    run_dir = tmp_path_factory.mktemp("suites") / "run"
    return recall_trained_run(CONFIGS / "tiny" / "gla.yaml", run_dir, steps=600, rows=32)


def test_recall_suite_finds_the_trained_recall(recall_run, capsys):
    assert cli(["eval", str(recall_run), "--suite", "recall", "--num-keys", "8", "--num-values",
                "8", "--pairs", "2,4,8", "--lengths", "16,32"]) == 0  # fmt: skip
    assert "rnnscale: recall: best" in capsys.readouterr().out
    result = json.loads((recall_run / "eval" / "recall.json").read_text())
    got = {(r["pairs"], r["length"]): r["accuracy"] for r in result["results"]}
    assert set(got) == {(2, 16), (2, 32), (4, 16), (4, 32), (8, 32)}  # 8 pairs need 32 tokens
    assert result["chance"] == 1 / 8
    assert got[(4, 16)] > 0.4  # as trained; chance is 0.125
    assert (recall_run / "eval" / "recall.png").stat().st_size > 0


def test_length_suite_scores_past_the_training_length(recall_run, capsys):
    assert cli(["eval", str(recall_run), "--suite", "length", "--factor", "4", "--rows", "2"]) == 0
    result = json.loads((recall_run / "eval" / "length.json").read_text())
    assert result["train_seq_len"] == 16 and result["positions"][-1] < 64 <= 4 * 16
    assert len(result["loss"]) == 32 and all(x > 0 for x in result["loss"])
    assert result["loss_beyond_train_len"] is not None
    assert "passkey" not in result  # the run trained on token ids: no text to hide a key in
    assert (recall_run / "eval" / "length.png").stat().st_size > 0


def test_eval_names_what_is_missing(recall_run, tmp_path, capsys):
    assert cli(["eval", str(recall_run)]) == 2
    assert "eval needs --tasks (lm-eval) or --suite recall|length" in capsys.readouterr().err
    assert cli(["eval", str(recall_run), "--tasks", "x"]) == 2
    assert "has no tokenizer.model" in capsys.readouterr().err
    assert cli(["eval", str(recall_run), "--suite", "recall", "--pairs", "two"]) == 2
    assert "--pairs takes whole numbers" in capsys.readouterr().err


def test_training_runs_the_suites_at_every_evaluation(tmp_path):
    """train.eval_suites: the suites' numbers are logged with every evaluation."""
    from rnnscale.train import trainer

    cfg = load_config(CONFIGS / "debug_cpu.yaml",
                      [f"run.dir={tmp_path}", "train.max_steps=2", "train.eval_interval=2",
                       "train.eval_batches=1", "train.eval_suites=[recall,length]",
                       "log.progress_bar=false"])  # fmt: skip
    trainer.run(cfg)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    (last,) = [x for x in lines if "eval_loss" in x]
    assert 0 <= last["eval_recall_acc"] <= 1 and "eval_recall_acc_16_pairs" in last
    assert last["eval_loss_beyond_train_len"] > 0 and last["eval_loss_within_train_len"] > 0
    assert "eval_passkey_acc" not in last  # synthetic data: no tokenizer


def test_training_suites_refuse_what_cannot_work():
    from rnnscale.train.config import ConfigError
    from rnnscale.train.suites import TrainingSuites

    base = ["train.eval_suites=[length]", "train.eval_interval=2"]
    with pytest.raises(ConfigError, match="which sequence parallelism is there to avoid"):
        load_config(CONFIGS / "debug_cpu.yaml", [*base, "parallel.sequence_parallel_size=2"])
    with pytest.raises(ConfigError, match="set train.eval_interval > 0 too"):
        load_config(CONFIGS / "debug_cpu.yaml", ["train.eval_suites=[recall]"])
    cfg = load_config(CONFIGS / "debug_cpu.yaml", base)
    cfg.data.source = "mds"  # the validation batches the run holds: one row of 64 tokens
    row = {"input_ids": torch.ones(1, 64, dtype=torch.long), "labels": torch.ones(1, 64)}
    with pytest.raises(ConfigError, match=r"= 512 validation tokens; the validation batches "
                       r"hold 64: raise train.eval_batches"):  # fmt: skip
        TrainingSuites(cfg, "cpu", [row])
