"""The docs cannot rot: every command in README.md and docs/*.md runs.

The convention (written for contributors in docs/contributing.md):
- shell commands go in fenced ```bash blocks; each command (a line, with `\\` continuations)
  runs by itself with bash, from a scratch directory that links the checkout's files and has
  an empty `runs/`, and must exit 0, or the code named by a trailing `# exit N`;
- ```python blocks run whole with the environment's python, from the same directory;
- a block that cannot run on a 2-core CPU machine in seconds (a GPU, a cluster, a server that
  runs until stopped, a job of many minutes) is preceded by `<!-- not run: REASON -->`;
- commands anywhere else (another block language, an indented block) are an error here, so
  none escapes the test.
The blocks of one page run in order in one scratch directory (a later command may use the run
an earlier one made).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOT_RUN = re.compile(r"^<!--\s*not run:\s*(.*?)\s*-->$")
EXIT = re.compile(r"#\s*exit\s+(\d+)\s*$")
# the start of a line that is a command (a prompt `$ ` allowed)
COMMAND = re.compile(
    r"^\s*(\$\s+)?(\.venv/bin/|rnnscale\s+[a-z-]+(\s|$)|make\s|python3?\s|torchrun\s|ray\s|kubectl\s|"
    r"sbatch\s|pip\s|bash\s|wandb\s|tensorboard\s|export\s+\w+=)"
)
SKIP_LINKS = {".git", "runs", ".pytest_cache", "build", "dist"}
SHELL_ONLY = {"export", "cd", "source", ".", "set", "unset", "alias"}


@dataclass
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    lang: str  # "" for an indented block
    text: str
    not_run: str | None  # the reason, when marked

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The code blocks of a Markdown page: fenced ones with their language, and indented ones
    (four spaces after a blank line, outside lists)."""
    lines = page.read_text().splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        fence = re.match(r"^(\s*)(```+|~~~+)\s*([\w+-]*)", line)
        if fence:
            indent, mark, lang = fence.groups()
            closing = re.compile(rf"\s*{re.escape(mark[0])}{{{len(mark)},}}\s*")
            j = i + 1
            while j < len(lines) and not closing.fullmatch(lines[j]):
                j += 1
            assert j < len(lines), f"{page.name}:{i + 1}: a code fence that is never closed"
            body = "\n".join(x[len(indent):] if x.startswith(indent) else x
                             for x in lines[i + 1: j])  # fmt: skip
            k = i - 1
            while k >= 0 and not lines[k].strip():
                k -= 1
            marked = NOT_RUN.match(lines[k].strip()) if k >= 0 else None
            out.append(Block(page, i + 1, lang or "text", body,
                             marked.group(1) if marked else None))  # fmt: skip
            i = j + 1
            continue
        prev_blank = i == 0 or not lines[i - 1].strip()
        if line.startswith("    ") and line.strip() and prev_blank and not _in_list(lines, i):
            j = i
            while j < len(lines) and (lines[j].startswith("    ") or not lines[j].strip()):
                j += 1
            out.append(Block(page, i + 1, "", "\n".join(x[4:] for x in lines[i:j]), None))
            i = j
            continue
        i += 1
    return out


def _in_list(lines: list[str], i: int) -> bool:
    """Whether an indented line continues a list item (the nearest unindented text above is
    a `-`, `*` or `1.` item) rather than starting a code block."""
    for k in range(i - 1, -1, -1):
        text = lines[k]
        if text.strip() and not text.startswith(" "):
            return bool(re.match(r"^(\s*[-*+]\s|\s*\d+[.)]\s)", text))
    return False


def commands(block: Block) -> list[tuple[str, int]]:
    """(command, expected exit code) for each command of a bash block."""
    out, pending = [], ""
    for raw in block.text.splitlines():
        line = raw.rstrip()
        if pending:
            line = pending + " " + line.strip()
            pending = ""
        if line.endswith("\\"):
            pending = line[:-1].rstrip()
            continue
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        expected = EXIT.search(line)
        out.append((line.strip(), int(expected.group(1)) if expected else 0))
    return out


def all_blocks() -> list[Block]:
    return [b for page in PAGES for b in blocks(page)]


def test_commands_are_only_in_bash_blocks():
    """A command in a ```text block or an indented block would never be run: move it into a
    ```bash block (marked `<!-- not run: ... -->` if it cannot run here)."""
    stray = [
        f"{b.where}: {line.strip()}"
        for b in all_blocks()
        if b.lang not in ("bash", "python")
        for line in b.text.splitlines()
        if COMMAND.match(line)
    ]
    assert not stray, "commands outside ```bash blocks:\n" + "\n".join(stray)


def test_blocks_not_run_say_why_and_are_few():
    marked = [b for b in all_blocks() if b.not_run is not None]
    assert all(b.not_run for b in marked), [b.where for b in marked if not b.not_run]
    ran = sum(len(commands(b)) or 1 for p in PAGES for b in runnable(p))
    assert ran > sum(len(commands(b)) for b in marked)  # most of what they show runs here


def scratch_dir(tmp_path: Path) -> Path:
    """A directory that looks like the checkout (its files linked) with an empty runs/."""
    for entry in ROOT.iterdir():
        if entry.name not in SKIP_LINKS:
            (tmp_path / entry.name).symlink_to(entry)
    (tmp_path / "runs").mkdir()
    return tmp_path


def run_block(block: Block, cwd: Path, env: dict) -> None:
    if block.lang == "python":
        r = subprocess.run([sys.executable, "-c", block.text], cwd=cwd, env=env,
                           capture_output=True, text=True, timeout=300)  # fmt: skip
        assert r.returncode == 0, f"{block.where}: python block failed:\n{r.stderr[-3000:]}"
        return
    for command, expected in commands(block):
        # each command runs in a bash of its own: one that only changes the shell would test
        # nothing (mark its block not run, or fold it into the command that needs it)
        first = command.split()[0]
        assert first not in SHELL_ONLY and not re.match(r"^\w+=\S*$", command), (
            f"{block.where}: `{command}` only changes the shell; each command runs alone"
        )
        r = subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=cwd, env=env,
                           capture_output=True, text=True, timeout=600)  # fmt: skip
        assert r.returncode == expected, (
            f"{block.where}: `{command}` exited {r.returncode}, not {expected}:\n"
            f"{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
        )


def runnable(page: Path) -> list[Block]:
    return [b for b in blocks(page) if b.lang in ("bash", "python") and b.not_run is None]


WITH_COMMANDS = [p for p in PAGES if runnable(p)]


@pytest.mark.parametrize("page", WITH_COMMANDS, ids=[p.name for p in WITH_COMMANDS])
def test_the_commands_on_the_page_run(page, tmp_path):
    cwd = scratch_dir(tmp_path)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "WANDB_MODE": "offline"}  # fmt: skip
    env.pop("TRITON_INTERPRET", None)  # as a user runs them: CPU tensors take the PyTorch path
    for block in runnable(page):
        run_block(block, cwd, env)


def config_args(command: str) -> list[str] | None:
    """CONFIG and key=value overrides of an `rnnscale train|submit` command, else None."""
    argv = shlex.split(command.split(" #")[0])
    if len(argv) < 3 or not argv[0].endswith("rnnscale") or argv[1] not in ("train", "submit"):
        return None
    out, skip = [], False
    for arg in argv[2:]:
        if skip:
            skip = False
        elif arg.startswith("--"):
            skip = "=" not in arg  # every option of train and submit takes a value
        else:
            out.append(arg)
    return out


def test_runs_shown_but_not_run_have_configs_that_load():
    """A command that cannot run here (a cluster, a GPU) still has its config and overrides
    checked: a renamed key or a bad value in a cluster example fails here, not on the cluster."""
    from rnnscale.train.config import ConfigError, load_config

    checked, wrong = 0, []
    for block in all_blocks():
        if block.lang != "bash" or block.not_run is None:
            continue
        for command, _ in commands(block):
            args = config_args(command)
            if args is None:
                continue
            checked += 1
            try:
                load_config(ROOT / args[0], args[1:])
            except ConfigError as e:
                wrong.append(f"{block.where}: {e}")
    assert not wrong, "\n".join(wrong)
    assert checked >= 3  # the README's and cluster.md's submit commands at least
