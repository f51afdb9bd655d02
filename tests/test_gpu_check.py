"""`make gpu-check` (benchmarks/gpu_check.py) stays runnable without a GPU: its kernel cases are
the recipes' head shapes, it finds every Triton kernel it reports on, it unpacks only the wheels
a machine lacks, and its dry run (CPU, tiny shapes, Triton's interpreter) writes tables that
name their peers. Timings are never asserted."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from test_benchmarks import table_problems

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_common  # noqa: E402
import gpu_kernels  # noqa: E402


def test_kernel_cases_are_the_recipes_head_shapes():
    """Every case read from a recipe has the shape the sm_90 report derives from configs/."""
    sm90 = pytest.importorskip("rnnscale.kernels.sm90", reason="the sm_90 report is not here")
    shapes = {}
    for s in sm90.recipe_shapes():
        for recipe in s.label.split(","):
            key = (s.family, s.D, s.C) if s.family == "scan" else (s.family, s.H, s.K, s.V, s.C)
            shapes.setdefault(recipe, set()).add(key)
    checked = 0
    for case in gpu_kernels.CASES:
        found = re.match(r"configs/recipes/([\w.-]+)\.yaml", case.get("source", ""))
        if not found:
            continue
        fam = case["family"]
        keys = (case[k] for k in (("D", "C") if fam == "scan" else ("H", "K", "V", "C")))
        assert (fam, *keys) in shapes[found.group(1)], (case["name"], shapes[found.group(1)])
        checked += 1
    assert checked >= 9


def test_every_triton_module_is_read_and_autotuners_are_unwrapped():
    """Compiled (not interpreted) kernels, as on a GPU: every module of rnnscale.kernels with a
    `@triton.jit` belongs to a family's list, and each `tuned(...)` kernel is found with its
    autotuner."""
    with_jit = {
        ".".join(p.relative_to(ROOT / "kernels").with_suffix("").parts)
        for p in (ROOT / "kernels").rglob("*.py")
        if re.search(r"^@triton\.jit", p.read_text(), re.M)
    }
    listed = {m for modules in gpu_kernels.KERNEL_MODULES.values() for m in modules}
    assert with_jit <= listed, with_jit - listed
    code = (
        "import json, sys; sys.path.insert(0, 'benchmarks'); import gpu_common;"
        "gpu_common.make_importable(); import gpu_kernels;"
        "print(json.dumps({f: [sorted(a), sorted(b)] for f in gpu_kernels.KERNEL_MODULES"
        " for a, b in [gpu_kernels.jit_kernels(f)]}))"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    found = json.loads(r.stdout.strip().splitlines()[-1])
    tuned = {"_la_output", "_la_dv", "_la_dqk", "_state_pass"}
    assert tuned | {"_gla_scores", "_gla_dA", "_gla_dqk_intra"} <= set(found["gla"][1])
    assert tuned | {"_delta_states", "_delta_solve", "_delta_wy_bwd"} <= set(found["delta"][1])
    assert {"_chunk_cumsum", *tuned} <= set(found["simple_gla"][0])
    assert {"_scan_fwd", "_scan_bwd"} <= set(found["scan"][0])


def fake_wheel(folder: Path, name: str, files: dict[str, str]) -> None:
    with zipfile.ZipFile(folder / name, "w") as z:
        for path, text in files.items():
            z.writestr(path, text)


def test_only_the_missing_pure_python_wheels_are_unpacked(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    probe = "rnnscale_gpu_check_probe"
    fake_wheel(wheels, f"{probe}-1.0-py3-none-any.whl", {f"{probe}/__init__.py": "VALUE = 7\n",
               f"{probe}-1.0.dist-info/METADATA": f"Name: {probe}\nVersion: 1.0\n"})  # fmt: skip
    fake_wheel(wheels, "pytest-0.0.1-py3-none-any.whl", {"pytest/__init__.py": ""})
    fake_wheel(wheels, "native-1.0-cp312-cp312-linux_x86_64.whl", {"native.py": ""})
    site = tmp_path / "site"
    try:
        got = gpu_common.unpack_wheels(wheels, site)
        assert got[f"{probe}-1.0-py3-none-any.whl"] == "unpacked"
        assert got["pytest-0.0.1-py3-none-any.whl"].startswith("left packed: this Python has")
        assert "not a pure-Python wheel" in got["native-1.0-cp312-cp312-linux_x86_64.whl"]
        assert __import__(probe).VALUE == 7
        assert not (site / "pytest").exists()
    finally:
        sys.path.remove(str(site))
        sys.modules.pop(probe, None)
    assert gpu_common.unpack_wheels(tmp_path / "absent", site) == {}


def test_dry_run_writes_every_phase_with_its_peers(tmp_path):
    """The CPU dry run of every phase (one kernel case): ours beside fla (not measured without
    CUDA, and said so), the training steps beside Llama, the kernel case, the CUDA tests."""
    out = tmp_path / "out"
    cmd = [sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--out", str(out),
           "--wheels", str(tmp_path / "no-wheels"), "--cases", "dry scan"]  # fmt: skip
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    results = json.loads((out / "gpu_check.json").read_text())
    page = (out / "gpu_check.md").read_text()
    assert not table_problems(page), table_problems(page)
    for entry in results["fla"]:
        stages = {x["stage"]: x for x in entry["timing"]["records"]}
        assert stages["ours fwd+bwd"]["ms"] > 0, entry
        assert stages["fla"]["skipped"].startswith("not measured: no CUDA device")
    names = [e["case"]["name"] for e in results["train"]]
    assert names[:3] == [
        f"rnnscale {n}" for n in ("gla-1.3b", "gated_deltanet-1.3b", "mamba2-1.3b")
    ]
    assert len(names) == 4  # one Llama: the dry run's three models have the same depth
    for entry in results["train"]:
        result = {x["stage"]: x for x in entry["timing"]["records"]}["result"]
        assert result["tokens_per_s"] > 0 and result["mfu_vs_yardstick"] > 0
    assert [e["case"]["name"] for e in results["cases"]] == ["dry scan"]
    assert "compare" in {x["stage"] for x in results["cases"][0]["timing"]["records"]}
    # every gpu-marked test, one process each, skipped without CUDA: the scans' and the export's
    nodes = [p["node"] for p in results["pytest"]["processes"]]
    assert results["pytest"]["counts"] == {"skipped": len(nodes)}
    assert {n.split("::")[0] for n in nodes} == {"tests/scans/test_families.py", "tests/test_hf.py"}
