"""Training steps of the 1.3B recipes on one GPU in `make gpu-check`, beside transformers' Llama.

Each model in a child of its own (`gpu_check.py --child train-time`), with a time limit:
rnnscale's model built by its own code from the recipe (`load_config`, `build_model`, the
recipe's kernels section: backend auto, so Triton on CUDA, and its chunk sizes), weights and
gradients in bf16 on the GPU (no fp32 master copy: DeepSpeed's bf16 mode keeps one, an
update a small share of the step), a plain `torch.optim.AdamW` step (fused on CUDA, the
recipe's lr, betas and weight decay; no gradient clipping), at the recipe's micro-batch and
sequence length (8 x 2048). Warm-up steps (compiles, autotuning) and then timed steps, each
between two `torch.cuda.synchronize()`: tokens/s over the timed steps, and MFU as the trainer
counts it (train/trainer.py): 3 x `flops_per_token(T)` x tokens/s over a peak, here the GPU's
bf16 dense peak from its datasheet, and also the matmul yardstick this run measured.

The peer: transformers' LlamaForCausalLM of the same width, depth, vocabulary and untied head,
32 heads of 64, the SwiGLU width ours uses (8/3 d rounded up to 64: 5504), SDPA attention,
the same batch, dtype, optimizer and timing; its FLOPs counted by the same formulas (our
model with attention in every layer, on the meta device). One Llama per depth the recipes use.
"""

from __future__ import annotations

import time

from gpu_common import ROOT, by_stage, first_line, sync

RECIPES = ("gla-1.3b", "gated_deltanet-1.3b", "mamba2-1.3b")
WARMUP, STEPS = 2, 5
DRY_WARMUP, DRY_STEPS = 1, 2
DRY = ["model.d_model=64", "model.num_layers=2", "model.vocab_size=256",
       "train.micro_batch_size=2", "train.seq_len=64"]  # fmt: skip
DRY_MIXER = {
    "gated_deltanet-1.3b": ["model.gated_deltanet.head_dim=16"],
    "mamba2-1.3b": ["model.mamba2.head_dim=16", "model.mamba2.state_size=16"],
}
LLAMA = ["model.mixer_pattern=[attn]"]  # + num_heads = d_model / 64, set per recipe
# bf16 dense tensor-core peaks (TFLOP/s): NVIDIA's datasheets give them with 2:4 sparsity;
# dense is half. Matched against torch.cuda.get_device_name(), first match wins.
BF16_PEAKS = [
    ("H200 NVL", 835.5, "NVIDIA H200 NVL datasheet: 1671 TFLOP/s bf16 with sparsity, half dense"),
    ("H200", 989.5, "NVIDIA H200 SXM datasheet: 1979 TFLOP/s bf16 with sparsity, half dense"),
    ("H100 NVL", 835.5, "NVIDIA H100 NVL datasheet: 1671 TFLOP/s bf16 with sparsity, half dense"),
    ("H100 PCIe", 756.5, "NVIDIA H100 PCIe datasheet: 1513 TFLOP/s bf16 with sparsity, half dense"),
    ("H100", 989.5, "NVIDIA H100 SXM datasheet: 1979 TFLOP/s bf16 with sparsity, half dense"),
]


def datasheet_peak(gpu: str | None) -> tuple[float | None, str]:
    for key, tflops, source in BF16_PEAKS:
        if gpu and key in gpu:
            return tflops, source
    return None, f"no datasheet peak for {gpu or 'this device'} in benchmarks/gpu_train.py"


def recipe(name: str) -> str:
    return f"configs/recipes/{name}.yaml"


def cases(dry: bool, peak: dict) -> list[dict]:
    """Ours per recipe, then one Llama per (width, depth, vocabulary, batch) they need;
    `peak`: {"peak_tflops", "peak_source", "yardstick_tflops"} for MFU."""
    from rnnscale.train.config import load_config

    out, peers = [], {}
    for name in RECIPES:
        over = [*DRY, *DRY_MIXER.get(name, [])] if dry else []
        cfg = load_config(ROOT / recipe(name), over)
        m, t = cfg.model, cfg.train
        key = (m.d_model, m.num_layers, m.vocab_size, t.micro_batch_size, t.seq_len)
        peer = f"transformers Llama (sdpa) {m.num_layers} layers"
        out.append(dict(name=f"rnnscale {name}", kind="ours", recipe=recipe(name), overrides=over,
                        peer=peer, **peak))  # fmt: skip
        heads = [f"model.num_heads={max(1, m.d_model // 64)}"]
        peers.setdefault(key, dict(name=peer, kind="llama", recipe=recipe(name),
                                   overrides=[*over, *LLAMA, *heads], **peak))  # fmt: skip
    return out + list(peers.values())


def precompile_cases(dry: bool) -> list[dict]:
    """Ours at one layer, B = 1, T = 128: the same kernels and signatures as the full model."""
    small = ["model.num_layers=1", "train.micro_batch_size=1", "train.seq_len=128"]
    return [dict(c, name=f"{c['name']} (compile)", overrides=[*c["overrides"], *small])
            for c in cases(dry, {}) if c["kind"] == "ours"]  # fmt: skip


def build(case: dict, cfg, T: int):
    """(model, loss of ids [B, T + 1], forward FLOPs per token) on the current default device."""
    import torch

    from rnnscale.train.model import build_model

    if case["kind"] == "ours":
        model = build_model(cfg.model, cfg.kernels)
        return model, lambda ids: model.loss(ids[:, :-1], ids[:, 1:]), model.flops_per_token(T)
    import transformers

    from rnnscale.train.model.layers import mlp_hidden_size

    m = cfg.model
    with torch.device("meta"):  # our attention layers: the same FLOP count as Llama's
        flops = build_model(m, cfg.kernels).flops_per_token(T)
    llama = transformers.LlamaConfig(
        hidden_size=m.d_model, num_hidden_layers=m.num_layers, vocab_size=m.vocab_size,
        num_attention_heads=m.num_heads, num_key_value_heads=m.num_heads,
        intermediate_size=mlp_hidden_size(m.d_model, m.mlp_hidden), rms_norm_eps=m.norm_eps,
        tie_word_embeddings=m.tie_embeddings, max_position_embeddings=max(T, 2048),
        attn_implementation="sdpa",
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(llama)
    return model, lambda ids: model(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss, flops


def child(mode: str, case: dict, emit, dry: bool) -> None:
    """mode "train-precompile": one step (compiles and autotunes); "train-time": warm-up steps,
    then timed steps, tokens/s and MFU."""
    import torch

    from rnnscale.train.config import load_config

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = load_config(ROOT / case["recipe"], case["overrides"])
    B, T = cfg.train.micro_batch_size, cfg.train.seq_len
    torch.manual_seed(0)
    start = time.perf_counter()
    with device:
        model, loss_fn, flops = build(case, cfg, T)
    model.to(torch.bfloat16).train()
    o = cfg.optim
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                            weight_decay=o.weight_decay, fused=device.type == "cuda")  # fmt: skip
    ids = torch.randint(cfg.model.vocab_size, (B, T + 1), device=device)
    params = sum(p.numel() for p in model.parameters())
    emit(stage="built", device=str(device), B=B, T=T, params=params, flops_per_token=flops,
         build_s=time.perf_counter() - start)  # fmt: skip
    warmup, steps = (DRY_WARMUP, DRY_STEPS) if dry else (WARMUP, STEPS)
    if mode == "train-precompile":
        warmup, steps = 1, 0
    times = []
    for i in range(warmup + steps):
        sync()
        start = time.perf_counter()
        loss = loss_fn(ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - start)
        emit(stage=f"step {i}", s=times[-1], loss=float(loss), warmup=i < warmup)
    if steps:
        emit(stage="result", **result(case, times[warmup:], B * T, flops, device))


def result(case: dict, times: list[float], tokens: int, flops: float, device) -> dict:
    import torch

    from rnnscale.train.measure import measure_peak_flops, peak_memory_gb

    tps = tokens * len(times) / sum(times)
    out = {"tokens_per_s": tps, "step_s_median": sorted(times)[len(times) // 2],
           "peak_memory_gb": peak_memory_gb(device)}  # fmt: skip
    yard = case.get("yardstick_tflops")
    if not yard:  # what the trainer does without train.peak_tflops
        yard = measure_peak_flops(device, "bf16") / 1e12
        out["yardstick_source"] = "measured in this child: rnnscale.train.measure (bf16)"
    out["mfu_vs_yardstick"] = 3 * flops * tps / (yard * 1e12)
    if case.get("peak_tflops"):
        out["mfu"] = 3 * flops * tps / (case["peak_tflops"] * 1e12)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


# ------------------------------------------------------------------------------------------
# the parent's side


def describe(got: dict) -> str:
    st = by_stage(got.get("records", []))
    r = st.get("result")
    if r:
        mfu = f", MFU {r['mfu']:.1%}" if "mfu" in r else ""
        return (f"{r['tokens_per_s']:.4g} tokens/s{mfu}, MFU vs yardstick "
                f"{r['mfu_vs_yardstick']:.1%}, {r['peak_memory_gb']:.1f} GiB")  # fmt: skip
    if "error" in st:
        return first_line(st["error"]["error"])
    return got.get("skipped") or got.get("note") or f"no result (exit {got.get('returncode')})"


HEADER = [
    "| model | params | B x T | tokens/s | step s (median) | MFU (bf16 dense peak) "
    "| MFU (matmul yardstick) | peak memory GiB | peer: Llama (sdpa) tokens/s | ours/Llama "
    "tokens/s | Llama MFU (bf16 dense peak) |",
    "|" + "---|" * 11,
]


def table(entries: list[dict]) -> list[str]:
    """Ours, one row per recipe, with its Llama's figures beside it."""
    results = {e["case"]["name"]: outcome(e.get("timing", {})) for e in entries}
    lines = list(HEADER)
    for entry in entries:
        case = entry["case"]
        if case["kind"] != "ours":
            continue
        mine, peer = results[case["name"]], results.get(case["peer"], "not run: no peer case")
        built = by_stage(entry.get("timing", {}).get("records", [])).get("built", {})
        n = built.get("params", 0)
        size = f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.3g}M" if n else "none"
        shape = f"{built['B']} x {built['T']}" if "B" in built else "none"
        cells = [case["name"], size, shape]
        if isinstance(mine, dict):
            cells += [f"{mine['tokens_per_s']:.4g}", f"{mine['step_s_median']:.3f}",
                      pct(mine.get("mfu")), pct(mine["mfu_vs_yardstick"]),
                      f"{mine['peak_memory_gb']:.1f}"]  # fmt: skip
        else:
            cells += [mine, "none", "none", "none", "none"]
        if isinstance(peer, dict):
            ratio = (
                f"{mine['tokens_per_s'] / peer['tokens_per_s']:.2f}"
                if isinstance(mine, dict)
                else "none"
            )
            cells += [f"{peer['tokens_per_s']:.4g}", ratio, pct(peer.get("mfu"))]
        else:
            cells += [peer, "none", "none"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def pct(x: float | None) -> str:
    return f"{x:.1%}" if x is not None else "none (no datasheet peak)"


def outcome(timing: dict):
    """The child's result record, or why there is none ("not measured: ...")."""
    st = by_stage(timing.get("records", []))
    if "result" in st:
        return st["result"]
    if timing.get("skipped"):
        return timing["skipped"]
    if "error" in st:
        return f"not measured: {first_line(st['error']['error'], 160)}"
    if timing.get("timed_out"):
        return f"not measured: {timing.get('note', 'killed at its time limit')}"
    return f"not measured: the child exited {timing.get('returncode')} without a result"
