"""flash-linear-attention's chunk kernels compiled for sm_90 at our recipes' head shapes, the
same way as ours (`python -m rnnscale.kernels.sm90`): the peer table of docs/kernels.md.

    .venv/bin/pip install --no-deps --target /tmp/fla fla-core==0.6.0  # not a dependency
    .venv/bin/python benchmarks/sm90_fla.py --fla /tmp/fla             # per kernel: fits / configs
    .venv/bin/python benchmarks/sm90_fla.py --fla /tmp/fla --json      # every launch, as ours

fla picks its autotune lists when it is imported, from the device (shared memory, Hopper or
not), so it is imported as on an H100: a stand-in Triton driver and stand-in torch.cuda answers
(nothing runs on them). Its launches are recorded, not written out by hand: chunk_gla,
chunk_simple_gla and chunk_gated_delta_rule run forward and backward on meta tensors with
every `kernel[grid](...)` recorded, so the block sizes fla's wrappers choose in Python are
kept. Each launch is expanded over its heuristics and every autotune config
(`rnnscale.kernels.sm90.expand`) and compiled by `rnnscale.kernels.sm90.measure`, with our
cache. The inputs are what our mixers pass: q, k, v in the shape's dtype, gates in fp32; fla
uses its own chunk size (64), not the recipe's. On a GPU fla's autotuner times the configs and
keeps one: a kernel is fine when some config fits (the `fit` column).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import types
from pathlib import Path
from unittest import mock

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.jit import KernelInterface

from rnnscale.kernels import sm90

H100 = {"max_shared_mem": sm90.SHARED_LIMIT, "multiprocessor_count": 132, "max_num_regs": 65536,
        "warpSize": 32}  # fmt: skip
DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
          torch.int32: "i32", torch.int64: "i64"}  # fmt: skip


class _H100Driver:
    """What fla asks Triton's driver: the target and the device's properties."""

    utils = types.SimpleNamespace(get_device_properties=lambda index=0: dict(H100))

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0


@contextlib.contextmanager
def as_h100():
    """Triton's driver and torch.cuda answer as one H100 would, for fla's import-time choices."""
    props = types.SimpleNamespace(
        name="NVIDIA H100 80GB HBM3", major=9, minor=0, multi_processor_count=132,
        shared_memory_per_block_optin=sm90.SHARED_LIMIT, shared_memory_per_block=49152,
    )  # fmt: skip
    answers = {"get_device_name": lambda *_: props.name, "get_device_capability": lambda *_: (9, 0),
               "get_device_properties": lambda *_: props, "device_count": lambda: 1,
               "is_available": lambda: True, "current_device": lambda: 0}  # fmt: skip
    # patched, not set_active/reset_active: resetting builds the real driver, none without a GPU
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(triton.runtime.driver, "_active", _H100Driver()))
        for name, answer in answers.items():
            stack.enter_context(mock.patch.object(torch.cuda, name, answer))
        yield


def import_fla(path: str):
    """fla's three chunk ops, imported as on an H100; `check_shared_mem` takes the meta
    tensors' device index (None) as device 0."""
    if not Path(path, "fla", "__init__.py").is_file():
        raise SystemExit(f"no fla package in {path}: install it there with .venv/bin/pip "
                         f"install --no-deps --target {path} fla-core")  # fmt: skip
    sys.path.insert(0, path)
    import fla.utils
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    from fla.ops.gla import chunk_gla
    from fla.ops.simple_gla import chunk_simple_gla

    check = fla.utils.check_shared_mem
    for module in [m for name, m in sys.modules.items() if name.startswith("fla")]:
        if getattr(module, "check_shared_mem", None) is check:
            module.check_shared_mem = lambda arch="none", index=0: check(arch, index or 0)
    return fla.__version__, {"gla": chunk_gla, "simple_gla": chunk_simple_gla,
                             "delta": chunk_gated_delta_rule}  # fmt: skip


def recorded_launches(op, shape: sm90.HeadShape) -> list[tuple]:
    """(kernel, grid, args, kwargs) of every launch of `op` forward and backward at `shape`
    (B x T tokens, meta tensors: nothing runs)."""
    B, T, H, K, V = sm90.B, sm90.T, shape.H, shape.K, shape.V
    x = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[shape.dtype]
    make = lambda *s, dtype=x: torch.empty(*s, device="meta", dtype=dtype, requires_grad=True)  # noqa: E731
    q, k, v = make(B, T, H, K), make(B, T, H, K), make(B, T, H, V)  # (B, T, H, K|V)
    fp32 = torch.float32
    gates = {"gla": [make(B, T, H, K, dtype=fp32)], "simple_gla": [make(B, T, H, dtype=fp32)],
             "delta": [make(B, T, H, dtype=fp32), make(B, T, H, dtype=fp32)]}  # fmt: skip
    calls = []
    record = lambda self, grid: lambda *a, **kw: calls.append((self, grid, a, kw))  # noqa: E731
    with mock.patch.object(KernelInterface, "__getitem__", record):
        o, ht = op(q, k, v, *gates[shape.family], output_final_state=True)
        torch.autograd.backward([o, ht], [torch.empty_like(o), torch.empty_like(ht)])
    return calls


def launches_of(kernel, grid, args, kwargs) -> list[sm90.Launch]:
    """A recorded launch as sm90 Launches: every heuristics value and autotune config."""
    fn = sm90.unwrap(kernel)
    named = dict(zip(fn.arg_names, args)) | kwargs
    types_, nones = {}, {}
    for p in fn.params:
        value = named.get(p.name)
        if p.is_constexpr:
            continue
        if value is None:  # Triton makes a None argument a constexpr
            types_[p.name], nones[p.name] = "constexpr", None
        elif isinstance(value, torch.Tensor):
            types_[p.name] = f"*{DTYPES[value.dtype]}"
        else:
            types_[p.name] = {bool: "i1", int: "i32", float: "fp32"}[type(value)]
    out = []
    for launch in sm90.expand(kernel, types_, named, programs=0):
        launch.constexprs |= nones
        size = grid(named | launch.constexprs) if callable(grid) else grid
        launch.programs = math.prod(size)
        out.append(launch)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fla", required=True, help="the folder fla-core is installed in")
    parser.add_argument("--json", action="store_true", help="every launch, one JSON line each")
    parser.add_argument("--markdown", action="store_true", help="the summary for docs/kernels.md")
    parser.add_argument("--shapes", choices=["all", "largest"], default="largest")
    parser.add_argument("--timeout", type=float, default=sm90.TIMEOUT_S)
    args = parser.parse_args()
    shapes = sm90.largest_shapes() if args.shapes == "largest" else sm90.recipe_shapes()
    rows, seen = [], set()
    with as_h100():
        version, ops = import_fla(args.fla)
        for shape in [s for s in shapes if s.family in ops]:
            for call in recorded_launches(ops[shape.family], shape):
                for launch in launches_of(*call):
                    key = (sm90.cache_key(launch), launch.programs, shape)
                    if key not in seen:  # the backward recomputes some forward kernels
                        seen.add(key)
                        rows.append(sm90.Row(launch, shape))
    sm90.measure(rows, args.timeout)
    if args.json:
        for row in rows:
            print(json.dumps(row.to_json(), default=str))
        return 0
    print(
        f"fla-core {version}, Triton {triton.__version__}, sm_90. fit: the configs with no "
        f"spill and shared memory <= {sm90.SHARED_LIMIT} bytes, of all its autotune configs\n"
    )
    sm90.print_rows(sm90.summary(rows), args.markdown, code_columns=(0,))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
