"""The evaluations recurrent models are judged by, built in: `rnnscale eval RUN --suite recall`
and `--suite length` (docs/evaluation.md). Each returns a JSON-able dict; `draw` makes its PNG.

- recall: multi-query associative recall (`rnnscale.data.recall`, Zoology's MQAR) accuracy at
  several numbers of key/value pairs and row lengths (a gap of filler tokens between the pairs
  and the queries: the distance the state must hold them over), against chance (1 / values).
- length: (1) the loss at every position of rows `factor` times the training length, cut from
  the validation data read as one stream (documents back to back, nothing reset: a state that
  runs past what training showed it), averaged over rows and binned; (2) passkey retrieval: a
  five-digit key hidden at several depths in filler text of growing length, then asked for;
  right when greedy decoding gives its digits (needs the run's tokenizer).
"""

from __future__ import annotations

import itertools
import random

import numpy as np
import torch

from rnnscale.data.recall import IGNORE, AssociativeRecall
from rnnscale.train.generate import generate


@torch.no_grad()
def recall_accuracy(model, task: AssociativeRecall, rows: int, batches: int, device="cpu"):
    """The share of answers whose most likely next token is right, over `batches` batches of
    `rows` held-out rows (indices from 10^6: never those a training run draws)."""
    right = total = 0
    for i in range(batches):
        batch = task.batch(10**6 + i, rows)
        labels = batch["labels"].to(device)
        (_, hits), _ = model(batch["input_ids"].to(device), labels=labels, scores=True)
        right += int(hits.sum())
        total += int((labels != IGNORE).sum())
    return right / total


def fit_recall(model, task: AssociativeRecall, steps: int, rows: int, lr: float = 3e-3):
    """Train `model` on `task` (AdamW, no weight decay; batches 0 .. steps - 1 of `rows` rows):
    the first and last losses. For tests and the figures of docs/evaluation.md."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for step in range(steps):
        batch = task.batch(step, rows)
        loss = model.loss(batch["input_ids"], batch["labels"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses[0], losses[-1]


def recall_trained_run(config, run_dir, steps: int, rows: int):
    """A finished run directory (config.yaml, model.safetensors) of the model of the run config
    `config`, trained on recall rows of 4 pairs (16 tokens; 8 keys, 8 values) by `fit_recall`:
    a model that knows the task, for tests/test_suites.py and benchmarks/evaluation.py."""
    from pathlib import Path

    from rnnscale.train.config import dump_yaml, load_config
    from rnnscale.train.export import export_model
    from rnnscale.train.files import write_atomic
    from rnnscale.train.model import build_model

    task = AssociativeRecall(num_keys=8, num_values=8, pairs=4, queries=4, seed=0)
    run_dir = Path(run_dir)
    cfg = load_config(config, [f"model.vocab_size={task.vocab_size}", "train.seq_len=16",
                               f"run.dir={run_dir}"])  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.kernels)
    fit_recall(model, task, steps, rows)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(run_dir / "config.yaml", dump_yaml(cfg))
    export_model(model.eval(), run_dir)
    return run_dir


def recall_suite(model, vocab_size: int, *, pairs=(4, 8, 16, 32), lengths=(64, 256, 1024),
                 num_keys: int = 0, num_values: int = 0, rows: int = 16, batches: int = 2,
                 device="cpu") -> dict:  # fmt: skip
    """Accuracy for every (pairs, length) that fits (every key asked once: length >= 4 pairs).
    Keys and values split the ids above the specials in two (or `num_keys`, `num_values`)."""
    keys = num_keys or (vocab_size - 3) // 2
    values = num_values or vocab_size - 3 - keys
    if 3 + keys + values > vocab_size or keys < 1 or values < 1:
        raise ValueError(f"--num-keys {keys} and --num-values {values} do not fit beside the 3 "
                         f"special ids in the vocabulary ({vocab_size})")  # fmt: skip
    results = []
    for n, length in itertools.product(pairs, lengths):
        if n > keys or length < 4 * n:
            continue
        task = AssociativeRecall(keys, values, n, n, seed=0, length=length)
        accuracy = recall_accuracy(model, task, rows, batches, device)
        results.append({"pairs": n, "length": length, "accuracy": accuracy})
    return {"suite": "recall", "num_keys": keys, "num_values": values, "chance": 1 / values,
            "rows": rows * batches, "results": results}  # fmt: skip


def validation_stream(cfg, tokens: int):
    """At least `tokens` tokens of the run's validation documents, back to back: data.val_streams
    (mds; the training streams if there are none), or the synthetic chain's held-out documents."""
    if cfg.data.source == "synthetic":
        from rnnscale.data.synthetic import HELD_OUT, MarkovDocuments

        chain = MarkovDocuments(cfg.model.vocab_size, cfg.data.mean_doc_len, cfg.run.seed,
                                first_index=HELD_OUT)  # fmt: skip
        docs = (chain[i] for i in itertools.count())
    else:
        from rnnscale.data.loader import held_out_documents

        streams = cfg.data.val_streams or cfg.data.streams
        docs = held_out_documents([s.path for s in streams], 0, 1)
    got, parts = 0, []
    for doc in docs:
        parts.append(np.asarray(doc, dtype=np.int64))
        got += len(doc)
        if got >= tokens:
            return np.concatenate(parts)[:tokens]
    raise ValueError(f"the validation data holds {got:,} tokens; the length suite needs "
                     f"{tokens:,} (fewer --rows or a smaller --factor)")  # fmt: skip


@torch.no_grad()
def loss_by_position(model, stream: np.ndarray, rows: int, length: int, device) -> np.ndarray:
    """The next-token loss at every position `[length - 1]`, the mean over `rows` rows of
    `length` tokens, a row at a time (the model's chunked scores: no whole logits)."""
    ids = torch.as_tensor(stream[: rows * length]).view(rows, length).to(device)
    total = torch.zeros(length - 1, dtype=torch.float64, device=device)
    for row in ids:
        (nll, _), _ = model(row[None, :-1], labels=row[None, 1:], scores=True)
        total += nll[0]
    return (total / rows).cpu().numpy()


def binned(loss: np.ndarray, bins: int) -> tuple[list[int], list[float]]:
    """`(bin starts, mean losses)` over `bins` equal bins of positions (for the curve)."""
    edges = np.linspace(0, len(loss), bins + 1).astype(int)
    return edges[:-1].tolist(), [float(loss[a:b].mean()) for a, b in itertools.pairwise(edges)]


FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)
INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
         "memorize it. I will quiz you about the important information there. ")  # fmt: skip


def passkey_prompt(sp, tokens: int, depth: float, key: int) -> list[int]:
    """BOS, the intro, filler to about `tokens` tokens with the key's line at `depth` of it, and
    the question."""
    line = f"The pass key is {key}. Remember it. {key} is the pass key. "
    question = "What is the pass key? The pass key is"
    fixed = len(sp.encode(INTRO + line + question)) + 1
    repeats = max(0, (tokens - fixed) // len(sp.encode(FILLER)))
    before = round(repeats * depth)
    text = INTRO + FILLER * before + line + FILLER * (repeats - before) + question
    return [sp.bos_id(), *sp.encode(text)]


def passkey(model, sp, lengths, depths=(0.1, 0.5, 0.9), keys: int = 3, device="cpu") -> list:
    """Accuracy of greedy retrieval at every length (over depths x keys prompts)."""
    rng, out = random.Random(0), []
    for length in lengths:
        right, sizes = 0, []
        for depth, _ in itertools.product(depths, range(keys)):
            key = rng.randint(10000, 99999)
            prompt = passkey_prompt(sp, length, depth, key)
            answer = sp.decode(generate(model, prompt, len(sp.encode(f" {key}")) + 2,
                                        temperature=0, num_tokens=sp.get_piece_size()))  # fmt: skip
            right += str(key) in answer.split(".")[0]
            sizes.append(len(prompt))
        out.append({"tokens": round(float(np.mean(sizes))), "target_tokens": length,
                    "accuracy": right / len(sizes)})  # fmt: skip
    return out


def length_suite(model, cfg, sp=None, *, factor: int = 8, rows: int = 4, bins: int = 32,
                 device="cpu") -> dict:  # fmt: skip
    """Loss by position up to `factor` x train.seq_len, and passkey retrieval at 1/2, 1, 2, ...
    `factor` x train.seq_len when the run has a tokenizer (`sp`)."""
    seq = cfg.train.seq_len
    length = factor * seq
    stream = validation_stream(cfg, rows * length)
    loss = loss_by_position(model, stream, rows, length, device)
    starts, losses = binned(loss, bins)
    result = {"suite": "length", "train_seq_len": seq, "factor": factor, "rows": rows,
              "positions": starts, "loss": losses, **within_and_beyond(loss, seq)}  # fmt: skip
    if sp is not None:
        doublings = [seq * 2**i for i in range(int(np.log2(factor)) + 1)]
        lengths = sorted({seq // 2, *doublings, factor * seq})
        result["passkey"] = passkey(model, sp, lengths, device=device)
    return result


def within_and_beyond(loss: np.ndarray, seq: int) -> dict:
    """The mean loss of the predictions made from at most `seq` tokens (positions 0 .. seq - 1,
    as training makes them) and of those made from more."""
    beyond = float(loss[seq:].mean()) if len(loss) > seq else None
    return {"loss_within_train_len": float(loss[:seq].mean()), "loss_beyond_train_len": beyond}


def draw(result: dict, png) -> bool:
    """The suite's PNG (False where matplotlib is missing)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import FuncFormatter, NullFormatter
    except ImportError:
        return False

    def log2(axes):  # powers of two as plain numbers
        axes.set_xscale("log", base=2)
        axes.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        axes.xaxis.set_minor_formatter(NullFormatter())

    if result["suite"] == "recall":
        fig = Figure(figsize=(6, 4))
        ax = fig.add_subplot()
        for length in sorted({r["length"] for r in result["results"]}):
            rs = [r for r in result["results"] if r["length"] == length]
            ax.plot([r["pairs"] for r in rs], [r["accuracy"] for r in rs], "o-",
                    label=f"{length} tokens")  # fmt: skip
        ax.axhline(result["chance"], color="gray", ls="--", label="chance")
        log2(ax)
        ax.set(xlabel="key/value pairs", ylabel="recall accuracy", ylim=(0, 1.02),
               title="Multi-query associative recall")  # fmt: skip
    else:
        panels = 2 if "passkey" in result else 1
        fig = Figure(figsize=(6 * panels, 4))
        ax = fig.add_subplot(1, panels, 1)
        ax.plot(result["positions"], result["loss"], "-")
        ax.axvline(result["train_seq_len"], color="gray", ls="--", label="training length")
        ax.set(xlabel="token position", ylabel="loss", title="Loss by position")
        if "passkey" in result:
            pk = fig.add_subplot(1, panels, 2)
            pk.plot([p["tokens"] for p in result["passkey"]],
                    [p["accuracy"] for p in result["passkey"]], "o-")  # fmt: skip
            pk.axvline(result["train_seq_len"], color="gray", ls="--")
            log2(pk)
            pk.set(xlabel="prompt tokens", ylabel="passkey accuracy", ylim=(-0.02, 1.02),
                   title="Passkey retrieval")  # fmt: skip
    ax.legend()
    fig.tight_layout()
    FigureCanvasAgg(fig).print_png(str(png))
    return True


class TrainingSuites:
    """`train.eval_suites` at every evaluation: `metrics(model)` gives flat `eval_*` scalars.
    Every rank runs the same forwards (ZeRO-3 gathers its parameters in them) and decides the
    same: the passkey runs where data.tokenizer is set (every rank checked it at the start).
    The length suite's stream is read here, at the start (too little validation data stops the
    run now, not hours later): the synthetic held-out documents, or the validation batches the
    run already holds (a second reader of the same streams would clash with the first). Smaller
    than `rnnscale eval`'s defaults: recall rows of train.seq_len, length rows of 4 x
    train.seq_len, one passkey depth."""

    ROWS, FACTOR = 2, 4

    def __init__(self, cfg, device, val_batches):
        self.cfg, self.device, self.stream, self.sp = cfg, device, None, None
        if "length" not in cfg.train.eval_suites:
            return
        tokens = self.ROWS * self.FACTOR * cfg.train.seq_len
        if cfg.data.source == "synthetic":
            self.stream = validation_stream(cfg, tokens)
            return
        from rnnscale.train.model.loss import IGNORE_INDEX

        rows = [b["input_ids"][r] for b in val_batches for r in range(len(b["input_ids"]))
                if bool((b["labels"][r] != IGNORE_INDEX).any())]  # fmt: skip
        held = sum(len(r) for r in rows)
        if held < tokens:
            from rnnscale.train.config import ConfigError

            raise ConfigError(
                f"train.eval_suites: length scores {self.ROWS} rows of {self.FACTOR} x "
                f"train.seq_len = {tokens:,} validation tokens; the validation batches hold "
                f"{held:,}: raise train.eval_batches (or leave length out)"
            )
        self.stream = torch.cat(rows).numpy()[:tokens]
        import sentencepiece

        self.sp = sentencepiece.SentencePieceProcessor(model_file=cfg.data.tokenizer)

    @torch.no_grad()
    def metrics(self, model) -> dict:
        cfg, out = self.cfg, {}
        was_training = model.training
        model.eval()
        seq = cfg.train.seq_len
        if "recall" in cfg.train.eval_suites:
            pairs = [n for n in (4, 8, 16, 32) if 4 * n <= seq] or [max(1, seq // 4)]
            result = recall_suite(model, cfg.model.vocab_size, pairs=pairs, lengths=(seq,),
                                  rows=16, batches=1, device=self.device)  # fmt: skip
            for r in result["results"]:
                out[f"eval_recall_acc_{r['pairs']}_pairs"] = r["accuracy"]
            out["eval_recall_acc"] = float(np.mean([r["accuracy"] for r in result["results"]]))
        if "length" in cfg.train.eval_suites:
            loss = loss_by_position(model, self.stream, self.ROWS, self.FACTOR * seq, self.device)
            out.update({f"eval_{k}": v for k, v in within_and_beyond(loss, seq).items()})
            if self.sp is not None:
                found = passkey(model, self.sp, [seq, self.FACTOR * seq], depths=(0.5,), keys=2,
                                device=self.device)  # fmt: skip
                out["eval_passkey_acc"] = float(np.mean([p["accuracy"] for p in found]))
        model.train(was_training)
        return out
