"""The trained model as one file: `<run dir>/model.safetensors` beside `config.yaml`.

Written at the end of every run (and read by `rnnscale generate`). Tied weights are stored
once (safetensors' `save_model` drops the alias and `load_model` restores it). The file is
written under a temporary name and renamed, so a crash never leaves a partial model.safetensors
that looks whole.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from rnnscale.train.config import RunConfig, load_config
from rnnscale.train.model import LanguageModel, build_model

MODEL_FILE = "model.safetensors"


def export_model(model: LanguageModel, run_dir: Path) -> Path:
    """`run_dir/model.safetensors`, whole or not at all: a write that fails (a full disk)
    removes its temporary file and raises OSError naming the file and the free space."""
    from safetensors import SafetensorError

    path = Path(run_dir) / MODEL_FILE
    tmp = path.with_name(f".{MODEL_FILE}.{os.getpid()}.tmp")
    try:
        save_model(model, str(tmp), metadata={"layers": ",".join(model.layer_types)})
        os.replace(tmp, path)
    except (OSError, SafetensorError) as e:
        tmp.unlink(missing_ok=True)
        free = shutil.disk_usage(path.parent).free / 2**20
        what = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        raise OSError(f"{path} was not written: {what}; {free:.1f} MiB free there") from e
    return path


def export_from_engine(engine, cfg: RunConfig) -> None:
    """model.safetensors (fp32) from rank 0, at the end of a run (collective). ZeRO-3 gathers
    the weights onto rank 0 only, layer by layer; other stages copy them (DeepSpeed's may be
    bf16 views into its flat buffers). A write that fails raises `RunStopped` on every rank,
    naming the newest checkpoint to export from."""
    rank, problem = torch.distributed.get_rank(), [""]
    if cfg.parallel.zero_stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()  # collective; full on rank 0
    else:
        state = engine.module.state_dict() if rank == 0 else {}
    if rank == 0:
        with torch.device("meta"):
            copy = build_model(cfg.model, cfg.kernels)
        # one tensor at a time, each gathered one dropped once copied: the full model is held
        # once, not twice (a 1B model is 4 GB of fp32 beside rank 0's training state)
        weights = {k: state.pop(k).detach().to("cpu", torch.float32, copy=True)
                   for k in list(state)}  # fmt: skip
        copy.load_state_dict(weights, assign=True)
        if cfg.model.tie_embeddings:
            copy.head.weight = copy.embed.weight
        try:
            export_model(copy, cfg.run_dir)
        except OSError as e:
            problem[0] = str(e)
    if torch.distributed.get_world_size() > 1:
        torch.distributed.broadcast_object_list(problem, src=0)
    if problem[0]:
        from rnnscale.train.room import RunStopped, newest_committed

        newest = newest_committed(cfg.checkpoint_dir)
        keep = (f"the newest checkpoint, {newest}, is intact: make room and run `rnnscale "
                f"export {newest} --out DIR`" if newest else "no checkpoint was saved")  # fmt: skip
        raise RunStopped(f"training finished but the model was not exported: {problem[0]}; {keep}")


def load_exported(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[LanguageModel, RunConfig]:
    """`path`: a run directory, or a model.safetensors inside one (its config.yaml beside it)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: pass a run directory written by "
                                f"rnnscale train, or a model.safetensors in one")  # fmt: skip
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
    model = build_model(cfg.model, cfg.kernels)
    from safetensors import SafetensorError

    try:
        load_model(model, str(weights), device=str(device))
    except (SafetensorError, OSError, RuntimeError) as e:  # truncated, or another model's
        raise ValueError(
            f"{weights} cannot be loaded ({str(e).splitlines()[0]}): it is damaged or not this "
            f"config's model; export it again from a checkpoint (rnnscale export CHECKPOINT "
            f"--out DIR)"
        ) from None
    return model.to(device).eval(), cfg


def checkpoint_model(checkpoint_dir: str | Path, dtype: str = "fp32"):
    """`(model, cfg, tokenizer)`: the consolidated weights of a committed checkpoint (fp32 or
    bf16), its config, and the tokenizer it was trained with (a path, or None for token data
    without one). ZeRO 0-2 checkpoints hold the whole model in `mp_rank_00_model_states.pt`
    (read with `weights_only`); ZeRO-3 shards are merged by DeepSpeed's `zero_to_fp32`."""
    import json

    from rnnscale.train import checkpoint

    path = Path(checkpoint_dir)
    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"--dtype must be fp32 or bf16, got {dtype!r}")
    problem = checkpoint.verify(path)
    if problem is not None:
        raise ValueError(f"{path} is not a committed checkpoint: {problem}")
    cfg = load_config(path / "config.yaml")
    if cfg.parallel.zero_stage == 3:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with checkpoint.weights_only_loading():
            state = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    else:
        file = path / "mp_rank_00_model_states.pt"
        state = torch.load(file, map_location="cpu", weights_only=True)["module"]
    with torch.device("meta"):
        model = build_model(cfg.model, cfg.kernels)
    target = torch.bfloat16 if dtype == "bf16" else torch.float32
    model.load_state_dict({k: v.to(target, copy=True) for k, v in state.items()}, assign=True)
    if cfg.model.tie_embeddings:
        model.head.weight = model.embed.weight
    fingerprint = json.loads((path / checkpoint.META).read_text())["tokenizer"]
    if fingerprint is None:
        return model, cfg, None
    from rnnscale.data.tokenizer import fingerprint as tokenizer_fingerprint

    tokenizer = path.parent.parent / "tokenizer.model"  # the run directory's copy
    if not tokenizer.is_file() or tokenizer_fingerprint(tokenizer) != fingerprint:
        tokenizer = Path(cfg.data.tokenizer)
    if not tokenizer.is_file() or tokenizer_fingerprint(tokenizer) != fingerprint:
        raise FileNotFoundError(
            f"the tokenizer this checkpoint was trained with (fingerprint {fingerprint[:12]}"
            f"...) is neither in its run directory nor at data.tokenizer={cfg.data.tokenizer}"
        )
    return model, cfg, tokenizer


def source_model(source: str | Path, dtype: str = "fp32"):
    """`(model, cfg, tokenizer or None)` of a committed checkpoint (`checkpoint_model`), of a
    finished run directory (its model.safetensors, config.yaml and tokenizer.model), or of a
    directory `rnnscale export --format hf` wrote."""
    from rnnscale.train import checkpoint

    path = Path(source)
    if path.is_dir() and ((path / checkpoint.META).exists() or path.name.startswith("step_")):
        return checkpoint_model(path, dtype)
    if (path / "config.json").is_file():  # a Hugging Face directory rnnscale exported
        from rnnscale.train.hf.load import hf_model

        model, cfg, tokenizer = hf_model(path)
        return (model.bfloat16() if dtype == "bf16" else model), cfg, tokenizer
    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"--dtype must be fp32 or bf16, got {dtype!r}")
    model, cfg = load_exported(path)
    if dtype == "bf16":
        model = model.bfloat16()
    run_dir = path if path.is_dir() else path.parent
    tokenizer = run_dir / "tokenizer.model"
    return model, cfg, tokenizer if tokenizer.is_file() else None


def export_checkpoint(checkpoint_dir: str | Path, out: str | Path, dtype: str = "fp32") -> Path:
    """Consolidated weights of a committed checkpoint (or a finished run directory, see
    `source_model`) as `out/model.safetensors` (fp32 or bf16), with its `config.yaml` and the
    run's tokenizer: what `rnnscale generate OUT` loads, with no DeepSpeed."""
    model, cfg, tokenizer = source_model(checkpoint_dir, dtype)
    source, out = Path(checkpoint_dir), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile((source if source.is_dir() else source.parent) / "config.yaml",
                    out / "config.yaml")  # fmt: skip
    if tokenizer is not None:
        shutil.copyfile(tokenizer, out / "tokenizer.model")
    return export_model(model, out)
