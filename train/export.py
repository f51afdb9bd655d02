"""The trained model as one file: `<run dir>/model.safetensors` beside `config.yaml`.

Written at the end of every run (and read by `rnnscale generate`). Tied weights are stored
once (safetensors' `save_model` drops the alias and `load_model` restores it). The file is
written under a temporary name and renamed, so a crash never leaves a partial model.safetensors
that looks whole.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from rnnscale.train.config import RunConfig, load_config
from rnnscale.train.model import LanguageModel, build_model

MODEL_FILE = "model.safetensors"


def export_model(model: LanguageModel, run_dir: Path) -> Path:
    path = Path(run_dir) / MODEL_FILE
    tmp = path.with_name(f".{MODEL_FILE}.{os.getpid()}.tmp")
    save_model(model, str(tmp), metadata={"layers": ",".join(model.layer_types)})
    os.replace(tmp, path)
    return path


def load_exported(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[LanguageModel, RunConfig]:
    """`path`: a run directory, or a model.safetensors inside one (its config.yaml beside it)."""
    path = Path(path)
    run_dir = path if path.is_dir() else path.parent
    weights = path / MODEL_FILE if path.is_dir() else path
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise FileNotFoundError(
            f"{config} not found: pass a run directory written by rnnscale train"
        )
    if not weights.is_file():
        raise FileNotFoundError(
            f"{weights} not found: the run has not finished (the model is exported at its end)"
        )
    cfg = load_config(config)
    model = build_model(cfg.model)
    load_model(model, str(weights), device=str(device))
    return model.to(device).eval(), cfg
