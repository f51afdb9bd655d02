"""Resume on the streaming data path, end to end through `run(cfg)` on shards made by
`rnnscale data prepare`: a run killed with SIGKILL at random steps (1 rank with synchronous
saves, 2 ranks with asynchronous ones, 2 ranks as one sequence-parallel group reading replicated
samples) ends with the losses and the rows of the run that never stopped, bit for bit; a run
resumed on another number of ranks (2 -> 1, 1 -> 2) goes on with the stream. In every case each
document is counted: trained on exactly once, or still waiting in the loader's final state, and
together exactly the documents streaming handed out."""

import json
import random
import sys
from pathlib import Path

import pytest
import sentencepiece
from launcher import kill_when, losses, past, run_ranks
from recorded_train import kept_rows

from rnnscale.data.prepare import prepare
from rnnscale.data.tokenizer import BOS, EOS, train_tokenizer
from rnnscale.train.checkpoint import rank_file

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi".split()
STEPS = 12
BIN = Path(sys.executable).parent
RECORDED = str(Path(__file__).parent / "recorded_train.py")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(overrides that train on the shards, every document's tokens, overrides that train on
    120 of them): 4,000 distinct documents, more than the runs read, so no epoch ends; 120, so
    that a run goes through several epochs."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    texts = [f"doc{i} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 30)))
             for i in range(4000)]  # fmt: skip
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    train_tokenizer([str(root / "docs.jsonl")], 300, root / "tok")
    tok = root / "tok" / "tokenizer.model"
    prepare([str(root / "docs.jsonl")], tok, root / "shards", progress=False)
    (root / "few.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:120]))
    prepare([str(root / "few.jsonl")], tok, root / "few", progress=False)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tok))
    docs = {(BOS, *ids, EOS) for ids in sp.encode(texts)}
    assert len(docs) == len(texts)  # each document can be told from every other
    overrides = ["data.source=mds", f"data.streams=[{{path: {root / 'shards'}}}]",
                 f"data.tokenizer={tok}", "model.vocab_size=300"]  # fmt: skip
    few = [o.replace(str(root / "shards"), str(root / "few")) for o in overrides]
    return overrides, docs, few


def command(corpus, run_dir: Path, ranks: int, *extra: str) -> list[str]:
    args = [RECORDED, "configs/debug_cpu.yaml", *corpus[0], f"run.dir={run_dir}",
            f"train.max_steps={STEPS}", "train.seq_len=512", "checkpoint.interval=2",
            "checkpoint.keep=2", "log.progress_bar=false", "log.wandb.mode=disabled",
            "log.tensorboard=false", *extra]  # fmt: skip
    if ranks == 1:
        return [sys.executable, *args]
    return [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", str(ranks), *args]


def run_to_end(repo_root, corpus, run_dir, ranks, *extra):
    r = run_ranks(command(corpus, run_dir, ranks, *extra), cwd=repo_root, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]


def kill_at_random_steps(repo_root, corpus, run_dir, ranks, kills, seed, *extra) -> None:
    for step in sorted(random.Random(seed).sample(range(2, STEPS - 1), kills)):
        cmd = command(corpus, run_dir, ranks, *extra)
        assert kill_when(cmd, repo_root, past(run_dir, step))


def streams(run_dir: Path, readers: int = 1) -> dict[tuple[int, int], list[int]]:
    """(rank, first step) -> the tokens that rank trained on from that step on, for each
    stretch the same start trained without a break; only rank % readers == 0 when `readers`
    ranks read the same rows (whose rows must then be the same)."""
    kept = kept_rows(run_dir)
    assert sorted({step for step, _, _ in kept}) == list(range(1, STEPS + 1))
    out: dict[tuple[int, int], list[int]] = {}
    last: dict[int, tuple[str, int]] = {}
    for (step, rank, micro), (start, rows) in sorted(kept.items()):
        if rank % readers:
            assert rows == kept[step, rank - rank % readers, micro][1]  # replicated samples
            continue
        key = (rank, step if last.get(rank, (None,))[0] != start else last[rank][1])
        last[rank] = (start, key[1])
        out.setdefault(key, []).extend(t for row in rows for t in row)
    return out


def pieces(tokens: list[int]) -> list[tuple[int, ...]]:
    """Cut at every BOS and after every EOS: whole documents, and the parts of cut ones."""
    out, piece = [], []
    for t in tokens:
        if t == BOS and piece:
            out.append(tuple(piece))
            piece = []
        piece.append(t)
        if t == EOS:
            out.append(tuple(piece))
            piece = []
    return out + [tuple(piece)] * bool(piece)


def assert_each_document_once(run_dir: Path, docs: set, readers: int = 1) -> None:
    """Every document trained on at most once (a cut one: its head in one stretch, its rest at
    the start of a later one), and what was trained on plus what the final loader state still
    holds are exactly the documents streaming handed out (its global sample count)."""
    whole, heads, rests = [], [], []
    for tokens in streams(run_dir, readers).values():
        for p in pieces(tokens):
            (whole if p[0] == BOS and p[-1] == EOS else heads if p[0] == BOS else rests).append(p)
    for rest in rests:  # the rest of a document cut at a checkpoint continues elsewhere
        joined = [h for h in heads if h + rest in docs]
        assert joined, f"a document's rest with no head: {rest}"
        heads.remove(joined[0])
        whole.append(joined[0] + rest)
    assert set(whole) <= docs and len(set(whole)) == len(whole), "a document trained twice"
    final = max(p for p in (run_dir / "checkpoints").iterdir() if (p / "manifest.json").exists())
    waiting, in_flight, handed_out = [], [], 0
    world = json.loads((final / "meta.json").read_text())["world_size"]
    for rank in range(0, world, readers):
        state = json.loads((final / rank_file(rank)).read_text())["loader"]
        rows = state["rows"]
        left = [tuple(d) for d in state["buffer"][rows["doc_index"] - state["first"] :]]
        if rows["offset"]:
            in_flight.append(left[0][: rows["offset"]])
        waiting += left
        handed_out = state["stream"]["sample_in_epoch"]
    assert sorted(heads) == sorted(in_flight)  # the documents cut at the end
    assert set(waiting) <= docs and not set(waiting) & set(whole)
    assert len(set(whole) | set(waiting)) == len(whole) + len(waiting) == handed_out


@pytest.mark.parametrize("ranks,saves", [(1, "sync"), (2, "async")])
def test_streaming_run_killed_at_random_steps_resumes_bit_for_bit(repo_root, tmp_path, corpus,
                                                                  ranks, saves):  # fmt: skip
    mode = f"checkpoint.async={saves == 'async'}"
    whole = tmp_path / "whole"
    run_to_end(repo_root, corpus, whole, ranks, mode)
    run_dir = tmp_path / "killed"
    kill_at_random_steps(repo_root, corpus, run_dir, ranks, 3, ranks, mode)
    run_to_end(repo_root, corpus, run_dir, ranks, mode)
    assert losses(run_dir) == losses(whole)  # exact
    assert _joined(run_dir) == _joined(whole)  # the same rows on every rank
    assert_each_document_once(run_dir, corpus[1])
    assert_each_document_once(whole, corpus[1])


def _joined(run_dir: Path) -> dict[int, list[int]]:
    """Each rank's tokens over the whole run, the stretches of its starts joined."""
    out: dict[int, list[int]] = {}
    for (rank, _), tokens in sorted(streams(run_dir).items()):
        out.setdefault(rank, []).extend(tokens)
    return out


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_streaming_resume_on_another_number_of_ranks(repo_root, tmp_path, corpus, before, after):
    run_dir = tmp_path / "run"
    run_to_end(repo_root, corpus, run_dir, before, f"train.max_steps={STEPS // 2}")
    run_to_end(repo_root, corpus, run_dir, after)
    events = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
    assert [e["world_size"] for e in events if e["event"] == "start"] == [before, after]
    assert_each_document_once(run_dir, corpus[1])


def test_sequence_parallel_streaming_run_resumes_bit_for_bit(repo_root, tmp_path, corpus):
    """P = 2 on 2 ranks: both read the same samples (streaming's replication)."""
    sp = ["parallel.sequence_parallel_size=2", "train.global_batch_size=4"]
    whole = tmp_path / "whole"
    run_to_end(repo_root, corpus, whole, 2, *sp)
    run_dir = tmp_path / "killed"
    kill_at_random_steps(repo_root, corpus, run_dir, 2, 2, 5, *sp)
    run_to_end(repo_root, corpus, run_dir, 2, *sp)
    assert losses(run_dir) == losses(whole)
    assert _joined(run_dir) == _joined(whole)
    assert_each_document_once(run_dir, corpus[1], readers=2)


def test_two_ranks_go_through_many_epochs_and_a_resume(repo_root, tmp_path, corpus):
    """Streaming starts each epoch behind a barrier of the node's ranks (PackedLoader.line_up
    reads in lock step): more than ten epochs of 120 documents on 2 ranks, stopped and resumed
    in the middle."""
    few = (corpus[2], corpus[1])
    run_to_end(repo_root, few, tmp_path, 2, f"train.max_steps={STEPS // 2}")
    run_to_end(repo_root, few, tmp_path, 2)
    assert sorted(losses(tmp_path)) == list(range(1, STEPS + 1))
