"""Model training steps on CPU: rnnscale's models beside Hugging Face transformers' in one run.

    .venv/bin/python benchmarks/models.py                 # d_model 512, 4 layers, vocab 8192
    .venv/bin/python benchmarks/models.py --smoke         # tiny, seconds (the test runs it)
    .venv/bin/python benchmarks/models.py --lengths 1024 2048 4096 --mamba2-max-len 1024  # suite

At equal width, depth and vocabulary: our mamba2 against transformers' Mamba2 (its pure-PyTorch
path: no CUDA kernels on CPU), and our gla, gated_deltanet and a gated_deltanet+attn 3:1 hybrid
against transformers' Llama with SDPA attention. One training step is forward, backward and an
AdamW step on one row of T tokens, fp32; tokens/s is the best of a few steps (the first is a
warm-up). Peak memory: each (model, T) in a fresh process, the growth of peak resident memory
over the built model. MFU: 3 x flops_per_token x tokens/s over this machine's fp32 matmul peak,
measured in the same run; Llama's FLOPs are counted by our own all-attention model of its shape
(the same parameters, checked; attention causal-half), transformers' Mamba2 has no count. The
last column is the tokens/s ratio to Llama that equal MFU would give: Llama's FLOPs per token
over the row's, the ceiling for a model that runs its matmuls no better than Llama. Every row
carries both peers' figures at the same T and its ratios to them (tokens/s, and peak memory);
a peer that did not run says why. Read ratios, not absolute numbers: the machine is shared.

`--malloc heap` runs every child, ours and the peers alike, with glibc's malloc kept on its
heap (MALLOC_MMAP_THRESHOLD_ 1 GiB, MALLOC_TRIM_THRESHOLD_ 4 GiB): by default each tensor over
32 MiB is a fresh mmap, whose pages the kernel faults in and zeroes on every first touch; at
T = 8192 that dominates the elementwise work (docs/performance.md). Peak memory then counts
freed memory the heap keeps: read memory ratios from a default run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import torch
from measure import HEAP_MALLOC, matmul_peak_gflops, peak_rss_mb, rss_mb

from rnnscale.train.measure import cpu_live_bytes

OURS = {  # name: mixer pattern
    "rnnscale mamba2": ["mamba2"],
    "rnnscale gla": ["gla"],
    "rnnscale gated_deltanet": ["gated_deltanet"],
    "rnnscale gdn+attn 3:1": ["gated_deltanet", "gated_deltanet", "gated_deltanet", "attn"],
}
ATTENTION = {"rnnscale attn": ["attn"]}  # Llama's shape in our code; counts Llama's FLOPs too
PEERS = ["transformers Mamba2", "transformers Llama (sdpa)"]


def build(name: str, d: int, layers: int, vocab: int):
    """(model, loss function of input ids, flops per token or None)."""
    if name in OURS or name in ATTENTION:
        from rnnscale.train.config import from_dict
        from rnnscale.train.model import build_model

        heads = max(1, d // 64)
        model = build_model(
            from_dict(
                {
                    "model": {
                        "vocab_size": vocab,
                        "d_model": d,
                        "num_layers": layers,
                        "num_heads": heads,
                        "mixer_pattern": {**OURS, **ATTENTION}[name],
                        "tie_embeddings": False,
                    }
                }  # fmt: skip
            ).model
        )
        return model, lambda ids: model.loss(ids[:, :-1], ids[:, 1:]), model.flops_per_token
    import transformers

    if name == "transformers Mamba2":
        cfg = transformers.Mamba2Config(
            hidden_size=d, num_hidden_layers=layers, vocab_size=vocab, expand=2, head_dim=64,
            num_heads=2 * d // 64, state_size=128, n_groups=1, tie_word_embeddings=False,
        )  # fmt: skip
        model = transformers.Mamba2ForCausalLM(cfg)
    else:
        cfg = transformers.LlamaConfig(
            hidden_size=d, num_hidden_layers=layers, vocab_size=vocab, num_attention_heads=d // 64,
            num_key_value_heads=d // 64, intermediate_size=64 * -(-(8 * d) // 192),
            tie_word_embeddings=False, attn_implementation="sdpa",
            max_position_embeddings=1 << 16,
        )  # fmt: skip
        model = transformers.LlamaForCausalLM(cfg)
        return model, lambda ids: model(input_ids=ids, labels=ids).loss, llama_flops(model, d)
    return model, lambda ids: model(input_ids=ids, labels=ids).loss, None


def llama_flops(llama, d: int):
    """Llama's FLOPs per token, counted as ours are: by our own all-attention model of the same
    shape (fused q, k, v and o projections, rotary positions, the same SwiGLU, untied head,
    attention counted causal-half), whose parameter count must equal Llama's."""
    cfg = llama.config
    ours, _, flops = build("rnnscale attn", d, cfg.num_hidden_layers, cfg.vocab_size)
    mine, theirs = (sum(p.numel() for p in m.parameters()) for m in (ours, llama))
    if mine != theirs:
        raise SystemExit(f"our attention model has {mine} parameters, Llama {theirs}: not alike")
    return flops


def one_step(optimizer, loss_fn, ids) -> None:
    loss_fn(ids).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def step_seconds(optimizer, loss_fn, ids, steps: int) -> float:
    best = float("inf")
    for i in range(steps + 1):  # the first step is a warm-up
        start = time.perf_counter()
        one_step(optimizer, loss_fn, ids)
        if i:
            best = min(best, time.perf_counter() - start)
    return best


def child(name: str, T: int, d: int, layers: int, vocab: int, steps: int) -> None:
    """One (model, T) in a fresh process: print JSON with seconds, memory, params, flops."""
    torch.manual_seed(0)
    model, loss_fn, flops = build(name, d, layers, vocab)
    if os.environ.get(COMPILE_ENV):
        compile_blocks(model)
    if os.environ.get(KEEP_ENV) and hasattr(model, "recompute_activations"):
        model.recompute_activations = False  # kernels.recompute_activations: false
    before = rss_mb()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, vocab, (1, T + 1), generator=torch.Generator().manual_seed(0))
    seconds = step_seconds(optimizer, loss_fn, ids, steps)
    peak_mib = peak_rss_mb() - before
    params = sum(p.numel() for p in model.parameters())
    live = live_mib(optimizer, loss_fn, ids)
    result = {"seconds": seconds, "peak_mib": peak_mib, "live_mib": live, "params": params,
              "flops": flops(T) if flops else None}  # fmt: skip
    print(json.dumps(result))


def live_mib(optimizer, loss_fn, ids) -> float:
    """The live-tensor peak of one more step, MiB: the optimizer's state plus the most that
    the step's tensors hold at once (`cpu_live_bytes`: allocator bytes, what CUDA's
    max_memory_allocated counts), the parameters left out as in the resident-memory figure."""
    tensors = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    state = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    peak, _ = cpu_live_bytes(lambda: one_step(optimizer, loss_fn, ids))
    return (sum(state.values()) + peak) / 2**20


COMPILE_ENV = "RNNSCALE_BENCH_COMPILE"  # set by --compile for every child
KEEP_ENV = "RNNSCALE_BENCH_KEEP_ACTIVATIONS"  # set by --keep-activations for every child


def compile_blocks(model) -> None:
    """`torch.compile` every block in place, ours (`LanguageModel.compile_blocks`, the trainer's
    `train.compile`: the scans stay eager) and the peers' alike."""
    if hasattr(model, "compile_blocks"):
        return model.compile_blocks()
    inner = getattr(model, "model", None) or model.backbone  # Llama, or Mamba2
    for block in inner.layers:
        block.compile()


def run_child(name: str, T: int, dims: tuple[int, int, int, int], timeout: int,
              env: dict[str, str] | None = None) -> dict | str:  # fmt: skip
    """One (model, T) in a fresh process (`env` added to its environment): its JSON result, or
    why it did not run."""
    cmd = [sys.executable, __file__, "--child", name, *map(str, (T, *dims))]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, **(env or {})})  # fmt: skip
    except subprocess.TimeoutExpired:
        return f"over {timeout} s"
    if r.returncode < 0:  # killed: on this machine, by the kernel's OOM killer
        return f"killed by signal {-r.returncode} (out of memory)"
    if r.returncode != 0:
        errors = [x for x in r.stderr.splitlines() if "Error" in x] or ["failed"]
        return errors[-1][:120]
    return json.loads(r.stdout.strip().splitlines()[-1])


def peer_cells(T: int, m: dict | str, peer: dict | str) -> list[str]:
    """A peer's figures at this T, and this row's tokens/s and peak memory as multiples of the
    peer's (a peer's own row shows 1.00x)."""
    if isinstance(peer, str):
        return [f"not measured: {peer}", "-"]
    figures = (
        f"{T / peer['seconds']:.0f} tokens/s, {peer['peak_mib']:.0f} / {peer['live_mib']:.0f} MiB"
    )
    if isinstance(m, str):
        return [figures, "-"]
    speed = peer["seconds"] / m["seconds"]
    memory = (m[k] / max(peer[k], 1) for k in ("peak_mib", "live_mib"))
    return [figures, "{:.2f}x, {:.2f}x / {:.2f}x".format(speed, *memory)]


def row(name: str, T: int, results: dict[str, dict | str], peak: float) -> str:
    m = results[name]
    cells = [name, str(T)]
    if isinstance(m, str):
        cells += [f"not run: {m}", "", "", "", ""]
    else:
        mfu = f"{100 * 3 * m['flops'] * T / m['seconds'] / 1e9 / peak:.1f}%" if m["flops"] else "-"
        tokens_s, mib = f"{T / m['seconds']:.0f}", f"{m['peak_mib']:.0f}"
        cells += [f"{m['params'] / 1e6:.1f}M", tokens_s, mib, f"{m['live_mib']:.0f}", mfu]
    for peer in ("transformers Llama (sdpa)", "transformers Mamba2"):
        cells += peer_cells(T, m, results[peer])
    llama = results["transformers Llama (sdpa)"]
    bound = isinstance(m, dict) and isinstance(llama, dict) and m["flops"] and llama["flops"]
    cells.append(f"{llama['flops'] / m['flops']:.2f}x" if bound else "-")
    return "| " + " | ".join(cells) + " |"


def saved_mib(model, loss_fn, ids) -> float:
    """MiB that one forward leaves held for its backward: what the tensors it allocated still
    hold when it returns (`cpu_live_bytes`; a saved view holds its whole storage). Counted by
    the allocator, not by a saved-tensor hook, which would turn our recomputed activations off
    (rnnscale.kernels.common.recompute)."""
    graph = []  # the loss, and through it the graph, outlive the measured call
    _, held = cpu_live_bytes(lambda: graph.append(loss_fn(ids)))
    return held / 2**20


def saved_table(T: int) -> None:
    """`saved_mib` of each model at d_model 512, 4 layers, vocab 8192, one row of T tokens, and
    the same with our recomputed activations off (`kernels.recompute_activations: false`)."""
    print(f"activations saved for the backward, T = {T}, d_model 512, 4 layers, vocab 8192, fp32\n")
    print("| model | saved MiB | with recomputing off | peer: Llama (sdpa), saved MiB |")
    print("|---|---|---|---|")
    sizes = {}
    for name in [*OURS, *ATTENTION, "transformers Llama (sdpa)"]:
        torch.manual_seed(0)
        model, loss_fn, _ = build(name, 512, 4, 8192)
        ids = torch.randint(0, 8192, (1, T + 1))
        recomputing = saved_mib(model, loss_fn, ids)
        if hasattr(model, "recompute_activations"):
            model.recompute_activations = False
        sizes[name] = recomputing, saved_mib(model, loss_fn, ids)
    llama, _ = sizes["transformers Llama (sdpa)"]
    for name in [*OURS, *ATTENTION]:
        print(f"| {name} | {sizes[name][0]:.0f} | {sizes[name][1]:.0f} | {llama:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes: check it runs")
    parser.add_argument("--lengths", type=int, nargs="*", default=[2048, 8192])
    parser.add_argument("--steps", type=int, default=2, help="timed steps after the warm-up")
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per model and T")
    parser.add_argument(
        "--mamba2-max-len", type=int, default=None,
        help="longest T for transformers' Mamba2 (about 100 s a step at T = 2048 here)",
    )  # fmt: skip
    parser.add_argument("--saved", type=int, metavar="T", default=None,
                        help="what one forward at T keeps for the backward, per model")  # fmt: skip
    parser.add_argument(
        "--malloc",
        choices=["default", "heap"],
        default="default",
        help="heap: glibc's malloc keeps large tensors on its heap (every child)",
    )
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile every block, ours and the peers'")  # fmt: skip
    parser.add_argument("--keep-activations", action="store_true",
                        help="kernels.recompute_activations false for ours")  # fmt: skip
    parser.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.saved:
        return saved_table(args.saved)
    if args.child:
        name, *dims = args.child
        return child(name, *map(int, dims))
    d, layers, vocab = (64, 2, 256) if args.smoke else (512, 4, 8192)
    lengths = [64] if args.smoke else args.lengths
    steps = 1 if args.smoke else args.steps
    peak = matmul_peak_gflops(256 if args.smoke else 1024)
    print(
        f"machine: {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} "
        f"threads; fp32 matmul peak {peak:.1f} GFLOP/s; d_model {d}, {layers} layers, vocab {vocab}"
        f"; malloc: {args.malloc}; torch.compile: {'every block' if args.compile else 'no'}"
        f"; recomputed activations: {'off' if args.keep_activations else 'on'}"
    )
    print(
        "| model | T | params | tokens/s | peak memory MiB | live peak MiB | MFU | "
        "peer: Llama (sdpa), same T: tokens/s, peak / live MiB | "
        "tokens/s, memory vs Llama: peak / live | "
        "peer: transformers Mamba2, same T: tokens/s, peak / live MiB | "
        "tokens/s, memory vs Mamba2: peak / live | "
        "tokens/s vs Llama at Llama's MFU (its FLOPs per token over ours) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    env = dict(HEAP_MALLOC) if args.malloc == "heap" else {}
    if args.compile:
        env[COMPILE_ENV] = "1"  # the warm-up step compiles
    if args.keep_activations:
        env[KEEP_ENV] = "1"
    for T in lengths:
        results = {}
        for name in [*OURS, *ATTENTION, *PEERS]:
            if name == "transformers Mamba2" and T > (args.mamba2_max_len or T):
                results[name] = f"skipped above T = {args.mamba2_max_len} (--mamba2-max-len)"
                continue
            results[name] = run_child(name, T, (d, layers, vocab, steps), args.timeout, env)
        for name in [*OURS, *ATTENTION, *PEERS]:
            print(row(name, T, results, peak), flush=True)


if __name__ == "__main__":
    main()
