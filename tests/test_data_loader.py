"""The streaming loader: packing marks exactly the document boundaries, resume gives the batches
of the loader that never stopped (one process, and two gloo ranks), and a weighted mixture keeps
its proportions."""

import functools
import gc
import os
import random

import pytest
import sentencepiece
import torch
import torch.multiprocessing as mp

from rnnscale.data.loader import PackedLoader
from rnnscale.data.prepare import prepare
from rnnscale.data.tokenizer import BOS, train_tokenizer

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def write_docs(path, prefix: str, n: int, seed: int) -> None:
    rng = random.Random(seed)
    path.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 40))]
        (path / f"{i:04d}.txt").write_text(f"{prefix} {' '.join(words)}\n")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Two prepared streams of short documents: 'AAAA ...' and 'ZZZZ ...'."""
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()  # what killed processes of earlier runs left
    root = tmp_path_factory.mktemp("streams")
    write_docs(root / "a", "AAAA", 300, 0)
    write_docs(root / "z", "ZZZZ", 300, 1)
    train_tokenizer([str(root / "*" / "*.txt")], 300, root / "tok")
    tok = root / "tok" / "tokenizer.model"
    for name in ("a", "z"):
        prepare([str(root / name / "*.txt")], tok, root / f"{name}-shards", progress=False)
    return root


def loader(shards, streams=None, docs_per_batch=4, **kw):
    streams = streams or [(str(shards / "a-shards"), None)]
    return PackedLoader(streams, seq_len=32, micro_batch_size=3, seed=7,
                        docs_per_batch=docs_per_batch, **kw)  # fmt: skip


def take(it, n):
    return [next(it) for _ in range(n)]


def same(a, b):
    return all(
        torch.equal(x["input_ids"], y["input_ids"])
        and torch.equal(x["cu_seqlens"], y["cu_seqlens"])
        for x, y in zip(a, b, strict=True)
    )


def test_cu_seqlens_mark_exactly_the_document_starts(shards):
    it = loader(shards)
    for batch in take(it, 20):
        ids, cu = batch["input_ids"], batch["cu_seqlens"].tolist()
        B, T = ids.shape
        flat = ids.reshape(-1)
        bos = {i for i in range(B * T) if flat[i] == BOS}
        row_starts = set(range(0, B * T, T))
        assert set(cu[:-1]) == bos | row_starts and cu[-1] == B * T
        assert torch.equal(batch["labels"][:, :-1], ids[:, 1:])
    del it
    gc.collect()


def test_resume_continues_exactly(shards):
    it = loader(shards)
    whole = take(it, 15)
    del it
    gc.collect()
    it = loader(shards)
    assert same(take(it, 6), whole[:6])
    state = it.state_dict()
    del it
    gc.collect()
    resumed = loader(shards)
    resumed.load_state_dict(state)
    assert same(take(resumed, 9), whole[6:])
    del resumed
    gc.collect()


def _join(rank: int, store: str) -> None:
    """Rank `rank` of 2 gloo processes, with the environment streaming reads."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE="2", NODE_RANK="0")  # fmt: skip
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                                         world_size=2)  # fmt: skip


def _two_ranks(rank: int, shards, store: str, results: str, replication: int = 1) -> None:
    _join(rank, store)
    make = functools.partial(loader, replication=replication)
    try:
        it = make(shards)
        whole = take(it, 10)
        del it
        gc.collect()
        torch.distributed.barrier()
        it = make(shards)
        take(it, 4)
        state = it.state_dict()  # collective: the ranks line up on one stream position
        del it
        gc.collect()
        torch.distributed.barrier()
        resumed = make(shards)
        resumed.load_state_dict(state)
        ok = same(take(resumed, 6), whole[4:])
        ids = [b["input_ids"].tolist() for b in whole]
        torch.save({"ok": ok, "first": ids[0], "ids": ids}, f"{results}.{rank}")
        del resumed
        gc.collect()
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


def test_resume_with_two_ranks(shards, tmp_path):
    mp.start_processes(_two_ranks, args=(shards, str(tmp_path / "store"), str(tmp_path / "r")),
                       nprocs=2, start_method="spawn", join=True)  # fmt: skip
    r0, r1 = (torch.load(tmp_path / f"r.{rank}") for rank in (0, 1))
    assert r0["ok"] and r1["ok"]
    assert r0["first"] != r1["first"]  # the ranks read different documents


def test_ranks_of_a_sequence_group_read_the_same_rows(shards, tmp_path):
    # a sequence group of 2 (streaming's replication): the same rows on both, and resumable
    mp.start_processes(_two_ranks, args=(shards, str(tmp_path / "store"), str(tmp_path / "r"), 2),
                       nprocs=2, start_method="spawn", join=True)  # fmt: skip
    r0, r1 = (torch.load(tmp_path / f"r.{rank}") for rank in (0, 1))
    assert r0["ok"] and r1["ok"]
    assert r0["ids"] == r1["ids"]


def test_mixture_keeps_its_proportions(shards):
    streams = [(str(shards / "a-shards"), 3.0), (str(shards / "z-shards"), 1.0)]
    it = loader(shards, streams=streams)
    docs = [it.docs[i] for i in range(400)]
    sp = sentencepiece.SentencePieceProcessor(model_file=str(shards / "tok" / "tokenizer.model"))
    a, z = sp.encode("AAAA x")[0], sp.encode("ZZZZ x")[0]  # the first piece of each stream
    assert a != z and {int(d[1]) for d in docs} == {a, z}
    share = sum(int(d[1] == a) for d in docs) / len(docs)
    assert abs(share - 0.75) < 0.05, share  # stated tolerance: 5 points over 400 documents
    del it
    gc.collect()


def test_resume_across_epochs(shards):
    """The loader runs epoch after epoch (a new shuffle each); a resume in the second epoch,
    or just before the first one ends, continues exactly."""
    it = loader(shards)
    whole = take(it, 260)  # the first epoch (300 documents) lasts about 214 batches
    epoch_two = it.epoch_start
    del it
    gc.collect()
    assert epoch_two == 300  # 260 batches went past the first epoch
    for stop in (210, 240):
        it = loader(shards)
        take(it, stop)
        state = it.state_dict()
        del it
        gc.collect()
        resumed = loader(shards)
        resumed.load_state_dict(state)
        assert same(take(resumed, 260 - stop), whole[stop:]), stop
        del resumed
        gc.collect()


def test_resume_across_a_change_of_loader_workers(shards):
    """DataLoader workers read ahead without changing the order: stop with one worker count,
    resume with another (in the first epoch, and across the epoch boundary, with a streaming
    batch that does not divide the epoch) and the rows are those of the in-process loader."""
    it = loader(shards, docs_per_batch=7)
    whole = take(it, 260)
    del it
    gc.collect()
    for stop, before, after in ((30, 0, 2), (210, 2, 1), (240, 1, 0)):
        it = loader(shards, docs_per_batch=7, num_workers=before)
        assert same(take(it, stop), whole[:stop]), (stop, before)
        state = it.state_dict()
        del it
        gc.collect()
        resumed = loader(shards, docs_per_batch=7, num_workers=after)
        resumed.load_state_dict(state)
        assert same(take(resumed, 260 - stop), whole[stop:]), (stop, before, after)
        del resumed
        gc.collect()


def _recording(it, log: list) -> None:
    """Record every document the loader pulls from the stream, in order."""

    def record(batches):
        for batch in batches:
            log.extend(d.tolist() for d in batch)
            yield batch

    it.docs.batches = record(it.docs.batches)


def _tokens(batches) -> list[int]:
    """The token stream the rows were cut from (rows are consecutive, disjoint pieces)."""
    out = []
    for b in batches:
        for ids, labels in zip(b["input_ids"].tolist(), b["labels"].tolist(), strict=True):
            out += ids + labels[-1:]
    return out


def _stop_on_two_ranks(rank: int, shards, store: str, results: str) -> None:
    _join(rank, store)
    try:
        it, pulled = loader(shards), []
        _recording(it, pulled)
        rows = _tokens(take(it, 5 + 3 * rank))  # the ranks stop at different points
        state = it.state_dict()  # collective
        torch.save({"state": state, "pulled": pulled, "rows": rows}, f"{results}.{rank}")
        del it
        gc.collect()
    finally:
        torch.distributed.destroy_process_group()


def test_resume_on_another_world_size(shards, tmp_path):
    """2 ranks stop; one rank goes on from their states (PackedLoader.reshard): it first packs
    what the two had pulled and not yet packed (rank 0's, then rank 1's), then reads the rest
    of the epoch; over the epoch every document is read exactly once."""
    mp.start_processes(_stop_on_two_ranks,
                       args=(shards, str(tmp_path / "store"), str(tmp_path / "r")),
                       nprocs=2, start_method="spawn", join=True)  # fmt: skip
    old = [torch.load(tmp_path / f"r.{rank}") for rank in (0, 1)]
    leftover = []
    for o in old:
        pulled = [t for d in o["pulled"] for t in d]
        assert pulled[: len(o["rows"])] == o["rows"]  # rows are the pulled documents, in order
        leftover += pulled[len(o["rows"]) :]
    assert len({len(o["pulled"]) for o in old}) == 1  # state_dict lined the ranks up
    (state,) = PackedLoader.reshard([o["state"] for o in old], 1)
    it, pulled = loader(shards), []
    it.load_state_dict(state)
    _recording(it, pulled)
    before = [tuple(d) for o in old for d in o["pulled"]]
    batches = []
    while len(pulled) < 300 - len(before):  # the rest of the epoch
        batches.append(next(it))
    rows = _tokens(batches)
    assert rows[: len(leftover)] == leftover  # nothing the old ranks held is lost
    assert rows[len(leftover) :] == [t for d in pulled for t in d][: len(rows) - len(leftover)]
    rest = [tuple(d) for d in pulled[: 300 - len(before)]]
    dataset = loader(shards)
    everything = [tuple(dataset.docs[i].tolist()) for i in range(300)]  # one epoch, 1 rank
    assert sorted(before + rest) == sorted(everything)
    del it, dataset
    gc.collect()


def _go_on_on_two_ranks(rank: int, shards, store: str, results: str, state: dict) -> None:
    _join(rank, store)
    try:
        it, pulled = loader(shards), []
        it.load_state_dict(PackedLoader.reshard([state], 2)[rank])
        _recording(it, pulled)
        rest = (300 - state["stream"]["sample_in_epoch"] + 1) // 2  # this rank's share
        batches = []
        while len(pulled) < rest:
            batches.append(next(it))
        torch.save({"pulled": pulled[:rest], "rows": _tokens(batches)}, f"{results}.{rank}")
        del it
        gc.collect()
    finally:
        torch.distributed.destroy_process_group()


def test_resume_on_more_ranks(shards, tmp_path):
    """1 rank stops; 2 ranks go on: rank 0 first packs what the one rank held; together they
    read the rest of the epoch, every document once (streaming may repeat one to give both
    ranks the same count)."""
    it, before = loader(shards), []
    _recording(it, before)
    rows = _tokens(take(it, 7))
    state = it.state_dict()
    del it
    gc.collect()
    leftover = [t for d in before for t in d][len(rows) :]
    mp.start_processes(_go_on_on_two_ranks,
                       args=(shards, str(tmp_path / "store"), str(tmp_path / "r"), state),
                       nprocs=2, start_method="spawn", join=True)  # fmt: skip
    new = [torch.load(tmp_path / f"r.{rank}") for rank in (0, 1)]
    assert new[0]["rows"][: len(leftover)] == leftover
    after = [tuple(d) for n in new for d in n["pulled"]]
    dataset = loader(shards)
    everything = {tuple(dataset.docs[i].tolist()) for i in range(300)}
    read = [tuple(d) for d in before] + after
    assert set(read) == everything and len(read) - len(everything) <= 1
    del dataset
    gc.collect()


def test_a_truncated_shard_is_named_before_training_starts(shards, tmp_path, repo_root):
    """Issue 20, item 2: a shard truncated on disk is found by the loader, by the launch's
    pre-flight and by `rnnscale train` before a step (not inside streaming mid-run): one line
    naming the file and what to run; nothing in the stream is changed or removed."""
    import shutil

    from test_cli import rnnscale

    from rnnscale.data.integrity import DamagedShards
    from rnnscale.train.config import ConfigError, load_config
    from rnnscale.train.preflight import check_inputs

    copy = tmp_path / "a-shards"
    shutil.copytree(shards / "a-shards", copy)
    (shard,) = copy.glob("part-*/shard.*")
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[: size // 2])
    files = sorted((str(p), p.stat().st_size) for p in copy.rglob("*"))
    want = f"{shard} is {size // 2:,} bytes, its index says {size:,}"
    with pytest.raises(DamagedShards, match="run the same `rnnscale data prepare`") as e:
        loader(shards, streams=[(str(copy), None)])
    assert want in str(e.value)
    tok = shards / "tok" / "tokenizer.model"
    overrides = ["data.source=mds", f"data.streams=[{{path: {copy}}}]", f"data.tokenizer={tok}",
                 "model.vocab_size=300", f"run.dir={tmp_path / 'run'}"]  # fmt: skip
    with pytest.raises(ConfigError, match="data.streams: .* damaged shards") as e:
        check_inputs(load_config(repo_root / "configs/debug_cpu.yaml", overrides), 2)
    assert want in str(e.value)
    r = rnnscale("train", "configs/debug_cpu.yaml", *overrides, cwd=repo_root)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    said = [line for line in r.stderr.splitlines() if line.startswith("rnnscale:")]
    assert said == [f"rnnscale: {e.value}"], r.stderr  # (torch may warn on stderr too)
    assert sorted((str(p), p.stat().st_size) for p in copy.rglob("*")) == files
