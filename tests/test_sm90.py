"""The sm_90 fit report (kernels/sm90.py, docs/kernels.md "Fit on H100 / H200"): every Triton
kernel of the package is launched by some module's `sm90_launches` or inlined into a launched
kernel, and every launch at each family's largest recipe shape compiles for sm_90 with no
spilled byte and shared memory within the limit (the full sweep is `slow`).

The report runs in a child process without TRITON_INTERPRET: conftest.py sets it for the
interpreter tests, and kernels imported under it cannot be compiled for a GPU. Compiles are
cached (~/.cache/rnnscale/sm90, or $RNNSCALE_SM90_CACHE): a warm run takes seconds.
"""

import json
import os
import subprocess
import sys
import time

import pytest
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from rnnscale.kernels import sm90
from rnnscale.train.config import load_config

FAMILIES = ("gla", "simple_gla", "delta", "scan")


def run_report(*args: str, timeout: float = 1800) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "rnnscale.kernels.sm90", "--json", *args],
                         capture_output=True, text=True, env=env, timeout=timeout)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines()]


@pytest.fixture(scope="module")
def largest() -> list[dict]:
    return run_report("--shapes", "largest")


def check_fits(lines: list[dict], family: str) -> None:
    rows = [x for x in lines if "config" in x and x["shape"]["family"] == family]
    undeclared = sorted({x["module"] for x in lines if "sm90_launches" in x.get("uncovered", "")})
    assert rows, (f"no launch declared for the {family} family; modules with Triton kernels and "
                  f"no sm90_launches(shape): {', '.join(undeclared) or 'none'}")  # fmt: skip
    bad = [f"{x['kernel']} at {x['shape']} {x['config']}: regs {x['regs']}, spilled "
           f"{x['spill_bytes']} B, shared {x['shared_bytes']} B {x.get('error', '')}"
           for x in rows if not x["fits"]]  # fmt: skip
    assert not bad, f"{len(bad)} of {len(rows)} launches do not fit sm_90:\n" + "\n".join(bad)


def test_every_kernel_is_launched_or_inlined(largest):
    missing = [f"{x['module']}:{x['kernel']} ({x['uncovered']})" for x in largest
               if "uncovered" in x]  # fmt: skip
    assert not missing, "jit functions no sm90_launches covers:\n" + "\n".join(missing)


@pytest.mark.parametrize("family", FAMILIES)
def test_largest_recipe_shape_fits_sm90(largest, family):
    check_fits(largest, family)


@pytest.fixture(scope="module")
def every_shape() -> list[dict]:
    return run_report("--shapes", "all")


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_every_recipe_shape_fits_sm90(every_shape, family):
    check_fits(every_shape, family)


def test_recipe_shapes_come_from_the_configs():
    shapes = sm90.recipe_shapes()
    labels = {name for s in shapes for name in s.label.split(",")}
    recipes = {p.stem for p in (sm90.ROOT / "configs" / "recipes").glob("*.yaml")}
    assert labels == recipes  # every recipe has a scan (attention hybrids too)
    gla = next(s for s in shapes if "gla-1.3b" in s.label.split(","))  # d_model 2048, 4 heads
    C = load_config(sm90.ROOT / "configs" / "recipes" / "gla-1.3b.yaml").kernels.chunk_size.gla
    assert (gla.family, gla.H, gla.K, gla.V, gla.C) == ("gla", 4, 256, 512, C)
    largest = {s.family: s for s in sm90.largest_shapes()}
    assert set(largest) == set(FAMILIES)
    assert all(s.K * s.V <= largest[s.family].K * largest[s.family].V for s in shapes)


def _kernel(x_ptr, n, BLOCK: tl.constexpr, EVEN: tl.constexpr):
    pass


def test_expand_applies_heuristics_and_the_autotune_prune():
    fn = JITFunction(_kernel)  # not triton.jit: that is the interpreter's under conftest.py
    configs = [triton.Config({"BLOCK": b}, num_warps=w) for b in (16, 64, 256) for w in (4, 8)]
    prune = lambda configs, args: [c for c in configs if c.kwargs["BLOCK"] <= args["n"]]  # noqa: E731
    tuned = triton.autotune(configs, key=["n"], prune_configs_by={"early_config_prune": prune})
    kernel = triton.heuristics({"EVEN": lambda args: args["n"] % 16 == 0})(tuned(fn))
    launches = sm90.expand(kernel, {"x_ptr": "*bf16", "n": "i32"}, {"n": 100}, programs=7)
    got = sorted((x.constexprs["BLOCK"], x.num_warps, x.constexprs["EVEN"]) for x in launches)
    assert got == [(16, 4, False), (16, 8, False), (64, 4, False), (64, 8, False)]
    assert all(x.kernel is fn and x.programs == 7 for x in launches)


def test_timeout_is_an_error_row_not_a_hang(monkeypatch, tmp_path):
    monkeypatch.setenv("RNNSCALE_SM90_CACHE", str(tmp_path))
    monkeypatch.setattr(sm90, "compile_sm90", lambda launch: time.sleep(60))
    shape = sm90.HeadShape("t", "scan", 1, 16, 16, 16)
    row = sm90.Row(sm90.Launch(JITFunction(_kernel), {}, {}), shape)
    sm90.measure([row], timeout_s=1.0)
    assert not row.fits and row.error.startswith("timeout")
    assert not list(tmp_path.iterdir())  # a timeout is not cached
