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
    ev = commands.add_parser(
        "eval", help="lm-evaluation-harness tasks, or the recall and length suites, on a model"
    )
    ev.add_argument("source", metavar="SOURCE",
                    help="a finished run directory, a committed checkpoint, or a directory "
                    "`rnnscale export --format hf` wrote")  # fmt: skip
    ev.add_argument("--tasks", help="lm-eval task names, comma-separated")
    ev.add_argument("--suite", choices=["recall", "length"], action="append",
                    help="a built-in suite (repeat for both): JSON and PNG in eval/")  # fmt: skip
    ev.add_argument("--pairs", default="4,8,16,32", help="recall: key/value pairs per row")
    ev.add_argument("--lengths", default="64,256,1024", help="recall: tokens per row")
    ev.add_argument("--num-keys", type=int, default=0, help="recall: key ids (0: half)")
    ev.add_argument("--num-values", type=int, default=0, help="recall: value ids (0: the rest)")
    ev.add_argument("--factor", type=int, default=8, help="length: rows of this x train.seq_len")
    ev.add_argument("--rows", type=int, default=4, help="length: rows scored")
    ev.add_argument("--config", metavar="YAML",
                    help="length: the run config whose data and train.seq_len to use (an "
                    "exported directory has none)")  # fmt: skip
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

    if not args.tasks and not args.suite:
        print("rnnscale: eval needs --tasks (lm-eval) or --suite recall|length", file=sys.stderr)
        return 2
    exported = (Path(args.source) / "config.json").is_file()
    if "length" in (args.suite or []) and exported and not args.config:
        print(f"rnnscale: --suite length reads the validation data of a run config, which "
              f"{args.source} lacks: pass --config RUN_CONFIG", file=sys.stderr)  # fmt: skip
        return 2
    try:
        model, cfg, tokenizer = source_model(args.source)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"rnnscale: {e}", file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.suite:
        try:
            run_suites(args, model.to(device), cfg, tokenizer, device)
        except (ValueError, ConfigError, FileNotFoundError) as e:
            print(f"rnnscale: {e}", file=sys.stderr)
            return 2
    if not args.tasks:
        return 0
    import sentencepiece

    from rnnscale.train.harness import run_tasks, write_results

    if tokenizer is None:
        print(f"rnnscale: {args.source} has no tokenizer.model (its run trained on token ids): "
              "lm-eval tasks are text", file=sys.stderr)  # fmt: skip
        return 2
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


def _ints(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} takes whole numbers separated by commas, got {text!r}") from None


def run_suites(args, model, cfg, tokenizer, device) -> None:
    """Each --suite: its JSON and PNG in the eval directory, and one line of what it found."""
    import json

    from rnnscale.train import suites

    out = eval_dir(args.source)
    out.mkdir(parents=True, exist_ok=True)
    for suite in args.suite:
        if suite == "recall":
            result = suites.recall_suite(
                model, cfg.model.vocab_size, pairs=_ints(args.pairs, "--pairs"),
                lengths=_ints(args.lengths, "--lengths"), num_keys=args.num_keys,
                num_values=args.num_values, device=device,
            )  # fmt: skip
            best = max(result["results"], key=lambda r: r["accuracy"], default=None)
            found = "no setting fits"
            if best:
                found = (f"best {best['accuracy']:.3f} at {best['pairs']} pairs, "
                         f"{best['length']} tokens (chance {result['chance']:.3f})")  # fmt: skip
        else:
            if args.config:
                from rnnscale.train.config import load_config

                run = load_config(args.config)
                cfg.data, cfg.train, cfg.run = run.data, run.train, run.run
            sp = None
            if tokenizer is not None:
                import sentencepiece

                sp = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer))
            result = suites.length_suite(model, cfg, sp, factor=args.factor, rows=args.rows,
                                         device=device)  # fmt: skip
            found = (f"loss {result['loss_within_train_len']:.3f} within the training length, "
                     f"{result['loss_beyond_train_len']:.3f} beyond")  # fmt: skip
        (out / f"{suite}.json").write_text(json.dumps(result, indent=2) + "\n")
        drew = suites.draw(result, out / f"{suite}.png")
        png = f" and {suite}.png" if drew else " (no PNG: pip install matplotlib)"
        print(f"rnnscale: {suite}: {found}; wrote {out / f'{suite}.json'}{png}")
