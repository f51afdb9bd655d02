"""The `rnnscale` command.

    rnnscale train CONFIG [key=value ...]        train (one process on this machine, for now)
    rnnscale config show CONFIG [key=value ...]  print the resolved config, start nothing

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


if __name__ == "__main__":
    raise SystemExit(main())
