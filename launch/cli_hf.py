"""`rnnscale import-hf DIR` (the `model` section that starts a run from an exported model) and
`rnnscale eval SOURCE` (lm-evaluation-harness tasks, and the recall and length suites):
docs/evaluation.md."""

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
    ev = commands.add_parser("eval", help="lm-evaluation-harness tasks on a trained model")
    ev.add_argument("source", metavar="SOURCE",
                    help="a finished run directory, a committed checkpoint, or a directory "
                    "`rnnscale export --format hf` wrote")  # fmt: skip
    ev.add_argument("--tasks", required=True, help="lm-eval task names, comma-separated")
    ev.add_argument("--include-path", metavar="DIR", help="more lm-eval task YAMLs (local data)")
    ev.add_argument("--num-fewshot", type=int, help="examples before each question")
    ev.add_argument("--limit", type=float, help="documents per task (a fraction if < 1)")
    ev.add_argument("--batch-tokens", type=int, default=8192,
                    help="tokens per forward (requests packed as documents)")  # fmt: skip
    ev.add_argument("--device", help="default: cuda when there is a GPU, else cpu")
    ev.add_argument(
        "--out",
        metavar="JSON",
        help="results file (default: the run directory's eval/lm_eval.json)",
    )


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


def eval_dir(source: str | Path) -> Path:
    """Where results of SOURCE go: its run directory's eval/ (a checkpoint's:
    eval/<step_...>/), or the exported directory's eval/."""
    path = Path(source)
    folder = path if path.is_dir() else path.parent
    if folder.parent.name == "checkpoints":
        return folder.parent.parent / "eval" / folder.name
    return folder / "eval"


def run_eval(args: argparse.Namespace) -> int:
    import torch

    from rnnscale.train.config import ConfigError
    from rnnscale.train.export import source_model

    try:
        model, _, tokenizer = source_model(args.source)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"rnnscale: {e}", file=sys.stderr)
        return 2
    if tokenizer is None:
        print(f"rnnscale: {args.source} has no tokenizer.model (its run trained on token ids): "
              "lm-eval tasks are text", file=sys.stderr)  # fmt: skip
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    import sentencepiece

    from rnnscale.train.harness import run_tasks, write_results

    sp = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer))
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    try:
        results = run_tasks(model, sp, tasks, include_path=args.include_path,
                            num_fewshot=args.num_fewshot, limit=args.limit,
                            batch_tokens=args.batch_tokens, device=device)  # fmt: skip
    except (ImportError, ValueError) as e:
        print(f"rnnscale: {e}", file=sys.stderr)
        return 2
    from lm_eval.utils import make_table

    print(make_table(results))
    out = write_results(
        results, Path(args.out) if args.out else eval_dir(args.source) / "lm_eval.json"
    )
    print(f"rnnscale: wrote {out}")
    return 0
