"""Choosing between the PyTorch and the Triton path, and what every Triton launch needs.

`backend="auto"` runs Triton on CUDA tensors when Triton imports, PyTorch otherwise.
`backend="triton"` on CPU tensors runs the kernels in Triton's interpreter, which is how the
tests check them; that needs `TRITON_INTERPRET=1` in the environment before the kernels are
first imported (Triton reads it when it decorates the kernels).

The Triton kernels run one program per (sequence, head) that walks the sequence's chunks in
order (forward) or in reverse (backward). Sequences are given to them as offsets: `bounds`
`[N + 1]` (the rows of a batch laid end to end, or `cu_seqlens`) and `chunk_offsets` `[N + 1]`
(where each sequence's chunks start among all M chunks; the forward stores the state entering
every chunk there for the backward, memory linear in T).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os

import torch

from rnnscale.kernels.common.chunks import sequence_bounds

BACKENDS = ("auto", "torch", "triton")
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.cache
def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """ "torch" or "triton" for inputs on `x`'s device; a clear error for what cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if backend == "auto":
        return "triton" if x.is_cuda and triton_importable() else "torch"
    if backend == "triton":
        if not triton_importable():
            raise ValueError("backend='triton' needs the triton package; use backend='torch'")
        if not x.is_cuda and not interpreting():
            raise ValueError(
                "backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before import "
                "to run the kernels on CPU in Triton's interpreter; use backend='torch' on CPU"
            )
    return backend


def check_triton(chunk_size: int, tensors: dict[str, torch.Tensor]) -> None:
    """What the Triton path adds to the shared checks: a chunk a power of two >= 16 (the size
    `tl.dot` needs), and inputs of one floating dtype it computes with."""
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(
            f"chunk_size must be a power of two >= 16 for backend='triton', got {chunk_size}"
        )
    dtypes = {name: x.dtype for name, x in tensors.items()}
    first, dtype = next(iter(dtypes.items()))
    if dtype not in TRITON_DTYPES:
        raise ValueError(
            f"{first} has dtype {dtype}; backend='triton' computes in float32, bfloat16 or "
            "float16 (use backend='torch' for float64)"
        )
    for name, other in dtypes.items():
        if other != dtype:
            raise ValueError(f"{name} has dtype {other} but {first} has {dtype}; pass one dtype")


def sequence_offsets(
    B: int, T: int, cu_seqlens: torch.Tensor | None, C: int, device
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """`(bounds [N + 1], chunk_offsets [N + 1], M)` as int32 on `device`: token offsets of the
    sequences in the flat `[B * T]` layout, and where each one's chunks start."""
    bounds, offsets = sequence_bounds(B, T, cu_seqlens, C)
    as_tensor = functools.partial(torch.tensor, dtype=torch.int32, device=device)
    return as_tensor(bounds), as_tensor(offsets), offsets[-1]


def state_buffers(x: torch.Tensor, B: int, T: int, cu_seqlens, C: int, state: tuple, h0):
    """What every Triton forward allocates: `(bounds, chunk_offsets, ht, hs, h0_in)`: the
    offsets, the final states `ht [N, *state]` and the states entering every chunk
    `hs [M, *state]` (fp32, kept for the backward), and the initial states to read (`ht`, not
    read, when there are none)."""
    bounds, offsets, M = sequence_offsets(B, T, cu_seqlens, C, x.device)
    N = bounds.numel() - 1
    ht = x.new_empty(N, *state, dtype=torch.float32)
    hs = x.new_empty(max(M, 1), *state, dtype=torch.float32)
    return bounds, offsets, ht, hs, ht if h0 is None else h0.contiguous()


def chunk_table(bounds: torch.Tensor, offsets: torch.Tensor, C: int) -> torch.Tensor:
    """`[M, 2]` int32 on the device of `bounds`: the first and the end token of every chunk,
    for the kernels that run one program per chunk (chunk m of all M in the order of
    `chunk_offsets`: sequence by sequence)."""
    b, f = bounds.tolist(), offsets.tolist()
    rows = [(s + c * C, min(s + (c + 1) * C, e))
            for s, e, n in zip(b[:-1], b[1:], [y - x for x, y in zip(f[:-1], f[1:])])
            for c in range(n)]  # fmt: skip
    return torch.tensor(rows or [(0, 0)], dtype=torch.int32, device=bounds.device).view(-1, 2)


def tuned(kernel, key: list[str], configs: list | None = None):
    """`kernel` autotuned over `configs` (default `TUNE_CONFIGS`) keyed by `key` on a GPU; in
    the interpreter, which has no GPU to time, the kernel itself (launched with the first
    config's num_warps)."""
    if interpreting():
        return kernel
    import triton

    return triton.autotune(configs=configs or tune_configs(), key=key)(kernel)


def tune_configs() -> list:
    """The launch configurations the autotuner tries for every chunk-parallel kernel; the sm_90
    fit report (`python -m rnnscale.kernels.sm90`) compiles each of them. 8 warps: at 4, the
    64 x 64 tiles with their gates spill registers (up to 1.5 KB in `_la_dqk`); 3 stages spill
    in gla's state pass."""
    import triton

    return [triton.Config({}, num_warps=8, num_stages=s) for s in (1, 2)]


def state_grads(x: torch.Tensor, N: int, state: tuple, dht):
    """What every Triton backward allocates: `(dh0, dht)`, the initial states' gradient and the
    final states' incoming one (zeros when the final state was not used), fp32, contiguous."""
    dh0 = x.new_empty(N, *state, dtype=torch.float32)
    dht = x.new_zeros(N, *state, dtype=torch.float32) if dht is None else dht.float()
    return dh0, dht.contiguous()


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs keep fp32 products (tests compare them at 1e-5); bf16 and fp16 inputs go to
    `tl.dot` in their own dtype (tensor cores at the half-precision rate, fp32 accumulation),
    where this setting does not apply."""
    return "ieee" if dtype == torch.float32 else "tf32"


def dot_args(dtype: torch.dtype) -> dict:
    """The chunk-parallel kernels' `PREC` (see `dot_precision`) and `MT`, the dtype `tl.dot`
    takes: the inputs' own (bf16 or fp16 on tensor cores, fp32 for fp32). Triton's interpreter
    multiplies bf16 blocks wrongly (Triton 3.8: garbage of size 1e9), so there the operands are
    rounded to bf16 as on a GPU and multiplied in fp32."""
    import triton.language as tl

    mt = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
    exact = dtype == torch.float32 or (dtype == torch.bfloat16 and interpreting())
    return {"PREC": dot_precision(dtype), "MT": tl.float32 if exact else mt[dtype]}


def tile(width: int) -> int:
    """The block a K or V width is tiled by: its power of two, at least 16 (`tl.dot`'s
    smallest), at most 64 (a 64 x 64 fp32 state tile per program)."""
    import triton

    return min(64, max(16, triton.next_power_of_2(width)))


def dispatch(backend: str, x: torch.Tensor, torch_fn, triton_fn: str, *args, **kwargs):
    """Call `torch_fn` or the Triton function named "module:function" (imported only when it
    runs, so CPU-only installs never import Triton) with `args` and `kwargs`; a `chunk_size`
    of None is left to each path's own default."""
    if kwargs.get("chunk_size", 0) is None:
        del kwargs["chunk_size"]
    if resolve_backend(backend, x) == "torch":
        return torch_fn(*args, **kwargs)
    module, name = triton_fn.split(":")
    return getattr(importlib.import_module(module), name)(*args, **kwargs)
