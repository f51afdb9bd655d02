"""Sampling from a trained model with its recurrent form: the prompt runs once in parallel
(chunkwise scans, attention), then every new token is one step that carries the state: O(1)
per token for recurrent layers, a key/value cache for `attn`, a rolling window for `swa`."""

from __future__ import annotations

import torch

from rnnscale.train.model import LanguageModel


@torch.no_grad()
def generate(
    model: LanguageModel,
    prompt: list[int],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    stop_id: int | None = None,
    num_tokens: int | None = None,
    generator: torch.Generator | None = None,
    stop=None,
) -> list[int]:
    """The new tokens after `prompt` (at most `max_new_tokens`; stops after `stop_id`).
    temperature 0 is greedy; top_p < 1 samples from the smallest set of tokens whose
    probabilities reach top_p (nucleus sampling). `num_tokens`: only ids below it are drawn
    (a vocabulary padded beyond the tokenizer's pieces). `stop(tokens)`: a test on the new
    tokens after each one (e.g. a stop string in their text): True ends the generation."""
    if not prompt:
        raise ValueError("the prompt must hold at least one token (e.g. BOS)")
    device = next(model.parameters()).device
    ids = torch.tensor([prompt], device=device)  # (1, T)
    logits, state = model(ids)
    out: list[int] = []
    for _ in range(max_new_tokens):
        last = logits[0, -1].float()
        if num_tokens is not None:
            last[num_tokens:] = float("-inf")
        token = sample(last, temperature, top_p, generator)
        out.append(token)
        if token == stop_id or (stop is not None and stop(out)):
            break
        logits, state = model(torch.tensor([[token]], device=device), state=state)
    return out


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator=None) -> int:
    """One token id from `logits [V]`."""
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, -1)
    if top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the tokens ranked above
        sorted_probs[before >= top_p] = 0  # keep the smallest prefix reaching top_p
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))
