"""The benchmark suite runs (every script at tiny shapes, once, through `benchmarks/suite.py
--smoke`) and writes its regions and figures; every table of docs/performance.md names a peer.
Timings are never asserted."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "performance.md"
REGIONS = ["kernels", "kernels-memory", "models", "data", "checkpoint", "sequence_parallel"]
FIGURES = ["kernels", "models", "checkpoint", "sequence_parallel"]
REGION = re.compile(r"<!-- bench:([\w-]+) -->\n(.*?)<!-- /bench:\1 -->", re.S)


def cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip()[1:-1].split("|")]


def page_tables(text: str) -> list[tuple[int, list[str]]]:
    """(line number, lines) of every run of lines that start with `|`."""
    out: list[tuple[int, list[str]]] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.lstrip().startswith("|"):
            continue
        if out and out[-1][0] + len(out[-1][1]) == number:
            out[-1][1].append(line)
        else:
            out.append((number, [line]))
    return out


def table_problems(text: str) -> list[str]:
    """What is wrong with the page's tables: each needs a header, a rule and rows of as many
    cells, and a column whose header starts with `peer`, filled in every row (a figure, a name,
    or `not measured: REASON`; not a placeholder)."""
    problems = []
    for line, lines in page_tables(text):
        rows = [cells(x) for x in lines]
        if len(rows) < 3 or not all(re.fullmatch(r":?-{3,}:?", c) for c in rows[1]):
            problems.append(f"line {line}: not a header, a rule and rows")
            continue
        if len({len(r) for r in rows}) != 1:
            problems.append(f"line {line}: rows of {sorted({len(r) for r in rows})} cells")
        peers = [i for i, head in enumerate(rows[0]) if head.lower().startswith("peer")]
        if not peers:
            problems.append(f"line {line}: no column headed `peer...` in {rows[0]}")
        for row in rows[2:]:
            for cell in (row[i] for i in peers if i < len(row)):
                unsaid = re.match(r"not (measured|run)(?!: \S)", cell)
                if cell in ("", "-", "n/a", "?") or unsaid:
                    problems.append(f"line {line}: row {row[0]!r} names no peer: {cell!r}")
    return problems


def test_every_table_on_the_performance_page_names_a_peer():
    assert not table_problems(PAGE.read_text())


def test_the_table_check_finds_a_missing_peer():
    good = "| a | peer: b |\n|---|---|\n| x | 1.0 |\n| y | not measured: no GPU |\n"
    assert not table_problems(good)
    assert table_problems("| a | b |\n|---|---|\n| x | 1 |\n")  # no peer column
    assert table_problems("| a | peer |\n|---|---|\n| x | |\n")  # an empty peer cell
    assert table_problems("| a | peer |\n|---|---|\n| x | - |\n")  # a placeholder
    assert table_problems("| a | peer |\n|---|---|\n| x | not measured |\n")  # no reason
    assert table_problems("| a | peer |\n|---|---|\n| x | 1 | 2 |\n")  # a row too long
    assert table_problems("| a | peer |\n| x | 1 |\n")  # no rule


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict:
    """`benchmarks/suite.py --smoke` once, into a copy of the page: {region name: its text},
    plus the page ("page") and the figures' folder ("img")."""
    out = tmp_path_factory.mktemp("bench")
    page = out / "performance.md"
    shutil.copy(PAGE, page)
    cmd = [sys.executable, "benchmarks/suite.py", "--smoke", "--out", str(page),
           "--img", str(out / "img")]  # fmt: skip
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    text = page.read_text()
    return {**dict(REGION.findall(text)), "page": text, "img": out / "img"}


def rows(region: str, first: str) -> list[list[str]]:
    """The body rows of the region's table whose first header cell is `first`."""
    for _, lines in page_tables(region):
        if cells(lines[0])[0] == first:
            return [cells(x) for x in lines[2:]]
    raise AssertionError(f"no table headed {first!r} in:\n{region}")


def test_suite_writes_every_region_with_its_header(smoke):
    for name in REGIONS:
        first = smoke[name].splitlines()[0]
        assert first.startswith("Measured ") and "--smoke" in first, first
        assert "command: `" in first and "peer in the same run: " in first, first
        assert re.search(r"torch \d", first) and "cores" in first, first
    assert not table_problems(smoke["page"])


def test_suite_leaves_the_prose_as_it_was(smoke):
    strip = lambda text: REGION.sub("", text)  # noqa: E731
    assert strip(smoke["page"]) == strip(PAGE.read_text())


def test_suite_draws_the_four_figures(smoke):
    for name in FIGURES:
        png = smoke["img"] / f"{name}.png"
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", png
        assert len(data) > 1000
        assert f"]({Path('img') / png.name})" in smoke[name]  # embedded in its region


def test_kernel_benchmark_runs(smoke):
    table = rows(smoke["kernels"], "family")
    assert [row[0] for row in table] == ["gla", "simple_gla", "delta", "scan"]
    assert all(float(row[3]) > 0 for row in table)  # the step loop ran beside each
    assert "flash-linear-attention" in smoke["kernels"]  # measured, or why not


def test_kernel_profile_splits_the_time():
    r = subprocess.run([sys.executable, "benchmarks/kernels.py", "--profile", "--smoke"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    table = rows(r.stdout, "family")
    assert [row[0] for row in table] == ["gla", "simple_gla", "delta"]  # scan: no matmuls
    for row in table:
        total, matmul, share = float(row[2]), float(row[3]), float(row[4].rstrip("%"))
        assert 0 < matmul < total and share == pytest.approx(100 * matmul / total, abs=1)


def test_kernel_memory_benchmark_runs(smoke):
    table = rows(smoke["kernels-memory"], "family")
    assert [(row[0], int(row[1])) for row in table] == [
        (name, T) for name in ("gla", "simple_gla", "delta", "scan") for T in (256, 512)
    ]
    assert all(float(row[2]) >= 0 for row in table)
    assert [row[4] for row in table if row[1] == "256"] == ["-"] * 4  # no slope at the first T
    assert all(abs(float(row[4])) < 1e4 for row in table if row[1] == "512")  # a number
    assert all(float(row[5]) >= 0 for row in table if row[1] == "256")  # the step loop's


def test_model_benchmark_runs_with_its_peers(smoke):
    table = rows(smoke["models"], "model")
    assert [row[0] for row in table] == [
        "rnnscale mamba2",
        "rnnscale gla",
        "rnnscale gated_deltanet",
        "rnnscale gdn+attn 3:1",
        "rnnscale attn",
        "transformers Mamba2",
        "transformers Llama (sdpa)",
    ]
    assert not [row for row in table if row[2].startswith("not run")], table  # all measured
    assert not [row for row in table if "not measured" in row[7] + row[9]], table
    llama = table[-1]  # its FLOPs counted by our all-attention model of its shape
    assert llama[6].endswith("%") and llama[11] == "1.00x", llama
    assert llama[8] == "1.00x, 1.00x / 1.00x", llama  # tokens/s, peak and live memory
    assert all(float(row[5]) > 0 for row in table), table  # the live-tensor peaks
    assert all(float(row[11].rstrip("x")) > 0 for row in table[:5]), table


def test_data_benchmark_runs(smoke):
    table = rows(smoke["data"], "step")
    assert [row[0] for row in table] == [
        "sentencepiece encode, 1 process",
        "data prepare, 1 worker",
        "data prepare, 2 workers",
    ]
    assert all(float(row[1]) > 0 for row in table)
    debug = [row for row in rows(smoke["data"], "loader, against") if row[0] == "vs debug_cpu step"]
    assert len(debug) == 1 and debug[0][3].endswith("x") and number(debug[0][2]) > 0


def number(cell: str) -> float:
    return float(re.search(r"[\d,]+\.?\d*", cell).group().replace(",", ""))


def test_checkpoint_benchmark_runs(smoke):
    table = rows(smoke["checkpoint"], "measure")
    assert [row[0] for row in table] == [
        "save bandwidth (sync, GB/s)",
        "load bandwidth (GB/s)",
        "sync save, step loop held up (s)",
        "async save, step loop held up + slower steps (s)",
    ]
    assert all(float(row[3]) > 0 for row in table[:3])  # bandwidths and a blocking save
    # the async save's cost is the steps it slowed beside their median: noise around a small
    # number, below zero on a machine where other work slowed the plain run's steps more
    assert math.isfinite(float(table[3][3]))


def test_sequence_parallel_benchmark_runs(smoke):
    table = rows(smoke["sequence_parallel"], "layer")
    names = [row[0] for row in table]
    assert names.count("attention, Ulysses all-to-all") == 3  # P = 2, 4, 8
    scan = [row for row in table if row[0].endswith(", scan")]
    gather = [row for row in table if row[0].endswith(", allgather")]
    assert len(scan) == len(gather) == 9
    assert all(len(set(row[2:5])) == 1 for row in scan + gather)  # no T
    assert all(float(a[2]) < float(b[2]) for a, b in zip(scan, gather, strict=True))
    scaling = rows(smoke["sequence_parallel"], "model")
    assert [(row[0], row[3]) for row in scaling] == [("gla x4", "scan"), ("gla x4", "allgather")]
    assert all(float(row[5]) > 0 and float(row[6]) > 0 for row in scaling)


def test_the_sequence_parallel_overhead_benchmark_runs():
    """benchmarks/sp_overhead.py (not in the suite): a row per layer of the hybrid and one for
    the whole model, each timed plain and in its SP form."""
    cmd = [sys.executable, "benchmarks/sp_overhead.py", "--seq-len", "128", "--repeats", "1"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    table = rows(r.stdout, "layer")
    assert [row[0] for row in table] == ["GatedDeltaNet", "SlidingWindowAttention", "Mamba2",
                                         "GatedLinearAttention", "the whole model"]  # fmt: skip
    assert all(float(row[1]) > 0 and float(row[2]) > 0 for row in table)


def test_the_sequence_parallel_model_costs_what_its_formulas_say():
    """benchmarks/sp_model.py: one hop, a ring all-gather and a pipelined chain cost their
    alpha-beta formulas; the scan's modelled exchange grows with P - 1 hops of one state, the
    all-gather's with P - 1 states and transitions, so the scan is never slower for a recipe;
    Ulysses is refused where the heads do not divide by P."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import sp_model as m

    links = m.Links(per_node=2, alpha_intra=1.0, alpha_inter=10.0, bw_intra=4.0, bw_inter=1.0)
    assert m.chain(links, 2, 8, 1) == 1.0 + 2.0  # one NVLink hop
    assert m.chain(links, 3, 8, 2) == (1.0 + 1.0) + (10.0 + 4.0) + (10.0 + 4.0)  # a node edge
    assert m.ring_allgather(links, 4, 8) == 3 * (10.0 + 8.0)
    layers = m.recipe_layers(ROOT / "configs/recipes/gated_deltanet-attn-1.3b.yaml")
    gdn = layers[0]
    assert (gdn.kind, gdn.state, gdn.transition) == ("recurrent", 8 * 208 * 416, 8 * 208 * 208)
    assert m.layer_time(layers[3], 16, 1 << 20, "ulysses", 1e15, m.Links(), 4) is None
    rate = 4e14
    for name in ("gla-1.3b", "gated_deltanet-1.3b"):
        recipe = m.recipe_layers(ROOT / f"configs/recipes/{name}.yaml")
        for P in (2, 16, 256):
            gather, lockstep, scan = (
                m.efficiency(recipe, P, 16384, {"recurrent": way}, rate, m.Links(), 4)
                for way in ("allgather", "lockstep", "scan")
            )
            assert 0 < gather <= lockstep <= scan <= 1


def test_the_attention_benchmark_runs():
    """benchmarks/attention.py (not in the suite): the blocked window and document forms beside
    SDPA under the whole mask, each row computing the same outputs."""
    cmd = [sys.executable, "benchmarks/attention.py", "--seq-len", "256", "--window", "16",
           "--repeats", "1"]  # fmt: skip
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    table = rows(r.stdout, "attention")
    assert len(table) == 4 and all(float(row[1]) > 0 and float(row[2]) > 0 for row in table)
    assert all(float(row[4]) < 1e-4 for row in table)  # the same outputs
