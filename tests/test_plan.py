"""`rnnscale plan`: parameter counts from the meta model, model-state memory per ZeRO stage
against DeepSpeed's own estimators (their return values and what they print), the stage 0/1
byte arithmetic, and the command's exit codes."""

import dataclasses
import re
from types import SimpleNamespace

import pytest
import torch
from deepspeed.runtime.zero import stage3, stage_1_and_2
from test_cli import rnnscale

from rnnscale.launch.cli import main
from rnnscale.launch.plan import (
    count_model,
    match_width,
    model_state_bytes,
    parse_count,
    plan_report,
)
from rnnscale.train.config import load_config
from rnnscale.train.model import build_model

GIB = 2**30
STAGE_ROW = re.compile(r"^\s+([0-3])\s+([\d.]+) (GiB|MiB|KiB|B)\s+(yes|no)\s", re.M)
UNIT = {"GiB": 2**30, "MiB": 2**20, "KiB": 2**10, "B": 1}


@pytest.fixture(scope="module")
def gla(request):
    root = request.config.rootpath
    cfg = load_config(root / "configs" / "recipes" / "gla-1.3b.yaml")
    with torch.device("meta"):
        params = build_model(cfg.model, cfg.kernels).num_params()
    return cfg, params, plan_report(cfg, gpus=8, gpus_per_node=8, gpu_memory_gb=80)


def printed_stages(report: str) -> dict[int, float]:
    rows = STAGE_ROW.findall(report)
    return {int(s): float(v) * UNIT[u] for s, v, u, _ in rows}


def test_parameter_count_is_the_meta_models(gla):
    cfg, params, report = gla
    assert params > 1e9
    assert count_model(cfg.model, cfg.train.seq_len).params == params
    assert f"parameters        {params:>15,}" in report


def test_largest_layer_follows_deepspeeds_rule(repo_root):
    cfg = load_config(repo_root / "configs" / "debug_cpu.yaml")
    _, largest = stage3.model_to_params(
        build_model(cfg.model, cfg.kernels)
    )  # a real model: data_ptr works
    assert count_model(cfg.model, cfg.train.seq_len).largest_layer == largest


def test_stages_2_and_3_are_deepspeeds_estimates(gla, capsys):
    cfg, params, report = gla
    largest = cfg.model.vocab_size * cfg.model.d_model  # the embedding, and the untied head
    per_gpu = model_state_bytes(params, largest, gpus=8, gpus_per_node=8)
    _, zero2 = stage_1_and_2.estimate_zero2_model_states_mem_needs(
        params, num_gpus_per_node=8, num_nodes=1, cpu_offload=False
    )
    _, zero3, _ = stage3.estimate_zero3_model_states_mem_needs(
        params, largest, num_gpus_per_node=8, num_nodes=1, cpu_offload=False,
        cpu_offload_params=False,
    )  # fmt: skip
    assert (per_gpu[2], per_gpu[3]) == (zero2, zero3)

    capsys.readouterr()
    stage_1_and_2.estimate_zero2_model_states_mem_needs_all_cold(params, 8, 1)
    stage3.estimate_zero3_model_states_mem_needs_all_cold(params, largest, 8, 1)
    out = capsys.readouterr().out
    ds2 = re.search(r"\|\s*([\d.]+)GB \| offload_optimizer=none", out)[1]
    ds3 = re.search(r"\|\s*([\d.]+)GB \| offload_param=none, offload_optimizer=none", out)[1]
    printed = STAGE_ROW.findall(report)
    assert [(s, v, u) for s, v, u, _ in printed[2:]] == [("2", ds2, "GiB"), ("3", ds3, "GiB")]


def test_stage_0_and_1_byte_arithmetic(gla):
    cfg, params, report = gla
    per_gpu = model_state_bytes(params, 1, gpus=8, gpus_per_node=8)
    assert per_gpu[0] == 20 * params  # 2 + 2 + 4 + 4 + 8 bytes, nothing sharded
    assert per_gpu[1] == 4 * params + 16 * params // 8
    assert printed_stages(report)[0] == pytest.approx(20 * params, rel=1e-3)
    # on one GPU nothing is sharded: every stage's formula is DeepSpeed's stage 2 at N = 1
    one = model_state_bytes(params, 1, gpus=1, gpus_per_node=8)
    assert one[0] == one[1] == one[2] == 20 * params


@pytest.mark.parametrize("gpus", [1, 2, 8, 64])
def test_stages_decrease(gla, gpus):
    cfg, params, report = gla
    largest = cfg.model.vocab_size * cfg.model.d_model
    per_gpu = model_state_bytes(params, largest, gpus=gpus, gpus_per_node=8)
    assert per_gpu[0] >= per_gpu[1] >= per_gpu[2] >= per_gpu[3]
    shown = printed_stages(report)
    assert list(shown) == [0, 1, 2, 3]
    assert shown[0] >= shown[1] >= shown[2] >= shown[3]


def test_fits_compares_with_the_gpu_memory(gla):
    cfg, params, _ = gla
    small = plan_report(cfg, gpus=8, gpus_per_node=8, gpu_memory_gb=4)
    fits = {int(s): f for s, _, _, f in STAGE_ROW.findall(small)}
    assert fits == {0: "no", 1: "no", 2: "no", 3: "yes"}  # 24.1, 7.2, 5.1, 3.0 GiB


def with_parallel(cfg, **parallel):
    """`cfg` with a `parallel` section of just these fields (the config may have none)."""
    return SimpleNamespace(**{**vars(cfg), "parallel": SimpleNamespace(**parallel)})


def test_activations(gla):
    cfg, _, _ = gla
    off = plan_report(with_parallel(cfg, activation_checkpointing=False), 8, 8, 80)
    assert "Activations per GPU: not estimated" in off
    on = plan_report(with_parallel(cfg, activation_checkpointing=True), 8, 8, 80)
    kept = 8 * 2048 * 2048 * 23 * 2  # micro batch x seq_len x d_model x layers x bf16
    assert f"at least {kept / GIB:.2f} GiB" in on and "not estimated" in on  # the recompute
    fp32 = with_parallel(cfg, activation_checkpointing=True, dtype="fp32")
    assert f"at least {2 * kept / GIB:.2f} GiB" in plan_report(fp32, 8, 8, 80)


def test_configured_stage_and_precision_are_shown(gla):
    cfg, _, _ = gla
    report = plan_report(with_parallel(cfg, zero_stage=2, dtype="bf16"), 8, 8, 80)
    marked = [line for line in report.splitlines() if "<- parallel.zero_stage" in line]
    assert len(marked) == 1 and marked[0].lstrip().startswith("2 ")
    assert "parallel.dtype" not in report
    assert "trains in fp32 (parallel.dtype)" in plan_report(
        with_parallel(cfg, dtype="fp32"), 8, 8, 80
    )


def test_batch_split(repo_root):
    cfg = load_config(repo_root / "configs" / "debug_cpu.yaml")  # 8 rows, micro batch 4
    assert "4 rows x 2 GPUs x 1 accumulation step\n" in plan_report(cfg, 2, 8, 80)
    assert "do not split" in plan_report(cfg, 4, 8, 80)


def test_cli_prints_every_stage(repo_root):
    override = "train.global_batch_size=16"  # after the options, as the usage line puts it
    r = rnnscale("plan", "configs/debug_cpu.yaml", "--gpus", "2", override, cwd=repo_root)
    assert r.returncode == 0, r.stderr
    assert [s for s, *_ in STAGE_ROW.findall(r.stdout)] == ["0", "1", "2", "3"]
    assert "debug_cpu: 2 GPUs (1 x 2)" in r.stdout
    assert "16 rows per step = 4 rows x 2 GPUs x 2 accumulation steps" in r.stdout


@pytest.mark.parametrize(
    "args,needle",
    [(["--gpus", "0"], "--gpus: must be a whole number >= 1"), (["--gpus", "12"], "multiple of 8")],
)
def test_cli_refuses_bad_gpu_counts(repo_root, args, needle):
    r = rnnscale("plan", "configs/debug_cpu.yaml", *args, cwd=repo_root)
    assert r.returncode == 2
    assert needle in r.stderr and "Traceback" not in r.stderr


def test_parameter_counts_are_parsed_as_written():
    assert [parse_count(t) for t in ("125000000", "350M", "1.3B", "20k", "2T")] == [
        125_000_000, 350_000_000, 1_300_000_000, 20_000, 2 * 10**12,
    ]  # fmt: skip
    for bad in ("abc", "0", "-5M", "1.3X", ""):
        with pytest.raises(ValueError, match="write a parameter count like 350M"):
            parse_count(bad)


def test_match_params_picks_the_closest_width(repo_root):
    """The counts are those of the whole model on the meta device (the search builds one block
    per distinct mixer), and no width of the grid comes closer."""
    cfg = load_config(repo_root / "configs/debug_cpu.yaml",
                      ["model.mixer_pattern=[mamba2, gated_deltanet, rglru, attn]",
                       "model.num_layers=6"])  # fmt: skip
    counts = match_width(cfg.model, 20_000_000)
    best = next(iter(counts))
    assert sorted(counts) == [best - 64, best, best + 64]
    for d_model, n in counts.items():
        with torch.device("meta"):
            full = build_model(dataclasses.replace(cfg.model, d_model=d_model))
        assert n == full.num_params()
    assert min(counts.values(), key=lambda n: abs(n - 20_000_000)) == counts[best]


def test_cli_match_params(repo_root, capsys):
    config = str(repo_root / "configs/debug_cpu.yaml")
    assert main(["plan", config, "--match-params", "20M", "model.num_layers=6"]) == 0
    out = capsys.readouterr().out
    assert "\n      512       19,443,712     -2.78%  <- closest\n" in out, out
    assert out.endswith("override: model.d_model=512\n"), out
    assert main(["plan", config, "--match-params", "1k"]) == 2
    assert "--match-params 1 k: out of reach" in capsys.readouterr().err
    assert main(["plan", config]) == 2
    assert "plan needs --gpus N" in capsys.readouterr().err
