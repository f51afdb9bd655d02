"""Back from Hugging Face's format: `model.init_from` (a new run starts from exported weights)
and `rnnscale import-hf DIR` (the `model` section that such a run needs).

A source is a directory `rnnscale export --format hf` wrote (config.json of model_type
rnnscale) or a finished rnnscale run directory (config.yaml and model.safetensors; or that
file). Its architecture is compared with the run's, field by field, as config.json states it
(sizes, layer types, the options of every mixer used, the SwiGLU width, tied embeddings), and
its tokenizer, where it has one, with data.tokenizer: a mismatch is one line naming the fields,
before any weight is read.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rnnscale.train.config import ConfigError, RunConfig, load_config
from rnnscale.train.hf import WEIGHTS, hf_config

ARCHITECTURE = ("vocab_size", "d_model", "num_layers", "num_heads", "layer_types", "mixers",
                "mlp_hidden", "norm_eps", "tie_word_embeddings")  # fmt: skip
"""The config.json fields that fix the weights' shapes and meaning."""


def read_source(path: str | Path) -> tuple[dict, Path, Path | None]:
    """`(config.json's content, the weights file, the tokenizer or None)` of a source."""
    path = Path(path)
    what = ("give a directory `rnnscale export --format hf` wrote, or a finished run "
            "directory")  # fmt: skip
    if not path.exists():
        raise ConfigError(f"model.init_from: {path} does not exist: {what}")
    folder = path if path.is_dir() else path.parent
    tokenizer = folder / "tokenizer.model"
    tokenizer = tokenizer if tokenizer.is_file() else None
    if (folder / "config.json").is_file():
        config = json.loads((folder / "config.json").read_text())
        if config.get("model_type") != "rnnscale":
            raise ConfigError(
                f"model.init_from: {folder} holds a {config.get('model_type')!r} model, not one "
                f"rnnscale exported: only rnnscale's own models load here"
            )
    elif (folder / "config.yaml").is_file():
        config = hf_config(load_config(folder / "config.yaml"))
    else:
        raise ConfigError(f"model.init_from: {folder} has no config.json or config.yaml: {what}")
    weights = path if path.is_file() else folder / WEIGHTS
    if not weights.is_file():
        raise ConfigError(f"model.init_from: {weights} not found (a run exports it at its end)")
    return config, weights, tokenizer


def check_source(cfg: RunConfig) -> Path:
    """The weights file of `cfg.model.init_from`, whose architecture and tokenizer are the
    run's; else ConfigError naming what differs."""
    theirs, weights, tokenizer = read_source(cfg.model.init_from)
    mine = hf_config(cfg)
    differ = [f"{key}: {theirs.get(key)!r} there, {mine[key]!r} here" for key in ARCHITECTURE
              if theirs.get(key) != mine[key]]  # fmt: skip
    if differ:
        raise ConfigError(
            f"model.init_from: {cfg.model.init_from} is another architecture ({'; '.join(differ)})"
            f": set the model section to its own (rnnscale import-hf {cfg.model.init_from})"
        )
    if tokenizer is not None and cfg.data.source != "synthetic":
        from rnnscale.data.tokenizer import fingerprint

        if Path(cfg.data.tokenizer).is_file() and fingerprint(tokenizer) != fingerprint(
            cfg.data.tokenizer
        ):
            raise ConfigError(
                f"model.init_from: {cfg.model.init_from} was trained with another tokenizer than "
                f"data.tokenizer {cfg.data.tokenizer}: use its tokenizer.model (and data made "
                "with it)"
            )
    return weights


@torch.no_grad()
def load_initial_weights(model: torch.nn.Module, cfg: RunConfig) -> None:
    """Copy the weights of `cfg.model.init_from` into `model` (built from `cfg`), one tensor at
    a time from the file (never the whole model in host memory at once). Under ZeRO-3 (already
    partitioned) each parameter is gathered, written by rank 0 alone (the only rank that reads
    the file) and partitioned again; names and shapes are checked on every rank first."""
    from safetensors import safe_open

    weights = check_source(cfg)
    params = dict(model.named_parameters())  # a tied head is named once, as embed.weight
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    with safe_open(str(weights), framework="pt") as f:
        stored = {name: name for name in f.keys()}
        if "embed.weight" not in stored and "head.weight" in stored and cfg.model.tie_embeddings:
            stored["embed.weight"] = stored.pop("head.weight")  # safetensors kept the other alias
        missing = sorted(set(params) - set(stored))
        unexpected = sorted(set(stored) - set(params) - {"head.weight"})
        if missing or unexpected:
            raise ConfigError(
                f"model.init_from: {cfg.model.init_from} does not hold this model's weights "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        for name, p in params.items():
            there = tuple(f.get_slice(stored[name]).get_shape())
            here = tuple(getattr(p, "ds_shape", p.shape))
            if there != here:
                raise ConfigError(f"model.init_from: {name} is {there} there, {here} here")
        for name, p in params.items():
            with _gathered(p):
                if rank == 0 or not hasattr(p, "ds_id"):
                    p.copy_(f.get_tensor(stored[name]).to(p.dtype))


def _gathered(p: torch.nn.Parameter):
    import contextlib

    if not hasattr(p, "ds_id"):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([p], modifier_rank=0)


def source_config(path: str | Path) -> tuple[RunConfig, Path | None]:
    """The run config (`model` and `kernels.chunk_size`, `model.init_from` the source; the
    rest defaults) of a model from `path`, and its tokenizer or None."""
    from rnnscale.train.config import from_dict

    config, _, tokenizer = read_source(path)
    model = config.get("rnnscale_model")
    if model is None:  # a config.json written by hand: its fields
        model = {"vocab_size": config["vocab_size"], "d_model": config["d_model"],
                 "num_layers": config["num_layers"], "num_heads": config["num_heads"],
                 "mixer_pattern": config["layer_types"], "mlp_hidden": config["mlp_hidden"],
                 "norm_eps": config["norm_eps"],
                 "tie_embeddings": config["tie_word_embeddings"], **config["mixers"]}  # fmt: skip
    model = {**model, "init_from": str(Path(path).resolve())}
    chunks = config.get("chunk_sizes", {})
    return from_dict({"model": model, "kernels": {"chunk_size": chunks}}), tokenizer


def hf_model(path: str | Path):
    """`(model, cfg, tokenizer or None)` of a directory `rnnscale export --format hf` wrote,
    as rnnscale's own model (eval mode)."""
    from rnnscale.train.model import build_model

    cfg, tokenizer = source_config(path)
    model = build_model(cfg.model, cfg.kernels)
    load_initial_weights(model, cfg)
    return model.eval(), cfg, tokenizer


def import_section(path: str | Path) -> str:
    """The `model:` YAML section (with `init_from`) that starts a run from the source, and the
    `kernels.chunk_size` it ran with (the same sums in the same order)."""
    import yaml

    from rnnscale.train.config import to_dict

    cfg, tokenizer = source_config(path)
    section = {
        "model": to_dict(cfg.model),
        "kernels": {"chunk_size": to_dict(cfg.kernels.chunk_size)},
    }
    text = yaml.safe_dump(section, sort_keys=False, default_flow_style=None)
    if tokenizer is not None:
        text += f"# its tokenizer: data.tokenizer={tokenizer.resolve()}\n"
    return text
