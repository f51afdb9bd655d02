"""Cross-entropy over a large vocabulary without the `[tokens, vocab]` logits in memory.

Legend: N tokens, D model width, V vocabulary size, C tokens per chunk.

`chunked_cross_entropy(hidden [N, D], weight [V, D], labels [N])` is `F.cross_entropy(hidden @
weight^T, labels)` (mean over labels != ignore_index) computed C tokens at a time. Each chunk's
logits live only inside the forward: the gradients of the loss with respect to the chunk's
hidden states and to the head weight are known there in closed form, `dlogits = softmax -
onehot`, so the forward accumulates them and the backward only scales them. Peak extra memory
is C x V logits (fp32) instead of N x V, e.g. 4096 x 128K x 4 B = 2 GiB instead of 64 GiB for
N = 128K tokens. The logits and the softmax are computed in fp32 whatever the input dtype.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_tokens, needs_grad, count):
        N = hidden.shape[0]
        valid = labels != IGNORE_INDEX
        count = (valid.sum() if count is None else count).clamp(min=1)
        total = hidden.new_zeros((), dtype=torch.float32)
        d_hidden = torch.zeros_like(hidden, dtype=torch.float32) if needs_grad else None
        d_weight = torch.zeros_like(weight, dtype=torch.float32) if needs_grad else None
        w = weight.float()
        for start in range(0, N, chunk_tokens):
            h = hidden[start : start + chunk_tokens].float()  # (C, D)
            y = labels[start : start + chunk_tokens]  # (C,)
            ok = valid[start : start + chunk_tokens]  # (C,)
            logits = h @ w.T  # (C, V)
            lse = logits.logsumexp(-1)  # (C,)
            target = logits.gather(1, y.clamp(min=0)[:, None])[:, 0]  # (C,)
            total += ((lse - target) * ok).sum()
            if needs_grad:
                d_logits = (logits - lse[:, None]).exp_()  # softmax, (C, V)
                d_logits[torch.arange(len(y)), y.clamp(min=0)] -= 1.0
                d_logits *= (ok / count)[:, None]
                d_hidden[start : start + chunk_tokens] = d_logits @ w
                d_weight += d_logits.T @ h
        ctx.save_for_backward(d_hidden, d_weight)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return total / count

    @staticmethod
    def backward(ctx, grad):
        d_hidden, d_weight = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        grads = (d_hidden * grad).to(h_dtype), (d_weight * grad).to(w_dtype)
        return *grads, None, None, None, None


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_tokens: int = 4096,
    count: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of `hidden [N, D] @ weight [V, D]^T` against `labels [N]` (entries of
    IGNORE_INDEX = -100 are left out of the mean), C = `chunk_tokens` at a time. `count`: divide
    the summed losses by this many tokens instead of the labels' own (a slice of longer rows
    under sequence parallelism)."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden must be [N, D] and weight [V, D], got {tuple(hidden.shape)} and "
            f"{tuple(weight.shape)}"
        )
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels must be [N] = [{hidden.shape[0]}], got {tuple(labels.shape)}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _ChunkedCrossEntropy.apply(hidden, weight, labels, chunk_tokens, needs_grad, count)


@torch.no_grad()
def chunked_token_scores(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token, without the `[N, V]` logits: the cross-entropy `[N]` (fp32) of `hidden [N, D]
    @ weight^T` against `labels [N]`, and whether the most likely token is the label `[N]`
    (evaluation: log-likelihoods and greedy matches; IGNORE_INDEX labels score 0 and False)."""
    nll = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    right = torch.zeros(hidden.shape[0], dtype=torch.bool, device=hidden.device)
    w = weight.float()
    for start in range(0, hidden.shape[0], chunk_tokens):
        logits = hidden[start : start + chunk_tokens].float() @ w.T  # (C, V)
        y = labels[start : start + chunk_tokens]
        ok = y != IGNORE_INDEX
        target = logits.gather(1, y.clamp(min=0)[:, None])[:, 0]
        nll[start : start + chunk_tokens] = (logits.logsumexp(-1) - target) * ok
        right[start : start + chunk_tokens] = (logits.argmax(-1) == y) & ok
    return nll, right
