import dataclasses
import os
import typing
from pathlib import Path

import pytest
import yaml

from rnnscale.train.config import (
    ConfigError,
    RunConfig,
    dump_yaml,
    from_dict,
    load_config,
    model_architecture,
    reference_markdown,
    to_dict,
)

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_there_are_configs():
    assert any(p.name == "debug_cpu.yaml" for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    # the resolved YAML loads back to the same tree
    assert from_dict(yaml.safe_load(dump_yaml(cfg))) == cfg


def test_overrides_apply_with_yaml_types(repo_root):
    cfg = load_config(
        repo_root / "configs/debug_cpu.yaml",
        [
            "optim.lr=1e-3",
            "optim.eps=2E+1",
            "train.max_steps=7",
            "model.mixer_pattern=[attn, gla, gla]",
            "log.progress_bar=false",
            "run.name=x",
            "optim.betas=[0.8, 0.9]",
        ],
    )
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float) and cfg.optim.eps == 20.0
    assert cfg.train.max_steps == 7
    assert cfg.model.mixer_pattern == ["attn", "gla", "gla"]
    assert cfg.log.progress_bar is False
    assert cfg.run_dir == Path("runs/x")
    assert cfg.optim.betas == [0.8, 0.9]


def test_integer_given_for_float_is_a_float():
    assert from_dict({"optim": {"lr": 1}}).optim.lr == 1.0


@pytest.mark.parametrize(
    "override,message",
    [
        (
            "optim.lrr=1",
            r"optim\.lrr: unknown key; valid keys under optim: lr, .*did you mean optim\.lr",
        ),
        ("optimm.lr=1", r"optimm: unknown key; valid keys: run, model"),
        ("train.max_steps=abc", r"train\.max_steps: expected an integer, got 'abc'"),
        ("train.max_steps=1.5", r"train\.max_steps: expected an integer, got 1\.5"),
        ("log.progress_bar=yes please", r"log\.progress_bar: expected true or false"),
        (
            "schedule.kind=exp",
            r"schedule\.kind: 'exp' \(str\) is not one of: cosine, linear, wsd, constant",
        ),
        (
            "model.mixer_pattern=[gla, mamba9]",
            r"model\.mixer_pattern\[1\]: 'mamba9' .* not one of: gla, retnet, mamba2, ",
        ),
        ("model.mixer_pattern=gla", r"model\.mixer_pattern: expected a list"),
        ("kernels.chunk_size.gla=0", r"kernels\.chunk_size\.gla: must be > 0"),
        (
            "kernels.chunk_size.delta=24",
            r"kernels\.chunk_size\.delta: must be a power of two >= 16 .*kernels\.backend=torch",
        ),
        ("train.eval_interval=-1", r"train\.eval_interval: must be >= 0 \(0: never\)"),
        ("run.name=a/b", r"run\.name: must not contain any of / \(got 'a/b'\) \(a path goes"),
        ("log.wandb.project=x:y", r"log\.wandb\.project: must not contain any of / \\ # \?"),
        ("model.mixer_pattern=[]", r"model\.mixer_pattern: must not be empty \(name a mixer\)"),
        ("schedule.min_lr_ratio=1.5", r"schedule\.min_lr_ratio: must be >= 0, <= 1"),
        ("model.d_model=65", r"model\.d_model: must divide by model\.num_heads=2"),
        (
            "train.global_batch_size=6",
            r"train\.global_batch_size: must be a multiple of train\.micro_batch_size",
        ),
        ("optim.betas=[0.9]", r"optim\.betas: must be two numbers"),
        ("optim.lr=.inf", r"optim\.lr: must be a finite number \(got inf\)"),
        ("optim.weight_decay=.nan", r"optim\.weight_decay: must be a finite number \(got nan\)"),
        ("optim.betas=[0.9, -.inf]", r"optim\.betas: must be a finite number \(got \[0\.9, -inf\]"),
        ("optim.lr.x=1", r"optim\.lr is not a section"),
        ("optim.lr", r"not of the form section\.key=value"),
        ("model=3", r"model: expected a mapping"),
    ],
)
def test_bad_values_name_their_dotted_path(repo_root, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(repo_root / "configs/debug_cpu.yaml", [override])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(listy)


def _fields(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        yield f"{prefix}{f.name}", f
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _fields(hints[f.name], f"{prefix}{f.name}.")


def test_every_field_is_documented():
    fields = dict(_fields(RunConfig))
    assert "kernels.chunk_size.gla" in fields
    undocumented = [name for name, f in fields.items() if not f.metadata.get("doc")]
    assert undocumented == []


def test_defaults_are_valid():
    from_dict({})


def test_config_reference_doc_is_current(repo_root):
    doc_path = repo_root / "docs" / "configs.md"
    text = reference_markdown()
    if os.environ.get("RNNSCALE_UPDATE_DOCS"):
        doc_path.write_text(text)
    assert doc_path.read_text() == text, "regenerate: see the top of docs/configs.md"


def test_a_key_that_is_not_a_python_name(repo_root, tmp_path):
    """checkpoint.async (a Python keyword) is the YAML key and the override; it round-trips."""
    cfg = load_config(repo_root / "configs/debug_cpu.yaml", ["checkpoint.async=true"])
    assert cfg.checkpoint.async_save is True
    dumped = yaml.safe_load(dump_yaml(cfg))
    assert dumped["checkpoint"]["async"] is True and "async_save" not in dumped["checkpoint"]
    (tmp_path / "c.yaml").write_text(dump_yaml(cfg))
    assert load_config(tmp_path / "c.yaml").checkpoint.async_save is True
    with pytest.raises(ConfigError, match="did you mean checkpoint.async"):
        load_config(repo_root / "configs/debug_cpu.yaml", ["checkpoint.async_save=true"])


def test_any_chunk_size_with_the_torch_backend(repo_root):
    cfg = load_config(repo_root / "configs/debug_cpu.yaml",
                      ["kernels.backend=torch", "kernels.chunk_size.gla=24"])  # fmt: skip
    assert cfg.kernels.chunk_size.gla == 24


OLD_CHUNKS = {"gla": 16, "retnet": 64, "mamba2": 64, "hgrn2": 64, "gated_deltanet": 64,
              "mingru": 32, "minlstm": 32, "rglru": 32}  # fmt: skip
"""The chunk sizes every config.yaml and checkpoint wrote under model.<mixer> before 2026-12."""


def _old_format(cfg) -> dict:
    """`cfg` as a config.yaml (and a checkpoint's meta.json model) was written before the
    kernels section: every mixer with its chunk size, loss_chunk_tokens under model."""
    raw = to_dict(cfg)
    del raw["kernels"]
    for name, chunk in OLD_CHUNKS.items():
        raw["model"][name]["chunk_size"] = chunk
    raw["model"]["loss_chunk_tokens"] = 4096
    return raw


def test_configs_and_checkpoints_written_before_the_kernels_section_load(repo_root, capsys):
    """Old config.yaml files (a run's, a checkpoint's) load: the chunk sizes of the mixers the
    model has move to kernels.chunk_size.<family> with a warning, the others were never used;
    two mixers of one family that disagree (gla 16, hgrn2 64) keep the first one's; and an old
    checkpoint's model section, less those keys, is the model section of today."""
    cfg = load_config(repo_root / "configs/debug_cpu.yaml")
    old = _old_format(cfg)
    assert from_dict(old) == cfg
    assert "model.gla.chunk_size is now kernels.chunk_size.gla" in capsys.readouterr().err
    old["model"]["mixer_pattern"] = ["gla", "hgrn2", "rglru"]
    moved = from_dict(old)
    assert (moved.kernels.chunk_size.gla, moved.kernels.chunk_size.scan) == (16, 32)
    assert "model.hgrn2.chunk_size (64) is now kernels.chunk_size.gla, which is 16 here" in (
        capsys.readouterr().err
    )
    assert model_architecture(_old_format(cfg)["model"]) == to_dict(cfg)["model"]


def test_speed_settings_under_model_move_to_kernels_with_a_warning(repo_root, capsys):
    """An override in the old place still works, with a warning naming the new one; a value
    under kernels wins over an old one."""
    cfg = load_config(repo_root / "configs/debug_cpu.yaml",
                      ["model.mixer_pattern=[rglru]", "model.rglru.chunk_size=64",
                       "model.loss_chunk_tokens=128"])  # fmt: skip
    assert (cfg.kernels.chunk_size.scan, cfg.kernels.loss_chunk_tokens) == (64, 128)
    err = capsys.readouterr().err
    assert "model.loss_chunk_tokens is now kernels.loss_chunk_tokens" in err
    both = {"model": {"gla": {"chunk_size": 32}}, "kernels": {"chunk_size": {"gla": 64}}}
    assert from_dict(both).kernels.chunk_size.gla == 64
    assert "model.gla.chunk_size (32) is now kernels.chunk_size.gla, which is 64 here" in (
        capsys.readouterr().err
    )


def test_a_pattern_that_does_not_divide_num_layers_is_said_once(repo_root, capsys, monkeypatch):
    """[gdn, gdn, attn] over 4 layers tiles to gdn, gdn, attn, gdn: said once per process, on
    rank 0 only, naming the layers; a pattern that divides num_layers says nothing."""
    from rnnscale.train.config import loading

    monkeypatch.setattr(loading, "_TILINGS_SAID", set())
    uneven = ["model.mixer_pattern=[gated_deltanet, gated_deltanet, attn]", "model.num_layers=4"]
    for _ in range(2):
        load_config(repo_root / "configs/debug_cpu.yaml", uneven)
    err = capsys.readouterr().err
    assert err.count("does not divide model.num_layers=4") == 1, err
    assert "the layers are [gated_deltanet, gated_deltanet, attn, gated_deltanet]" in err
    load_config(repo_root / "configs/debug_cpu.yaml", [uneven[0], "model.num_layers=6"])
    monkeypatch.setattr(loading, "_TILINGS_SAID", set())
    from rnnscale.train import notice  # rank 1 (an earlier test may have left a process group)

    monkeypatch.setattr(notice, "_rank", lambda: 1)
    load_config(repo_root / "configs/debug_cpu.yaml", uneven)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    "in_file,overrides,name",
    [
        ("{name: base}", ["run.dir=runs/exp2"], "exp2"),  # the reported case
        ("{name: base}", ["run.dir=/tmp/sweep/lr3e-4/"], "lr3e-4"),
        ("{name: base}", ["run.dir=runs/exp2", "run.name=mine"], "mine"),
        ("{name: base}", ["run.name=mine", "run.dir=runs/exp2"], "mine"),  # one level
        ("{name: base}", ["run.dir="], "base"),  # empty: runs/<run.name>
        ("{name: base, dir: runs/b}", [], "base"),
        ("{dir: runs/b}", [], "b"),
        ("{dir: runs/b}", ["run.name=mine"], "mine"),
        ("{name: base, dir: runs/b}", ["run.dir=runs/c"], "c"),
        ("{name: base, dir: runs/b}", ["run.seed=3"], "base"),
    ],
)
def test_run_dir_alone_names_the_run(tmp_path, in_file, overrides, name):
    """A run.dir set (in the file or by overrides) without a run.name at the same or a later
    level names the run, and so its wandb id: two directories are two runs."""
    path = tmp_path / "c.yaml"
    path.write_text(f"run: {in_file}\n")
    assert load_config(path, overrides).run.name == name
