"""Ours beside flash-linear-attention's chunk kernels in `make gpu-check`: the 1.3B recipes' head
shapes at T = 2048 and 8192 (B x T = 32768 tokens), bf16, forward and forward + backward.

Ours: rnnscale.kernels.{simple_gla.chunk_simple_gla, delta.chunk_gated_delta_rule,
gla.chunk_gla} with backend="triton" and the recipe's chunk size (64). The peer: fla's
chunk_simple_gla, chunk_gated_delta_rule and chunk_gla (fla-core, brought as a wheel by
`make gpu-wheels`: a GPU machine has no network) with its own defaults (chunk 64, its autotuned
configurations). Both take [B, T, H, K] inputs with log-space gates (per key for gla, per head
for simple_gla and the delta rule) and beta per head; both get the same tensors (q, k, v in
bf16, the gates and beta in fp32, as our mixers pass them) and the same scale, and are timed by
the same do_bench (warm-up and repetitions) in one child per (shape, T). Output and gradients
are compared by relative RMS (ours against fla's).

fla's kernels are compiled first, side by side with the other compiles, at B = 1, T = 128
(fla's T is no compile-time constant: the same binaries): its autotuners try up to 36
configurations per kernel and compile each, so each head shape gets PARTS children that start
at different configurations and share the binaries through Triton's disk cache; none keeps an
autotuning choice (FLA_CACHE_RESULTS=0). The timing children keep their choices on disk
(TRITON_CACHE_AUTOTUNING, and fla's own FLA_CACHE_RESULTS): each side tunes once per head
shape, at T = 2048 on a quiet GPU, and the T = 8192 child reuses the choice, as one training
process does (neither side's autotune key holds T).
"""

from __future__ import annotations

import time
import traceback

from gpu_common import bench_ms, by_stage, error_text, first_line, rel_rms, sync
from gpu_kernels import CASES, DRY_CASES, case_inputs, case_op

SHAPES = ("mamba2-1.3b", "gated_deltanet-1.3b", "gla-1.3b")  # names in gpu_kernels.CASES
LENGTHS, TOKENS = (2048, 8192), 32768
DRY_LENGTHS, DRY_TOKENS = (16, 32), 32  # one and two chunks (C = 16)
NO_CUDA = "not measured: no CUDA device (fla's kernels are Triton kernels for GPUs)"
NO_WHEEL = "run `make gpu-wheels` before the device call and carry `wheels`"
PARTS = {"gla": 3, "delta": 2, "simple_gla": 2}  # compile children per head shape


def cases(dry: bool) -> list[dict]:
    """One case per (head shape, T), B = tokens / T."""
    base = DRY_CASES if dry else CASES
    names = [c["name"] for c in base if c["family"] != "scan"] if dry else SHAPES
    lengths, tokens = (DRY_LENGTHS, DRY_TOKENS) if dry else (LENGTHS, TOKENS)
    shapes = {c["name"]: c for c in base}
    return [dict(shapes[n], shape=n, name=f"{n} T={T}", T=T, B=tokens // T, dtype="bfloat16")
            for n in names for T in lengths]  # fmt: skip


def precompile_cases(dry: bool) -> list[dict]:
    """fla at B = 1, T = 128, PARTS[family] children per head shape (ours compiles in the
    kernel cases)."""
    shapes = [] if dry else [c for c in cases(dry) if c["T"] == LENGTHS[0]]
    return [dict(c, name=f"fla {c['shape']} ({i + 1}/{PARTS[c['family']]})", T=128, B=1, part=i,
                 parts=PARTS[c["family"]])
            for c in shapes for i in range(PARTS[c["family"]])]  # fmt: skip


def spread_configs(part: int, parts: int) -> int:
    """In fla's compile children: every fla autotuner's configurations rotated to start at
    part / parts of its list, so that the children of one shape compile different ones first
    (Triton's disk cache hands each the others' binaries when it reaches them). The timing
    children keep fla's order. Returns how many autotuners were rotated."""
    import sys

    from triton.runtime.autotuner import Autotuner, Heuristics

    seen = set()
    for name, module in list(sys.modules.items()):
        if not name.startswith("fla.") or module is None:
            continue
        for obj in list(vars(module).values()):
            while isinstance(obj, (Autotuner, Heuristics)):
                if isinstance(obj, Autotuner) and id(obj) not in seen and len(obj.configs) > 1:
                    seen.add(id(obj))
                    k = len(obj.configs) * part // parts
                    obj.configs = obj.configs[k:] + obj.configs[:k]
                obj = obj.fn
    return len(seen)


def fla_op(family: str):
    """fla's chunk op of the family as a function of our inputs' list; raises ImportError."""
    if family == "gla":
        from fla.ops.gla import chunk_gla

        return lambda q, k, v, g, scale: chunk_gla(q, k, v, g, scale=scale)
    if family == "simple_gla":
        from fla.ops.simple_gla import chunk_simple_gla

        return lambda q, k, v, g, scale: chunk_simple_gla(q, k, v, g=g, scale=scale)
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    return lambda q, k, v, g, beta, scale: chunk_gated_delta_rule(q, k, v, g, beta, scale=scale)


def sides(case: dict, emit) -> dict:
    """{"ours": fn(*xs), "fla": fn(*xs)}; fla left out, with the reason emitted, where it
    cannot run."""
    import torch

    op, kw = case_op(case)
    scale = case.get("scale") or case["K"] ** -0.5
    kw = dict(kw, scale=scale, backend="triton")
    out = {"ours": lambda *xs: op(*xs, **kw)}
    if not torch.cuda.is_available():
        emit(stage="fla", skipped=NO_CUDA)
        return out
    try:
        theirs = fla_op(case["family"])
    except Exception as e:  # noqa: BLE001 (recorded verbatim)
        emit(
            stage="fla",
            skipped=f"not measured: fla not importable ({error_text(e)[:200]}); {NO_WHEEL}",
        )
        return out
    out["fla"] = lambda *xs: theirs(*xs, scale=scale)
    return out


def child(mode: str, case: dict, emit, dry: bool) -> None:
    """mode "fla-precompile": fla's forward and backward once (its autotuner compiles every
    configuration); mode "fla-time": both sides timed and compared."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    xs = case_inputs(case, case["T"], case["B"], device, torch.bfloat16)
    gen = torch.Generator(device=device).manual_seed(1)
    do = torch.randn(xs[2].shape, generator=gen, device=device).to(torch.bfloat16)
    emit(stage="start", mode=mode, device=device, B=case["B"], T=case["T"])
    fns = sides(case, emit)
    if mode == "fla-precompile":
        fns.pop("ours")
        if "fla" in fns:
            emit(stage="spread", autotuners=spread_configs(case["part"], case["parts"]))
    outs: dict[str, dict] = {}
    for side, fn in fns.items():
        outs[side] = run_side(side, fn, xs, do, timed=mode == "fla-time", emit=emit)
    if "o" in outs.get("ours", {}) and "o" in outs.get("fla", {}):
        cmp = {"output": rel_rms(outs["ours"]["o"], outs["fla"]["o"])}
        names = ["q", "k", "v", "g", "beta"]
        for name, a, b in zip(names, outs["ours"].get("grads", []), outs["fla"].get("grads", [])):
            cmp[f"d{name}"] = rel_rms(a, b)
        emit(stage="compare", **cmp)


def run_side(side: str, fn, xs, do, timed: bool, emit) -> dict:
    """Forward (no graph) and forward + backward of one side: the first call's seconds (compile
    and autotune), then do_bench's median; its output and gradients for the comparison."""
    import torch

    got: dict = {}
    try:
        start = time.perf_counter()
        with torch.no_grad():
            o, _ = fn(*xs)
        sync()
        rec = dict(stage=f"{side} fwd", first_call_s=time.perf_counter() - start)
        if timed:
            with torch.no_grad():
                rec["ms"] = bench_ms(lambda: fn(*xs))
        got["o"] = o.float()
        emit(**rec)
        leaves = [x.clone().requires_grad_() for x in xs]
        start = time.perf_counter()
        o, _ = fn(*leaves)
        o.backward(do)
        sync()
        rec = dict(stage=f"{side} fwd+bwd", first_call_s=time.perf_counter() - start)
        got["grads"] = [x.grad.float().clone() for x in leaves]  # do_bench accumulates into .grad

        def step():
            out, _ = fn(*leaves)
            out.backward(do)

        if timed:
            rec["ms"] = bench_ms(step, grad_to_none=leaves)
        emit(**rec)
    except Exception as e:  # noqa: BLE001 (recorded verbatim)
        emit(stage=f"{side} error", error=error_text(e), traceback=traceback.format_exc()[-2000:])
    return got


# ------------------------------------------------------------------------------------------
# the parent's side


def env_for_timing(env: dict) -> dict:
    return dict(env, TRITON_CACHE_AUTOTUNING="1")


def describe(got: dict) -> str:
    st = by_stage(got.get("records", []))
    out = [f"{k} {r['ms']:.3f} ms" for k, r in st.items() if "ms" in r]
    out += [f"{k}: {first_line(r['error'], 120)}" for k, r in st.items() if r.get("error")]
    if st.get("fla", {}).get("skipped"):
        out.append(st["fla"]["skipped"][:100])
    if "compare" in st:
        out.append(f"relRMS o {st['compare'].get('output', float('nan')):.1e}")
    return "; ".join(out) or got.get("skipped") or got.get("note") or "no result"


HEADER = [
    "| family | recipe shape | T | B | ours fwd ms | peer: fla fwd ms | ours/fla fwd "
    "| ours fwd+bwd ms | peer: fla fwd+bwd ms | ours/fla fwd+bwd | ours fwd+bwd tokens/s "
    "| rel RMS o | max rel RMS grads |",
    "|" + "---|" * 13,
]


def table(entries: list[dict]) -> list[str]:
    return [*HEADER, *(row(e["case"], e.get("timing", {})) for e in entries)]


def row(case: dict, timing: dict) -> str:
    st = by_stage(timing.get("records", []))
    why = failure(timing, st)

    def ms(side: str, what: str) -> str:
        r = st.get(f"{side} {what}")
        if r and "ms" in r:
            return f"{r['ms']:.3f}"
        if side == "fla" and st.get("fla", {}).get("skipped"):
            return st["fla"]["skipped"]
        err = st.get(f"{side} error", {}).get("error")
        return f"not measured: {first_line(err, 160)}" if err else why

    def ratio(what: str) -> str:
        a, b = st.get(f"ours {what}", {}), st.get(f"fla {what}", {})
        return f"{a['ms'] / b['ms']:.2f}" if "ms" in a and "ms" in b else "none"

    ours_fb = st.get("ours fwd+bwd", {})
    toks = f"{case['B'] * case['T'] / (ours_fb['ms'] * 1e-3):.3g}" if "ms" in ours_fb else "none"
    cmp = st.get("compare", {})
    grads = [v for k, v in cmp.items() if k.startswith("d")]
    shape = f"{case['shape']} (H={case['H']} K={case['K']} V={case['V']} C={case['C']})"
    cells = [
        case["family"], shape,
        str(case["T"]), str(case["B"]), ms("ours", "fwd"), ms("fla", "fwd"), ratio("fwd"),
        ms("ours", "fwd+bwd"), ms("fla", "fwd+bwd"), ratio("fwd+bwd"), toks,
        f"{cmp['output']:.1e}" if "output" in cmp else "none",
        f"{max(grads):.1e}" if grads else "none",
    ]  # fmt: skip
    return "| " + " | ".join(cells) + " |"


def failure(timing: dict, st: dict) -> str:
    if timing.get("skipped"):
        return timing["skipped"]
    if "error" in st:
        return f"not measured: {first_line(st['error']['error'], 160)}"
    if timing.get("timed_out"):
        return f"not measured: {timing.get('note', 'killed at its time limit')}"
    if timing.get("returncode"):
        return f"not measured: the child exited {timing['returncode']}"
    return "not measured: no record of this stage"
