"""`rnnscale submit` and `rnnscale jobs`: runs on a Ray cluster through the Ray Job Submission
API (`ray.job_submission.JobSubmissionClient`), docs/cluster.md.

The job's entrypoint is `rnnscale train CONFIG [key=value ...]` run on the cluster: the
cluster's Python environment must have rnnscale installed (the image), or `--pip` names the
requirements Ray installs for the job. The working directory (this repository: configs,
code) is uploaded without `.git`, virtual environments, runs, checkpoints and data; `WANDB_*`
variables and the ones named with `--env` are passed through.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
from pathlib import Path

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
EXCLUDES = [".git", ".venv", "venv", "runs", "checkpoints", "wandb", "__pycache__",
            "*.safetensors", "*.pt", "*.mds", "*.zstd", ".pytest_cache", ".ruff_cache"]  # fmt: skip
PASSED_PREFIXES = ("WANDB_",)


def address_of(given: str | None) -> str:
    """--address, else RAY_ADDRESS when it is an http(s) dashboard URL, else localhost."""
    if given:
        return given
    env = os.environ.get("RAY_ADDRESS", "")
    return env if env.startswith(("http://", "https://")) else DEFAULT_ADDRESS


def client(address: str | None):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address_of(address))


def runtime_env(working_dir: Path, pip: str | None, env_names: list[str]) -> dict:
    """The job's minimal runtime_env: the code without data or history, the named variables."""
    env = {k: v for k, v in os.environ.items() if k.startswith(PASSED_PREFIXES)}
    for name in env_names:
        if name not in os.environ:
            raise SystemExit(f"rnnscale submit: --env {name}: not set in this environment")
        env[name] = os.environ[name]
    out: dict = {"working_dir": str(working_dir), "excludes": EXCLUDES, "env_vars": env}
    if pip:
        out["pip"] = pip if not Path(pip).is_file() else str(Path(pip).resolve())
    return out


def main(args) -> int:
    """`submit` or `jobs ...`, with what the cluster answers as one line and what to do."""
    from ray.exceptions import AuthenticationError

    try:
        return submit(args) if args.command == "submit" else jobs(args)
    except ConnectionError as e:
        print(f"rnnscale {args.command}: {e} Is the cluster's dashboard there? Pass "
              f"--address http://HEAD:8265 or set RAY_ADDRESS.", file=sys.stderr)  # fmt: skip
    except AuthenticationError as e:
        print(f"rnnscale {args.command}: {e.message} Set RAY_AUTH_TOKEN to the cluster's "
              f"token (or put it in ~/.ray/auth_token).", file=sys.stderr)  # fmt: skip
    except RuntimeError as e:  # the Jobs API's answer, e.g. no job of that id
        print(f"rnnscale {args.command}: {e}", file=sys.stderr)
    return 1


def submit(args) -> int:
    address = address_of(args.address)
    entrypoint = shlex.join(["rnnscale", "train", args.config, *args.overrides])
    job_id = client(address).submit_job(
        entrypoint=entrypoint,
        runtime_env=runtime_env(Path(args.working_dir), args.pip, args.env),
        submission_id=args.job_id,
    )
    print(f"submitted {job_id}: {entrypoint}")
    print(f"dashboard: {address}/#/jobs/{job_id}")
    print(f"follow it: rnnscale jobs logs {job_id} --follow --address {address}")
    return 0


def jobs(args) -> int:
    c = client(args.address)
    if args.jobs_command == "list":
        for job in sorted(c.list_jobs(), key=lambda j: j.start_time or 0):
            print(f"{job.submission_id}\t{job.status}\t{job.entrypoint}")
    elif args.jobs_command == "status":
        info = c.get_job_info(args.job_id)
        print(f"{args.job_id}: {info.status}" + (f" ({info.message})" if info.message else ""))
    elif args.jobs_command == "logs":
        if args.follow:
            asyncio.run(_follow(c, args.job_id))
        else:
            sys.stdout.write(c.get_job_logs(args.job_id))
    elif args.jobs_command == "stop":
        stopped = c.stop_job(args.job_id)
        print(f"{args.job_id}: {'stopping' if stopped else 'not running'}")
    return 0


async def _follow(c, job_id: str) -> None:
    async for lines in c.tail_job_logs(job_id):
        sys.stdout.write(lines)
        sys.stdout.flush()


def add_parsers(commands) -> None:
    sub = commands.add_parser("submit", help="submit a training run to a Ray cluster (Jobs API)")
    sub.add_argument("config", metavar="CONFIG")
    sub.add_argument("overrides", nargs="*", metavar="key=value")
    sub.add_argument("--address", help=f"the cluster's dashboard URL (default: RAY_ADDRESS or "
                     f"{DEFAULT_ADDRESS})")  # fmt: skip
    sub.add_argument("--working-dir", default=".", help="uploaded as the job's working dir")
    sub.add_argument("--pip", help="requirements file or package list Ray installs for the job "
                     "(default: the cluster's environment)")  # fmt: skip
    sub.add_argument("--env", action="append", default=[], metavar="NAME",
                     help="pass this variable through (WANDB_* always are)")  # fmt: skip
    sub.add_argument("--job-id", help="the submission id (default: Ray makes one)")
    j = commands.add_parser("jobs", help="list, inspect, follow and stop submitted runs")
    actions = j.add_subparsers(dest="jobs_command", required=True, metavar="ACTION")
    actions.add_parser("list", help="every job of the cluster")
    for name, text in (("status", "a job's state"), ("logs", "a job's output"),
                       ("stop", "stop a job")):  # fmt: skip
        action = actions.add_parser(name, help=text)
        action.add_argument("job_id", metavar="ID")
        if name == "logs":
            action.add_argument("--follow", action="store_true", help="until the job ends")
    for parser in (sub, *actions.choices.values()):
        if parser is not sub:
            parser.add_argument("--address", help="the cluster's dashboard URL")
