"""The `rnnscale` command and `python -m rnnscale.train`, as a user runs them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from privileged import cannot

BIN = Path(sys.executable).parent


def rnnscale(*args, cwd):
    return subprocess.run(
        [str(BIN / "rnnscale"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "WANDB_MODE": "disabled"},
    )


@pytest.mark.parametrize(
    "override,needle",
    [("optim.lrr=1", "optim.lrr"), ("train.max_steps=abc", "train.max_steps")],
)
def test_train_refuses_bad_config_at_once(repo_root, tmp_path, override, needle):
    r = rnnscale(
        "train", "configs/debug_cpu.yaml", override, f"run.dir={tmp_path}/run", cwd=repo_root
    )
    assert r.returncode == 2
    assert needle in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()  # nothing started


@pytest.mark.parametrize(
    "config,overrides,needle",
    [
        ("debug_cpu", ["train.global_batch_size=6"], "global_batch_size"),  # 6 rows, 2 workers
        ("debug_cpu", ["parallel.sequence_parallel_size=3"], "sequence_parallel_size = 3"),
        ("quickstart", ["data.streams=[{path: TMP}]", "data.tokenizer=missing.model"],
         "data.tokenizer"),
        ("debug_cpu", ["checkpoint.resume=nowhere/step_000000004"], "checkpoint.resume"),
        ("quickstart", ["data.streams=[{path: nowhere/shards}]"], "data.streams: nowhere"),
    ],
)  # fmt: skip
def test_ray_train_refuses_bad_inputs_before_starting_workers(repo_root, tmp_path, config,
                                                              overrides, needle):  # fmt: skip
    """With launch.num_workers > 1 what the ranks would refuse is checked before Ray starts:
    an error once, not once per restart."""
    if any("TMP" in o for o in overrides):  # a whole shard set of one document
        from streaming import MDSWriter

        with MDSWriter(out=str(tmp_path / "shards"), columns={"tokens": "ndarray:int32"}) as w:
            w.write({"tokens": np.arange(8, dtype=np.int32)})
    overrides = [o.replace("TMP", str(tmp_path / "shards")) for o in overrides]
    r = rnnscale("train", f"configs/{config}.yaml", "launch.num_workers=2", *overrides,
                 f"run.dir={tmp_path}/run", cwd=repo_root)  # fmt: skip
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert needle in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert "Ray" not in r.stdout and not (tmp_path / "run").exists()  # nothing started


def test_a_missing_stream_is_named_before_training(repo_root, tmp_path):
    r = rnnscale("train", "configs/quickstart.yaml", "launch.num_workers=1",
                 "data.streams=[{path: nowhere/shards}]", f"run.dir={tmp_path}/run",
                 cwd=repo_root)  # fmt: skip
    assert r.returncode == 2, r.stderr[-2000:]
    assert "data.streams: nowhere/shards does not exist" in r.stderr
    assert "Traceback" not in r.stderr


def test_jobs_without_a_cluster_say_so_in_one_line(repo_root):
    r = rnnscale("jobs", "list", "--address", "http://127.0.0.1:9", cwd=repo_root)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "Failed to connect" in r.stderr and "--address" in r.stderr


def test_config_show_prints_the_resolved_config(repo_root):
    r = rnnscale("config", "show", "configs/debug_cpu.yaml", "optim.lr=0.5", cwd=repo_root)
    assert r.returncode == 0, r.stderr
    assert "lr: 0.5" in r.stdout and "mixer_pattern: [gla, attn]" in r.stdout


def test_generate_help_shows_the_defaults(capsys):
    from rnnscale.launch.cli import main

    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps at the terminal's width
    for shown in ("--max-new-tokens MAX_NEW_TOKENS tokens to sample at most (default: 64)",
                  "0: greedy (default: 0.8)", "nucleus sampling mass (default: 0.95)",
                  "of the sampling (default: 0)"):  # fmt: skip
        assert shown in out, out


def test_no_subcommand_is_usage_error(repo_root):
    r = rnnscale(cwd=repo_root)
    assert r.returncode == 2 and "usage: rnnscale" in r.stderr


@pytest.fixture
def read_only_dir(tmp_path):
    """A read-only filesystem (even root cannot write it), unmounted after the test."""
    mount = tmp_path / "ro"
    mount.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount)],
                       capture_output=True, text=True)  # fmt: skip
    if r.returncode != 0:
        cannot(f"cannot mount a read-only tmpfs here (needs root): {r.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "--lazy", str(mount)], check=True)


def test_read_only_places_and_shell_expanded_globs_get_one_line(repo_root, tmp_path,
                                                                 read_only_dir):  # fmt: skip
    r = rnnscale("train", "configs/debug_cpu.yaml", f"run.dir={read_only_dir}/run", cwd=repo_root)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"run.dir {read_only_dir}/run: cannot write there (Read-only file system)" in r.stderr
    files = []
    for i in range(2):  # as `--input docs/*.md` reaches us once the shell expanded it
        files.append(tmp_path / f"part{i}.txt")
        files[-1].write_text("\n".join(f"line {j} of part {i}: the quick brown fox" for j in
                                       range(200)))  # fmt: skip
    r = rnnscale("data", "tokenizer", "--input", *map(str, files), "--vocab-size", "300",
                 "--out", f"{read_only_dir}/tok", cwd=repo_root)  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "unrecognized arguments" not in r.stderr
    assert f"{read_only_dir}/tok" in r.stderr and "Read-only file system" in r.stderr
    assert [f.read_text().count("\n") for f in files] == [199, 199]  # the inputs are untouched


def test_module_entry_trains(repo_root, tmp_path):
    run_dir = tmp_path / "run"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "rnnscale.train",
            "configs/debug_cpu.yaml",
            "train.max_steps=3",
            f"run.dir={run_dir}",
            "log.progress_bar=false",
        ],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3]
    assert "max_steps: 3" in (run_dir / "config.yaml").read_text()
    bad = subprocess.run(
        [sys.executable, "-m", "rnnscale.train", "configs/debug_cpu.yaml", "optim.lrr=1"],
        cwd=repo_root,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "optim.lrr" in bad.stderr
