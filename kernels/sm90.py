"""Does every Triton kernel fit an H100 / H200? Compiled for sm_90 on any machine, no GPU.

    python -m rnnscale.kernels.sm90            # a table, the inlined helpers, what is uncovered
    python -m rnnscale.kernels.sm90 --json     # one JSON object per line
    python -m rnnscale.kernels.sm90 --shapes largest --family scan
    python -m rnnscale.kernels.sm90 --markdown  # per kernel and shape (docs/kernels.md)

Legend: H heads, K key width, V value width, C chunk size, D channels of the elementwise scan.
Every module of rnnscale.kernels that defines `@triton.jit` kernels declares its launches,
`sm90_launches(shape: HeadShape) -> list[Launch]`: every configuration its wrappers may pick
at that shape (for an autotuned kernel every config that survives its prune: `expand`). Each
launch is compiled with Triton's compiler for sm_90: the log of its ptxas run gives the
registers and spills, the compiled metadata the shared memory. It fits with no spill and
shared memory within what one block may use. The head shapes are those of
configs/recipes/*.yaml (each recipe's mixers run on the meta device with the scan recorded)
and "K=V=64" (H = 16) for every family at its configured chunk. Results are cached per
(kernel source with its callees, signature, config, Triton version) under
$RNNSCALE_SM90_CACHE (default ~/.cache/rnnscale/sm90).

What the report covers (shapes, launches, coverage) is in `sm90_scope.py`, the one module of
kernels/ that imports rnnscale.train (pyproject.toml's import contract names the exception);
no module of the package imports this one or that one at import time.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import multiprocessing
import multiprocessing.connection
import os
import re
import signal
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import triton
from triton import knobs
from triton.runtime.autotuner import Autotuner, Heuristics
from triton.runtime.jit import JITFunction

from rnnscale.kernels.sm90_scope import (  # noqa: F401 (the report's API, re-exported)
    HeadShape,
    all_shapes,
    coverage,
    jit_functions,
    largest_shapes,
    launches,
    recipe_shapes,
    uncovered,
    undeclared_modules,
    unit_shapes,
    unwrap,
)

SHARED_LIMIT = 232448  # bytes of shared memory one block may opt in to on sm_90 (227 KiB)
B, T = 8, 4096  # the batch that `programs` counts: 8 rows of 4096 tokens
WORKERS, TIMEOUT_S = 2, 300  # compiles side by side, and the seconds each may take
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Launch:
    """One compile: the kernel, the Triton type of every runtime argument ("*bf16", "i32",
    ...; the constexpr ones may be left out), the constexpr values, and the number of programs
    at B x T tokens. num_warps and num_stages default to Triton's defaults on CUDA. `ints`:
    the values integer arguments have at that shape, specialised as Triton's launcher does
    (a multiple of 16 is compiled as one, 1 as a constant), which changes the code: at the
    delta rule's K = 192 the state pass vectorises its loads and multi-buffers them (registers
    254 -> 114, shared memory 10 KB -> 105 KB)."""

    kernel: JITFunction
    signature: dict[str, str]
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 3
    programs: int = 0
    maxnreg: int | None = None
    ints: dict = field(default_factory=dict)  # runtime values of integer arguments

    def config(self) -> dict:
        extra = {} if self.maxnreg is None else {"maxnreg": self.maxnreg}
        return {**self.constexprs, "num_warps": self.num_warps, "num_stages": self.num_stages,
                **extra}  # fmt: skip


@dataclass
class Row:
    """A launch at a shape and what it costs on sm_90 (-1: not measured, see `error`)."""

    launch: Launch = field(repr=False)
    shape: HeadShape
    regs: int = -1
    spill_bytes: int = -1
    shared_bytes: int = -1
    error: str | None = None

    @property
    def fits(self) -> bool:
        return self.error is None and self.spill_bytes == 0 and self.shared_bytes <= SHARED_LIMIT

    def to_json(self) -> dict:
        fn, shape = self.launch.kernel, self.shape
        out = {"kernel": fn.__name__, "module": fn.__module__,
               "shape": {"label": shape.label, "family": shape.family, **shape.numbers()},
               "config": self.launch.config(), "regs": self.regs,
               "spill_bytes": self.spill_bytes, "shared_bytes": self.shared_bytes,
               "programs": self.launch.programs, "fits": self.fits}  # fmt: skip
        return out if self.error is None else {**out, "error": self.error}


def expand(kernel, types: dict[str, str], args: dict, programs: int) -> list[Launch]:
    """Every Launch of `kernel` (a JITFunction, maybe under triton.heuristics and
    triton.autotune) for the runtime arguments `args` (name -> value, as its heuristics and
    prune functions read them; a tensor may be any stand-in they accept): the heuristics
    applied, and each autotune config left by `early_config_prune`. `types`: the runtime
    arguments' Triton types."""
    out = []
    for fn, values, options in _configs(kernel, dict(args), {}):
        constexprs = {p.name: values.get(p.name, p.default) for p in fn.params if p.is_constexpr}
        ints = {p.name: values[p.name] for p in fn.params if not p.is_constexpr
                and type(values.get(p.name)) is int}  # fmt: skip
        out.append(Launch(fn, dict(types), constexprs, programs=programs, ints=ints, **options))
    return out


def _configs(obj, args: dict, options: dict) -> list[tuple[JITFunction, dict, dict]]:
    if isinstance(obj, Heuristics):
        return _configs(obj.fn, args | {k: h(args) for k, h in obj.values.items()}, options)
    if isinstance(obj, Autotuner):
        configs = obj.configs
        if obj.early_config_prune:
            configs = obj.early_config_prune(configs, args)
        of = lambda c: {"num_warps": c.num_warps, "num_stages": c.num_stages,
                        "maxnreg": c.maxnreg}  # noqa: E731  # fmt: skip
        return [x for c in configs for x in _configs(obj.fn, args | c.kwargs, of(c))]
    return [(obj, args, options)]


def compile_sm90(launch: Launch) -> dict:
    """Compile `launch` for sm_90a: {regs, spill_bytes, shared_bytes}, or {error}."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource

    fn, signature, constexprs, attrs = launch.kernel, {}, dict(launch.constexprs), {}
    for i, p in enumerate(fn.params):
        signature[p.name] = "constexpr" if p.is_constexpr else launch.signature.get(p.name)
        if signature[p.name] is None:
            return {"error": f"the launch gives no type for argument {p.name!r}"}
        if p.is_constexpr and p.name not in launch.constexprs:
            return {"error": f"the launch gives no value for constexpr {p.name!r}"}
        if signature[p.name].startswith("*"):  # torch's fresh tensors are 16-byte aligned
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif p.name in launch.ints and not p.is_constexpr and not p.do_not_specialize:
            kind, spec = native_specialize_impl(BaseBackend, launch.ints[p.name], False, True,
                                                not p.do_not_specialize_on_alignment)  # fmt: skip
            if kind == "constexpr":
                signature[p.name], constexprs[p.name] = "constexpr", spec
            else:
                signature[p.name] = kind
                attrs.update({(i,): BaseBackend.parse_attr(spec)} if spec else {})
    options = {"num_warps": launch.num_warps, "num_stages": launch.num_stages}
    if launch.maxnreg is not None:
        options["maxnreg"] = launch.maxnreg
    log = io.StringIO()
    with knobs.compilation.scope(), knobs.nvidia.scope(), contextlib.redirect_stdout(log):
        # Triton's own ptxas run (its flags), printed even where its cache holds the kernel
        knobs.compilation.always_compile = knobs.nvidia.dump_ptxas_log = True
        try:
            source = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
            compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
        except Exception as e:  # noqa: BLE001 (Triton's errors share no base class)
            return {"error": _brief(f"{type(e).__name__}: {e}")}
    return {**ptxas_usage(log.getvalue()), "shared_bytes": compiled.metadata.shared}


def ptxas_usage(log: str) -> dict:
    """Registers and spilled bytes (stores + loads) from the log of `ptxas -v`."""
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if not (regs and spills):
        return {"error": f"no register count in the ptxas log: {log.strip()[-500:]}"}
    return {"regs": int(regs[1]), "spill_bytes": int(spills[1]) + int(spills[2])}


def _brief(message: str) -> str:
    """A compile error without the PTX that Triton appends to a failed ptxas run."""
    ptxas = re.search(r"`ptxas` stderr:\n(.*?)\nRepro command", message, re.S)
    if ptxas:
        lines = [x for x in ptxas[1].splitlines() if "fatal" in x or "error" in x.lower()]
        message = "ptxas: " + " | ".join(lines or ptxas[1].splitlines())
    return message.strip()[:1500]


def cache_key(launch: Launch) -> str:
    """The kernel's source with the jit functions it calls (JITFunction.cache_key), the
    signature, the config and Triton's version."""
    key = [launch.kernel.cache_key, sorted(launch.signature.items()), sorted(launch.ints.items()),
           sorted((k, repr(v)) for k, v in launch.config().items()), triton.__version__,
           "sm_90a", "ptxas log of Triton's compile"]  # fmt: skip
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()


def measure(rows: list[Row], timeout_s: float = TIMEOUT_S, workers: int = WORKERS) -> None:
    """Fill every row from the cache, or by a compile in a forked child (`workers` at a time;
    a child past `timeout_s` is killed, its rows get an error, which is not cached)."""
    cache = Path(os.environ.get("RNNSCALE_SM90_CACHE", Path.home() / ".cache/rnnscale/sm90"))
    todo: dict[Path, list[Row]] = {}
    for row in rows:
        path = cache / f"{cache_key(row.launch)}.json"
        if path.is_file():
            _fill([row], json.loads(path.read_text()))
        else:
            todo.setdefault(path, []).append(row)
    ctx = multiprocessing.get_context("fork")  # the children inherit the imported kernels
    pending, running = list(todo), {}
    while pending or running:
        while pending and len(running) < workers:
            path = pending.pop(0)
            recv, send = ctx.Pipe(duplex=False)
            child = ctx.Process(target=_child, args=(todo[path][0].launch, send), daemon=True)
            child.start()
            send.close()
            running[recv] = (path, child, time.monotonic())
        for recv in multiprocessing.connection.wait(list(running), timeout=1.0):
            path, child, _ = running.pop(recv)
            try:
                result = recv.recv()
                path.parent.mkdir(parents=True, exist_ok=True)
                path.with_suffix(f".{child.pid}").write_text(json.dumps(result))
                path.with_suffix(f".{child.pid}").replace(path)
            except EOFError:
                result = {"error": f"the compile process died (exit code {child.exitcode})"}
            child.join()
            _fill(todo[path], result)
        for recv, (path, child, start) in list(running.items()):
            if time.monotonic() - start > timeout_s:
                with contextlib.suppress(ProcessLookupError):  # not yet in its own group
                    child.kill()
                    os.killpg(child.pid, signal.SIGKILL)  # the child and its ptxas
                child.join()
                del running[recv]
                _fill(todo[path], {"error": f"timeout: no result within {timeout_s:.0f} s"})


def _child(launch: Launch, send) -> None:
    os.setpgrp()
    warnings.simplefilter("ignore")  # Triton's deprecation notes: the report is about resources
    send.send(compile_sm90(launch))


def _fill(rows: list[Row], result: dict) -> None:
    for row in rows:
        for name in ("regs", "spill_bytes", "shared_bytes", "error"):
            setattr(row, name, result.get(name, getattr(row, name)))


def print_table(rows: list[Row]) -> None:
    print(f"sm_90: a launch fits with 0 bytes spilled and shared memory <= {SHARED_LIMIT} bytes; "
          f"programs at B={B} x T={T}; Triton {triton.__version__}\n")  # fmt: skip
    table = [("kernel", "shape", "H K V C / D", "config", "regs", "spill", "shared", "programs",
              "fits")]  # fmt: skip
    for r in rows:
        config = " ".join(f"{k}={v}" for k, v in r.launch.config().items())
        numbers = " ".join(str(v) for v in r.shape.numbers().values())
        cost = (str(r.regs), str(r.spill_bytes), str(r.shared_bytes), str(r.launch.programs))
        fits = "yes" if r.fits else f"NO {r.error or ''}"[:60].strip()
        table.append((r.launch.kernel.__name__, r.shape.label, numbers, config, *cost, fits))
    print_rows(table)


def summary(rows: list[Row]) -> list[tuple]:
    """One line per (kernel, shape): how many of its launches fit, and the range of registers,
    spilled bytes, shared memory and programs over them (the launches that compiled)."""
    groups: dict[tuple, list[Row]] = {}
    for row in rows:
        groups.setdefault((row.launch.kernel.__name__, row.shape), []).append(row)
    span = lambda xs: f"{min(xs)}" if min(xs) == max(xs) else f"{min(xs)}-{max(xs)}"  # noqa: E731
    table = [("kernel", "shape", "H K V C / D", "fit", "regs", "spill", "shared", "programs")]
    for (name, shape), group in groups.items():
        ok = [r for r in group if r.error is None] or [Row(group[0].launch, shape)]
        numbers = " ".join(str(v) for v in shape.numbers().values())
        fit = f"{sum(r.fits for r in group)}/{len(group)}"
        cost = [span([getattr(r, x) for r in ok]) for x in ("regs", "spill_bytes", "shared_bytes")]
        programs = span([r.launch.programs for r in ok])
        table.append((name, shape.label, numbers, fit, *cost, programs))
    return table


def print_rows(table: list[tuple], markdown: bool = False, code_columns: tuple = ()) -> None:
    """A header and rows of strings, aligned, or as a Markdown table."""
    if markdown:
        code = lambda line: [f"`{x}`" if i in code_columns else x for i, x in enumerate(line)]  # noqa: E731
        print("| " + " | ".join(table[0]) + " |\n" + "|---" * len(table[0]) + "|")
        print("\n".join("| " + " | ".join(code(line)) + " |" for line in table[1:]))
        return
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    for line in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rnnscale.kernels.sm90",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--markdown", action="store_true", help="per kernel and shape, Markdown")
    parser.add_argument("--shapes", choices=["all", "largest"], default="all",
                        help="every recipe shape and K=V=64, or each family's largest")  # fmt: skip
    parser.add_argument("--family", action="append", help="only this family (repeatable)")
    parser.add_argument("--timeout", type=float, default=TIMEOUT_S, help="seconds per compile")
    args = parser.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # real kernels in the modules imported from here
    shapes = all_shapes() if args.shapes == "all" else largest_shapes()
    rows = [Row(launch, s) for s in shapes if s.family in (args.family or [s.family])
            for launch in launches(s)]  # fmt: skip
    measure(rows, args.timeout)
    helpers, missing = coverage(all_shapes())
    (print_json if args.json else print_text)(rows, helpers, missing, args.markdown)
    return 0


def print_text(rows: list[Row], helpers: dict, missing: list[str], markdown: bool) -> None:
    if markdown:
        print_rows(summary(rows), markdown=True, code_columns=(0,))
    else:
        print_table(rows)
    print()
    for helper, into in sorted(helpers.items()):
        print(f"inlined: {helper} into {', '.join(into)}")
    print(f"uncovered: {', '.join(missing) or 'none'}")
    if undeclared := undeclared_modules(missing):
        print(f"modules with uncovered kernels and no sm90_launches: {', '.join(undeclared)}")


def print_json(rows: list[Row], helpers: dict, missing: list[str], _markdown: bool) -> None:
    for row in rows:
        print(json.dumps(row.to_json(), default=str))  # a constexpr may be a dtype
    for name, into in sorted(helpers.items()):
        module, kernel = name.split(":")
        print(json.dumps({"kernel": kernel, "module": module, "inlined_into": into}))
    undeclared = undeclared_modules(missing)
    for name in missing:
        module, kernel = name.split(":")
        why = "its module declares no sm90_launches" if module in undeclared else "not launched"
        print(json.dumps({"kernel": kernel, "module": module, "uncovered": why}))


if __name__ == "__main__":
    from rnnscale.kernels.sm90 import main as _main  # the module's one copy, not __main__

    raise SystemExit(_main())
