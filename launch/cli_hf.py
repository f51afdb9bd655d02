"""`rnnscale import-hf DIR`: the `model` section that starts a run from an exported model
(docs/evaluation.md, "Continued pretraining")."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_hf_parsers(commands) -> None:
    imp = commands.add_parser(
        "import-hf",
        help="print (or write) the model section, with model.init_from, that starts a run from "
        "a model `rnnscale export --format hf` wrote",
    )
    imp.add_argument("source", metavar="DIR", help="the exported directory (or a run directory)")
    imp.add_argument("--out", metavar="YAML", help="write it there instead of printing it")


def run_import(args: argparse.Namespace) -> int:
    from rnnscale.train.config import ConfigError
    from rnnscale.train.hf.load import import_section

    try:
        text = import_section(args.source)
    except (ConfigError, KeyError, ValueError) as e:
        what = f"config.json lacks {e}" if isinstance(e, KeyError) else str(e)
        print(f"rnnscale: {what}", file=sys.stderr)
        return 2
    if args.out:
        Path(args.out).write_text(text)
        print(f"rnnscale: wrote {args.out}; train with: rnnscale train CONFIG with its model "
              f"section (or merge it in), and data.tokenizer as it says")  # fmt: skip
    else:
        print(text, end="")
    return 0
