"""`rnnscale data tokenizer` on bad input: one clear line with what to do (exit 2, no traceback),
nothing written when it fails, the inputs untouched; skipped items reported with file, line and
reason; long lines cut into sentences sentencepiece accepts rather than dropped."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece

from rnnscale.data.readers import Record, Skip, parse
from rnnscale.data.tokenizer import (
    MAX_SENTENCE_BYTES,
    CorpusError,
    explain,
    report,
    split_line,
    train_tokenizer,
)

WORDS = [f"def function_{i}(alpha, beta): return alpha * beta + {i}  # about item {i}\n"
         for i in range(60)]  # fmt: skip


def run(tmp_path, *args, repo_root):
    """The CLI on `args`; returns (returncode, stdout, stderr), checks no traceback."""
    from test_cli import rnnscale

    r = rnnscale("data", "tokenizer", *args, "--out", str(tmp_path / "tok"), cwd=repo_root)
    assert "Traceback" not in r.stderr, r.stderr
    return r.returncode, r.stdout, r.stderr


def snapshot(*paths):
    return {str(p): (p.read_bytes(), p.stat().st_mtime_ns) for p in paths}


def refused(tmp_path, inputs, vocab, repo_root) -> str:
    """The CLI refuses: exit 2, one line, no tokenizer written, the inputs untouched."""
    before = snapshot(*inputs)
    named = [arg for p in inputs for arg in ("--input", str(p))]
    code, out, err = run(tmp_path, *named, "--vocab-size", str(vocab), repo_root=repo_root)
    assert code == 2, (out, err)
    assert err.startswith("rnnscale: ") and err.count("\n") == 1, err
    assert not (tmp_path / "tok").exists()  # not even the directory
    assert snapshot(*inputs) == before
    return err


def test_vocabulary_larger_than_the_corpus_supports(tmp_path, repo_root):
    small = tmp_path / "small.txt"
    small.write_text("hello world\nsmall corpus\n")
    err = refused(tmp_path, [small], 32000, repo_root)
    assert "--vocab-size 32000 is larger than this corpus supports: at most " in err
    most = int(err.split("at most ")[1].split()[0])
    info = train_tokenizer([str(small)], most, tmp_path / "fits")  # the number given works
    assert info["vocab_size"] == most
    with pytest.raises(CorpusError, match=r"in the 1 lines sampled of 2\); give --vocab-size \d+ "
                       "or less, or a larger --max-sentences"):  # fmt: skip
        train_tokenizer([str(small)], 32000, tmp_path / "sampled", max_sentences=1)


def test_vocabulary_smaller_than_the_corpus_characters(tmp_path):
    cjk = tmp_path / "cjk.txt"
    cjk.write_text("".join(chr(0x4E00 + i) for i in range(300)) * 3 + "\n")
    before = snapshot(cjk)
    with pytest.raises(CorpusError, match="--vocab-size 300 is too small for this corpus") as e:
        train_tokenizer([str(cjk)], 300, tmp_path / "tok")
    assert "need 559 pieces; give --vocab-size 559 or more" in str(e.value)  # 300 + 256 + 3
    assert not (tmp_path / "tok").exists() and snapshot(cjk) == before
    assert train_tokenizer([str(cjk)], 559, tmp_path / "tok")["vocab_size"] == 559


def test_binary_file_is_named_and_skipped(tmp_path, repo_root):
    binary = tmp_path / "blob.bin"
    binary.write_bytes(bytes(range(256)) * 40)
    err = refused(tmp_path, [binary], 300, repo_root)
    assert f"no text to train a tokenizer on in --input '{binary}'" in err
    assert f"the first {binary}:1: binary data, not text (NUL at char 0)" in err
    text = tmp_path / "code.txt"
    text.write_text("".join(WORDS))
    info = train_tokenizer([str(binary), str(text)], 300, tmp_path / "tok")
    assert info["skipped"] == [
        {"file": str(binary), "line": 1, "reason": "binary data, not text (NUL at char 0)"}
    ]
    assert info["trained_on_lines"] == len(WORDS)


def test_undecodable_bytes_are_replaced_and_listed(tmp_path):
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("".join(WORDS).encode() + "caf\xe9\n".encode("latin-1"))
    info = train_tokenizer([str(latin)], 300, tmp_path / "tok")
    assert info["repaired"] == [{"file": str(latin), "line": 1}] and info["skipped"] == []
    assert "1 documents with undecodable bytes replaced" in report(info, tmp_path / "tok")


def test_a_line_over_the_sentence_limit_is_cut_not_dropped(tmp_path):
    spaced = " ".join(f"w{i % 97}" for i in range(30_000))  # about 120 KB, spaces
    solid = "\u00e9" * 40_000  # 80 KB, no space: cut at a character boundary
    corpus = tmp_path / "long.txt"
    corpus.write_text(spaced + "\n" + solid + "\n" + "".join(WORDS))
    info = train_tokenizer([str(corpus)], 300, tmp_path / "tok")
    pieces = split_line(spaced) + split_line(solid)
    assert len(pieces) == 4 and "".join(pieces) == spaced + solid
    assert all(len(p.encode()) <= MAX_SENTENCE_BYTES for p in pieces)
    assert split_line(spaced)[1].startswith(" ")  # cut before a space
    want = len(pieces) + len(WORDS)  # every piece is trained on, and counted
    assert info["trained_on_lines"] == info["corpus_lines"] == want
    assert info["split_lines"] == 2
    summary = report(info, tmp_path / "tok").splitlines()[0]
    assert f"trained on {want} lines (of {want} in 1 file; 2 lines over 65,536 bytes cut" in summary


def test_skipped_jsonl_lines_are_reported_like_prepare(tmp_path):
    jsonl = tmp_path / "a.jsonl"
    lines = [json.dumps({"text": t}) for t in WORDS[:30]]
    lines[2] = '{"text": "unterminated'
    lines[4] = '{"title": "no text", "url": "u"}'
    lines[6] = json.dumps({"text": 42})
    lines[8] = "[1, 2]"
    jsonl.write_text("\n".join(lines) + "\n")
    info = train_tokenizer([str(jsonl)], 300, tmp_path / "tok")
    assert [(s["file"], s["line"], s["reason"]) for s in info["skipped"]] == [
        (str(jsonl), 3, "malformed JSON (Unterminated string starting at, char 9)"),
        (str(jsonl), 5, "missing field 'text' (keys: title, url; set --text-key)"),
        (str(jsonl), 7, "field 'text' is not a string (number)"),
        (str(jsonl), 9, "missing field 'text' (the line is a JSON array, not an object)"),
    ]
    assert info["trained_on_lines"] == 26  # the used documents' lines only
    text = report(info, tmp_path / "tok")
    assert "4 items skipped" in text and f"  skipped {jsonl}:3: malformed JSON" in text
    assert json.loads((tmp_path / "tok" / "tokenizer.json").read_text()) == info


def test_jsonl_without_the_field_names_it(tmp_path, repo_root):
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("".join(json.dumps({"body": t}) + "\n" for t in WORDS[:5]))
    err = refused(tmp_path, [jsonl], 300, repo_root)
    assert f"(1 file: JSONL field 'text' in {jsonl}); 5 items skipped" in err
    assert "missing field 'text' (keys: body; set --text-key)" in err


def test_parquet_with_another_column_names_both(tmp_path, repo_root):
    table = tmp_path / "t.parquet"
    pq.write_table(pa.table({"body": WORDS[:5]}), table)
    err = refused(tmp_path, [table], 300, repo_root)
    assert f"(1 file: Parquet column 'text' in {table})" in err
    assert f"the first {table}:0: no column 'text' (columns: body; set --text-key)" in err


def test_a_file_that_is_not_parquet_is_reported(tmp_path, repo_root):
    fake = tmp_path / "fake.parquet"
    fake.write_text("not parquet at all\n")
    err = refused(tmp_path, [fake], 300, repo_root)
    assert f"{fake}:0: unreadable Parquet file (" in err


def test_many_inputs_and_kinds_are_summarised(tmp_path, repo_root):
    files = [tmp_path / f"e{i}.txt" for i in range(4)] + [tmp_path / "b.jsonl"]
    for f in files:
        f.write_text("   \n")
    err = refused(tmp_path, files, 300, repo_root)
    named = ", ".join(repr(str(f)) for f in files[:3])
    assert (
        f"--input {named} and 2 more (5 files: plain text in 4 files; JSONL field 'text' in "
        f"{files[4]}); 4 items skipped (empty document: 4), the first {files[0]}:1: " in err
    )  # the JSONL line is blank: no record


def test_lone_surrogate_escapes_are_bad_bytes(tmp_path):
    record = Record("bytes", b'{"text": "a \\ud800 b"}', "f.jsonl", 1, json=True)
    assert parse(record).text == "a \ufffd b" and parse(record).repaired
    assert parse(record, bad_bytes="skip") == Skip(
        "f.jsonl", 1, "unpaired surrogate escape at char 2"
    )
    jsonl = tmp_path / "s.jsonl"
    jsonl.write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in WORDS) + '{"text": "\\udc00"}\n'
    )
    info = train_tokenizer([str(jsonl)], 300, tmp_path / "tok")
    assert info["repaired"] == [{"file": str(jsonl), "line": len(WORDS) + 1}]


def test_other_sentencepiece_errors_lose_their_source_location():
    error = "INTERNAL: src/trainer_interface.cc(428) [!sentences_.empty()] \n"
    assert explain(error, 300, 0, 0) == (
        "sentencepiece cannot train on this corpus (0 lines sampled): [!sentences_.empty()]"
    )


def test_bad_options_are_refused_before_reading(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(WORDS))
    with pytest.raises(ValueError, match="--max-sentences must be at least 1, got 0"):
        train_tokenizer([str(corpus)], 300, tmp_path / "tok", max_sentences=0)
    with pytest.raises(ValueError, match="--out .* is a file: give a directory"):
        train_tokenizer([str(corpus)], 300, corpus)
    assert not (tmp_path / "tok").exists() and corpus.read_text() == "".join(WORDS)


def test_a_new_tokenizer_replaces_the_old_one_whole(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(WORDS))
    train_tokenizer([str(corpus)], 340, tmp_path / "tok")
    info = train_tokenizer([str(corpus)], 300, tmp_path / "tok")
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == [
        "tokenizer.json", "tokenizer.model"]  # fmt: skip
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "tok" / "tokenizer.model"))
    assert sp.vocab_size() == info["vocab_size"] == 300
    with pytest.raises(CorpusError):  # a failed run leaves the old tokenizer as it was
        train_tokenizer([str(corpus)], 32000, tmp_path / "tok")
    assert json.loads((tmp_path / "tok" / "tokenizer.json").read_text()) == info
