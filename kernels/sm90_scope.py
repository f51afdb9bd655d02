"""What the sm_90 fit report covers (`python -m rnnscale.kernels.sm90`; legend there): the
head shapes (each recipe's scans recorded on the meta device, and K = V = 64 for every
family), the launches every kernel module declares at a shape, and which `@triton.jit`
functions those launches reach, directly or inlined.

The shapes are the one use of rnnscale.train in kernels/ (pyproject.toml's import contract
names the exception): only the report and its test import this module.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import importlib
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from unittest import mock

from triton.runtime.autotuner import Autotuner, Heuristics
from triton.runtime.jit import JITFunction

if TYPE_CHECKING:
    from rnnscale.kernels.sm90 import Launch

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class HeadShape:
    """A head shape a scan runs at. The elementwise scan (family "scan") has D = H * K channels
    and no heads of its own: its recipe shapes have H = 1, K = V = D. `dtype`: the Triton type
    of the scanned values (q, k, v or a, b); gates and states are fp32."""

    label: str  # the recipes it comes from, or "K=V=64"
    family: str  # gla, simple_gla, delta or scan: the rnnscale.kernels folder
    H: int
    K: int
    V: int
    C: int
    dtype: str = "bf16"

    @property
    def D(self) -> int:
        return self.H * self.K

    def numbers(self) -> dict:
        if self.family == "scan":
            return {"D": self.D, "C": self.C, "dtype": self.dtype}
        return {"H": self.H, "K": self.K, "V": self.V, "C": self.C, "dtype": self.dtype}


def unwrap(obj):
    """The JITFunction under triton.autotune / triton.heuristics, or None."""
    while isinstance(obj, (Autotuner, Heuristics)):
        obj = obj.fn
    return obj if isinstance(obj, JITFunction) else None


@functools.cache
def kernel_modules() -> tuple:
    """Every module under rnnscale.kernels, imported."""
    import rnnscale.kernels as package

    names = sorted(m.name for m in pkgutil.walk_packages(package.__path__, "rnnscale.kernels."))
    return tuple(_import(name) for name in names)


def _import(name: str):
    try:
        return importlib.import_module(name)
    except Exception as e:
        why = f"{type(e).__name__}: {e}"
        raise RuntimeError(f"{name} does not import ({why}); the report reads every module") from e


def jit_functions() -> dict[str, JITFunction]:
    """ "module:name" -> every jit function defined in a module of rnnscale.kernels."""
    found = {}
    for module in kernel_modules():
        for obj in vars(module).values():
            if type(obj).__name__ == "InterpretedFunction":
                raise RuntimeError(
                    f"{module.__name__} was imported with TRITON_INTERPRET=1; the sm_90 report "
                    "compiles the real kernels: run it in a process without TRITON_INTERPRET"
                )
            fn = unwrap(obj)
            if fn is not None and fn.__module__ == module.__name__:
                found[f"{fn.__module__}:{fn.__name__}"] = fn
    return found


def undeclared_modules(missing: list[str]) -> list[str]:
    """The modules of the uncovered jit functions `missing` that declare no `sm90_launches`."""
    declared = {m.__name__ for m in kernel_modules() if hasattr(m, "sm90_launches")}
    return sorted({name.split(":")[0] for name in missing} - declared)


def launches(shape: HeadShape) -> list[Launch]:
    """What every module's `sm90_launches` declares at `shape`."""
    out = []
    for module in kernel_modules():
        for launch in getattr(module, "sm90_launches", lambda _: [])(shape):
            launch.kernel = unwrap(launch.kernel) or launch.kernel
            out.append(launch)
    return out


def callees(fn: JITFunction) -> set[str]:
    """ "module:name" of every jit function of rnnscale that `fn` names (calls, or hands to
    `tl.associative_scan` as its combine function), transitively: all are inlined into it."""
    found, todo = set(), [fn]
    while todo:
        caller = todo.pop()
        for node in ast.walk(ast.parse(caller.src)):
            callee = unwrap(_resolve(node, caller.__globals__))
            key = callee and f"{callee.__module__}:{callee.__name__}"
            if callee is not None and key.startswith("rnnscale.") and key not in found:
                found.add(key)
                todo.append(callee)
    return found


def _resolve(node, scope: dict):
    if isinstance(node, ast.Name):
        return scope.get(node.id)
    if isinstance(node, ast.Attribute):
        return getattr(_resolve(node.value, scope), node.attr, None)
    return None


def coverage(shapes: list[HeadShape]) -> tuple[dict[str, list[str]], list[str]]:
    """({helper: [the launched kernels it is inlined into]}, [jit functions not covered])."""
    launched = {f"{x.kernel.__module__}:{x.kernel.__name__}": x.kernel
                for shape in shapes for x in launches(shape)}  # fmt: skip
    helpers: dict[str, list[str]] = {}
    for name, fn in sorted(launched.items()):
        for callee in callees(fn):
            helpers.setdefault(callee, []).append(name)
    return helpers, sorted(set(jit_functions()) - set(launched) - set(helpers))


def uncovered(shapes: list[HeadShape] | None = None) -> list[str]:
    """The jit functions of rnnscale.kernels ("module:name") that no launch at `shapes`
    (default: every shape) runs, directly or inlined."""
    return coverage(all_shapes() if shapes is None else shapes)[1]


KERNEL_FAMILY = {"delta_product": "delta"}  # scan families that run another family's kernels


@functools.cache
def recipe_shapes(recipes: Path = ROOT / "configs" / "recipes") -> tuple[HeadShape, ...]:
    """The head shape of every scan of every recipe, from each mixer's forward on the meta
    device with `scan` recorded. Recipes that share a shape share one, labelled with all."""
    import torch

    from rnnscale.train.config import load_config
    from rnnscale.train.mixers import REGISTRY
    from rnnscale.train.model import build_model

    paths = sorted(recipes.glob("*.yaml"))
    if not paths:
        raise FileNotFoundError(f"no recipes in {recipes}: run the report from a checkout")
    seen: dict[tuple, list[str]] = {}
    for path in paths:
        cfg = load_config(path)
        with torch.device("meta"):
            model = build_model(cfg.model, cfg.kernels).to(torch.bfloat16)
        x = torch.empty(1, 16, cfg.model.d_model, device="meta", dtype=torch.bfloat16)
        with _recording_scans() as calls, torch.no_grad():
            for name in dict.fromkeys(n for n in model.layer_types if REGISTRY[n].family):
                model.blocks[model.layer_types.index(name)].mixer(x)
        for key in calls:
            seen.setdefault(key, []).append(path.stem)
    return tuple(HeadShape(",".join(dict.fromkeys(names)), *key) for key, names in seen.items())


@contextlib.contextmanager
def _recording_scans():
    """`scan` replaced, in every mixer module, by a recorder of (family, H, K, V, C, dtype)
    that returns empty outputs of the right shapes; yields the list of what it recorded."""
    import torch

    import rnnscale.train.model as package
    from rnnscale.train.model import scan as scan_module

    calls = []
    dtypes = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}

    def record(family, *inputs, settings=scan_module.DEFAULT, **_):
        (B, T), C = inputs[0].shape[:2], settings.chunk_size
        if family == "scan":
            b = inputs[1]  # (B, T, D)
            calls.append(("scan", 1, b.shape[-1], b.shape[-1], C, dtypes[b.dtype]))
            return torch.empty_like(b), b.new_empty(B, b.shape[-1])
        # q (B, T, H or G groups, K), v (B, T, [n,] H, V): the kernels see H heads (Triton
        # gets grouped q and k repeated to every head)
        K, v = inputs[0].shape[3], inputs[2]
        H = v.shape[-2]
        calls.append((KERNEL_FAMILY.get(family, family), H, K, v.shape[-1], C, dtypes[v.dtype]))
        return v.new_empty(B, T, H, v.shape[-1]), v.new_empty(B, H, K, v.shape[-1])

    with contextlib.ExitStack() as stack:
        for info in pkgutil.iter_modules(package.__path__):
            module = importlib.import_module(f"{package.__name__}.{info.name}")
            if getattr(module, "scan", None) is scan_module.scan:
                stack.enter_context(mock.patch.object(module, "scan", record))
        yield calls


def unit_shapes() -> list[HeadShape]:
    """K = V = 64, H = 16 for every scan family, at its configured (default) chunk size."""
    from rnnscale.train.mixers import FAMILIES

    return [HeadShape("K=V=64", family, 16, 64, 64, C) for family, (C, _) in FAMILIES.items()]


def all_shapes() -> list[HeadShape]:
    return [*recipe_shapes(), *unit_shapes()]


def largest_shapes() -> list[HeadShape]:
    """Per family its largest recipe shape (by K * V, then C, then H), or K=V=64 where no
    recipe uses the family: the always-on test's shapes."""
    size = lambda s: (s.K * s.V, s.C, s.H)  # noqa: E731
    recipes = recipe_shapes()
    return [max((s for s in recipes if s.family == unit.family), key=size, default=unit)
            for unit in unit_shapes()]  # fmt: skip
