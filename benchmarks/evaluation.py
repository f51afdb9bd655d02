"""The figures of docs/evaluation.md (not timings): the recall suite of a tiny gla trained on
associative recall, and the length suite of the quickstart run (`make quickstart` first).

    .venv/bin/python benchmarks/evaluation.py     # under a minute on 2 cores

Writes docs/img/eval_recall.png and docs/img/eval_length.png, and prints what each suite found.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from rnnscale.launch.cli import main as cli
from rnnscale.train.suites import recall_trained_run

ROOT = Path(__file__).resolve().parents[1]
IMG = ROOT / "docs" / "img"


def main() -> int:
    # configs/tiny/gla.yaml trained on rows of 4 pairs (16 tokens), 800 steps of 32 rows
    run = recall_trained_run(ROOT / "configs" / "tiny" / "gla.yaml", ROOT / "runs" / "recall-demo",
                             steps=800, rows=32)  # fmt: skip
    assert cli(["eval", str(run), "--suite", "recall", "--num-keys", "8", "--num-values", "8",
                "--pairs", "1,2,4,8", "--lengths", "16,32,64,128"]) == 0  # fmt: skip
    shutil.copyfile(run / "eval" / "recall.png", IMG / "eval_recall.png")
    quickstart = ROOT / "runs" / "quickstart"
    if not (quickstart / "model.safetensors").is_file():
        print("runs/quickstart not found: run `make quickstart` for the length figure")
        return 1
    assert cli(["eval", str(quickstart), "--suite", "length", "--factor", "8", "--rows", "8"]) == 0
    shutil.copyfile(quickstart / "eval" / "length.png", IMG / "eval_length.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
