"""The trainer on DeepSpeed (CPU, gloo): ZeRO 0-3 on 2 processes give the loss curve of 1
process with the same global batch; bf16 trains; a non-finite step is skipped and counted, too
many in a row stop the run; activation checkpointing changes nothing but memory, compiled
blocks train the losses of eager ones; batch arithmetic that does not divide is refused with
the numbers; the loss falls on real text."""

import contextlib
import io
import json
import math
import shlex
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from launcher import run_ranks

from rnnscale.parallel.deepspeed_config import batch_split
from rnnscale.train import trainer
from rnnscale.train.batches import SyntheticBatches
from rnnscale.train.config import load_config
from rnnscale.train.distributed import free_port
from rnnscale.train.model import build_model

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-4  # absolute, on losses near 5: the same sums in another order


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").open()]


def config(repo_root, run_dir, *overrides):
    return load_config(repo_root / "configs/debug_cpu.yaml",
                       [f"run.dir={run_dir}", "log.progress_bar=false", "log.wandb.mode=disabled",
                        "train.max_steps=6", *overrides])  # fmt: skip


def torchrun(repo_root, run_dir, *overrides, ranks: int = 2) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", str(ranks),
           "-m", "rnnscale.train", "configs/debug_cpu.yaml", f"run.dir={run_dir}",
           "log.progress_bar=false", "log.wandb.mode=disabled", "train.max_steps=6",
           *overrides]  # fmt: skip
    return run_ranks(cmd, cwd=repo_root, timeout=300)


def test_zero_stages_on_two_ranks_match_one_rank(repo_root, tmp_path):
    one = trainer.run(config(repo_root, tmp_path / "one"))  # accumulation 2 on 1 rank
    assert json.loads((tmp_path / "one" / "deepspeed_config.json").read_text())[
        "gradient_accumulation_steps"] == 2  # fmt: skip
    want = losses(tmp_path / "one")
    assert one["loss"] == want[-1] and want[-1] < want[0]
    for stage in (0, 1, 2, 3):
        run_dir = tmp_path / f"zero{stage}"
        # ZeRO-3 partitions every parameter, the small ones too (the norms' weights, which
        # the recomputed activations' recipes copy inside their modules' forward)
        whole = ["parallel.stage3_param_persistence_threshold=0"] if stage == 3 else []
        r = torchrun(repo_root, run_dir, f"parallel.zero_stage={stage}", *whole)
        assert r.returncode == 0, r.stderr[-3000:]
        ds = json.loads((run_dir / "deepspeed_config.json").read_text())
        assert ds["zero_optimization"]["stage"] == stage and ds["gradient_accumulation_steps"] == 1
        got = losses(run_dir)
        assert got == pytest.approx(want, abs=TOLERANCE), (stage, got, want)
        record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
        assert record["tokens"] == 8 * 64  # global: 8 rows of 64 tokens per step
        assert record["tokens_per_s"] == pytest.approx(2 * record["tokens_per_s_per_rank"])
        assert 0 < record["mfu"] < 1 and 0 <= record["data_wait_share"] < 1
        assert (run_dir / "model.safetensors").exists()


def test_deepspeed_launcher_runs_the_same_job(repo_root, tmp_path):
    trainer.run(config(repo_root, tmp_path / "one"))
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           "--module", "rnnscale.train", "configs/debug_cpu.yaml", f"run.dir={tmp_path / 'ds'}",
           "log.progress_bar=false", "log.wandb.mode=disabled", "train.max_steps=6",
           "parallel.zero_stage=2"]  # fmt: skip
    r = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 rank(s) = 2 data" in r.stdout
    assert losses(tmp_path / "ds") == pytest.approx(losses(tmp_path / "one"), abs=TOLERANCE)


EXIT = """
import atexit, sys, threading, time
import torch
from rnnscale.train.distributed import exit_process, init_distributed, leave_distributed_at_exit

def record(name):
    with open(sys.argv[1] + "/" + name, "w") as f:
        f.write(str(torch.distributed.is_initialized()))

init_distributed()
atexit.register(record, "after_leave")  # handlers run last in, first out
leave_distributed_at_exit()
atexit.register(record, "before_leave")
threading.Thread(target=lambda: (time.sleep(0.5), record("thread"))).start()
sys.stdout.write("buffered, no newline")
exit_process(3)
"""


def test_a_process_with_a_group_ends_after_its_threads_and_exit_handlers(tmp_path):
    """exit_process ends a process that joined a group with the code given, after what the
    interpreter's exit would have done: a non-daemon thread (a checkpoint write) finished,
    the exit handlers run in their order (the group destroyed by ours), the output flushed."""
    r = subprocess.run([sys.executable, "-c", EXIT, str(tmp_path)], capture_output=True,
                       text=True, timeout=120)  # fmt: skip
    assert r.returncode == 3, r.stderr[-2000:]
    assert r.stdout.endswith("buffered, no newline")  # after DeepSpeed's start-up lines
    assert (tmp_path / "thread").read_text() == "True"
    assert (tmp_path / "before_leave").read_text() == "True"
    assert (tmp_path / "after_leave").read_text() == "False"


def test_bf16_trains_close_to_fp32(repo_root, tmp_path):
    trainer.run(config(repo_root, tmp_path / "fp32"))
    trainer.run(config(repo_root, tmp_path / "bf16", "parallel.dtype=bf16",
                       "parallel.zero_stage=2"))  # fmt: skip
    fp32, bf16 = losses(tmp_path / "fp32"), losses(tmp_path / "bf16")
    assert bf16 == pytest.approx(fp32, abs=0.05)  # stated: bf16 rounding, 6 steps
    assert bf16 != fp32


def test_activation_checkpointing_changes_no_number(repo_root, tmp_path):
    trainer.run(config(repo_root, tmp_path / "plain", "train.max_steps=3"))
    trainer.run(config(repo_root, tmp_path / "ckpt", "train.max_steps=3",
                       "parallel.activation_checkpointing=true"))  # fmt: skip
    assert losses(tmp_path / "ckpt") == pytest.approx(losses(tmp_path / "plain"), abs=1e-6)


def test_compiled_blocks_train_the_losses_of_eager_blocks(repo_root, tmp_path):
    """train.compile: every block compiled in place by inductor, the scans left out of its
    graphs; packed documents, so shapes change from batch to batch."""
    model = build_model(config(repo_root, tmp_path).model)
    keys = list(model.state_dict())
    model.compile_blocks()
    assert list(model.state_dict()) == keys  # checkpoints alike
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    trainer.run(config(repo_root, tmp_path / "eager", "train.max_steps=3"))
    trainer.run(config(repo_root, tmp_path / "compiled", "train.max_steps=3",
                       "train.compile=true"))  # fmt: skip
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs  # it did compile
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), abs=1e-5)


def _poison(monkeypatch, bad_calls):
    """lm_loss gives NaN on the given training calls (1-based, counting micro batches)."""
    real, calls = trainer.lm_loss, {"n": 0}

    def lm_loss(model, batch, device, groups=None):
        loss = real(model, batch, device, groups)
        if model.training:
            calls["n"] += 1
            if calls["n"] in bad_calls:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(trainer, "lm_loss", lm_loss)


@pytest.mark.parametrize("stage", [0, 2])
def test_non_finite_step_is_skipped_and_counted(repo_root, tmp_path, monkeypatch, stage):
    _poison(monkeypatch, {5})  # step 3's first micro batch (2 per step)
    result = trainer.run(config(repo_root, tmp_path, f"parallel.zero_stage={stage}"))
    assert result["skipped_steps"] == 1
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 1, 1, 1]
    assert records[2]["loss"] == "nan" and math.isfinite(records[-1]["loss"])
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_too_many_skips_in_a_row_stop_the_run(repo_root, tmp_path, monkeypatch):
    _poison(monkeypatch, set(range(3, 100)))  # from step 2 on
    with pytest.raises(RuntimeError, match="3 steps in a row had a non-finite loss"):
        trainer.run(config(repo_root, tmp_path, "train.max_consecutive_skips=3"))


@pytest.mark.parametrize("stage", [0, 2])
def test_non_finite_steps_in_a_row_roll_back_past_their_data(repo_root, tmp_path, monkeypatch,
                                                             stage):  # fmt: skip
    """Steps 5-7 are non-finite (their batches poisoned); at the third in a row the run goes
    back to the checkpoint of step 4 and on with the batches after step 7. Its steps 5-10 equal
    a run resumed from that checkpoint whose data starts 3 steps later, exactly; the step-6
    checkpoint of the abandoned steps was removed (and saved again later)."""
    steps = ["train.max_steps=10", "checkpoint.interval=2", "checkpoint.keep=10",
             "train.max_consecutive_skips=3", f"parallel.zero_stage={stage}",
             "log.tensorboard=false"]  # fmt: skip
    clean = tmp_path / "clean"
    trainer.run(config(repo_root, clean, *steps))
    with monkeypatch.context() as m:  # the reference: step 4's state, data from step 8 on
        real = SyntheticBatches.load_state_dict

        def later(self, state):
            real(self, state)
            for _ in range(3 * 2):  # 3 steps of 2 micro batches
                next(self)

        m.setattr(SyntheticBatches, "load_state_dict", later)
        trainer.run(config(repo_root, tmp_path / "ref", *steps,
                           f"checkpoint.resume={clean}/checkpoints/step_000000004"))  # fmt: skip
    _poison(monkeypatch, set(range(9, 15)))  # the micro batches of steps 5-7
    result = trainer.run(config(repo_root, tmp_path / "rolled", *steps))
    assert result["steps"] == 10 and result["skipped_steps"] == 3
    rolled, ref = tmp_path / "rolled", tmp_path / "ref"
    records = [json.loads(line) for line in (rolled / "metrics.jsonl").open()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6, 7, 5, 6, 7, 8, 9, 10]
    assert [r["loss"] for r in records[4:7]] == ["nan"] * 3
    assert trainer_losses(rolled) == {**trainer_losses(clean, upto=4), **trainer_losses(ref)}
    events = [json.loads(line) for line in (rolled / "events.jsonl").open()]
    (event,) = [e for e in events if e["event"] == "rollback"]
    assert (event["step"], event["to_step"], event["first_bad_step"]) == (7, 4, 5)
    assert event["path"].endswith("step_000000004")
    names = sorted(p.name for p in (rolled / "checkpoints").iterdir() if p.name.startswith("s"))
    assert names == [f"step_{n:09d}" for n in (2, 4, 6, 8, 10)]  # 6: saved again after
    again = json.loads((rolled / "checkpoints" / names[2] / "rank_00000.json").read_text())
    assert again["counters"]["rollbacks"] == 1  # the abandoned step 6 was replaced


def trainer_losses(run_dir: Path, upto: int = 10**9) -> dict[int, float]:
    """Step -> loss, the last record of each step."""
    out = {}
    for line in (run_dir / "metrics.jsonl").open():
        r = json.loads(line)
        if r["step"] <= upto:
            out[r["step"]] = r["loss"]
    return out


def test_rollbacks_are_limited(repo_root, tmp_path, monkeypatch):
    _poison(monkeypatch, set(range(9, 100)))  # from step 5 on, every step
    with pytest.raises(RuntimeError, match=r"steps 5-6, train.max_consecutive_skips=2\); the "
                       r"run stops: it rolled back 1 times already"):  # fmt: skip
        trainer.run(config(repo_root, tmp_path, "train.max_steps=10", "checkpoint.interval=2",
                           "train.max_consecutive_skips=2", "train.max_rollbacks=1"))  # fmt: skip
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").open()]
    assert [e["to_step"] for e in events if e["event"] == "rollback"] == [4]


def test_batch_arithmetic_that_does_not_divide_is_refused():
    assert batch_split(16, 4, 2) == 2
    with pytest.raises(ValueError, match=r"12 rows per step do not split into micro batches of "
                       r"4 \(train.micro_batch_size\) on 2 data-parallel ranks: use a multiple "
                       r"of 8"):  # fmt: skip
        batch_split(12, 4, 2)


@pytest.fixture(scope="module")
def stdlib_run(tmp_path_factory):
    """A 40-step run on three stdlib packages (tokenizer, shards, evaluation, checkpoints):
    (its config, what it printed)."""
    from rnnscale.data.prepare import prepare
    from rnnscale.data.tokenizer import train_tokenizer

    tmp = tmp_path_factory.mktemp("stdlib")
    stdlib = sysconfig.get_paths()["stdlib"]
    inputs = [str(Path(stdlib) / name / "*.py") for name in ("json", "html", "email")]
    train_tokenizer(inputs, 512, tmp / "tok")
    tok, shards = tmp / "tok" / "tokenizer.model", tmp / "shards"
    prepare(inputs, tok, shards, progress=False)
    cfg = config(ROOT, tmp / "run", "data.source=mds", f"data.streams=[{{path: {shards}}}]",
                 f"data.val_streams=[{{path: {shards}}}]", f"data.tokenizer={tok}",
                 "model.vocab_size=512", "model.mixer_pattern=[gla, attn]", "train.max_steps=40",
                 "optim.lr=3e-3", "train.eval_interval=20", "train.eval_batches=2",
                 "checkpoint.interval=20", "log.progress_bar=true")  # fmt: skip
    out = io.StringIO()
    with contextlib.redirect_stdout(out):  # not a terminal: progress as lines
        trainer.run(cfg)
    return cfg, out.getvalue()


def test_loss_falls_on_the_embedded_corpus(stdlib_run):
    got = losses(stdlib_run[0].run_dir)
    assert sum(got[-5:]) / 5 < sum(got[:5]) / 5 - 0.5, got


def test_the_console_says_what_happens_and_what_to_do_next(stdlib_run):
    """A short banner (the full config stays in config.yaml), progress as lines, a line per
    evaluation and checkpoint, DeepSpeed's notices in the rank's log file, and an end summary
    whose sample prompt comes from the data."""
    cfg, out = stdlib_run
    assert "run run: a new run in" in out and "parameters" in out and "1 thread" not in out
    assert "zero_stage:" not in out and "DeepSpeed" not in out and "Setting accelerator" not in out
    assert (cfg.run_dir / "logs" / "rank_0.log").is_file()  # DeepSpeed's notices, if any
    assert [line for line in out.splitlines() if "  loss " in line][-1].startswith(
        "rnnscale: step 40/40"
    )
    assert len([line for line in out.splitlines() if line.startswith("rnnscale: step ")]) == 10
    assert "eval at step 20: loss" in out and "eval at step 40: loss" in out
    assert f"checkpoint {cfg.checkpoint_dir / 'step_000000020'} committed" in out
    summary = out[out.index("done: 40 steps") :]
    assert "best" in summary and "rnnscale dashboard" in summary
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(cfg.data.tokenizer))
    prompt = shlex.split(summary.split("rnnscale generate ")[1].splitlines()[0])
    assert prompt[0] == str(cfg.run_dir) and prompt[1] == "--prompt"
    ids = sp.encode(prompt[2])
    assert len(ids) >= 1 and sp.decode(ids) == prompt[2]  # words of the corpus, not "def "


def test_a_finished_run_started_again_touches_nothing(stdlib_run, capsys):
    cfg = stdlib_run[0]

    def files():
        return {p: p.read_bytes() for p in sorted(cfg.run_dir.rglob("*")) if p.is_file()}

    before = files()
    summary = trainer.run(cfg)
    assert summary["finished"] and summary["loss"] == losses(cfg.run_dir)[-1]
    assert files() == before
    assert "is finished (step 40, train.max_steps=40" in capsys.readouterr().out


def test_batch_that_does_not_split_over_the_ranks_exits_2(repo_root, tmp_path):
    r = torchrun(repo_root, tmp_path, "train.global_batch_size=4")  # micro 4 x 2 ranks > 4
    assert r.returncode != 0
    assert "rnnscale: train.global_batch_size: 4 rows per step do not split into micro " in r.stderr
    assert "ConfigError" not in r.stderr  # a message, not a traceback


def test_sequence_parallel_training_matches_one_rank(repo_root, tmp_path):
    """2 ranks holding halves of every packed row (ZeRO-2, documents crossing the halves; a
    hybrid of state passing, Ulysses attention and halos) train like 1 rank on whole rows, and
    so do 4 ranks as 2 data-parallel replicas of 2."""
    hybrid = ["model.mixer_pattern=[gated_deltanet,attn,mamba2,swa]", "model.num_layers=4",
              "model.mamba2.head_dim=32", "model.swa.window=8", "train.eval_interval=3",
              "train.eval_batches=2"]  # fmt: skip
    trainer.run(config(repo_root, tmp_path / "one", *hybrid))
    one = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").open()]
    for ranks in (2, 4):
        run_dir = tmp_path / f"sp{ranks}"
        r = torchrun(repo_root, run_dir, *hybrid, "parallel.sequence_parallel_size=2",
                     "parallel.zero_stage=2", ranks=ranks)  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
        sp = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
        for key in ("loss", "grad_norm"):
            assert [x[key] for x in sp] == pytest.approx([x[key] for x in one], abs=TOLERANCE)
        evals = [{x["step"]: x["eval_loss"] for x in run if "eval_loss" in x} for run in (one, sp)]
        assert list(evals[0]) == list(evals[1]) == [3, 6]
        if ranks == 2:  # one replica reads the held-out batches 1 rank reads (2 read others)
            assert evals[1] == pytest.approx(evals[0], abs=TOLERANCE)
        assert sp[-1]["tokens"] == 8 * 64  # every token once, not once per rank
        assert sp[-1]["sp_bytes_state"] > 0 and sp[-1]["sp_bytes_ulysses"] > 0
        assert sp[-1]["sp_bytes_halo"] > 0


def test_streaming_runs_refuse_uneven_ranks_per_node():
    """mosaicml-streaming takes ranks r*n..r*n+n-1 to be one node's n ranks: a placement with
    other counts, or a node's ranks out of order, is refused with what to set instead."""
    from rnnscale.train.config import ConfigError
    from rnnscale.train.preflight import check_node_layout

    check_node_layout(["0", "0", "1", "1"], uses_streaming=True)
    check_node_layout(["a"] * 3, uses_streaming=True)
    check_node_layout(["0", "0", "0", "1"], uses_streaming=False)  # synthetic data: any layout
    with pytest.raises(ConfigError, match=r"\(0: 3, 1: 1\).*STRICT_SPREAD"):
        check_node_layout(["0", "0", "0", "1"], uses_streaming=True)
    with pytest.raises(ConfigError, match=r"not grouped by node in rank order \(nodes by rank"):
        check_node_layout(["0", "1", "0", "1"], uses_streaming=True)


@pytest.mark.gpu
def test_a_run_trains_checkpoints_and_resumes_on_the_gpu(repo_root, tmp_path):
    """run(cfg) on CUDA in bf16 under ZeRO-2 with the compiled kernels, a checkpoint, and a
    resume that continues it: the process group takes the step's CPU collectives (metrics, the
    preemption flag: gloo) beside DeepSpeed's CUDA ones (NCCL)."""
    first = trainer.run(config(repo_root, tmp_path, "parallel.dtype=bf16", "parallel.zero_stage=2",
                               "train.max_steps=4", "checkpoint.interval=2"))  # fmt: skip
    assert torch.distributed.get_backend() != "gloo" and math.isfinite(first["loss"])
    again = trainer.run(config(repo_root, tmp_path, "parallel.dtype=bf16", "parallel.zero_stage=2",
                               "train.max_steps=6", "checkpoint.interval=2"))  # fmt: skip
    assert math.isfinite(again["loss"]) and len(losses(tmp_path)) == 6
