"""The held-out split of `data prepare --val-fraction` and whole-set evaluation: the split is by
document and decided by each document's text (the same on every run, for any worker count or
part size; no document on both sides; together the corpus; resumed like any shard set); a
nonsense fraction, an empty side or a directory of the other layout is refused in one line;
`train.eval_batches: 0` scores every token of the validation set once (its tokens minus its
documents), on one rank and on two; a request beyond the set is capped with a notice."""

import hashlib
import json
import random
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import sentencepiece
import torch
import torch.multiprocessing as mp

from rnnscale.data.prepare import MARKER, prepare, report
from rnnscale.data.split import SETS, held_out
from rnnscale.data.tokenizer import BOS, EOS, train_tokenizer
from rnnscale.parallel.layout import ParallelLayout
from rnnscale.train.batches import ONE_RANK, HeldOutBatches, RowShape, even_out, make_val_batches
from rnnscale.train.config import ConfigError, load_config
from rnnscale.train.model import build_model
from rnnscale.train.model.loss import IGNORE_INDEX
from rnnscale.train.trainer import evaluate

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
FRACTION = 0.25
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "debug_cpu.yaml"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """60 JSONL documents (3 of them twice: exact duplicates), a tokenizer, and a validation
    set of 7 documents whose even ones are long and odd ones short (2 replicas differ)."""
    root = tmp_path_factory.mktemp("split")
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 30))) for _ in range(57)]
    texts += texts[:3]
    (root / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    train_tokenizer([str(root / "a.jsonl")], 300, root / "tok")
    tok = root / "tok" / "tokenizer.model"
    val = [" ".join(WORDS * 3) if i % 2 == 0 else WORDS[i] for i in range(7)]
    (root / "val.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in val))
    stats = prepare([str(root / "val.jsonl")], tok, root / "val", progress=False)
    return root, tok, texts, stats


def samples(out) -> list[list[int]]:
    from streaming.base.format import reader_from_json  # (not in the spawned ranks: 5 s)

    index = json.loads((out / "index.json").read_text())
    docs = []
    for shard in index["shards"]:
        reader = reader_from_json(str(out), None, shard)
        docs += [reader[i]["tokens"].tolist() for i in range(reader.samples)]
    return docs


def digest(out) -> dict:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.glob("*/part-*/shard.*"))}  # fmt: skip


def test_the_split_is_by_document_and_the_same_on_every_run(corpus, tmp_path, capsys):
    root, tok, texts, _ = corpus
    inputs = [str(root / "a.jsonl")]
    stats = prepare(inputs, tok, tmp_path / "a", val_fraction=FRACTION, progress=False)
    prepare(inputs, tok, tmp_path / "b", val_fraction=FRACTION, workers=2, part_bytes=300,
            progress=False)  # fmt: skip
    got = {name: samples(tmp_path / "a" / name) for name in SETS}
    assert got == {name: samples(tmp_path / "b" / name) for name in SETS}
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tok))
    ids = [[BOS, *sp.encode(t), EOS] for t in texts]
    assert got["val"] == [d for d, t in zip(ids, texts) if held_out(t, FRACTION)]
    assert got["train"] == [d for d, t in zip(ids, texts) if not held_out(t, FRACTION)]
    assert not {tuple(d) for d in got["train"]} & {tuple(d) for d in got["val"]}
    # pinned, so that the split is the same in every process and release: another hash would
    # move every corpus's documents between the sets
    assert [i for i, t in enumerate(texts) if held_out(t, FRACTION)] == [
        5, 12, 17, 19, 21, 23, 27, 29, 35, 44, 50, 52, 55, 56
    ]  # fmt: skip
    for name in SETS:
        assert stats[name]["documents"] == len(got[name])
        assert stats[name]["tokens"] == sum(map(len, got[name]))
    text = report(stats, tmp_path / "a", tok)
    assert f"{tmp_path / 'a' / 'val'}: 1 files, {len(got['val'])} documents" in text
    assert f'"data.val_streams=[{{path: {tmp_path / "a" / "val"}}}]"' in text
    clean = digest(tmp_path / "a")
    shard = sorted((tmp_path / "a" / "val").glob("part-*/shard.*"))[0]
    shard.write_bytes(shard.read_bytes()[:50])  # damaged: its part is written again
    capsys.readouterr()
    again = prepare(inputs, tok, tmp_path / "a", val_fraction=FRACTION, progress=False)
    assert "damaged shards" in capsys.readouterr().out
    assert digest(tmp_path / "a") == clean and again["val"]["tokens"] == stats["val"]["tokens"]
    (tmp_path / "a" / "val" / MARKER).unlink()  # killed between the two sets' commits
    prepare(inputs, tok, tmp_path / "a", val_fraction=FRACTION, progress=False)
    assert all((tmp_path / "a" / name / MARKER).exists() for name in SETS)
    prepare(inputs, tok, tmp_path / "a", val_fraction=FRACTION, progress=False)
    assert "nothing to do" in capsys.readouterr().out
    assert digest(tmp_path / "a") == clean


def test_nonsense_splits_and_mixed_layouts_are_refused(corpus, tmp_path, repo_root):
    from test_cli import rnnscale

    root, tok, _, _ = corpus
    inputs = [str(root / "a.jsonl")]
    for bad in (0.0, 1.0, float("nan")):
        with pytest.raises(ValueError, match="--val-fraction must be between 0 and 1"):
            prepare(inputs, tok, tmp_path / "x", val_fraction=bad, progress=False)
    with pytest.raises(ValueError, match="holds out none of the 60 documents.*nothing was kept"):
        prepare(inputs, tok, tmp_path / "x", val_fraction=1e-6, progress=False)
    with pytest.raises(ValueError, match="leaves none of the 60 documents for training"):
        prepare(inputs, tok, tmp_path / "x", val_fraction=1 - 1e-9, progress=False)
    assert not (tmp_path / "x").exists()  # made by the refused runs, and removed
    prepare(inputs, tok, tmp_path / "plain", progress=False)
    with pytest.raises(ValueError, match="holds shards prepared without --val-fraction"):
        prepare(inputs, tok, tmp_path / "plain", val_fraction=FRACTION, progress=False)
    prepare(inputs, tok, tmp_path / "split", val_fraction=FRACTION, progress=False)
    with pytest.raises(ValueError, match="holds a held-out split"):
        prepare(inputs, tok, tmp_path / "split", progress=False)
    r = rnnscale("data", "prepare", "--input", inputs[0], "--tokenizer", str(tok), "--out",
                 str(tmp_path / "y"), "--val-fraction", "1.5", cwd=repo_root)  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        "rnnscale: --val-fraction must be between 0 and 1, exclusive (e.g. 0.01 holds out "
        "about 1% of the documents), got 1.5"
    ]


def eval_config(corpus, *overrides):
    root, tok, _, _ = corpus
    return load_config(CONFIG, ["data.source=mds", f"data.streams=[{{path: {root / 'val'}}}]",
                        f"data.val_streams=[{{path: {root / 'val'}}}]", f"data.tokenizer={tok}",
                        "model.vocab_size=300", "train.seq_len=16", "train.micro_batch_size=2",
                        "train.global_batch_size=4", "train.eval_interval=1",
                        "train.eval_batches=0", "kernels.backend=torch", *overrides])  # fmt: skip


def val_batches(cfg, count=0, layout=ONE_RANK):
    return make_val_batches(cfg.data, RowShape.of(cfg), 0, count, layout)


def scored(batches) -> list[int]:
    """The labels evaluated, in order."""
    return [int(x) for b in batches for x in b["labels"].reshape(-1) if x != IGNORE_INDEX]


def test_the_whole_set_scores_every_token_once(corpus, tmp_path):
    _, _, _, stats = corpus
    docs = samples(corpus[0] / "val")
    cfg = eval_config(corpus)
    whole = val_batches(cfg)
    assert scored(whole) == [x for d in docs for x in d[1:]]  # each token after its BOS
    got = evaluate(build_model(cfg.model, cfg.kernels), whole, torch.device("cpu"))
    assert got["eval_tokens"] == stats["tokens"] - stats["documents"]
    replicas = [val_batches(cfg, layout=ParallelLayout(2, 1, r)) for r in (0, 1)]
    assert [scored(b) for b in replicas] == [
        [x for d in docs[r::2] for x in d[1:]] for r in (0, 1)
    ]  # disjoint: every other document, together the set
    assert len(replicas[0]) > len(replicas[1])  # (in a job the shorter one is padded)
    group = [val_batches(cfg, layout=ParallelLayout(2, 2, r)) for r in (0, 1)]
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(*group, strict=True))


def test_more_batches_than_the_set_holds_are_capped_with_a_notice(corpus, tmp_path, capsys):
    cfg = eval_config(corpus)
    whole = val_batches(cfg)
    capsys.readouterr()
    capped = val_batches(cfg, count=len(whole) + 50)
    assert f"train.eval_batches={len(whole) + 50} asks for more micro batches than the " \
           f"validation set holds ({len(whole)} per rank)" in capsys.readouterr().err  # fmt: skip
    assert scored(capped) == scored(whole) and len(capped) == len(whole)
    first = val_batches(cfg, count=2)
    assert len(first) == 2 and scored(first) == scored([whole[0], whole[1]])
    synthetic = load_config(CONFIG, ["train.eval_batches=0"])
    with pytest.raises(ConfigError, match="train.eval_batches: 0 .* needs data.source=mds"):
        val_batches(synthetic)


def _evaluate_on_two_ranks(rank: int, cfg, parts, store: str, results: str) -> None:
    """Rank `rank` of 2 gloo processes: its replica's documents (`parts[rank]`, read by the
    parent: the reader is tested above, and streaming's import costs 5 s a process) evened out
    with the other rank's, then evaluated."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                                         world_size=2, timeout=timedelta(seconds=60))  # fmt: skip
    try:
        torch.manual_seed(0)
        model = build_model(cfg.model, cfg.kernels)
        docs = (np.array(d, dtype=np.uint16) for d in parts[rank])
        batches = even_out(HeldOutBatches(docs, RowShape.of(cfg), True), 0)
        got = evaluate(model, batches, torch.device("cpu"))
        torch.save({"eval": got, "batches": len(batches)}, f"{results}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


def test_the_whole_set_on_two_ranks(corpus, tmp_path):
    """Each rank its own documents, as many forwards on both (the shorter part padded), the
    loss of one rank that evaluates both parts, and every token once."""
    cfg = eval_config(corpus)
    docs = samples(corpus[0] / "val")
    mp.start_processes(_evaluate_on_two_ranks, nprocs=2, start_method="spawn", join=True,
                       args=(cfg, [docs[0::2], docs[1::2]], str(tmp_path / "store"),
                             str(tmp_path / "r")))  # fmt: skip
    r0, r1 = (torch.load(tmp_path / f"r.{rank}") for rank in (0, 1))
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.kernels)
    parts = [val_batches(cfg, layout=ParallelLayout(2, 1, r)) for r in (0, 1)]
    assert r0["batches"] == r1["batches"] == max(map(len, parts)) > min(map(len, parts))
    alone = [evaluate(model, p, torch.device("cpu")) for p in parts]
    tokens = sum(a["eval_tokens"] for a in alone)
    loss = sum(a["eval_loss"] * a["eval_tokens"] for a in alone) / tokens
    stats = corpus[3]
    assert r0["eval"]["eval_tokens"] == tokens == stats["tokens"] - stats["documents"]
    assert r0["eval"] == r1["eval"] and r0["eval"]["eval_loss"] == pytest.approx(loss, rel=1e-9)
