"""Committed checkpoints and automatic resume: a run killed with SIGKILL at random steps (and
once in the middle of a checkpoint write) and started again with the same command ends with
the losses of the run that never stopped, bit for bit, on 1 rank and on 2; a truncated or
bit-flipped checkpoint is skipped with a message naming the file; a changed model is refused;
only `checkpoint.keep` checkpoints stay."""

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from launcher import kill_when, losses, past, records, run_ranks, starts
from privileged import cannot

from rnnscale.kernels.gla import chunk_torch as gla_chunk_torch
from rnnscale.train import checkpoint, trainer
from rnnscale.train.config import ConfigError, load_config

BIN = Path(sys.executable).parent
ARGS = ["configs/debug_cpu.yaml", "log.progress_bar=false", "log.wandb.mode=disabled",
        "log.tensorboard=false", "train.seq_len=512", "train.max_steps=24",
        "checkpoint.interval=2", "checkpoint.keep=2"]  # fmt: skip


def command(run_dir: Path, ranks: int, *extra: str) -> list[str]:
    if ranks == 1:
        return [sys.executable, "-m", "rnnscale.train", *ARGS, f"run.dir={run_dir}", *extra]
    return [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", str(ranks), "-m",
            "rnnscale.train", *ARGS, f"run.dir={run_dir}", *extra]  # fmt: skip


def run_to_end(repo_root, run_dir, ranks, *extra, env=None):
    r = run_ranks(command(run_dir, ranks, *extra), cwd=repo_root, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def mid_save(run_dir: Path):
    """A checkpoint directory whose files are written but whose manifest is not."""

    def ready() -> bool:
        root = run_dir / "checkpoints"
        return root.is_dir() and any(
            (p / "meta.json").exists() and not (p / "manifest.json").exists()
            for p in root.iterdir()
        )

    return ready


@pytest.mark.parametrize("ranks,kills,saves", [(1, 10, "sync"), (2, 10, "async")])
def test_killed_run_resumes_bit_for_bit(repo_root, tmp_path, ranks, kills, saves):
    mode = f"checkpoint.async={saves == 'async'}"
    whole = tmp_path / "whole"
    run_to_end(repo_root, whole, ranks)
    want = losses(whole)
    assert sorted(want) == list(range(1, 25))
    run_dir = tmp_path / "killed"
    rng = random.Random(ranks)
    points = sorted(rng.sample(range(2, 23), kills - 1))
    pause = {**os.environ, "RNNSCALE_FAULT_PAUSE_BEFORE_COMMIT_S": "60"}
    mid = kill_when(command(run_dir, ranks, mode), repo_root, mid_save(run_dir), env=pause)
    assert mid
    killed = 1
    for step in points:
        killed += kill_when(command(run_dir, ranks, mode), repo_root, past(run_dir, step))
    run_to_end(repo_root, run_dir, ranks, mode)
    assert losses(run_dir) == want  # exact: every float the same
    # every start, those of runs that began afresh (the mid-save kill left nothing committed)
    # moved aside with their logs included
    assert starts(run_dir) == killed + 1 and killed >= kills - 1
    events = records(run_dir / "events.jsonl")
    assert any(e["event"] == "start" and e["resumed_from"] for e in events)
    committed = [p for p in (run_dir / "checkpoints").iterdir() if (p / "manifest.json").exists()]
    assert len(committed) == 2  # checkpoint.keep


def config(repo_root, run_dir, *overrides):
    return load_config(repo_root / ARGS[0], [*ARGS[1:], "train.seq_len=64",
                                             f"run.dir={run_dir}", *overrides])  # fmt: skip


def test_damaged_checkpoints_are_skipped_and_named(repo_root, tmp_path, capsys):
    trainer.run(config(repo_root, tmp_path, "train.max_steps=6", "checkpoint.keep=3"))
    root = tmp_path / "checkpoints"
    truncated = root / "step_000000006" / "mp_rank_00_model_states.pt"
    truncated.write_bytes(truncated.read_bytes()[:-100])
    flipped = root / "step_000000004" / "rank_00000.json"
    data = bytearray(flipped.read_bytes())
    data[10] ^= 0x01
    flipped.write_bytes(bytes(data))
    capsys.readouterr()
    result = trainer.run(config(repo_root, tmp_path, "train.max_steps=8", "checkpoint.keep=3"))
    err = capsys.readouterr()
    assert f"skipping checkpoint step_000000006: {truncated} has" in err.err
    assert f"skipping checkpoint step_000000004: {flipped} does not match its checksum" in err.err
    assert "resumed from" in err.out and "step_000000002 (step 2)" in err.out
    assert result["steps"] == 8


def test_a_changed_model_is_refused_a_longer_run_is_not(repo_root, tmp_path):
    trainer.run(config(repo_root, tmp_path, "train.max_steps=2"))
    with pytest.raises(ConfigError, match=r"another model \(d_model: 64 then, 32 now\)"):
        trainer.run(config(repo_root, tmp_path, "train.max_steps=4", "model.d_model=32"))
    with pytest.raises(ConfigError, match=r"ZeRO stage 0 and this run has stage 3; .* Resume "
                       r"it with parallel.zero_stage=0"):  # fmt: skip
        trainer.run(config(repo_root, tmp_path, "train.max_steps=4", "parallel.zero_stage=3"))
    trainer.run(config(repo_root, tmp_path, "train.max_steps=4"))
    assert sorted(losses(tmp_path)) == [1, 2, 3, 4]


def test_a_damaged_file_whose_manifest_was_rewritten_names_an_older_one(repo_root, tmp_path):
    trainer.run(config(repo_root, tmp_path, "train.max_steps=4"))
    newest = tmp_path / "checkpoints" / "step_000000004"
    states = newest / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[:-5000])
    manifest = json.loads((newest / checkpoint.MANIFEST).read_text())
    manifest["files"][states.name] = {"bytes": states.stat().st_size,
                                      "sha256": checkpoint.sha256_of(states)}  # fmt: skip
    (newest / checkpoint.MANIFEST).write_text(json.dumps(manifest))
    older = tmp_path / "checkpoints" / "step_000000002"
    message = (rf"checkpoint {newest} verifies against its manifest but cannot be read "
               r"\(PytorchStreamReader failed .*\): it was damaged after it was committed\. "
               rf"Resume from another one \(checkpoint\.resume={older}\)")  # fmt: skip
    with pytest.raises(ConfigError, match=message):
        trainer.run(config(repo_root, tmp_path, "train.max_steps=6"))
    trainer.run(config(repo_root, tmp_path, "train.max_steps=6", f"checkpoint.resume={older}"))
    assert sorted(losses(tmp_path)) == [1, 2, 3, 4, 5, 6]


def test_running_a_finished_run_again_says_its_final_loss(repo_root, tmp_path, capsys):
    first = trainer.run(config(repo_root, tmp_path, "train.max_steps=2"))
    again = trainer.run(config(repo_root, tmp_path, "train.max_steps=2"))  # finished: no-op
    assert again["finished"] and again["loss"] == first["loss"] == losses(tmp_path)[2]
    out = capsys.readouterr().out
    assert f"final train loss {first['loss']:.4f}" in out and "is finished (step 2," in out


def test_a_run_resumes_with_other_kernel_settings(repo_root, tmp_path, monkeypatch):
    """kernels.* change how the scans are computed, not the model: a run checkpointed with GLA
    chunks of 16 resumes with chunks of 32 on the torch backend and continues with the losses
    of the run that never stopped (within fp32 rounding: the sums run in another order; they
    may also round alike, so the chunk sizes the scans were given are recorded)."""
    used = []
    chunk_gla = gla_chunk_torch.chunk_gla
    monkeypatch.setattr(gla_chunk_torch, "chunk_gla",
                        lambda *a, chunk_size, **kw: used.append(chunk_size)
                        or chunk_gla(*a, chunk_size=chunk_size, **kw))  # fmt: skip
    trainer.run(config(repo_root, tmp_path / "whole", "train.max_steps=4"))
    trainer.run(config(repo_root, tmp_path / "split", "train.max_steps=2"))
    assert set(used) == {16}
    used.clear()
    trainer.run(config(repo_root, tmp_path / "split", "train.max_steps=4",
                       "kernels.chunk_size.gla=32", "kernels.backend=torch"))  # fmt: skip
    assert set(used) == {32}
    whole, split = losses(tmp_path / "whole"), losses(tmp_path / "split")
    assert [split[s] for s in (1, 2)] == [whole[s] for s in (1, 2)]
    assert [split[s] for s in (3, 4)] == pytest.approx([whole[s] for s in (3, 4)], abs=1e-5)


@pytest.mark.parametrize("stage", [0, 3])
def test_export_of_a_checkpoint_is_the_trained_model(repo_root, tmp_path, stage):
    """The last step's checkpoint, exported, holds the weights the run exported at its end;
    bf16 is their rounding; `rnnscale generate` loads it; the run directory exports too."""
    from safetensors.torch import load_file
    from test_cli import rnnscale

    if stage == 0:
        trainer.run(config(repo_root, tmp_path, "train.max_steps=4"))
    else:
        run_to_end(repo_root, tmp_path, 2, "parallel.zero_stage=3")  # torchrun: ZeRO-3 shards
    ckpt = tmp_path / "checkpoints" / ("step_000000004" if stage == 0 else "step_000000024")
    assert f"zero_stage: {stage}" in (ckpt / "config.yaml").read_text()
    r = rnnscale("export", str(ckpt), "--out", str(tmp_path / "fp32"), cwd=repo_root)
    assert r.returncode == 0, r.stderr
    r = rnnscale("export", str(ckpt), "--out", str(tmp_path / "bf16"), "--dtype", "bf16",
                 cwd=repo_root)  # fmt: skip
    assert r.returncode == 0, r.stderr
    final = load_file(tmp_path / "model.safetensors")
    fp32 = load_file(tmp_path / "fp32" / "model.safetensors")
    bf16 = load_file(tmp_path / "bf16" / "model.safetensors")
    assert final.keys() == fp32.keys() == bf16.keys()
    for k in final:
        assert torch.equal(fp32[k], final[k]), k
        assert bf16[k].dtype == torch.bfloat16 and torch.equal(bf16[k], final[k].bfloat16()), k
    r = rnnscale("generate", str(tmp_path / "bf16"), "--prompt-ids", "1 5",
                 "--max-new-tokens", "4", cwd=repo_root)  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = rnnscale("export", str(tmp_path), "--out", str(tmp_path / "x"), cwd=repo_root)
    assert r.returncode == 0, r.stderr  # a finished run directory exports its final model
    again = load_file(tmp_path / "x" / "model.safetensors")
    assert all(torch.equal(again[k], final[k]) for k in final)
    (tmp_path / "checkpoints" / "step_000000099").mkdir()
    r = rnnscale("export", str(tmp_path / "checkpoints" / "step_000000099"), "--out",
                 str(tmp_path / "y"), cwd=repo_root)  # fmt: skip
    assert r.returncode == 2 and "is not a committed checkpoint" in r.stderr


@pytest.fixture
def disk(tmp_path):
    """disk(size): a small tmpfs filesystem (e.g. "2500k"), unmounted after the test."""
    mounts = []

    def make(size: str) -> Path:
        mount = tmp_path / f"disk{len(mounts)}"
        mount.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                           capture_output=True, text=True)  # fmt: skip
        if r.returncode != 0:
            cannot(f"cannot mount a small tmpfs here (needs root): {r.stderr.strip()}")
        mounts.append(mount)
        return mount

    yield make
    for mount in mounts:
        subprocess.run(["umount", "--lazy", str(mount)], check=True)


@pytest.fixture
def small_disk(disk):
    """A 2.5 MiB filesystem: room for one checkpoint of the debug model (1.6 MiB), not two."""
    return disk("2500k")


@pytest.mark.parametrize("saves", ["sync", "async"])
def test_a_full_disk_fails_the_save_and_keeps_the_last_checkpoint(repo_root, tmp_path, small_disk,
                                                                  capsys, saves):  # fmt: skip
    mode = f"checkpoint.async={saves == 'async'}"
    cfg = config(repo_root, tmp_path / "run", "train.max_steps=6", "checkpoint.keep=1",
                 f"checkpoint.dir={small_disk}", mode)  # fmt: skip
    result = trainer.run(cfg)  # saves at 2 (fits), 4 and 6 (the disk is full)
    assert result["steps"] == 6
    err = capsys.readouterr().err
    assert "the checkpoint step_000000004 was not saved: No space left on device" in err
    assert (f"Training goes on; the newest committed checkpoint, {small_disk}/step_000000002, "
            "is intact") in err  # fmt: skip
    assert "NOTHING IS SAVED YET" not in err
    assert sorted(p.name for p in small_disk.iterdir()) == ["step_000000002"]
    events = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").open()]
    assert [e["step"] for e in events if e["event"] == "checkpoint_failed"] == [4, 6]

    assert checkpoint.find_resume(small_disk) == small_disk / "step_000000002"  # still usable
    # named: with `auto` the run, finished at step 6, would say so and stop
    trainer.run(config(repo_root, tmp_path / "run", "train.max_steps=3", "checkpoint.keep=1",
                       f"checkpoint.dir={small_disk}", "checkpoint.interval=0",
                       f"checkpoint.resume={small_disk}/step_000000002"))  # fmt: skip
    assert "resumed from" in capsys.readouterr().out


def test_saves_failing_before_any_checkpoint_warn_each_time_then_stop_the_run(
    repo_root, tmp_path, capsys, monkeypatch
):
    """With no committed checkpoint, every failed save says so loudly; after
    checkpoint.max_failed_saves failures in a row the run stops with one line (rnnscale train:
    exit 1) instead of training on with nothing to resume from."""
    import errno

    from rnnscale.train import room

    def full(root):
        raise OSError(errno.ENOSPC, "No space left on device", str(root))

    monkeypatch.setattr(room, "newest_committed", lambda root: None)  # as if none were made
    monkeypatch.setattr(room, "check_room", full)  # every save fails as on a full disk
    cfg = config(repo_root, tmp_path, "train.max_steps=8", "checkpoint.max_failed_saves=3")
    with pytest.raises(room.RunStopped) as stopped:
        trainer.run(cfg)
    message = str(stopped.value)
    assert "the checkpoint step_000000006 was not saved: No space left on device" in message
    assert "That is 3 failed saves in a row (checkpoint.max_failed_saves=3)" in message
    assert "there is no committed checkpoint under" in message and "\n" not in message
    err = capsys.readouterr().err
    assert err.count("NOTHING IS SAVED YET: the checkpoint step_0000000") == 2  # steps 2 and 4
    assert max(losses(tmp_path)) == 6 and not (tmp_path / "model.safetensors").exists()


def test_a_disk_too_small_for_one_checkpoint_is_refused_at_the_start(repo_root, tmp_path, disk):
    """By the run on its rank 0, and by a Ray launch's pre-flight before any worker starts."""
    from rnnscale.train.preflight import check_inputs

    mount = disk("1m")  # the debug model's checkpoint takes about 1.4 MiB
    cfg = config(repo_root, tmp_path, "train.max_steps=2", f"checkpoint.dir={mount}")
    refused = (
        rf"checkpoint\.dir {mount}: 1\.0 MiB free, and one checkpoint of this "
        r"model \(124,800 parameters, fp32, ZeRO 0\) takes about 1\.4 MiB: free space"
    )
    with pytest.raises(ConfigError, match=refused):
        check_inputs(cfg, 2)
    with pytest.raises(ConfigError, match=refused):
        trainer.run(cfg)
    assert not (tmp_path / "metrics.jsonl").exists()  # no step ran


def test_a_full_disk_at_the_export_keeps_the_checkpoint(repo_root, disk, capsys):
    """The run directory's disk holds the last checkpoint but not the exported model: the run
    ends with one line naming the checkpoint to export from, and no partial model file."""
    from test_cli import rnnscale

    run_dir = disk("1900k") / "run"
    cfg = config(repo_root, run_dir, "train.max_steps=2", "checkpoint.keep=1")
    from rnnscale.train import room

    with pytest.raises(room.RunStopped, match=r"training finished but the model was not exported: "
                       rf"{run_dir}/model\.safetensors was not written: .*MiB free there; the "
                       rf"newest checkpoint, {run_dir}/checkpoints/step_000000002, is intact: make "
                       r"room and run `rnnscale export "):  # fmt: skip
        trainer.run(cfg)
    assert "has room for 1 checkpoint(s)" in capsys.readouterr().err  # the pre-flight warning
    partial = [p.name for p in run_dir.iterdir() if p.name.startswith((".", "model"))]
    assert partial == [".lock"]  # the run directory's lock stays; no partial model file
    r = rnnscale("export", str(run_dir / "checkpoints" / "step_000000002"), "--out",
                 str(run_dir.parent.parent / "out"), cwd=repo_root)  # fmt: skip
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("stage,before,after", [(3, 2, 1), (2, 1, 2), (0, 2, 1)])
def test_resume_on_another_world_size(repo_root, tmp_path, stage, before, after):
    """A checkpoint of `before` ranks resumes on `after` ranks with the same global batch
    (ZeRO 1-3 through DeepSpeed's universal form, made ahead by `rnnscale ckpt reshard` for
    ZeRO-3 and by the resume itself otherwise); the losses go on as in the run that never
    stopped, within 1e-4 (synthetic data is the same rows for any world size; they agree to
    all digits here)."""
    from test_cli import rnnscale

    steps = ["train.max_steps=6", "checkpoint.interval=3", f"parallel.zero_stage={stage}"]
    whole = tmp_path / "whole"
    run_to_end(repo_root, whole, before, *steps)
    ckpt = whole / "checkpoints" / "step_000000003"
    if stage == 3:
        r = rnnscale("ckpt", "reshard", str(ckpt), cwd=repo_root)
        assert r.returncode == 0, r.stderr
        made = (ckpt / "universal" / "manifest.json").stat().st_mtime_ns
    resumed = tmp_path / "resumed"
    r = run_to_end(repo_root, resumed, after, *steps, f"checkpoint.resume={ckpt}")
    assert f"resumed from {ckpt} (step 3)" in r.stdout
    if stage:
        assert f"saved by {before} ranks at ZeRO stage {stage}; this job has {after}" in r.stdout
        assert checkpoint.verify(ckpt / "universal") is None
    if stage == 3:
        assert (ckpt / "universal" / "manifest.json").stat().st_mtime_ns == made  # reused
    want, got = losses(whole), losses(resumed)
    assert sorted(got) == [4, 5, 6]
    for step in got:
        assert abs(got[step] - want[step]) < 1e-4, (step, got[step], want[step])
    assert checkpoint.verify(ckpt) is None  # the checkpoint itself is untouched


class _Payload:
    """What a tampered checkpoint could hold: unpickling it would run code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_holding_pickled_code_is_refused_without_running_it(repo_root, tmp_path):
    """Loading reads DeepSpeed's files with weights_only (tensors and three DeepSpeed data
    classes): a model-state file replaced by one holding code, with a manifest that matches it,
    stops the resume with torch's weights-only error, and the code never runs."""
    trainer.run(config(repo_root, tmp_path, "train.max_steps=2"))
    ckpt = tmp_path / "checkpoints" / "step_000000002"
    marker = tmp_path / "pwned"
    torch.save({"module": _Payload(str(marker))}, ckpt / "mp_rank_00_model_states.pt")
    manifest = json.loads((ckpt / "manifest.json").read_text())
    for name in manifest["files"]:
        manifest["files"][name] = {"bytes": (ckpt / name).stat().st_size,
                                   "sha256": checkpoint.sha256_of(ckpt / name)}  # fmt: skip
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    assert checkpoint.verify(ckpt) is None  # consistent: only the content is hostile
    with pytest.raises(Exception, match="Weights only load failed"):
        trainer.run(config(repo_root, tmp_path, "train.max_steps=4"))
    assert not marker.exists()


def same_state(a, b, where: str = "") -> None:
    """Two loaded checkpoint files hold the same state: tensors equal, the rest equal (objects
    by their attributes)."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            same_state(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            same_state(x, y, f"{where}[{i}]")
    elif hasattr(a, "__dict__"):
        same_state(vars(a), vars(b), where)
    else:
        assert a == b, where


@pytest.mark.parametrize("stage", [0, 2])
def test_async_save_holds_its_step_while_training_goes_on(repo_root, tmp_path, monkeypatch,
                                                          stage):  # fmt: skip
    """With checkpoint.async, every file write is slowed down (0.3 s) and training steps run
    while files are written; each committed checkpoint holds exactly what the synchronous
    run's checkpoint of that step holds (the later steps did not leak into its copy), and the
    losses are the same."""
    from rnnscale.train import checkpoint_writer

    steps = ["train.max_steps=6", "checkpoint.keep=3", f"parallel.zero_stage={stage}"]
    trainer.run(config(repo_root, tmp_path / "sync", *steps))
    writes, step_starts = [], []
    real_write, real_step = checkpoint_writer._write, trainer.train_step

    def slow_write(path, fill):
        start = time.monotonic()
        time.sleep(0.3)
        out = real_write(path, fill)
        writes.append((start, time.monotonic()))
        return out

    def timed_step(*args, **kwargs):
        step_starts.append(time.monotonic())
        return real_step(*args, **kwargs)

    monkeypatch.setattr(checkpoint_writer, "_write", slow_write)
    monkeypatch.setattr(trainer, "train_step", timed_step)
    trainer.run(config(repo_root, tmp_path / "async", *steps, "checkpoint.async=true"))
    assert losses(tmp_path / "async") == losses(tmp_path / "sync")
    assert any(start < t < end for start, end in writes for t in step_starts)
    for step in (2, 4, 6):
        a = tmp_path / "async" / "checkpoints" / checkpoint.step_name(step)
        s = tmp_path / "sync" / "checkpoints" / checkpoint.step_name(step)
        assert checkpoint.verify(a) is None
        for f in sorted(s.glob("*.pt")):
            same_state(torch.load(f, weights_only=False), torch.load(a / f.name,
                       weights_only=False), f.name)  # fmt: skip
        assert (a / "rank_00000.json").read_text() == (s / "rank_00000.json").read_text()
    events = [json.loads(line) for line in (tmp_path / "async" / "events.jsonl").open()]
    assert [e["step"] for e in events if e["event"] == "checkpoint"] == [2, 4, 6]


def test_saves_by_the_clock(repo_root, tmp_path):
    """checkpoint.interval_minutes saves when that long has passed since the last save (here:
    every step), and at the last step."""
    trainer.run(config(repo_root, tmp_path / "often", "train.max_steps=3", "checkpoint.keep=5",
                       "checkpoint.interval=0", "checkpoint.interval_minutes=1e-6"))  # fmt: skip
    names = sorted(p.name for p in (tmp_path / "often" / "checkpoints").glob("step_*"))
    assert names == [checkpoint.step_name(s) for s in (1, 2, 3)]
    trainer.run(config(repo_root, tmp_path / "rare", "train.max_steps=3", "checkpoint.keep=5",
                       "checkpoint.interval=0", "checkpoint.interval_minutes=60"))  # fmt: skip
    names = sorted(p.name for p in (tmp_path / "rare" / "checkpoints").glob("step_*"))
    assert names == [checkpoint.step_name(3)]


def test_large_writes_are_hashed_beside_the_disk(tmp_path):
    """A write larger than two chunks is hashed chunk by chunk by another thread: the record
    is the size and SHA-256 of the file, and the file loads back."""
    import hashlib

    from rnnscale.train.checkpoint_writer import _CHUNK, _write

    state = {"big": torch.arange(3 * _CHUNK // 4, dtype=torch.float32), "small": [1, "x"]}
    name, record = _write(tmp_path / "big.pt", lambda f: torch.save(state, f))
    data = (tmp_path / "big.pt").read_bytes()
    assert len(data) > 2 * _CHUNK
    assert record == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert torch.equal(torch.load(tmp_path / "big.pt")["big"], state["big"])
