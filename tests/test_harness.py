"""lm-evaluation-harness through `rnnscale eval`: a tiny hybrid that learned which animal eats
what answers lm-eval's local tasks (multiple choice, generation, perplexity) well above chance;
its packed scoring equals one request at a time, and rolling perplexity is the whole document's
loss."""

from __future__ import annotations

import json
import random

import pytest
import sentencepiece
import torch

from rnnscale.launch.cli import main as cli
from rnnscale.train.config import dump_yaml, from_dict
from rnnscale.train.export import export_model
from rnnscale.train.harness import harness_lm
from rnnscale.train.model import build_model

PAIRS = [("cow", "grass"), ("cat", "fish"), ("bird", "seeds"), ("dog", "bones"),
         ("bee", "nectar"), ("owl", "mice")]  # fmt: skip

TASKS = {
    "tiny_choice": ("multiple_choice", 'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\n'
                    'doc_to_target: "{{answer}}"\nmetric_list:\n  - metric: acc\n'),
    "tiny_gen": ("generate_until", 'doc_to_text: "{{question}}"\ndoc_to_target: "{{target}}"\n'
                 'generation_kwargs:\n  until: ["."]\n  max_gen_toks: 12\n  do_sample: false\n'
                 "metric_list:\n  - metric: exact_match\n"),
    "tiny_ppl": ("loglikelihood_rolling", 'doc_to_text: ""\ndoc_to_target: "{{text}}"\n'
                 "metric_list:\n  - metric: word_perplexity\n"),
}  # fmt: skip


def _batch(sp, rng):
    docs = [[1, *sp.encode(f"the {a} eats {f}."), 2] for a, f in rng.choices(PAIRS, k=12)]
    ids = torch.tensor([t for d in docs for t in d])[None]
    ends = torch.tensor([len(d) for d in docs]).cumsum(0)
    labels = torch.cat([ids[:, 1:], torch.full((1, 1), -100)], 1)
    labels[0, ends[:-1] - 1] = -100  # a document's last token predicts nothing
    return ids, labels, torch.cat([torch.zeros(1), ends]).to(torch.int32)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished run directory: a gla + attn model trained on the sentences, its tokenizer."""
    from rnnscale.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("harness")
    (root / "corpus.txt").write_text("\n".join(f"the {a} eats {f}." for a, f in PAIRS * 40))
    train_tokenizer([str(root / "corpus.txt")], 290, root / "run")
    sp = sentencepiece.SentencePieceProcessor(model_file=str(root / "run" / "tokenizer.model"))
    cfg = from_dict({"run": {"dir": str(root / "run")}, "train": {"seq_len": 32},
                     "model": {"vocab_size": 320, "d_model": 32, "num_layers": 2,
                               "num_heads": 2, "mixer_pattern": ["gla", "attn"]}})  # fmt: skip
    torch.manual_seed(0)
    model, rng = build_model(cfg.model, cfg.kernels), random.Random(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(80):
        ids, labels, cu = _batch(sp, rng)
        model.loss(ids, labels, cu_seqlens=cu).backward()
        opt.step()
        opt.zero_grad()
    (root / "run" / "config.yaml").write_text(dump_yaml(cfg))
    export_model(model.eval(), root / "run")
    tasks = root / "tasks"
    tasks.mkdir()
    others = {a: [f for _, f in PAIRS if f != food][:2] for a, food in PAIRS}
    # lm-eval puts its target_delimiter, " ", between the question and a choice
    docs = [{"question": f"the {a} eats", "choices": [f, *others[a]], "answer": 0,
             "target": f" {f}", "text": f"the {a} eats {f}."} for a, f in PAIRS]  # fmt: skip
    (tasks / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    for name, (kind, body) in TASKS.items():
        (tasks / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: "
            f"{tasks / 'docs.jsonl'}\ntest_split: test\noutput_type: {kind}\n{body}"
        )
    return root / "run", model, sp


def test_eval_runs_local_lm_eval_tasks(run, monkeypatch, capsys):
    run_dir, _, _ = run
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert cli(["eval", str(run_dir), "--tasks", ",".join(TASKS), "--include-path",
                str(run_dir.parent / "tasks")]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "tiny_choice" in printed and f"wrote {run_dir / 'eval' / 'lm_eval.json'}" in printed
    results = json.loads((run_dir / "eval" / "lm_eval.json").read_text())["results"]
    assert results["tiny_choice"]["acc,none"] >= 5 / 6  # chance: 1/3
    assert results["tiny_gen"]["exact_match,none"] >= 5 / 6
    assert 1 <= results["tiny_ppl"]["word_perplexity,none"] < 10


class _Request:
    def __init__(self, *args):
        self.args = args


def test_packed_scores_equal_one_request_at_a_time(run):
    """Requests packed into rows as documents (and one longer than a row, in pieces carrying
    the state) score as each alone; rolling is the whole document's summed log-probability."""
    _, model, sp = run
    requests = [_Request(f"the {a} eats ", f) for a, f in PAIRS]
    requests += [_Request("", "the cow eats grass."), _Request("the " * 12, "cow eats grass.")]
    lm = harness_lm(model, sp, batch_tokens=40)
    got = lm.loglikelihood(requests)
    for r, (ll, greedy) in zip(requests, got):
        ctx, cont = lm._split(*r.args)
        with torch.no_grad():
            logits, _ = model(torch.tensor([ctx + cont]))
        logp = torch.log_softmax(logits[0, len(ctx) - 1 : -1], -1)
        want = logp.gather(1, torch.tensor(cont)[:, None]).sum().item()
        assert ll == pytest.approx(want, abs=1e-4)
        assert greedy == bool((logp.argmax(-1) == torch.tensor(cont)).all())
    text = "the dog eats bones. the owl eats mice."
    (rolling,) = lm.loglikelihood_rolling([_Request(text)])
    ids = torch.tensor([[1, *sp.encode(text)]])
    with torch.no_grad():
        loss = model.loss(ids[:, :-1], ids[:, 1:]).item()
    assert rolling == pytest.approx(-loss * (ids.shape[1] - 1), rel=1e-5)


def test_length_suite_asks_for_a_passkey(run):
    """With a tokenizer the length suite hides a five-digit key in filler text at lengths from
    half to `factor` times the training length and asks for it (this model never learned to)."""
    run_dir, _, _ = run
    assert cli(["eval", str(run_dir), "--suite", "length", "--factor", "2", "--rows", "1"]) == 0
    result = json.loads((run_dir / "eval" / "length.json").read_text())
    assert [p["target_tokens"] for p in result["passkey"]] == [16, 32, 64]
    assert all(0 <= p["accuracy"] <= 1 and p["tokens"] > 0 for p in result["passkey"])


def test_training_suites_on_streaming_data_ask_for_a_passkey(run, tmp_path):
    """train.eval_suites on MDS shards: the length suite reads the run's own validation batches
    and, with data.tokenizer, asks for a passkey; recall beside it."""
    from rnnscale.data.prepare import prepare
    from rnnscale.train import trainer
    from rnnscale.train.config import load_config

    run_dir, _, _ = run
    tok = run_dir / "tokenizer.model"
    for name, n in (("train", 60), ("val", 30)):
        docs = [{"text": f"the {a} eats {f}."} for a, f in PAIRS * n]
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
        prepare([str(tmp_path / f"{name}.jsonl")], tok, tmp_path / name, progress=False)
    cfg = load_config(run_dir / "config.yaml",
                      [f"run.dir={tmp_path / 'run'}", "data.source=mds",
                       f"data.streams=[{{path: {tmp_path / 'train'}}}]",
                       f"data.val_streams=[{{path: {tmp_path / 'val'}}}]", f"data.tokenizer={tok}",
                       "train.max_steps=2", "train.eval_interval=2", "train.eval_batches=4",
                       "train.micro_batch_size=4", "train.global_batch_size=4",
                       "train.eval_suites=[recall,length]", "log.progress_bar=false"])  # fmt: skip
    trainer.run(cfg)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    (last,) = [x for x in lines if "eval_loss" in x]
    assert 0 <= last["eval_passkey_acc"] <= 1 and 0 <= last["eval_recall_acc"] <= 1
    assert last["eval_loss_beyond_train_len"] > 0
