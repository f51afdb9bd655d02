"""Training the run's tokenizer: sentencepiece BPE with byte fallback.

`train_tokenizer(inputs, vocab_size, out_dir)` reads documents with `rnnscale.data.readers`,
samples at most `max_sentences` lines of them (reservoir sampling, seeded: memory stays bounded
however large the corpus, and the same inputs give the same tokenizer), and trains a
sentencepiece BPE model with byte fallback (no byte is ever unknown), digits split one by one,
and no whitespace normalisation (code and text keep their exact spacing). It writes
`DIR/tokenizer.model` and `DIR/tokenizer.json` with the model's SHA-256 fingerprint (checkpoints
record it, so a resume with another tokenizer is refused) and its special ids.

Nothing is dropped silently: items the readers skip (and binary documents) are listed in
`tokenizer.json` and the report; a line longer than sentencepiece's `max_sentence_length` (which
sentencepiece would drop) is split at spaces or tabs into sentences that fit, and counted. A
corpus that gives no text, or that sentencepiece cannot train on, raises `CorpusError` with
what to do, before anything is written. Files are written aside and renamed, `tokenizer.json`
last.

Ids: 0 unk, 1 BOS, 2 EOS (the synthetic data and the shards use the same), no padding id.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import sentencepiece

from rnnscale.data.readers import (
    Corpus,
    Document,
    list_files,
    localize,
    looked_for,
    skip_lines,
)

UNK, BOS, EOS = 0, 1, 2
MODEL_FILE, INFO_FILE = "tokenizer.model", "tokenizer.json"
MAX_SENTENCE_BYTES = 1 << 16  # sentencepiece's max_sentence_length (in UTF-8 bytes), as we set it
COVERAGE = 0.9995  # sentencepiece's character_coverage


class CorpusError(ValueError):
    """Inputs a tokenizer cannot be trained on; the message says why and what to do."""


def split_line(line: str, limit: int = MAX_SENTENCE_BYTES) -> list[str]:
    """`line` as sentences of at most `limit` UTF-8 bytes: cut before the last space or tab
    that keeps a piece within the limit, or, with none, at the last character boundary."""
    if len(line) * 4 <= limit:  # at most 4 bytes a character
        return [line]
    data = line.encode()
    pieces, start = [], 0
    while len(data) - start > limit:
        end = start + limit
        cut = max(data.rfind(b" ", start + 1, end + 1), data.rfind(b"\t", start + 1, end + 1))
        if cut < 0:
            cut = end
            while data[cut] & 0xC0 == 0x80:  # inside a multi-byte character
                cut -= 1
        pieces.append(data[start:cut].decode())
        start = cut
    pieces.append(data[start:].decode())
    return pieces


@dataclass
class Sample:
    lines: list[str] = field(default_factory=list)  # what sentencepiece trains on
    seen: int = 0  # non-empty sentences in the corpus (long lines counted as their pieces)
    split: int = 0  # lines longer than the limit, split


def sample_lines(
    docs: Iterator[Document], max_sentences: int, seed: int, limit: int = MAX_SENTENCE_BYTES
) -> Sample:
    """A uniform sample of at most `max_sentences` non-empty sentences (reservoir sampling):
    the documents' lines, each cut by `split_line` to at most `limit` bytes."""
    rng = random.Random(seed)
    sample = Sample()
    for doc in docs:
        for line in doc.text.splitlines():
            if not line.strip():
                continue
            pieces = split_line(line, limit)
            sample.split += len(pieces) > 1
            for piece in pieces:
                sample.seen += 1
                if len(sample.lines) < max_sentences:
                    sample.lines.append(piece)
                else:
                    j = rng.randrange(sample.seen)
                    if j < max_sentences:
                        sample.lines[j] = piece
    return sample


def train_tokenizer(
    inputs: list[str],
    vocab_size: int,
    out_dir: str | Path,
    *,
    max_sentences: int = 2_000_000,
    text_key: str = "text",
    split_blank_lines: bool = False,
    seed: int = 0,
) -> dict:
    """Train and write the tokenizer; returns the contents of tokenizer.json."""
    out = Path(out_dir)
    _check_options(vocab_size, max_sentences, out)
    files = list_files(inputs)
    with tempfile.TemporaryDirectory(prefix="rnnscale-inputs-") as cache:
        local, origin = localize(files, Path(cache))  # URLs are downloaded, local paths stay
        corpus = Corpus(local, text_key=text_key, split_blank_lines=split_blank_lines)
        sample = sample_lines(corpus.documents(), max_sentences, seed)
    skipped = [{**s.as_dict(), "file": origin.get(s.file, s.file)} for s in corpus.skips]
    repaired = [{**r, "file": origin.get(r["file"], r["file"])} for r in corpus.repaired]
    if not sample.lines:
        where = looked_for(files, text_key, split_blank_lines)
        raise CorpusError(nothing_usable(inputs, len(files), where, skipped))
    data = _train(sample, vocab_size)
    info = {
        "fingerprint": hashlib.sha256(data).hexdigest(),
        "vocab_size": vocab_size,
        "unk_id": UNK,
        "bos_id": BOS,
        "eos_id": EOS,
        "pad_id": None,
        "trained_on_lines": len(sample.lines),
        "corpus_lines": sample.seen,
        "split_lines": sample.split,
        "files": len(files),
        "repaired": repaired,
        "skipped": skipped,
    }
    _write(out, data, info)
    return info


def _check_options(vocab_size: int, max_sentences: int, out: Path) -> None:
    if vocab_size < 260:
        raise ValueError(
            f"--vocab-size must be at least 260 (256 byte pieces + specials), got {vocab_size}"
        )
    if max_sentences < 1:
        raise ValueError(f"--max-sentences must be at least 1, got {max_sentences}")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: give a directory for tokenizer.model")


def nothing_usable(inputs: list[str], files: int, where: str, skipped: list[dict]) -> str:
    """One line: the inputs, what was looked for in them, and why nothing was usable."""
    named = ", ".join(repr(i) for i in inputs[:3])
    if len(inputs) > 3:
        named += f" and {len(inputs) - 3} more"
    message = (
        f"no text to train a tokenizer on in --input {named} ({plural(files, 'file')}: {where})"
    )
    if not skipped:
        return message
    reasons = Counter(s["reason"].split(" (")[0] for s in skipped)
    counted = ", ".join(f"{reason}: {n:,}" for reason, n in reasons.most_common(3))
    first = skipped[0]
    return (
        f"{message}; {plural(len(skipped), 'item')} skipped ({counted}), the first "
        f"{first['file']}:{first['line']}: {first['reason']}"
    )


def plural(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def _train(sample: Sample, vocab_size: int) -> bytes:
    model = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(sample.lines),
            model_writer=model,
            vocab_size=vocab_size,
            model_type="bpe",
            byte_fallback=True,
            split_digits=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_by_whitespace=True,
            max_sentence_length=MAX_SENTENCE_BYTES,
            unk_id=UNK,
            bos_id=BOS,
            eos_id=EOS,
            pad_id=-1,
            character_coverage=COVERAGE,
            num_threads=1,
            minloglevel=2,
        )
    except RuntimeError as e:  # sentencepiece's failed CHECKs
        raise CorpusError(explain(str(e), vocab_size, len(sample.lines), sample.seen)) from None
    return model.getvalue()


_TOO_HIGH = re.compile(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)")
_TOO_FEW = re.compile(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)")


def explain(error: str, vocab_size: int, lines: int, corpus_lines: int) -> str:
    """Sentencepiece's error, as what to do about it."""
    if found := _TOO_HIGH.search(error):
        most = int(found[2])
        more = "a larger --max-sentences" if corpus_lines > lines else "more text"
        return (
            f"--vocab-size {vocab_size} is larger than this corpus supports: at most {most} "
            f"(sentencepiece found no more merges in the {lines:,} lines sampled of "
            f"{corpus_lines:,}); give --vocab-size {most} or less, or {more}"
        )
    if found := _TOO_FEW.search(error):
        least = int(found[2])
        return (
            f"--vocab-size {vocab_size} is too small for this corpus: its characters (those "
            f"covering {COVERAGE:.2%} of it), the 256 byte pieces and the 3 specials need "
            f"{least} pieces; give --vocab-size {least} or more"
        )
    detail = " ".join(re.sub(r"^\w+: \S+\(\d+\) ", "", error.strip()).split())  # no "src/x.cc(1)"
    return f"sentencepiece cannot train on this corpus ({lines:,} lines sampled): {detail}"


def _write(out: Path, model: bytes, info: dict) -> None:
    """tokenizer.model, then tokenizer.json, each written aside and renamed when whole; an old
    tokenizer.json goes first, so a model without one is a write that did not finish."""
    out.mkdir(parents=True, exist_ok=True)
    (out / INFO_FILE).unlink(missing_ok=True)
    for name, data in ((MODEL_FILE, model), (INFO_FILE, json.dumps(info, indent=2) + "\n")):
        aside = out / f".{name}.tmp"
        aside.write_bytes(data if isinstance(data, bytes) else data.encode())
        os.replace(aside, out / name)


def report(info: dict, out: str | Path) -> str:
    """The end-of-run summary: counts, then every skipped item (as `data prepare` lists them)."""
    out = Path(out)
    split = info["split_lines"]
    cut = (
        f"; {plural(split, 'line')} over {MAX_SENTENCE_BYTES:,} bytes cut into pieces, "
        "each counted as a line"
        if split
        else ""
    )
    lines = [
        f"rnnscale: {out / MODEL_FILE}: {info['vocab_size']} pieces, trained on "
        f"{plural(info['trained_on_lines'], 'line')} (of {info['corpus_lines']:,} in "
        f"{plural(info['files'], 'file')}{cut}); fingerprint {info['fingerprint'][:16]}; "
        f"{len(info['repaired'])} documents with undecodable bytes replaced; "
        f"{plural(len(info['skipped']), 'item')} skipped (all in {out / INFO_FILE})"
    ]
    return "\n".join(lines + skip_lines(info["skipped"]))


def fingerprint(model_path: str | Path) -> str:
    return hashlib.sha256(Path(model_path).read_bytes()).hexdigest()


def load_tokenizer(model_path: str | Path) -> sentencepiece.SentencePieceProcessor:
    path = Path(model_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no tokenizer there (make one with rnnscale data tokenizer)"
        )
    return sentencepiece.SentencePieceProcessor(model_file=str(path))
