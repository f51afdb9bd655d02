"""rnnscale models in Hugging Face's format: `rnnscale export SOURCE --format hf --out DIR`.

DIR then holds what `transformers.AutoModelForCausalLM.from_pretrained(DIR,
trust_remote_code=True)` and `AutoTokenizer.from_pretrained(DIR, trust_remote_code=True)` load
without rnnscale installed:

- `config.json` (`RnnscaleConfig`, with `auto_map`, and the run's `model` section as
  `rnnscale_model`, so an import builds the same model);
- the model code, copied from this package as it is: `configuration_rnnscale.py`,
  `modeling_rnnscale.py`, `mixers_rnnscale.py`, `layers_rnnscale.py` (plain PyTorch, the
  chunkwise and one-step forms), `tokenization_rnnscale.py`;
- `model.safetensors` under rnnscale's own parameter names (the head left out when tied);
- the run's `tokenizer.model` with `tokenizer_config.json` and `special_tokens_map.json`, and
  `generation_config.json`.

See docs/evaluation.md ("Hugging Face format") for the decisions and the weight names.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch

from rnnscale.train.config import RunConfig, to_dict
from rnnscale.train.model import LanguageModel
from rnnscale.train.model.layers import mlp_hidden_size

CODE = (
    "configuration_rnnscale.py",
    "modeling_rnnscale.py",
    "mixers_rnnscale.py",
    "layers_rnnscale.py",
    "tokenization_rnnscale.py",
)
WEIGHTS = "model.safetensors"


def hf_config(cfg: RunConfig) -> dict:
    """config.json's content for the run config `cfg`."""
    m = cfg.model
    names = m.layer_types()
    from rnnscale.data.tokenizer import BOS, EOS

    return {
        "architectures": ["RnnscaleForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_rnnscale.RnnscaleConfig",
            "AutoModelForCausalLM": "modeling_rnnscale.RnnscaleForCausalLM",
        },
        "model_type": "rnnscale",
        "vocab_size": m.vocab_size,
        "d_model": m.d_model,
        "num_layers": m.num_layers,
        "num_heads": m.num_heads,
        "layer_types": names,
        "mixers": {name: dataclasses.asdict(getattr(m, name)) for name in sorted(set(names))},
        "mlp_hidden": mlp_hidden_size(m.d_model, m.mlp_hidden),
        "norm_eps": m.norm_eps,
        "init_std": m.init_std,
        "chunk_sizes": dataclasses.asdict(cfg.kernels.chunk_size),
        "tie_word_embeddings": m.tie_embeddings,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
        "pad_token_id": EOS,
        "torch_dtype": "float32",
        "rnnscale_model": {k: v for k, v in to_dict(m).items() if k != "init_from"},
    }


def export_hf(model: LanguageModel, cfg: RunConfig, tokenizer: Path | None, out: str | Path,
              dtype: torch.dtype = torch.float32) -> Path:  # fmt: skip
    """Write `model` (built from `cfg`) and `tokenizer` (a sentencepiece model, or None) to
    `out` in Hugging Face's format. The weights are written aside and renamed when whole."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = hf_config(cfg)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    for name in CODE:
        shutil.copyfile(Path(__file__).with_name(name), out / name)
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    if cfg.model.tie_embeddings:
        state.pop("head.weight")
    aside = out / f".{WEIGHTS}.{os.getpid()}.tmp"
    try:
        save_file(state, str(aside), metadata={"format": "pt"})
        os.replace(aside, out / WEIGHTS)
    finally:
        aside.unlink(missing_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
                  "pad_token_id": config["pad_token_id"]}  # fmt: skip
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    if tokenizer is not None:
        _write_tokenizer(Path(tokenizer), out)
    return out


def _write_tokenizer(model_file: Path, out: Path) -> None:
    """tokenizer.model and the transformers files that load it with `RnnscaleTokenizer`."""
    import sentencepiece

    from rnnscale.data.tokenizer import BOS, EOS, UNK

    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    if (out / "tokenizer.model").resolve() != model_file.resolve():
        shutil.copyfile(model_file, out / "tokenizer.model")
    special = {"bos_token": sp.id_to_piece(BOS), "eos_token": sp.id_to_piece(EOS),
               "unk_token": sp.id_to_piece(UNK), "pad_token": sp.id_to_piece(EOS)}  # fmt: skip
    config = {
        "tokenizer_class": "RnnscaleTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_rnnscale.RnnscaleTokenizer", None]},
        **special,
        "add_bos_token": True,
        "add_eos_token": False,
        "padding_side": "left",
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": True,
        "model_max_length": 10**30,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
