"""lm-evaluation-harness on rnnscale's own model: `rnnscale eval SOURCE --tasks ...`.

`RnnscaleLM` is an `lm_eval.api.model.LM` over a `LanguageModel` and its sentencepiece
tokenizer. It answers lm-eval's three requests the way a recurrent model does best:

- `loglikelihood` (multiple choice, cloze): the requests' sequences are packed into rows of up
  to `batch_tokens` tokens as documents (`cu_seqlens`: every state resets at each one), so no
  token is padding; a sequence longer than a row runs alone, in pieces that carry the state;
- `loglikelihood_rolling` (perplexity): the whole document, in pieces that carry the state:
  every token is predicted once, from all of the document before it (no window);
- `generate_until`: the prompt once, then one step per token with the recurrent state, until a
  stop string, EOS or `max_gen_toks`; greedy unless the task asks for sampling.

Every text starts with BOS, as rnnscale's documents do. A context's trailing spaces move to the
continuation, and the continuation's ids are those of the whole text after the context's (as
lm-eval's own Hugging Face model splits them).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rnnscale.train.generate import generate


def _lm_base():
    try:
        from lm_eval.api.model import LM
    except ImportError as e:  # the `eval` extra
        raise ImportError(
            f"rnnscale eval --tasks needs lm-evaluation-harness ({e}): pip install "
            "'rnnscale[eval]' (or lm-eval)"
        ) from None
    return LM


def harness_lm(model, sp, *, batch_tokens: int = 8192, device="cpu"):
    """A `RnnscaleLM` (the class is made here: lm-eval is imported only when it is used)."""
    LM = _lm_base()

    class RnnscaleLM(LM):
        def __init__(self):
            super().__init__()
            self.model, self.sp = model.to(device).eval(), sp
            self.batch_tokens, self.where = batch_tokens, torch.device(device)
            self.bos, self.eos = sp.bos_id(), sp.eos_id()

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            pairs = [self._split(*r.args) for r in requests]
            return score(self.model, pairs, self.batch_tokens, self.where)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            pairs = [([self.bos], self.sp.encode(r.args[0])) for r in requests]
            return [ll for ll, _ in score(self.model, pairs, self.batch_tokens, self.where)]

        def generate_until(self, requests, disable_tqdm: bool = False):
            return [self._generate(*r.args) for r in requests]

        def _split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
            spaces = len(context) - len(context.rstrip())
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            whole = self.sp.encode(context + continuation)
            ctx = self.sp.encode(context) if context else []
            return [self.bos, *ctx], whole[len(ctx) :]

        def _generate(self, context: str, options: dict) -> str:
            until = options.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            sample = options.get("do_sample", False)
            temperature = float(options.get("temperature", 1.0)) if sample else 0.0

            def found(tokens):
                return any(u in self.sp.decode(tokens) for u in until)

            tokens = generate(self.model, [self.bos, *self.sp.encode(context)],
                              int(options.get("max_gen_toks", 256)), temperature=temperature,
                              stop_id=self.eos, stop=found if until else None,
                              num_tokens=self.sp.get_piece_size())  # fmt: skip
            text = self.sp.decode([t for t in tokens if t != self.eos])
            for u in until:
                text = text.split(u)[0]
            return text

    return RnnscaleLM()


@torch.no_grad()
def score(model, pairs, batch_tokens: int, device) -> list[tuple[float, bool]]:
    """For every `(context ids, continuation ids)`: the continuation's log-probability given the
    context, and whether greedy decoding would have produced it."""
    out: list[tuple[float, bool] | None] = [None] * len(pairs)
    order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
    row: list[int] = []
    for i in order:
        n = len(pairs[i][0]) + len(pairs[i][1])
        if n > batch_tokens:
            out[i] = _score_long(model, *pairs[i], batch_tokens, device)
            continue
        if row and sum(len(pairs[j][0]) + len(pairs[j][1]) for j in row) + n > batch_tokens:
            _score_row(model, pairs, row, out, device)
            row = []
        row.append(i)
    if row:
        _score_row(model, pairs, row, out, device)
    return out  # type: ignore[return-value]


def _targets(seq: list[int], context: int, start: int, stop: int) -> list[int]:
    """The labels of positions `start .. stop - 1` of `seq`: the next token where it belongs to
    the continuation (the tokens after the first `context`), IGNORE_INDEX elsewhere."""
    from rnnscale.train.model.loss import IGNORE_INDEX

    return [seq[p + 1] if context - 1 <= p < len(seq) - 1 else IGNORE_INDEX
            for p in range(start, stop)]  # fmt: skip


def _score_row(model, pairs, row: list[int], out: list, device) -> None:
    """The sequences of `row` packed into one row as documents; only the continuations' tokens
    are scored (the model's chunked scores: no `[tokens, vocab]` logits)."""
    seqs = [pairs[i][0] + pairs[i][1] for i in row]
    lengths = torch.tensor([0, *[len(s) for s in seqs]])
    cu = lengths.cumsum(0).to(device=device, dtype=torch.int32)
    ids = torch.tensor([t for s in seqs for t in s], device=device)[None]
    labels = [y for i, s in zip(row, seqs) for y in _targets(s, len(pairs[i][0]), 0, len(s))]
    (nll, right), _ = model(ids, labels=torch.tensor([labels], device=device), cu_seqlens=cu,
                            scores=True)  # fmt: skip
    for i, start, end in zip(row, cu[:-1].tolist(), cu[1:].tolist()):
        first = start + len(pairs[i][0]) - 1  # predicts the continuation's first token
        out[i] = (-float(nll[0, first : end - 1].sum()), bool(right[0, first : end - 1].all()))


def _score_long(model, ctx, cont, batch_tokens: int, device) -> tuple[float, bool]:
    """One sequence longer than a row, in pieces of `batch_tokens` that carry the state."""
    seq, state, total, greedy = ctx + cont, None, 0.0, True
    for start in range(0, len(seq) - 1, batch_tokens):
        stop = min(start + batch_tokens, len(seq) - 1)
        ids = torch.tensor([seq[start:stop]], device=device)
        labels = torch.tensor([_targets(seq, len(ctx), start, stop)], device=device)
        (nll, right), state = model(ids, labels=labels, state=state, scores=True)
        scored = labels[0] != -100
        total -= float(nll[0, scored].sum())
        greedy = greedy and bool(right[0, scored].all())
    return total, greedy


def run_tasks(model, sp, tasks: list[str], *, include_path: str | None = None,
              num_fewshot: int | None = None, limit: float | None = None,
              batch_tokens: int = 8192, device="cpu") -> dict:  # fmt: skip
    """lm-eval's `simple_evaluate` on the model: its results dict (`results`, `versions`, ...),
    samples left out."""
    lm = harness_lm(model, sp, batch_tokens=batch_tokens, device=device)
    from lm_eval import evaluator
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"--tasks: lm-eval knows no task {', '.join(unknown)} (a local task: "
                         "--include-path DIR with its YAML)")  # fmt: skip
    results = evaluator.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot,
                                        limit=limit, task_manager=manager, log_samples=False,
                                        bootstrap_iters=0)  # fmt: skip
    return json.loads(json.dumps({k: v for k, v in results.items() if k != "samples"},
                                 default=str))  # fmt: skip


def write_results(results: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path
