"""The tokenizer and `data prepare`: shards hold exactly what the tokenizer gives for every
document, the skip report is exact for a corpus seeded with known bad items, re-running is a
no-op, an interrupted run comes back identical, and the worker count does not change the shards."""

import hashlib
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece
from streaming.base.format import reader_from_json

from rnnscale.data.prepare import MARKER, prepare
from rnnscale.data.readers import list_files
from rnnscale.data.tokenizer import BOS, EOS, train_tokenizer

GOOD = [f"def f{i}(x):\n    return x * {i}  # item {i}\n" for i in range(40)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Files with known bad items; returns (dir, expected skips, expected repairs, good texts)."""
    root = tmp_path_factory.mktemp("corpus")
    jsonl = root / "a.jsonl"
    lines = [json.dumps({"text": t}).encode() for t in GOOD[:10]]
    lines.insert(2, b'{"text": "unterminated')  # line 3
    lines.insert(4, b'{"title": "no text field"}')  # line 5
    lines.insert(6, json.dumps({"text": 42}).encode())  # line 7
    lines.insert(8, json.dumps({"text": "   "}).encode())  # line 9
    lines.insert(10, b'{"text": "bad \xff byte"}')  # line 11: undecodable, replaced
    jsonl.write_bytes(b"\n".join(lines) + b"\n")
    (root / "b.txt").write_bytes(GOOD[10].encode() + b"\xfe tail\n")  # repaired
    (root / "c.txt").write_text("")  # empty document
    table = pa.table({"text": [GOOD[11], None, GOOD[12], ""]})
    pq.write_table(table, root / "d.parquet")
    pq.write_table(pa.table({"body": ["x"]}), root / "e.parquet")  # no text column
    skips = [
        (str(jsonl), 3, "malformed JSON"),
        (str(jsonl), 5, "missing field 'text'"),
        (str(jsonl), 7, "field 'text' is not a string"),
        (str(jsonl), 9, "empty document"),
        (str(root / "c.txt"), 1, "empty document"),
        (str(root / "d.parquet"), 2, "'text' is null"),
        (str(root / "d.parquet"), 4, "empty document"),
        (str(root / "e.parquet"), 0, "no column 'text'"),
    ]
    repairs = [(str(jsonl), 11), (str(root / "b.txt"), 1)]
    texts = GOOD[:6] + ["bad \ufffd byte"] + GOOD[6:10]
    texts += [GOOD[10] + "\ufffd tail\n", GOOD[11], GOOD[12]]
    return root, skips, repairs, texts


@pytest.fixture(scope="module")
def tokenizer(corpus, tmp_path_factory):
    root = corpus[0]
    out = tmp_path_factory.mktemp("tok")
    info = train_tokenizer([str(root / "*")], 300, out)
    return out / "tokenizer.model", info


def shard_samples(out) -> list[np.ndarray]:
    index = json.loads((out / "index.json").read_text())
    samples = []
    for shard in index["shards"]:
        reader = reader_from_json(str(out), None, shard)
        samples += [reader[i]["tokens"] for i in range(reader.samples)]
    return samples


def digest(out) -> dict:
    shards = sorted(out.glob("part-*/shard.*"))
    assert shards
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in shards}


def test_tokenizer_files_and_properties(tokenizer):
    path, info = tokenizer
    assert info["fingerprint"] == hashlib.sha256(path.read_bytes()).hexdigest()
    saved = json.loads((path.parent / "tokenizer.json").read_text())
    assert saved == info and (saved["bos_id"], saved["eos_id"]) == (BOS, EOS)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    assert sp.vocab_size() == 300
    text = "x  =\t42\n    y = '\u00e9\U0001f600'\n"
    assert sp.decode(sp.encode(text)) == text  # whitespace kept, unseen characters as bytes
    assert sp.unk_id() not in sp.encode(text)
    digits = [p for p in sp.encode("98765", out_type=str) if p.strip("\u2581")]
    assert all(len(p) == 1 for p in digits)  # digits split one by one


def test_shards_hold_exactly_the_tokenized_documents(corpus, tokenizer, tmp_path):
    root, skips, repairs, texts = corpus
    out = tmp_path / "shards"
    stats = prepare([str(root / "*")], tokenizer[0], out, progress=False)
    assert [(s["file"], s["line"], s["reason"].split(" (")[0]) for s in stats["skipped"]] == skips
    assert [(r["file"], r["line"]) for r in stats["repaired"]] == repairs
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer[0]))
    want = [[BOS, *sp.encode(t), EOS] for t in texts]
    got = shard_samples(out)
    assert [s.dtype for s in got] == [np.uint16] * len(got)
    assert [s.tolist() for s in got] == want
    assert stats["documents"] == len(want) and stats["tokens"] == sum(map(len, want))
    assert json.loads((out / "stats.json").read_text())["tokens"] == stats["tokens"]


def test_bad_bytes_can_be_skipped_instead(corpus, tokenizer, tmp_path):
    root = corpus[0]
    stats = prepare([str(root / "*")], tokenizer[0], tmp_path, bad_bytes="skip", progress=False)
    assert stats["repaired"] == []
    bad = [(s["file"], s["line"]) for s in stats["skipped"] if "undecodable" in s["reason"]]
    assert bad == [(r[0], r[1]) for r in corpus[2]]


def test_rerun_is_a_no_op_and_another_job_is_refused(corpus, tokenizer, tmp_path):
    inputs = [str(corpus[0] / "*")]
    first = prepare(inputs, tokenizer[0], tmp_path, progress=False)
    stamp = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    again = prepare(inputs, tokenizer[0], tmp_path, progress=False)
    assert again == json.loads((tmp_path / "stats.json").read_text())
    assert again["tokens"] == first["tokens"]
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == stamp
    with pytest.raises(ValueError, match="holds shards from a different prepare"):
        prepare(inputs, tokenizer[0], tmp_path, bad_bytes="skip", progress=False)


def test_interrupted_run_comes_back_identical_and_workers_do_not_matter(
    corpus, tokenizer, tmp_path
):
    inputs = [str(corpus[0] / "*")]
    clean = tmp_path / "clean"
    prepare(inputs, tokenizer[0], clean, progress=False)
    broken = tmp_path / "broken"
    prepare(inputs, tokenizer[0], broken, progress=False)
    (broken / MARKER).unlink()  # as if killed before the commit, with a half-written shard
    shard = sorted(broken.glob("part-*/shard.*"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    prepare(inputs, tokenizer[0], broken, workers=2, progress=False)
    assert digest(broken) == digest(clean)
    assert (broken / "index.json").read_bytes() == (clean / "index.json").read_bytes()


def test_parts_cut_inside_files_change_nothing_but_the_layout(corpus, tokenizer, tmp_path):
    """Tiny parts cut the JSONL file at line boundaries and spread files over many parts
    (written by 2 workers): the same documents in the same order, the same skip and repair
    locations, as one part; an interrupted run keeps its whole parts and redoes the rest."""
    inputs = [str(corpus[0] / "*")]
    whole = prepare(inputs, tokenizer[0], tmp_path / "one", progress=False)
    cut = prepare(inputs, tokenizer[0], tmp_path / "many", part_bytes=64, workers=2,
                  progress=False)  # fmt: skip
    assert whole["parts"] == 1 and cut["parts"] > 8
    for key in ("documents", "tokens", "skipped", "repaired"):
        assert cut[key] == whole[key], key
    got = [x.tolist() for x in shard_samples(tmp_path / "many")]
    assert got == [x.tolist() for x in shard_samples(tmp_path / "one")]
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "many").glob("part-*")}
    (tmp_path / "many" / MARKER).unlink()  # interrupted before the commit, one part unfinished
    os.rename(tmp_path / "many" / "part-00003", tmp_path / "many" / ".part-00003.tmp")
    again = prepare(inputs, tokenizer[0], tmp_path / "many", part_bytes=64, progress=False)
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "many").glob("part-*")}
    assert after.keys() == before.keys()
    assert [n for n in after if after[n] != before[n]] == ["part-00003"]  # only it was redone
    assert again["tokens"] == whole["tokens"]
    assert [x.tolist() for x in shard_samples(tmp_path / "many")] == got


def test_blank_line_text_is_cut_only_at_blank_lines(tokenizer, tmp_path):
    blocks = [f"block {i}\nline two of {i}\n" for i in range(30)]
    text = "".join(b + (" \t\n" if i % 3 else "\n") for i, b in enumerate(blocks))
    (tmp_path / "f.txt").write_text("\n" + text)
    inputs = [str(tmp_path / "f.txt")]
    spans_ = list_spans(inputs[0], 50)
    assert len(spans_) > 5
    data = (tmp_path / "f.txt").read_bytes()
    for span in spans_[1:]:
        assert data[span.start - 1 : span.start] == b"\n"
        assert data[span.start :].split(b"\n")[0].strip() == b""  # a blank line starts it
        assert span.line == data[: span.start].count(b"\n") + 1
    one = prepare(inputs, tokenizer[0], tmp_path / "one", split_blank_lines=True, progress=False)
    cut = prepare(inputs, tokenizer[0], tmp_path / "cut", split_blank_lines=True, part_bytes=50,
                  progress=False)  # fmt: skip
    assert cut["parts"] > 5 and one["documents"] == cut["documents"] == 30
    assert shard_lists(tmp_path / "one") == shard_lists(tmp_path / "cut")
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer[0]))
    assert shard_lists(tmp_path / "cut") == [[BOS, *sp.encode(b), EOS] for b in blocks]


def list_spans(path, part_bytes):
    from rnnscale.data.readers import spans

    return spans([path], part_bytes, split_blank_lines=True)


def shard_lists(out):
    return [x.tolist() for x in shard_samples(out)]


def test_inputs_that_match_nothing_are_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="matches no file"):
        list_files([str(tmp_path / "*.jsonl")])


def test_cli_tokenizer_and_prepare(corpus, tmp_path, repo_root):
    from test_cli import rnnscale

    root = corpus[0]
    r = rnnscale("data", "tokenizer", "--input", str(root / "*"), "--vocab-size", "300",
                 "--out", str(tmp_path / "tok"), cwd=repo_root)  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = rnnscale("data", "prepare", "--input", str(root / "*.jsonl"), "--tokenizer",
                 str(tmp_path / "tok" / "tokenizer.model"), "--out", str(tmp_path / "s"),
                 "--workers", "2", "--no-progress", cwd=repo_root)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "11 documents" in r.stdout and "4 items skipped" in r.stdout
    assert f"skipped {root / 'a.jsonl'}:3: malformed JSON" in r.stdout
    r = rnnscale("data", "prepare", "--input", str(tmp_path / "none*"), "--tokenizer", "x",
                 "--out", str(tmp_path / "s2"), cwd=repo_root)  # fmt: skip
    assert r.returncode == 2 and "matches no file" in r.stderr
    assert not os.path.exists(tmp_path / "s2")


def test_builtin_corpus_is_the_stdlib_source():
    from rnnscale.data.builtin import builtin_inputs

    files = list_files(builtin_inputs("python-stdlib"))
    assert len(files) > 500 and all(f.endswith(".py") for f in files)
    assert any(f.endswith(os.path.join("json", "decoder.py")) for f in files)
    with pytest.raises(ValueError, match="--builtin must be one of python-stdlib"):
        builtin_inputs("wikipedia")


def test_training_and_generation_on_prepared_shards(tmp_path, repo_root):
    import sysconfig

    from test_cli import rnnscale

    stdlib_json = os.path.join(sysconfig.get_paths()["stdlib"], "json", "*.py")
    train_tokenizer([stdlib_json], 512, tmp_path / "tok")
    tok = tmp_path / "tok" / "tokenizer.model"
    prepare([stdlib_json], tok, tmp_path / "shards", progress=False)
    stdlib_html = os.path.join(sysconfig.get_paths()["stdlib"], "html", "*.py")
    prepare([stdlib_html], tok, tmp_path / "val", progress=False)
    run_dir = tmp_path / "run"
    r = rnnscale("train", "configs/debug_cpu.yaml", "data.source=mds",
                 f"data.streams=[{{path: {tmp_path / 'shards'}}}]", f"data.tokenizer={tok}",
                 f"data.val_streams=[{{path: {tmp_path / 'val'}}}]", "train.eval_interval=2",
                 "model.vocab_size=512", "train.max_steps=3", f"run.dir={run_dir}",
                 "log.progress_bar=false", cwd=repo_root)  # fmt: skip
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    evals = [(m["step"], m["eval_loss"]) for m in records if "eval_loss" in m]
    assert [step for step, _ in evals] == [2, 3] and all(0 < loss < 10 for _, loss in evals)
    assert (run_dir / "tokenizer.model").read_bytes() == tok.read_bytes()
    r = rnnscale("generate", str(run_dir), "--prompt", "import json", "--max-new-tokens", "8",
                 cwd=repo_root)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("import json")
    small = rnnscale("train", "configs/debug_cpu.yaml", "data.source=mds",
                     f"data.streams=[{{path: {tmp_path / 'shards'}}}]", f"data.tokenizer={tok}",
                     f"run.dir={tmp_path / 'run2'}", cwd=repo_root)  # fmt: skip
    assert small.returncode == 2 and "raise model.vocab_size to at least 512" in small.stderr
    assert "Traceback" not in small.stderr
    train_tokenizer([stdlib_html], 512, tmp_path / "other")  # not the shards' tokenizer
    other = rnnscale("train", "configs/debug_cpu.yaml", "data.source=mds",
                     f"data.streams=[{{path: {tmp_path / 'shards'}}}]", "model.vocab_size=512",
                     f"data.tokenizer={tmp_path / 'other' / 'tokenizer.model'}",
                     f"run.dir={tmp_path / 'run3'}", cwd=repo_root)  # fmt: skip
    assert other.returncode == 2 and "was tokenized with another tokenizer" in other.stderr


def test_remote_output_gets_every_file_marker_last(corpus, tokenizer, tmp_path):
    """A directory as the remote: streaming's uploader copies (an s3:// or gs:// URL goes
    through the same uploader). The remote copy is complete and readable."""
    inputs = [str(corpus[0] / "*.jsonl")]
    remote = tmp_path / "remote"
    stats = prepare(inputs, tokenizer[0], tmp_path / "local", remote=str(remote), progress=False)
    local = sorted(str(p.relative_to(tmp_path / "local")) for p in (tmp_path / "local").rglob("*")
                   if p.name not in (".prepare-job", "part-stats.json"))  # fmt: skip
    assert sorted(str(p.relative_to(remote)) for p in remote.rglob("*")) == local
    assert MARKER in local and "index.json" in local and "stats.json" in local
    on_remote = [x.tolist() for x in shard_samples(remote)]
    assert on_remote == [x.tolist() for x in shard_samples(tmp_path / "local")]
    assert len(on_remote) == stats["documents"]
    marker_time = (remote / MARKER).stat().st_mtime_ns
    assert all(p.stat().st_mtime_ns <= marker_time for p in remote.rglob("*"))


def test_damaged_shards_are_found_and_only_their_parts_written_again(
    corpus, tokenizer, tmp_path, capsys
):
    """Issue 20, item 2: a finished set with a truncated shard (and one with a byte flipped,
    same size: the recorded hash finds it) is not 'nothing to do': the re-run names the file,
    writes only those parts again, keeps the others untouched, and ends with the clean shards."""
    inputs = [str(corpus[0] / "*")]
    out = tmp_path / "s"
    first = prepare(inputs, tokenizer[0], out, part_bytes=64, progress=False)
    clean = digest(out)
    index = json.loads((out / "index.json").read_text())
    assert all("xxh3_64" in s["raw_data"]["hashes"] for s in index["shards"])
    shards = sorted(out.glob("part-*/shard.*"))
    truncated, flipped = shards[1], shards[3]
    truncated.write_bytes(truncated.read_bytes()[:100])
    data = bytearray(flipped.read_bytes())
    data[-1] ^= 1
    flipped.write_bytes(bytes(data))
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*")}
    capsys.readouterr()
    again = prepare(inputs, tokenizer[0], out, part_bytes=64, progress=False)
    said = capsys.readouterr().out
    assert f"damaged shards: {truncated.parent.name}: {truncated} is 100 bytes" in said, said
    assert "(and 1 more)" in said and f"writing 2 of {first['parts']} parts again" in said
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*")}
    redone = sorted(n for n in after if after[n] != before[n])
    assert redone == sorted({truncated.parent.name, flipped.parent.name})
    assert digest(out) == clean
    assert {**again, "seconds": 0} == {**first, "seconds": 0}
    capsys.readouterr()
    prepare(inputs, tokenizer[0], out, part_bytes=64, progress=False)
    assert "every shard checked): nothing to do" in capsys.readouterr().out
    assert (corpus[0] / "a.jsonl").exists()  # the inputs are untouched


def test_a_corpus_with_no_usable_document_is_refused(tokenizer, tmp_path, repo_root):
    """Issue 20, item 5: an empty file and a Parquet file without the text column: exit 2, one
    line naming the inputs, the field looked for and every skip; no shards, no marker."""
    from test_cli import rnnscale

    (tmp_path / "empty.txt").write_text("")
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "other.parquet")
    out = tmp_path / "shards"
    r = rnnscale("data", "prepare", "--input", str(tmp_path / "empty.txt"), "--input",
                 str(tmp_path / "other.parquet"), "--tokenizer", str(tokenizer[0]), "--out",
                 str(out), "--workers", "1", "--no-progress", cwd=repo_root)  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    line = r.stderr.strip()
    assert line.startswith(f"rnnscale: --input '{tmp_path / 'empty.txt'}'") and "(2 files)" in line
    assert "no usable document" in line and "Parquet column 'text'" in line
    assert f"2 items skipped: {tmp_path / 'empty.txt'}:1: empty document; " in line
    assert f"{tmp_path / 'other.parquet'}:0: no column 'text'" in line
    assert not out.exists()  # nothing left, done-marked or not
    assert (tmp_path / "empty.txt").exists() and (tmp_path / "other.parquet").exists()
    out.mkdir()
    (out / "mine.txt").write_text("kept")  # a directory that was there keeps what it held
    with pytest.raises(ValueError, match="no usable document"):
        prepare([str(tmp_path / "other.parquet")], tokenizer[0], out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]


class Recording:
    """A tokenizer that records the longest text it was asked to encode."""

    def __init__(self, sp):
        self.sp, self.longest = sp, 0

    def encode(self, text, **kw):
        texts = text if isinstance(text, list) else [text]
        self.longest = max([self.longest, *map(len, texts)])
        return self.sp.encode(text, **kw)

    def __getattr__(self, name):
        return getattr(self.sp, name)


LONG = "".join(
    f"def f{i}(x):\n\treturn x  *  {i}\u2581{'#' * (i % 7)}   \n" + "    " * (i % 5)
    for i in range(300)
)
LONG += "y" * 700 + " " * 600 + "z end"  # a word and a space run longer than a piece


def test_a_long_document_is_encoded_in_pieces_with_the_ids_of_one_encode(
    tokenizer, tmp_path, monkeypatch
):
    """Issue 20, item 8: a document longer than PIECE_CHARS goes to sentencepiece in pieces of
    at most that many characters, cut just before a space run (a longer piece only where no such
    point exists: here a 700-character word and a 600-space run), and gets exactly the ids of
    one encode of the whole text; a tokenizer for which the rule does not hold is encoded whole."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    from rnnscale.data import encoding
    from rnnscale.data import prepare as prepare_module

    sp = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer[0]))
    got = list(encoding.pieces(LONG, 64))
    assert "".join(got) == LONG and len(got) > 100
    for piece in got[1:]:
        assert piece[0] in " \u2581"
    for piece in got[:-1]:
        assert piece[-1] not in " \u2581"  # a cut never splits a space run
        assert len(piece) <= 64 or not encoding._SEAM.search(piece[: 64 + 1])  # none earlier
    assert max(map(len, got)) > 600  # the word and the space run stay whole
    recording = Recording(sp)
    monkeypatch.setattr(encoding, "PIECE_CHARS", 64)
    monkeypatch.setattr(prepare_module, "load_tokenizer", lambda path: recording)
    (tmp_path / "long.txt").write_text(LONG)
    (tmp_path / "short.txt").write_text("x = 1\n")
    inputs = [str(tmp_path / "long.txt"), str(tmp_path / "short.txt")]
    stats = prepare(inputs, tokenizer[0], tmp_path / "s", progress=False)
    whole = [BOS, *sp.encode(LONG), EOS]
    assert shard_lists(tmp_path / "s") == [whole, [BOS, *sp.encode("x = 1\n"), EOS]]
    assert recording.longest == max(map(len, got)) < len(LONG)
    assert stats["bytes"] == len(LONG.encode()) + 6
    model = pb.ModelProto()
    model.ParseFromString(sp.serialized_model_proto())
    model.normalizer_spec.add_dummy_prefix = True  # each piece would get a leading space
    other = sentencepiece.SentencePieceProcessor(model_proto=model.SerializeToString())
    assert "add_dummy_prefix" in encoding.seam_problem(other)
    assert encoding.seam_problem(sp) is None
    recording = Recording(other)
    (ids,) = encoding.DocumentEncoder(recording, "uint16", limit=64).encode([LONG])
    assert ids.tolist() == [BOS, *other.encode(LONG), EOS] and recording.longest == len(LONG)


def test_a_killed_prepare_keeps_its_finished_parts_untouched(tokenizer, tmp_path):
    """`data prepare` with 2 workers, killed with SIGKILL (the process and its workers) once
    some parts are finished, then run again: the finished parts keep their bytes and mtimes,
    the rest is written, and the shards equal those of a run that never stopped."""
    import subprocess
    import sys
    import time

    from launcher import kill_tree

    rng = np.random.default_rng(0)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for f in range(40):
        lines = [json.dumps({"text": "".join(rng.choice(GOOD, 3))}) for _ in range(300)]
        (corpus / f"{f:02d}.jsonl").write_text("\n".join(lines) + "\n")
    args = f"[{str(corpus / '*')!r}], {str(tokenizer[0])!r}, OUT, part_bytes=8192, workers=2"
    code = f"from rnnscale.data.prepare import prepare; prepare({args}, progress=False)"
    clean, out = tmp_path / "clean", tmp_path / "out"
    subprocess.run([sys.executable, "-c", code.replace("OUT", repr(str(clean)))], check=True)
    proc = subprocess.Popen([sys.executable, "-c", code.replace("OUT", repr(str(out)))])
    deadline = time.monotonic() + 120
    while len(list(out.glob("part-*"))) < 10 and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    kill_tree(proc.pid)
    proc.wait()
    finished = {p.name: (p.stat().st_mtime_ns, digest_part(p)) for p in out.glob("part-*")}
    assert 10 <= len(finished) < len(list(clean.glob("part-*"))), "killed too late"
    assert not (out / MARKER).exists()
    subprocess.run([sys.executable, "-c", code.replace("OUT", repr(str(out)))], check=True)
    for name, (mtime, hashes) in finished.items():
        assert (out / name).stat().st_mtime_ns == mtime and digest_part(out / name) == hashes
    assert digest(out) == digest(clean)
    assert (out / "index.json").read_bytes() == (clean / "index.json").read_bytes()


def digest_part(part) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(part.iterdir())}
