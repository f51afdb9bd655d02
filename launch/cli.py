"""The `rnnscale` command.

    rnnscale train CONFIG [key=value ...]        train (one process on this machine, for now)
    rnnscale config show CONFIG [key=value ...]  print the resolved config, start nothing
    rnnscale generate RUN_DIR --prompt TEXT      sample from a trained model (recurrent form)

Overrides are dotted paths into the config tree, values parsed as YAML:
`optim.lr=3e-4 model.mixer_pattern=[gla,attn] log.progress_bar=false`.
"""

from __future__ import annotations

import argparse
import sys

from rnnscale.train.config import ConfigError, RunConfig, dump_yaml, load_config


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "generate":
        return _generate(args)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"rnnscale: {e}", file=sys.stderr)
        return 2
    return args.handler(cfg)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rnnscale",
        description="Pretrain recurrent and hybrid language models.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train a model from a config")
    _config_args(train)
    train.set_defaults(handler=_train)

    config = commands.add_parser("config", help="inspect configs")
    config_commands = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = config_commands.add_parser("show", help="print the resolved config and exit")
    _config_args(show)
    show.set_defaults(handler=_show)

    gen = commands.add_parser("generate", help="sample from a trained model")
    gen.add_argument("run_dir", metavar="RUN_DIR", help="run directory (or its model.safetensors)")
    prompt = gen.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="text, encoded with the run's tokenizer.model")
    prompt.add_argument("--prompt-ids", help="token ids instead of text, e.g. '1 17 5'")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    gen.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass")
    gen.add_argument("--seed", type=int, default=0)
    return parser


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="CONFIG", help="YAML file, e.g. configs/debug_cpu.yaml")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.lr=3e-4"
    )


def _train(cfg: RunConfig) -> int:
    from rnnscale.train import run

    run(cfg)
    return 0


def _show(cfg: RunConfig) -> int:
    print(dump_yaml(cfg), end="")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from rnnscale.train.export import load_exported
    from rnnscale.train.generate import generate

    if args.max_new_tokens < 0 or args.temperature < 0 or not 0 < args.top_p <= 1:
        print("rnnscale: need --max-new-tokens >= 0, --temperature >= 0, 0 < --top-p <= 1",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        model, cfg = load_exported(args.run_dir)
    except FileNotFoundError as e:
        print(f"rnnscale: {e}", file=sys.stderr)
        return 2
    run_dir = Path(args.run_dir) if Path(args.run_dir).is_dir() else Path(args.run_dir).parent
    tokenizer = _tokenizer(run_dir, cfg.model.vocab_size)
    if args.prompt is not None and tokenizer is None:
        print(f"rnnscale: {run_dir} has no tokenizer.model (this run trained on token ids): "
              "pass --prompt-ids", file=sys.stderr)  # fmt: skip
        return 2
    if args.prompt is not None:
        prompt = [tokenizer.bos_id(), *tokenizer.encode(args.prompt)]
    else:
        prompt = [int(t) for t in args.prompt_ids.replace(",", " ").split()]
        bad = [t for t in prompt if not 0 <= t < cfg.model.vocab_size]
        if bad or not prompt:
            print(f"rnnscale: --prompt-ids must be ids in [0, {cfg.model.vocab_size}), got "
                  f"{args.prompt_ids!r}", file=sys.stderr)  # fmt: skip
            return 2
    stop = tokenizer.eos_id() if tokenizer is not None else None
    new = generate(model, prompt, args.max_new_tokens, temperature=args.temperature,
                   top_p=args.top_p, stop_id=stop,
                   num_tokens=None if tokenizer is None else tokenizer.vocab_size(),
                   generator=torch.Generator().manual_seed(args.seed))  # fmt: skip
    if tokenizer is not None:
        print(args.prompt + tokenizer.decode(new))
    else:
        print(" ".join(str(t) for t in prompt + new))
    return 0


def _tokenizer(run_dir, vocab_size: int):
    """The run's sentencepiece tokenizer, or None when it trained on raw token ids."""
    path = run_dir / "tokenizer.model"
    if not path.is_file():
        return None
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    if sp.vocab_size() > vocab_size:
        raise SystemExit(f"rnnscale: {path} has {sp.vocab_size()} pieces but the model only "
                         f"{vocab_size} (model.vocab_size): not this run's tokenizer")  # fmt: skip
    return sp


if __name__ == "__main__":
    raise SystemExit(main())
