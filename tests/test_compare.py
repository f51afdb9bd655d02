"""`rnnscale compare`: the table of several runs' final numbers and the PNG of their loss curves,
on run directories written by hand (config.yaml, metrics.jsonl, events.jsonl), as runs leave
them."""

import json
import os
import re
import struct

import pytest

from rnnscale.launch.cli import main
from rnnscale.launch.compare import compare, find_runs
from rnnscale.train.config import dump_yaml, load_config

T0 = 1_000_000.0


def _write_run(run_dir, repo_root, pattern: str, parameters: int | None, evals: dict):
    """8 steps of 512 tokens, 0.5 s each but the last (0.1 s); loss 5 - step / 4; one start
    event 100 s before the last write of metrics.jsonl."""
    run_dir.mkdir(parents=True)
    cfg = load_config(repo_root / "configs/debug_cpu.yaml",
                      [f"run.dir={run_dir}", f"model.mixer_pattern={pattern}"])  # fmt: skip
    (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    with open(run_dir / "metrics.jsonl", "w") as f:
        for step in range(1, 9):
            seconds = 0.1 if step == 8 else 0.5
            m = {"step": step, "loss": 5 - step / 4, "tokens": 512,
                 "tokens_per_s": 512 / seconds, "step_time_s": seconds}  # fmt: skip
            if step in evals:
                m.update(eval_loss=evals[step])
            f.write(json.dumps(m) + "\n")
    start = {"time": T0, "event": "start", "step": 0}
    if parameters is not None:
        start["parameters"] = parameters
    (run_dir / "events.jsonl").write_text(json.dumps(start) + "\n")
    os.utime(run_dir / "metrics.jsonl", (T0 + 100, T0 + 100))


@pytest.fixture
def runs(repo_root, tmp_path):
    folder = tmp_path / "runs"
    _write_run(folder / "gla", repo_root, "[gla]", 110_208, {4: 3.9, 8: 4.1})
    _write_run(folder / "hybrid", repo_root, "[gla,attn]", None, {})  # an older run
    (folder / "notes").mkdir()  # not a run: left out of a folder
    return folder


def _rows(report: str) -> list[list[str]]:
    return [re.split(r"\s{2,}", line.strip()) for line in report.splitlines()[:3]]


def test_compare_tabulates_the_final_numbers_and_draws_the_curves(runs, tmp_path):
    out = tmp_path / "curves.png"
    report = compare([runs / "gla", runs / "hybrid"], out)
    header, gla, hybrid = _rows(report)
    assert header == ["run", "mixers", "layers", "parameters", "steps", "loss", "eval loss",
                      "eval ppl", "best eval", "best ppl", "tokens/s", "elapsed"]  # fmt: skip
    # 8 x 512 tokens in 7 x 0.5 + 0.1 s: 1,138 tokens/s, not the last step's 5,120
    assert gla == ["gla", "gla", "2", "110,208", "8", "3.0000", "4.1000", "60.34", "3.9000",
                   "49.40", "1,138", "0:01:40"]  # fmt: skip
    assert hybrid == ["hybrid", "gla,attn", "2", "-", "8", "3.0000", "-", "-", "-", "-",
                      "1,138", "0:01:40"]  # fmt: skip
    assert report.splitlines()[-1] == f"rnnscale: wrote the loss curves to {out}"
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == (1000, 400)  # 10 x 4 inches at 100 dpi
    assert 0 < len(data) < 200_000


def test_compare_takes_a_folder_of_runs(runs):
    assert find_runs([runs]) == [runs / "gla", runs / "hybrid"]
    assert find_runs([runs / "hybrid", runs / "gla"]) == [runs / "hybrid", runs / "gla"]


def test_compare_refuses_what_is_not_a_run(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["compare", str(runs / "gla"), str(runs / "notes")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{runs / 'notes'} is not a run directory" in err
    assert not (tmp_path / "compare.png").exists()
    assert main(["compare", str(tmp_path / "missing")]) == 2
    assert main(["compare", str(runs / "gla")]) == 0  # the default --out: ./compare.png
    assert (tmp_path / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
