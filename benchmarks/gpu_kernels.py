"""The kernel cases of `make gpu-check`: each recipe's head shape through the public op with
backend="triton" beside backend="torch" (the chunkwise PyTorch path), and what the compiled
Triton kernels cost (registers, spills, shared memory; the autotuner's choice).

Per case, in a child (`gpu_check.py --child precompile|time`): first every case's kernels
compiled side by side (B = 1, T = 2 C: T is no compile-time constant, so the same binaries),
then the timings one case at a time: forward and forward + backward of both paths timed with
do_bench (the same warm-up and repetitions), tokens/s, the relative RMS difference of triton
against torch (output and every gradient). Errors (OutOfResources, ...) are kept verbatim.
"""

from __future__ import annotations

import importlib
import time
import traceback

from gpu_common import bench_ms, by_stage, first_line, rel_rms, sync

# Head shapes of the recipes (configs/recipes/*.yaml with the config's defaults, 2026-12; the
# same as `python -m rnnscale.kernels.sm90` derives, which tests/test_gpu_check.py checks):
#   gla: K = 0.5 d/H, V = d/H, C = 64 (the recipes' kernels.chunk_size.gla); mamba2: H = 2d/64,
#   K = state_size 128, V = head_dim 64, C = 64, scale 1; gated_deltanet: K = head_dim,
#   V = 2 K, C = 64; rglru: D = H round(4/3 d/H), C = 32, scanned in fp32 by the mixer. hgrn2
#   has no recipe: K = expand_ratio 128, V = d/H = 128 (d 2048, 16 heads) and the gla family's
#   default chunk 16 are assumed, not read from configs/.
# Order: the 1.3B recipes first (the fla comparison and the training steps use them).
CASES = [
    dict(name="mamba2-1.3b", family="simple_gla", B=2, T=2048, H=64, K=128, V=64, C=64,
         scale=1.0, source="configs/recipes/mamba2-1.3b.yaml (d_model 2048)"),
    dict(name="gated_deltanet-1.3b", family="delta", B=2, T=2048, H=8, K=192, V=384, C=64,
         source="configs/recipes/gated_deltanet-1.3b.yaml (head_dim 192; 340m and 2.7b too)"),
    dict(name="gla-1.3b", family="gla", B=2, T=2048, H=4, K=256, V=512, C=64,
         source="configs/recipes/gla-1.3b.yaml (d_model 2048, 4 heads)"),
    dict(name="griffin-1.3b fp32", family="scan", B=2, T=2048, D=2394, C=32, dtype="float32",
         source="configs/recipes/griffin-1.3b.yaml (rglru width 14 x 171)"),
    dict(name="griffin-1.3b bf16", family="scan", B=2, T=2048, D=2394, C=32,
         source="configs/recipes/griffin-1.3b.yaml (rglru width 14 x 171)"),
    dict(name="gla-340m", family="gla", B=2, T=2048, H=4, K=128, V=256, C=64,
         source="configs/recipes/gla-340m.yaml (d_model 1024, 4 heads)"),
    dict(name="gated_deltanet-attn-7b", family="delta", B=2, T=4096, H=32, K=80, V=160, C=64,
         source="configs/recipes/gated_deltanet-attn-7b.yaml (head_dim 80)"),
    dict(name="gated_deltanet-attn-1.3b", family="delta", B=2, T=2048, H=8, K=208, V=416, C=64,
         source="configs/recipes/gated_deltanet-attn-1.3b.yaml (head_dim 208)"),
    dict(name="gla-2.7b", family="gla", B=2, T=2048, H=4, K=320, V=640, C=64,
         source="configs/recipes/gla-2.7b.yaml (d_model 2560, 4 heads)"),
    dict(name="hgrn2 (assumed)", family="gla", B=2, T=2048, H=16, K=128, V=128, C=16,
         source="no recipe: expand_ratio 128 default, d_model 2048 / 16 heads assumed"),
]  # fmt: skip

DRY_CASES = [  # --dry-run: the same code paths at tiny shapes (CPU, Triton's interpreter)
    dict(name="dry simple_gla", family="simple_gla", B=1, T=40, H=2, K=16, V=8, C=16, scale=1.0),
    dict(name="dry delta", family="delta", B=1, T=40, H=2, K=16, V=12, C=16),
    dict(name="dry gla", family="gla", B=1, T=40, H=2, K=8, V=16, C=16),
    dict(name="dry scan", family="scan", B=1, T=40, D=24, C=16, dtype="float32"),
]

# the Triton modules each family's chunk op launches kernels from (rnnscale.kernels.<name>)
KERNEL_MODULES = {
    "gla": ["common.linear_attention_triton", "common.chunk_state_triton", "gla.subchunk_triton"],
    "simple_gla": ["common.linear_attention_triton", "common.chunk_state_triton"],
    "delta": ["delta.chunk_triton", "delta.wy_triton", "delta.state_triton",
              "common.linear_attention_triton", "common.chunk_state_triton"],
    "scan": ["scan.chunk_triton"],
}  # fmt: skip


def case_inputs(case: dict, T: int, B: int, device, dtype):
    """Valid random inputs as tests/scans/families.py draws them (model-like: normalised q, k
    for the delta rule), made in fp32 on the device; q, k, v (a, b for the scan) rounded to
    dtype, the gates and beta kept in fp32 as the mixers pass them."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator(device=device).manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32)

    fam = case["family"]
    if fam == "scan":
        D = case["D"]
        return [x.to(dtype).contiguous() for x in (torch.sigmoid(r(B, T, D) + 2), r(B, T, D))]
    H, K, V = case["H"], case["K"], case["V"]
    q, k, v = r(B, T, H, K), r(B, T, H, K), r(B, T, H, V)
    if fam == "delta":
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    qkv = [x.to(dtype).contiguous() for x in (q, k, v)]
    if fam == "gla":
        return [*qkv, F.logsigmoid(r(B, T, H, K) + 2)]
    if fam == "simple_gla":
        return [*qkv, F.logsigmoid(r(B, T, H) + 2)]
    return [*qkv, F.logsigmoid(r(B, T, H) + 3), torch.sigmoid(r(B, T, H))]


def case_op(case: dict):
    fam = case["family"]
    if fam == "gla":
        from rnnscale.kernels.gla import chunk_gla as op
    elif fam == "simple_gla":
        from rnnscale.kernels.simple_gla import chunk_simple_gla as op
    elif fam == "delta":
        from rnnscale.kernels.delta import chunk_gated_delta_rule as op
    else:
        from rnnscale.kernels.scan import linear_scan as op
    kw = {"chunk_size": case["C"]}
    if fam != "scan":
        kw["scale"] = case.get("scale")
    return op, kw


def jit_kernels(family: str) -> tuple[dict, dict]:
    """({name: jit function}, {name: its autotuner}) of every `@triton.jit` function the
    family's Triton modules hold (defined there or imported), triton.autotune /
    triton.heuristics wrappers unwrapped (each has `.fn`: `la_output = tuned(_la_output, ...)`
    gives `_la_output` and its autotuner). Under TRITON_INTERPRET they are InterpretedFunctions."""
    from triton.runtime.autotuner import Autotuner, Heuristics
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    fns, tuners = {}, {}
    for name in KERNEL_MODULES[family]:
        module = importlib.import_module(f"rnnscale.kernels.{name}")
        for obj in list(vars(module).values()):
            wrapper = None
            while isinstance(obj, (Autotuner, Heuristics)):
                wrapper = obj if isinstance(obj, Autotuner) else wrapper
                obj = obj.fn
            if not isinstance(obj, (JITFunction, InterpretedFunction)):
                continue
            fns[obj.__name__] = obj
            if wrapper is not None:
                tuners[obj.__name__] = wrapper
    return fns, tuners


def kernel_metadata(case: dict) -> list[dict]:
    """Every compiled variant of the family's Triton kernels in this process: name, warps,
    stages, shared memory (bytes), and registers and spills once the kernel was loaded (a kernel
    refused at launch, e.g. for shared memory, has its shared size but no registers); then one
    row per autotuned kernel with the configuration it chose for each key."""
    fns, tuners = jit_kernels(case["family"])
    out = []
    for label, fn in sorted(fns.items()):
        caches = getattr(fn, "device_caches", None)
        for entry in list((caches or {}).values()):
            parts = entry if isinstance(entry, tuple) else (entry,)
            cache = next((p for p in parts if isinstance(p, dict)), {})
            for compiled in list(cache.values()):
                md = getattr(compiled, "metadata", None)
                row = {"kernel": label}
                for field in ("num_warps", "num_stages", "shared"):
                    row[field] = getattr(md, field, None)
                row["n_regs"] = getattr(compiled, "n_regs", None)
                row["n_spills"] = getattr(compiled, "n_spills", None)
                row["loaded"] = getattr(compiled, "module", None) is not None
                out.append(row)
    for label, tuner in sorted(tuners.items()):
        chosen = {str(key): str(config) for key, config in dict(tuner.cache).items()}
        if chosen:
            out.append({"kernel": label, "autotuned": chosen})
    if not any("num_warps" in r for r in out):  # the interpreter, or nothing launched yet
        kinds = sorted({type(fn).__name__ for fn in fns.values()})
        out.append(
            {"note": f"nothing compiled to read ({', '.join(kinds)})", "kernels": sorted(fns)}
        )
    return out


def kernels_cell(rows: list[dict]) -> str:
    """One table cell for a case's compiled kernels: counts, the most registers, the spills
    (and which kernels spill), the most shared memory."""
    compiled = [r for r in rows if "num_warps" in r]
    if not compiled:
        return "none compiled"
    regs = [r["n_regs"] for r in compiled if r.get("n_regs") is not None]
    spills = sorted({r["kernel"] for r in compiled if (r.get("n_spills") or 0) > 0})
    shared = max(r.get("shared") or 0 for r in compiled)
    text = f"{len({r['kernel'] for r in compiled})} kernels, {len(compiled)} compiled: "
    text += f"regs <= {max(regs) if regs else '?'}, shared <= {shared} B, "
    return text + (f"spills in {', '.join(spills)}" if spills else "no spills")


def child(mode: str, case: dict, emit, dry: bool) -> None:
    """mode "precompile": the Triton path at B = 1, T = 2 C, and a small check against torch;
    mode "time": both paths at the case's shape, timed and compared."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, case.get("dtype", "bfloat16"))
    op, kw = case_op(case)
    B, T = (1, 2 * case["C"]) if mode == "precompile" else (case["B"], case["T"])
    xs = case_inputs(case, T, B, device, dtype)
    gen = torch.Generator(device=device).manual_seed(1)
    out_shape = xs[-1].shape if case["family"] == "scan" else xs[2].shape
    do = torch.randn(out_shape, generator=gen, device=device, dtype=torch.float32).to(dtype)
    emit(stage="start", mode=mode, device=device, dtype=str(dtype), B=B, T=T)
    backends = ["triton"] if mode == "precompile" else ["torch", "triton"]
    if mode == "time" and case.get("skip_triton"):
        emit(stage="triton fwd", backend="triton", error=case["skip_triton"], skipped=True)
        backends = ["torch"]
    outs: dict[str, dict] = {}
    for backend in backends:
        try:  # forward only (no autograd graph)
            start = time.perf_counter()
            with torch.no_grad():
                o, _ = op(*xs, backend=backend, **kw)
            sync()
            first_s = time.perf_counter() - start
            bad = int((~torch.isfinite(o.float())).sum())
            rec = dict(stage=f"{backend} fwd", backend=backend, first_call_s=first_s, nonfinite=bad)
            if mode == "time":
                with torch.no_grad():
                    rec["ms"] = bench_ms(lambda b=backend: op(*xs, backend=b, **kw))
            outs.setdefault(backend, {})["o"] = o.float()
            emit(**rec)
        except Exception as e:  # noqa: BLE001 (recorded verbatim)
            emit(stage=f"{backend} fwd", backend=backend, error=f"{type(e).__name__}: {e}"[:3000],
                 traceback=traceback.format_exc()[-2000:])  # fmt: skip
            if backend == "triton":
                break  # the backward needs the forward kernel
        if backend == "triton" and mode == "time" and case.get("skip_triton_bwd"):
            emit(stage="triton fwd+bwd", backend="triton", error=case["skip_triton_bwd"],
                 skipped=True)  # fmt: skip
            continue
        try:  # forward + backward
            leaves = [x.clone().requires_grad_() for x in xs]
            start = time.perf_counter()
            o, _ = op(*leaves, backend=backend, **kw)
            o.backward(do)
            sync()
            first_s = time.perf_counter() - start
            # copies: do_bench's untimed calls below accumulate into .grad in place
            grads = [x.grad.float().clone() for x in leaves]
            for x in leaves:
                x.grad = None
            bad = sum(int((~torch.isfinite(g)).sum()) for g in grads)
            rec = dict(stage=f"{backend} fwd+bwd", backend=backend, first_call_s=first_s,
                       nonfinite=bad)  # fmt: skip

            def step(leaves=leaves, backend=backend):
                out, _ = op(*leaves, backend=backend, **kw)
                out.backward(do)

            if mode == "time":
                rec["ms"] = bench_ms(step, grad_to_none=leaves)
            outs.setdefault(backend, {})["grads"] = grads
            emit(**rec)
        except Exception as e:  # noqa: BLE001
            emit(stage=f"{backend} fwd+bwd", backend=backend,
                 error=f"{type(e).__name__}: {e}"[:3000],
                 traceback=traceback.format_exc()[-2000:])  # fmt: skip
    compare(mode, case, op, xs, kw, outs, emit)
    try:
        emit(stage="kernels", kernels=kernel_metadata(case))
    except Exception as e:  # noqa: BLE001
        emit(stage="kernels", error=f"{type(e).__name__}: {e}")


def compare(mode: str, case: dict, op, xs, kw, outs: dict, emit) -> None:
    """Triton against torch: at the compile shape the output only (torch runs here alone),
    at the timed shape the output and every gradient."""
    import torch

    if mode == "precompile":
        try:
            with torch.no_grad():
                ref, _ = op(*xs, backend="torch", **kw)
            if "o" in outs.get("triton", {}):
                emit(stage="compare", output=rel_rms(outs["triton"]["o"], ref.float()))
        except Exception as e:  # noqa: BLE001
            emit(stage="compare", error=f"{type(e).__name__}: {e}")
        return
    if "torch" not in outs or "triton" not in outs:
        return
    cmp = {}
    if "o" in outs["torch"] and "o" in outs["triton"]:
        cmp["output"] = rel_rms(outs["triton"]["o"], outs["torch"]["o"])
    if "grads" in outs["torch"] and "grads" in outs["triton"]:
        names = ["a", "b"] if case["family"] == "scan" else ["q", "k", "v", "g", "beta"]
        for name, got, want in zip(names, outs["triton"]["grads"], outs["torch"]["grads"]):
            cmp[f"d{name}"] = rel_rms(got, want)
    emit(stage="compare", **cmp)


# ------------------------------------------------------------------------------------------
# the parent's side


def case_label(case: dict) -> str:
    dt = {"float32": "fp32"}.get(case.get("dtype", "bfloat16"), "bf16")
    shape = (
        f"D={case['D']}"
        if case["family"] == "scan"
        else f"H={case['H']} K={case['K']} V={case['V']}"
    )
    return f"B={case['B']} T={case['T']} {shape} C={case['C']} {dt}"


def after_precompile(entry: dict, got: dict, limit: float) -> str:
    """Records what the compile child found (the Triton path unavailable, forward or backward)
    and returns its log line."""
    entry["precompile"] = got
    st = by_stage(got["records"])
    fwd, bwd = st.get("triton fwd", {}), st.get("triton fwd+bwd", {})
    if got["timed_out"] and "error" not in fwd and "first_call_s" not in fwd:
        entry["triton_unavailable"] = f"compile/launch did not finish in {limit:.0f} s (forward)"
    elif "error" in fwd:
        entry["triton_unavailable"] = fwd["error"]
    elif got["timed_out"] and "first_call_s" not in bwd and "error" not in bwd:
        entry["triton_bwd_unavailable"] = (
            f"compile/launch did not finish in {limit:.0f} s (backward)"
        )
    elif not fwd and got["returncode"] != 0:
        entry["triton_unavailable"] = (
            f"compile child exited {got['returncode']}: "
            + (got["stderr_tail"].strip().splitlines() or ["no stderr"])[-1][:300]
        )
    text = "ok" if not entry.get("triton_unavailable") else entry["triton_unavailable"][:160]
    if entry.get("triton_bwd_unavailable"):
        text = "fwd ok; " + entry["triton_bwd_unavailable"]
    elif "error" in bwd:
        text = "fwd ok; bwd: " + bwd["error"][:160]
    nan = float("nan")
    seconds = (
        f"fwd {fwd.get('first_call_s', nan):.1f} s, fwd+bwd {bwd.get('first_call_s', nan):.1f} s"
    )
    return f"compile {case_label(entry['case'])} [{entry['case']['name']}]: {text} ({seconds})"


def timing_case(entry: dict) -> dict:
    """The case as the timing child gets it: the Triton path skipped where it could not compile
    (a backward compile would run into the same limit again)."""
    case = dict(entry["case"])
    if entry.get("triton_unavailable"):
        case["skip_triton"] = entry["triton_unavailable"]
    elif entry.get("triton_bwd_unavailable"):
        case["skip_triton_bwd"] = entry["triton_bwd_unavailable"]
    return case


def describe(got: dict) -> str:
    st, out = by_stage(got.get("records", [])), []
    for stage in ("torch fwd", "torch fwd+bwd", "triton fwd", "triton fwd+bwd"):
        r = st.get(stage)
        if r and "ms" in r:
            out.append(f"{stage} {r['ms']:.3f} ms")
        elif r and "error" in r:
            out.append(f"{stage} ERROR {r['error'][:120]}")
    cmp = st.get("compare", {})
    if cmp:
        out.append(
            "relRMS " + ", ".join(f"{k} {v:.1e}" for k, v in cmp.items() if isinstance(v, float))
        )
    return "; ".join(out) or got.get("skipped") or got.get("note") or "no result"


def fmt_ms(r: dict | None) -> str:
    if not r:
        return "not run: no record"
    if "ms" in r:
        return f"{r['ms']:.3f}"
    return "error" if r.get("error") else "not timed"


HEADER = [
    "| case | shape | triton fwd ms | peer: torch fwd ms | torch/triton fwd | triton fwd+bwd ms "
    "| peer: torch fwd+bwd ms | torch/triton fwd+bwd | triton fwd+bwd tokens/s | rel RMS o "
    "| max rel RMS grads | triton kernels | error |",
    "|" + "---|" * 13,
]


def table(entries: list[dict]) -> list[str]:
    """The kernel cases' table (Markdown): the Triton path beside its peer, the PyTorch path."""
    lines = list(HEADER)
    for entry in entries:
        case, timing = entry["case"], entry.get("timing", {})
        st = by_stage(timing.get("records", []))
        pre = by_stage(entry.get("precompile", {}).get("records", []))
        tf, tb = st.get("triton fwd"), st.get("triton fwd+bwd")
        pf, pb = st.get("torch fwd"), st.get("torch fwd+bwd")

        def ratio(a, b):
            return f"{a['ms'] / b['ms']:.2f}" if a and b and "ms" in a and "ms" in b else "none"

        toks = f"{case['B'] * case['T'] / (tb['ms'] * 1e-3):.3g}" if tb and "ms" in tb else "none"
        cmp = st.get("compare", {})
        grads = [v for k, v in cmp.items() if k.startswith("d") and isinstance(v, float)]
        out_err = f"{cmp['output']:.1e}" if isinstance(cmp.get("output"), float) else "none"
        grad_err = f"{max(grads):.1e}" if grads else "none"
        kernels = (st.get("kernels") or pre.get("kernels") or {}).get("kernels", [])
        stages = (tf, tb, pf, pb, st.get("error"), pre.get("triton fwd"),
                  pre.get("triton fwd+bwd"), pre.get("error"))  # fmt: skip
        errors = [r["error"] for r in stages if r and r.get("error")]
        errors += [
            entry[k] for k in ("triton_unavailable", "triton_bwd_unavailable") if entry.get(k)
        ]
        errors += [timing[k] for k in ("note", "skipped") if timing.get(k)]
        err = " / ".join(dict.fromkeys(first_line(e) for e in errors)) or "none"
        peer_f = fmt_ms(pf) if pf or not timing.get("skipped") else timing["skipped"]
        peer_b = fmt_ms(pb) if pb or not timing.get("skipped") else timing["skipped"]
        lines.append(
            f"| {case['name']} | {case_label(case)} | {fmt_ms(tf)} | {peer_f} | {ratio(pf, tf)} "
            f"| {fmt_ms(tb)} | {peer_b} | {ratio(pb, tb)} | {toks} | {out_err} | {grad_err} "
            f"| {kernels_cell(kernels)} | {err} |"
        )
    return lines
