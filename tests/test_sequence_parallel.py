"""Sequence parallelism on CPU (gloo) with 2 and 4 processes: every mixer and a hybrid model
over slices of the sequence give the single-rank outputs and parameter gradients of the whole
sequence, with and without packed documents crossing the slice boundaries; the kernels' SP
forms honour a caller's initial state and return the true final states; the communication
volume of a recurrent layer does not depend on the sequence length."""

import functools
import json
import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_mixers import TINY, build_tiny

from rnnscale.train.model import MIXERS

TOL = 2e-5  # fp32: max |SP - single rank| relative to the largest magnitude of the reference
HYBRID = ["gated_deltanet", "mamba2", "gla", "attn", "rglru", "swa", "hgrn2", "retnet"]
T = 96  # slices of 48 (P = 2) or 24 (P = 4)
# documents: one starts before and ends after a slice boundary, one covers a whole slice of 4
# ranks, one starts exactly at a boundary (72), several start inside slices
PACKED = [0, 5, 60, 72, 80, 96]


def _model(pattern, **extra):
    cfg = {"vocab_size": 97, "d_model": 32, "num_layers": len(pattern), "num_heads": 2}
    cfg.update(mixer_pattern=pattern, **TINY)
    for key, value in extra.items():  # sections merge into TINY's, scalars replace
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) else value
    return build_tiny(cfg).float()


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


def _compare_model(groups, pattern, packed: bool, recompute=False, **extra) -> float:
    """Largest relative error of logits and every parameter's gradient (summed over the
    group) between the SP slices and the whole sequence on one rank; `recompute`: activation
    checkpointing, whose backward runs every block's collectives again."""
    model = _model(pattern, **extra)
    model.activation_checkpointing = recompute
    torch.manual_seed(1)
    ids = torch.randint(0, 97, (1 if packed else 2, T))
    weights = torch.randn(ids.shape[0], T, 97)
    cu = torch.tensor(PACKED, dtype=torch.int32) if packed else None
    params = [p for p in model.parameters()]
    logits, _ = model(ids, cu_seqlens=cu)
    full = torch.autograd.grad((logits * weights).sum(), params)
    shard = groups.shard(T, cu)
    local, _ = model(shard.local(ids), cu_seqlens=shard.cu_seqlens, shard=shard)
    grads = torch.autograd.grad((local * shard.local(weights)).sum(), params, allow_unused=True)
    errors = [_relative(local, shard.local(logits).detach())]
    for p, g_full, g in zip(params, full, grads, strict=True):
        g = torch.zeros_like(p) if g is None else g
        dist.all_reduce(g, group=shard.group)
        errors.append(_relative(g, g_full))
    return max(errors)


def _kernel_cases(groups) -> dict:
    """The SP kernels with a caller's initial state on rank 0, against one rank: outputs, the
    last rank's final state, and the gradients of q, k, v, gates and the initial state."""
    shard = groups.shard(T)
    errors = {}
    for name, (kernel, parallel, inputs, state) in _cases().items():
        leaves = [x.clone().requires_grad_() for x in (*inputs, state)]
        o, final = kernel(*leaves[:-1], initial_state=leaves[-1], output_final_state=True)
        weights = torch.randn_like(o)
        full = torch.autograd.grad((o * weights).sum() + final.sum(), leaves)
        local = [shard.local(x).detach().requires_grad_() for x in leaves[:-1]]
        S = leaves[-1].detach().clone().requires_grad_()
        o_sp, final_sp = parallel(*local, shard=shard, initial_state=S)
        last = final_sp.sum() if shard.rank == shard.size - 1 else 0.0 * final_sp.sum()
        grads = torch.autograd.grad((o_sp * shard.local(weights)).sum() + last, [*local, S],
                                    allow_unused=True)  # fmt: skip
        grads = [torch.zeros_like(S) if g is None else g for g in grads]  # scan: S on rank 0
        errs = [_relative(o_sp, shard.local(o).detach())]
        if shard.rank == shard.size - 1:
            errs.append(_relative(final_sp, final.detach()))
        for g, g_full in zip(grads[:-1], full[:-1], strict=True):
            errs.append(_relative(g, shard.local(g_full)))
        dist.all_reduce(grads[-1], group=shard.group)  # the state's gradient from every slice
        errs.append(_relative(grads[-1], full[-1]))
        errors[f"kernel:{name}"] = max(errs)
    return errors


def _exchanges_agree(groups) -> dict:
    """1.0 where the scan and the all-gather give different outputs or final states, bit for
    bit (both fold the same maps in the same order), else 0.0; packed documents included."""
    shard, packed = groups.shard(T), groups.shard(T, torch.tensor(PACKED, dtype=torch.int32))
    out = {}
    for name, (_, parallel, inputs, state) in _cases().items():
        for where, sh, S in (("rows", shard, state), ("packed", packed, None)):
            local = [sh.local(x[:1] if S is None else x) for x in inputs]
            got = []
            for groups.state_exchange in ("scan", "allgather"):
                sh.state_exchange = groups.state_exchange
                got.append(parallel(*local, shard=sh, initial_state=S, cu_seqlens=sh.cu_seqlens))
            same = all(torch.equal(a, b) for a, b in zip(*got, strict=True))
            out[f"same:{name}:{where}"] = float(not same)
    groups.state_exchange = "scan"
    return out


def _cases() -> dict:
    """(kernel, its SP form, inputs, initial state) of every family, rows of T tokens."""
    from rnnscale.kernels.delta import chunk_delta_product, chunk_gated_delta_rule
    from rnnscale.kernels.gla import chunk_gla
    from rnnscale.kernels.scan import linear_scan
    from rnnscale.kernels.simple_gla import chunk_simple_gla
    from rnnscale.parallel import state_passing as sp

    torch.manual_seed(2)
    B, H, K, V = 2, 2, 8, 4
    q, k = torch.randn(B, T, H, K), torch.nn.functional.normalize(torch.randn(B, T, H, K), dim=-1)
    v = torch.randn(B, T, H, V)
    g_key = -torch.rand(B, T, H, K) * 0.2
    g_head = -torch.rand(B, T, H) * 0.2
    beta = torch.rand(B, T, H) * 1.5
    kp = torch.nn.functional.normalize(torch.randn(B, T, 2, H, K), dim=-1)
    vp, betap = torch.randn(B, T, 2, H, V), torch.rand(B, T, 2, H)
    S0 = torch.randn(B, H, K, V)
    a, b, h0 = torch.rand(B, T, 6) * 0.5 + 0.5, torch.randn(B, T, 6), torch.randn(B, 6)
    cases = {
        "gla": (chunk_gla, sp.chunk_gla_sp, (q, k, v, g_key), S0),
        "simple_gla": (chunk_simple_gla, sp.chunk_simple_gla_sp, (q, k, v, g_head), S0),
        # Mamba2's B and C: one q and k shared by both heads, never repeated
        "simple_gla_grouped": (chunk_simple_gla, sp.chunk_simple_gla_sp,
                               (q[:, :, :1], k[:, :, :1], v, g_head), S0),
        "delta": (chunk_gated_delta_rule, sp.chunk_gated_delta_rule_sp,
                  (q, k, v, g_head, beta), S0),
        "delta_product": (chunk_delta_product, sp.chunk_delta_product_sp,
                          (q, kp, vp, g_head, betap), S0),
        "scan": (linear_scan, sp.linear_scan_sp, (a, b), h0),
        # the delta rule's identity columns through the Triton kernel (interpreted on CPU)
        "delta_triton": (chunk_gated_delta_rule, functools.partial(
            sp.chunk_gated_delta_rule_sp, backend="triton", chunk_size=16),
            (q, k, v, g_head, beta), S0),
        # gla and simple_gla's chunk-parallel kernels carry the SP initial state the same way
        "gla_triton": (chunk_gla, functools.partial(sp.chunk_gla_sp, backend="triton",
                       chunk_size=16), (q, k, v, g_key), S0),
        "simple_gla_triton": (chunk_simple_gla, functools.partial(
            sp.chunk_simple_gla_sp, backend="triton", chunk_size=16), (q, k, v, g_head), S0),
    }  # fmt: skip
    return cases


def _recurrent_state_numel(model) -> int:
    """Elements of one row's recurrent state in the layer's own decoding state: the matrix
    `[1, H, K, V]` or the vector `[1, D]` (not the convolutions' `[1, D, w]` or a count)."""
    _, (state,) = model(torch.zeros(1, 4, dtype=torch.long))
    tensors = [state] if torch.is_tensor(state) else state
    (recurrent,) = [x for x in tensors if torch.is_tensor(x) and x.dim() in (2, 4)]
    return recurrent.numel()


def _bytes_per_layer(groups, length: int) -> dict:
    """SP bytes one rank sends for one forward and backward of each recurrent mixer (one row),
    with the elements of its recurrent state."""
    sent = {}
    for name in MIXERS:
        if name in ("attn", "swa"):
            continue
        model = _model([name])
        shard = groups.shard(length)
        ids = torch.randint(0, 97, (1, length))
        groups.stats.take()
        logits, _ = model(shard.local(ids), shard=shard)
        logits.sum().backward()
        sent[name] = {**groups.stats.take(), "numel": _recurrent_state_numel(model)}
    return sent


def _worker(rank: int, world: int, port: int, out: str, job: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=120))  # fmt: skip
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    from rnnscale.parallel.layout import ParallelLayout
    from rnnscale.parallel.sequence import ParallelGroups

    groups = ParallelGroups(ParallelLayout(world, world, rank))  # the scan exchange
    results = {}
    if job == "equal":
        from rnnscale.parallel import state_exchange

        state_exchange.MIN_PIECE_BYTES = 0  # the tiny states travel in 4 pieces, as large ones
        for packed in (False, True):
            for name in MIXERS:
                results[f"{name}:{'packed' if packed else 'rows'}"] = _compare_model(
                    groups, [name], packed
                )
            results[f"hybrid:{'packed' if packed else 'rows'}"] = _compare_model(
                groups, HYBRID, packed
            )
        results["hybrid:packed:recompute"] = _compare_model(groups, HYBRID, True, recompute=True)
        # attention whose 3 heads do not split over the group: all-gather of keys and values
        results["attn_kv_gather:packed"] = _compare_model(
            groups, ["attn"], True, d_model=48, num_heads=3
        )
        results["deltaproduct:packed"] = _compare_model(
            groups, ["gated_deltanet"], True,
            gated_deltanet={"num_householder": 2, "allow_neg_eigval": True},
        )  # fmt: skip
        results.update(_kernel_cases(groups))
        results.update(_exchanges_agree(groups))
        # the all-gather exchange (parallel.sp_state_exchange=allgather)
        groups.state_exchange = "allgather"
        results.update({f"allgather:{k}": v for k, v in _kernel_cases(groups).items()})
        results["allgather:hybrid:packed"] = _compare_model(groups, HYBRID, True)
    else:
        for groups.state_exchange in ("scan", "allgather"):
            for length in (256, 1024):
                results[f"{groups.state_exchange}:{length}"] = _bytes_per_layer(groups, length)
    if rank == 0:
        print(json.dumps(results, indent=1))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


def _run(world: int, tmp_path, job: str) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(world, port, str(tmp_path), job), nprocs=world)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.mark.parametrize("world", [2, 4])
def test_every_mixer_and_a_hybrid_equal_the_single_rank_run(tmp_path, world):
    results = _run(world, tmp_path, "equal")
    worst = {case: max(r[case] for r in results) for case in results[0]}
    assert len(worst) == 2 * (len(MIXERS) + 1) + 3 + 2 * 9 + 1 + 2 * 9
    bad = {case: err for case, err in worst.items() if not err < TOL}
    assert not bad, f"relative errors above {TOL}: {bad}"


@pytest.mark.parametrize("world", [2, 4])
def test_recurrent_layers_send_one_state_each_way_at_any_length(tmp_path, world):
    """Runtime counts of every recurrent mixer equal the accounting formulas: the scan sends
    one fp32 state to each neighbour (never the transition), at any length and any P; the
    all-gather sends (P - 1) (transition + state) each way. GLA's transition: a decay per key."""
    from rnnscale.parallel.sequence import state_passing_bytes
    from rnnscale.parallel.state_exchange import scan_bytes

    results = _run(world, tmp_path, "bytes")
    gla = _model(["gla"]).blocks[0].mixer
    H, K, V = gla.num_heads, gla.key_dim // gla.num_heads, gla.value_dim // gla.num_heads
    for rank, counts in enumerate(results):
        assert counts["scan:256"] == counts["scan:1024"]
        assert counts["allgather:256"] == counts["allgather:1024"]
        for name, sent in counts["scan:256"].items():
            assert sent["state"] == scan_bytes(world, rank, sent["numel"]), (rank, name, sent)
            assert sent["state"] <= 2 * 4 * sent["numel"]
        both = [counts["allgather:256"][n]["state"] for n in ("gla", "gated_deltanet")]
        assert both[0] == state_passing_bytes(world, H * K, H * K * V)
        assert both[1] > 2 * (world - 1) * 4 * counts["scan:256"]["gated_deltanet"]["numel"]
