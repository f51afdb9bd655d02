"""The `rnnscale` command.

    rnnscale train CONFIG [key=value ...]        train: one process, or launch.num_workers Ray
                                                 Train workers (embedded local Ray by default)
    rnnscale submit CONFIG --address URL [k=v]   the same run on a Ray cluster (Jobs API)
    rnnscale jobs list|status ID|logs ID [--follow]|stop ID   submitted runs
    rnnscale config show CONFIG [key=value ...]  print the resolved config, start nothing
    rnnscale plan CONFIG --gpus N [key=value ...]  parameters, FLOPs, memory per GPU by ZeRO stage
    rnnscale plan CONFIG --match-params 350M     the d_model that gives that many parameters
    rnnscale generate RUN_DIR --prompt TEXT      sample from a trained model (recurrent form)
    rnnscale export CHECKPOINT --out DIR         a checkpoint's weights for generate (safetensors)
    rnnscale export RUN_OR_CKPT --format hf --out DIR   a Hugging Face model directory
    rnnscale import-hf DIR [--out YAML]          the model section (model.init_from) to go on
    rnnscale eval SOURCE --tasks T1,T2           lm-evaluation-harness tasks on a trained model
    rnnscale ckpt reshard CHECKPOINT             its universal form: resume on other world sizes
    rnnscale data tokenizer --input GLOB --vocab-size N --out DIR    train a sentencepiece BPE
    rnnscale data prepare --input GLOB --tokenizer PATH --out DIR    corpus -> MDS shards
    (either data command takes --builtin python-stdlib instead of --input: no download)
    rnnscale status RUN_DIR                      step, loss, eval ppl, tokens/s, elapsed, ETA, ...
    rnnscale dashboard DIR [--port 6006]         TensorBoard on a run, or on a folder of runs
    rnnscale compare RUN RUN ... [--out PNG]     runs' final numbers side by side, loss curves

Overrides are dotted paths into the config tree, values parsed as YAML:
`optim.lr=3e-4 model.mixer_pattern=[gla,attn] log.progress_bar=false`.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

from rnnscale.train.config import ConfigError, RunConfig, dump_yaml, load_config


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command in ("plan", "submit") and not any(a.startswith("-") for a in rest):
        args.overrides += rest  # `plan CONFIG --gpus N key=value`: overrides after the options
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "generate":
        return _generate(args)
    if args.command == "data":
        from rnnscale.launch.cli_data import run_data

        return run_data(args)
    if args.command in ("status", "dashboard", "compare"):
        return _monitor(args)
    if args.command == "export":
        return _export(args)
    if args.command in ("import-hf", "eval"):
        from rnnscale.launch.cli_hf import run_eval, run_import

        return run_import(args) if args.command == "import-hf" else run_eval(args)
    if args.command == "ckpt":
        return _ckpt(args)
    if args.command in ("submit", "jobs"):
        from rnnscale.launch import jobs

        if args.command == "submit":  # the config must load here before it goes anywhere
            try:
                load_config(args.config, args.overrides)
            except ConfigError as e:
                print(f"rnnscale: {e}", file=sys.stderr)
                return 2
        return jobs.main(args)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"rnnscale: {e}", file=sys.stderr)
        return 2
    if args.command == "plan":
        return _plan(cfg, args)
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

    plan = commands.add_parser(
        "plan", help="memory per GPU by ZeRO stage, or the d_model for a parameter count"
    )
    _config_args(plan)
    plan.add_argument("--gpus", type=_positive_int, help="data-parallel ranks (memory table)")
    plan.add_argument("--match-params", metavar="N", help="print the d_model whose parameter "
                      "count is closest to N (350M, 1.3B), the rest as configured")  # fmt: skip
    plan.add_argument("--gpus-per-node", type=_positive_int, default=8)
    plan.add_argument("--gpu-memory-gb", type=float, default=80.0, help="per GPU, GiB")

    gen = commands.add_parser("generate", help="sample from a trained model")
    gen.add_argument("run_dir", metavar="RUN_DIR", help="run directory (or its model.safetensors)")
    prompt = gen.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="text, encoded with the run's tokenizer.model")
    prompt.add_argument("--prompt-ids", help="token ids instead of text, e.g. '1 17 5'")
    gen.add_argument("--max-new-tokens", type=int, default=64,
                     help="tokens to sample at most (default: %(default)s)")  # fmt: skip
    gen.add_argument("--temperature", type=float, default=0.8,
                     help="0: greedy (default: %(default)s)")  # fmt: skip
    gen.add_argument("--top-p", type=float, default=0.95,
                     help="nucleus sampling mass (default: %(default)s)")  # fmt: skip
    gen.add_argument("--seed", type=int, default=0, help="of the sampling (default: %(default)s)")
    from rnnscale.launch.cli_data import add_data_parser

    add_data_parser(commands)
    _checkpoint_parsers(commands)
    from rnnscale.launch.jobs import add_parsers

    add_parsers(commands)
    status = commands.add_parser("status", help="print where a run stands")
    status.add_argument("run_dir", metavar="RUN_DIR")
    dash = commands.add_parser("dashboard", help="TensorBoard on a run, or a folder of runs")
    dash.add_argument("run_dir", metavar="DIR", help="a run directory, or a folder of them")
    dash.add_argument("--port", type=int, default=6006)
    dash.add_argument("--host", default="127.0.0.1", help="0.0.0.0 serves other machines too")
    comp = commands.add_parser("compare", help="runs side by side: a table and loss curves")
    comp.add_argument("runs", nargs="+", metavar="RUN", help="run directories, or a folder")
    comp.add_argument("--out", default="compare.png", metavar="PNG", help="the loss curves")
    return parser


def _checkpoint_parsers(commands) -> None:
    """rnnscale export, rnnscale ckpt reshard; import-hf and eval (launch/cli_hf.py)."""
    export = commands.add_parser(
        "export",
        help="a checkpoint's or a run's model: safetensors, config and tokenizer, for "
        "rnnscale generate or for transformers (--format hf)",
    )
    export.add_argument(
        "checkpoint", metavar="SOURCE",
        help="a committed checkpoint (.../checkpoints/step_*) or a finished run directory",
    )  # fmt: skip
    export.add_argument("--out", required=True, metavar="DIR")
    export.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    export.add_argument(
        "--format", choices=["rnnscale", "hf"], default="rnnscale",
        help="rnnscale: model.safetensors + config.yaml (rnnscale generate, resume tools); hf: a "
        "directory transformers loads with trust_remote_code=True (docs/evaluation.md)",
    )  # fmt: skip
    from rnnscale.launch.cli_hf import add_hf_parsers

    add_hf_parsers(commands)
    ckpt = commands.add_parser("ckpt", help="checkpoint tools")
    ckpt_actions = ckpt.add_subparsers(dest="ckpt_command", required=True, metavar="ACTION")
    reshard = ckpt_actions.add_parser(
        "reshard",
        help="convert a checkpoint to DeepSpeed's universal form, so that it resumes on any "
        "number of ranks or ZeRO stage (a resume that needs it does this itself; doing it "
        "ahead saves the job's time)",
    )
    reshard.add_argument(
        "checkpoint", metavar="CHECKPOINT", help="a committed checkpoint: .../checkpoints/step_*"
    )


def _monitor(args: argparse.Namespace) -> int:
    from rnnscale.launch.monitor import run_dashboard, status_report

    try:
        if args.command == "status":
            print(status_report(args.run_dir))
        elif args.command == "compare":
            from rnnscale.launch.compare import compare

            print(compare(args.runs, args.out))
        else:
            run_dashboard(args.run_dir, args.host, args.port)
    # FileNotFoundError: no metrics.jsonl or tb/; else the port, the PNG not written, or
    # matplotlib missing
    except (OSError, ImportError) as e:
        print(f"rnnscale: {e}", file=sys.stderr)
        return 2
    return 0


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="CONFIG", help="YAML file, e.g. configs/debug_cpu.yaml")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.lr=3e-4"
    )


def _train(cfg: RunConfig) -> int:
    """Train in this process, or with launch.num_workers > 1 in Ray Train workers."""
    from rnnscale.train.preemption import EXIT_PREEMPTED, Preempted

    if cfg.launch.num_workers > 1:
        from ray.train import TrainingFailedError

        from rnnscale.launch.ray_launch import train_with_ray
        from rnnscale.train.preflight import check_inputs

        # here, once: a worker's ConfigError would be retried launch.max_failures times. The
        # files only on an embedded Ray: a cluster's driver (e.g. a head without the data
        # volume) need not see what its workers read
        joins = bool(cfg.launch.address or os.environ.get("RAY_ADDRESS"))
        try:
            check_inputs(cfg, cfg.launch.num_workers, files=not joins)
        except ConfigError as e:
            print(f"rnnscale: {e}", file=sys.stderr)
            return 2
        try:
            train_with_ray(cfg)
        except ConfigError as e:  # another run holds run.dir
            print(f"rnnscale: {e}", file=sys.stderr)
            return 2
        except TrainingFailedError as e:
            print(f"rnnscale: training failed after launch.max_failures="
                  f"{cfg.launch.max_failures} restarts: {e}", file=sys.stderr)  # fmt: skip
            return 1
        except Preempted as e:  # the workers committed a checkpoint and stopped
            print(f"rnnscale: {e}", file=sys.stderr)
            return EXIT_PREEMPTED
        return 0
    from rnnscale.train import run
    from rnnscale.train.distributed import leave_distributed_at_exit
    from rnnscale.train.room import RunStopped

    leave_distributed_at_exit()  # gloo's threads must not outlive the interpreter
    try:
        run(cfg)
    except ConfigError as e:  # found once the run looks at its inputs (e.g. the tokenizer)
        print(f"rnnscale: {e}", file=sys.stderr)
        return 2
    except RunStopped as e:  # saves fail again and again, the model cannot be written
        print(f"rnnscale: {e}", file=sys.stderr)
        return 1
    except Preempted as e:  # a checkpoint of the last step is committed: run it again
        print(f"rnnscale: {e}", file=sys.stderr)
        return EXIT_PREEMPTED
    return 0


def _export(args) -> int:
    from rnnscale.train.export import export_checkpoint, source_model

    try:
        if args.format == "hf":
            import torch

            from rnnscale.train.hf import export_hf

            model, cfg, tokenizer = source_model(args.checkpoint, args.dtype)
            dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
            out = export_hf(model, cfg, tokenizer, args.out, dtype)
            kind = "" if tokenizer else " (no tokenizer: the run trained on token ids)"
            load = f"AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)"
            print(f"rnnscale: wrote {out} ({args.dtype}){kind}; load it with transformers' {load}")
            return 0
        path = export_checkpoint(args.checkpoint, args.out, args.dtype)
    except (ValueError, FileNotFoundError) as e:
        print(f"rnnscale: {e}", file=sys.stderr)
        return 2
    print(f"rnnscale: wrote {path} ({args.dtype}); sample: rnnscale generate {args.out} "
          f"--prompt-ids 1")  # fmt: skip
    return 0


def _ckpt(args) -> int:
    from pathlib import Path

    from rnnscale.train import universal

    try:
        out = universal.make_universal(Path(args.checkpoint))
    except (RuntimeError, OSError, KeyError, ValueError) as e:
        print(f"rnnscale: {e}", file=sys.stderr)
        return 2
    print(f"rnnscale: wrote {out}; a resume from {args.checkpoint} on another number of ranks "
          f"or ZeRO stage loads it")  # fmt: skip
    return 0


def _show(cfg: RunConfig) -> int:
    print(dump_yaml(cfg), end="")
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return value


def _plan(cfg: RunConfig, args: argparse.Namespace) -> int:
    from rnnscale.launch.plan import plan_command

    return plan_command(cfg, args)


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
    except (FileNotFoundError, ValueError) as e:  # ConfigError: a damaged config.yaml
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
        words = args.prompt_ids.replace(",", " ").split()
        prompt = [int(t) for t in words if t.isdigit()]
        if len(prompt) < len(words) or not prompt or max(prompt) >= cfg.model.vocab_size:
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


def entry() -> NoReturn:
    """The `rnnscale` command: `main`, then the process ends as train/distributed.py's
    `exit_process` ends it (tests call `main` and keep their process)."""
    from rnnscale.train.distributed import exit_process

    exit_process(main())


if __name__ == "__main__":
    entry()
