"""Profiles and offload: train.profile writes a trace that TensorBoard and Perfetto open (one
short single-process run); parallel.offload_* map onto DeepSpeed's zero_optimization and are
refused with one line where they cannot work (no processes, no DeepSpeed run)."""

import json

import pytest

from rnnscale.parallel.deepspeed_config import deepspeed_config, offload_config
from rnnscale.parallel.layout import ParallelLayout
from rnnscale.train import preflight, trainer
from rnnscale.train.config import ConfigError, load_config


def config(repo_root, *overrides):
    return load_config(repo_root / "configs/debug_cpu.yaml", list(overrides))


@pytest.mark.parametrize(
    "overrides,want",
    [
        ([], {}),
        (
            ["parallel.zero_stage=1", "parallel.offload_optimizer=cpu"],
            {"offload_optimizer": {"device": "cpu", "pin_memory": False}},
        ),
        (
            ["parallel.zero_stage=3", "parallel.offload_optimizer=cpu",
             "parallel.offload_params=nvme", "parallel.offload_nvme_path=/nvme",
             "parallel.sub_group_size=100000000"],
            {"offload_optimizer": {"device": "cpu", "pin_memory": False},
             "offload_param": {"device": "nvme", "pin_memory": False, "nvme_path": "/nvme",
                               "max_in_cpu": 1_000_000_000, "buffer_size": 100_000_000,
                               "buffer_count": 5}},
        ),
    ],
)  # fmt: skip
def test_offload_maps_onto_zero_optimization(repo_root, overrides, want):
    cfg = config(repo_root, *overrides)
    assert offload_config(cfg.parallel) == want
    ds = deepspeed_config(cfg.train, cfg.optim, cfg.parallel, ParallelLayout(2, 1, 0))
    assert {k: ds["zero_optimization"][k] for k in want} == want
    if cfg.parallel.zero_stage == 3:  # the unit an offloaded optimizer is swapped in
        assert ds["zero_optimization"]["sub_group_size"] == cfg.parallel.sub_group_size
    # our torch AdamW steps the offloaded partitions: DeepSpeed must be told to accept it
    assert ds.get("zero_force_ds_cpu_optimizer", True) is not ("offload_optimizer" in want)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["parallel.offload_optimizer=cpu"],
         "parallel.offload_optimizer: offloading the optimizer needs parallel.zero_stage >= 1 "
         "(got 0): set parallel.zero_stage=1, 2 or 3, or offload_optimizer=none"),
        (["parallel.zero_stage=2", "parallel.offload_params=cpu"],
         "parallel.offload_params: offloading parameters needs parallel.zero_stage=3 (got 2): "
         "set parallel.zero_stage=3, or offload_params=none"),
        (["parallel.zero_stage=3", "parallel.offload_params=nvme"],
         "parallel.offload_nvme_path: parallel.offload_params=nvme needs a directory on an "
         "NVMe drive here, e.g. parallel.offload_nvme_path=/local_nvme"),
        (["parallel.offload_optimizer=disk"],
         "parallel.offload_optimizer: 'disk' (str) is not one of: none, cpu, nvme"),
        (["train.profile_start=19", "train.profile_steps=3"],
         "train.profile_steps: steps 19-21 to profile run past train.max_steps (20): lower "
         "train.profile_start or train.profile_steps"),
        (["train.profile_steps=0"], "train.profile_steps: must be > 0"),
    ],
)  # fmt: skip
def test_offload_and_profile_errors_name_the_field(repo_root, overrides, message):
    with pytest.raises(ConfigError) as e:
        config(repo_root, *overrides)
    assert f": {message}" in str(e.value)


def test_nvme_without_libaio_says_so_before_any_rank_starts(repo_root, monkeypatch):
    monkeypatch.setattr(preflight, "_async_io_compatible", lambda: False)
    cfg = config(repo_root, "parallel.zero_stage=3", "parallel.offload_optimizer=nvme",
                 "parallel.offload_nvme_path=/nvme")  # fmt: skip
    with pytest.raises(ConfigError) as e:
        preflight.check_inputs(cfg, world=2, files=False)
    assert str(e.value) == (
        "parallel.offload_optimizer=nvme needs DeepSpeed's async_io op, which needs libaio, and "
        "libaio is not installed on this machine: install it (`apt-get install libaio-dev` on "
        "Debian/Ubuntu, `yum install libaio-devel` on RHEL), or offload to cpu"
    )
    monkeypatch.setattr(preflight, "_async_io_compatible", lambda: True)
    preflight.check_inputs(cfg, world=2, files=False)


def test_a_short_run_writes_a_trace_of_the_profiled_step(repo_root, tmp_path, capsys):
    cfg = config(repo_root, f"run.dir={tmp_path}", "log.progress_bar=false",
                 "log.wandb.mode=disabled", "log.tensorboard=false", "train.max_steps=2",
                 "train.peak_tflops=1", "train.profile_start=2")  # fmt: skip
    trainer.run(cfg)
    traces = list((tmp_path / "profile").glob("rank0.*.pt.trace.json"))
    assert len(traces) == 1
    events = json.loads(traces[0].read_text())["traceEvents"]
    assert any(e.get("name", "").startswith("ProfilerStep#") for e in events)
    assert f"profile of step 2 written: {traces[0]}" in capsys.readouterr().out
