"""Input checks shared by the public kernels: every message names the argument and the fix."""

from __future__ import annotations

import torch


def check_shape(name: str, x: torch.Tensor, shape: tuple, legend: str) -> None:
    """`x` must have `shape` (ints, or None for any size); `legend` spells it, e.g. "[B, T, H]"."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a tensor {legend}, got {type(x).__name__}")
    ok = x.dim() == len(shape) and all(s is None or s == d for s, d in zip(shape, x.shape))
    if not ok:
        raise ValueError(f"{name} must have shape {legend} = {_spell(shape)}, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")


def check_sequences(B: int, T: int, cu_seqlens: torch.Tensor | None) -> int:
    """Validate `cu_seqlens` against a `[B, T]` batch; return N, the number of sequences."""
    if cu_seqlens is None:
        return B
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1:
        raise ValueError("cu_seqlens must be a 1-D integer tensor [N + 1] of document offsets")
    if cu_seqlens.is_floating_point() or cu_seqlens.dtype == torch.bool:
        raise ValueError(f"cu_seqlens must hold integers (int32), got {cu_seqlens.dtype}")
    if B != 1:
        raise ValueError(f"cu_seqlens needs a packed batch with B = 1, got B = {B}")
    bounds = cu_seqlens.tolist()
    if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != T:
        raise ValueError(f"cu_seqlens must rise from 0 to T = {T}, got {bounds}")
    if any(a > b for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"cu_seqlens must not decrease, got {bounds}")
    return len(bounds) - 1


def check_state(initial_state: torch.Tensor | None, shape: tuple, legend: str) -> None:
    if initial_state is not None:
        check_shape("initial_state", initial_state, shape, legend)


def check_chunk_size(chunk_size: int) -> None:
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")


def repeat_groups(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Grouped q or k `[B, T, G, K]` repeated to v's H heads `[B, T, H, K]` (head h reads group
    h // (H / G)), for the forms that take one q and k per head; unchanged when G = H. A G that
    does not divide H is left for the kernel's check to name."""
    G, H = x.shape[2], v.shape[2]
    return x if G == H or H % G else x.repeat_interleave(H // G, dim=2)


def _spell(shape: tuple) -> str:
    return "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"


def check_linear_attention(
    q, k, v, gates: dict, initial_state, cu_seqlens, chunk_size, grouped: bool = False
) -> tuple[int, int, int, int]:
    """Checks for the q/k/v families; `gates` maps a name to (tensor, per_key): per-key gates are
    `[B, T, H, K]`, per-head ones `[B, T, H]`. `grouped`: q and k may have G heads, each shared
    by H / G consecutive heads of v (Mamba2's groups). Returns (B, T, H, K)."""
    check_shape("q", q, (None, None, None, None), "[B, T, H, K]")
    B, T, H, K = q.shape
    check_shape("k", k, (B, T, H, K), "[B, T, G, K]" if grouped else "[B, T, H, K]")
    if grouped:
        check_shape("v", v, (B, T, None, None), "[B, T, H, V]")
        if v.shape[2] % H:
            raise ValueError(f"q and k have {H} heads (groups), which must divide v's "
                             f"{v.shape[2]} heads: repeat them to H heads or regroup")  # fmt: skip
        H = v.shape[2]
    check_shape("v", v, (B, T, H, None), "[B, T, H, V]")
    for name, (x, per_key) in gates.items():
        if per_key:
            check_shape(name, x, (B, T, H, K), "[B, T, H, K]")
        else:
            check_shape(name, x, (B, T, H), "[B, T, H]")
    N = check_sequences(B, T, cu_seqlens)
    check_state(initial_state, (N, H, K, v.shape[-1]), "[N, H, K, V]")
    check_chunk_size(chunk_size)
    return B, T, H, K
