"""Reading a corpus: plain text, JSONL and Parquet files into documents, with every item that
cannot be used reported with its reason and location. Nothing is dropped silently.

Reading is split in three so `data prepare` can parallelise it:
- `spans(files, part_bytes)` (one process): the files cut into `Span`s of about `part_bytes`,
  at line boundaries for JSONL (at blank lines for text split on them), with the line number
  each span starts at; other text files and Parquet files stay whole.
- `raw_records(spans)` (a worker, in order): cheap slicing of a span into records, each with
  its location (file, line or row): a JSONL line as bytes, a text file or blank-line block as
  bytes, a Parquet cell as a string.
- `parse(record)` (the same worker): decoding (bad UTF-8 is replaced or skipped, by policy),
  JSON parsing, the text field, the empty check. It returns a `Document` or a `Skip`.

Formats go by extension: `.jsonl`/`.json` (one JSON object per line, text in `text_key`),
`.parquet` (text in column `text_key`), anything else is plain text: one document per file, or
one per blank-line-separated block with `split_blank_lines`.
"""

from __future__ import annotations

import glob
import hashlib
import json
import mmap
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

JSON_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
BAD_BYTES = ("replace", "skip")


@dataclass(frozen=True)
class Span:
    """Bytes [start, end) of a file (end None: to its end), whose first line is `line`."""

    file: str
    start: int = 0
    end: int | None = None
    line: int = 1


@dataclass(frozen=True)
class Record:
    kind: str  # "bytes" (text or a JSONL line, still to decode), "str" (a Parquet cell), "skip"
    payload: bytes | str | None
    file: str
    line: int  # 1-based line (text, JSONL) or row (Parquet)
    json: bool = False  # the payload is a JSON object holding the text


@dataclass(frozen=True)
class Document:
    text: str
    file: str
    line: int
    repaired: bool = False  # undecodable bytes were replaced by U+FFFD


@dataclass(frozen=True)
class Skip:
    file: str
    line: int
    reason: str

    def as_dict(self) -> dict:
        return {"file": self.file, "line": self.line, "reason": self.reason}


def is_remote(path: str) -> bool:
    return "://" in path


def list_files(inputs: list[str]) -> list[str]:
    """Expand globs (sorted, so the order is the same everywhere); a glob that matches no file
    is an error, not an empty corpus. A URL (s3://, gs://, ... any store mosaicml-streaming
    lists) is matched against the store's listing: `*` and `?` within a path segment, `**`
    across segments; the result stays URLs (`localize` downloads them)."""
    files: list[str] = []
    for pattern in inputs:
        if is_remote(pattern):
            matched = _list_remote(pattern)
        else:
            matched = sorted(p for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
        if not matched:
            raise FileNotFoundError(f"--input {pattern!r} matches no file")
        files.extend(matched)
    return list(dict.fromkeys(files))  # a file named by two globs is read once


def _list_remote(pattern: str) -> list[str]:
    from urllib.parse import urlparse

    from streaming.base.storage.upload import CloudUploader

    wild = min((i for i, c in enumerate(pattern) if c in "*?"), default=len(pattern))
    base = pattern[: pattern.rfind("/", 0, wild)]
    url = urlparse(base)
    regex = re.compile(
        "".join(
            ".*" if part == "**" else "[^/]*" if part == "*" else "[^/]" if part == "?"
            else re.escape(part)
            for part in re.split(r"(\*\*|\*|\?)", pattern)
        )
    )  # fmt: skip
    uploader = CloudUploader.get(out=base, exist_ok=True)
    try:
        keys = uploader.list_objects()
    finally:
        shutil.rmtree(uploader.local, ignore_errors=True)  # the empty local dir it made
    urls = (f"{url.scheme}://{url.netloc}/{key.lstrip('/')}" for key in keys)
    return sorted(u for u in urls if regex.fullmatch(u))


def localize(files: list[str], cache: Path, threads: int = 8) -> tuple[list[str], dict[str, str]]:
    """Local paths for `files`: URLs are downloaded into `cache` (through mosaicml-streaming's
    downloaders, `threads` at a time), local paths stay. Returns (paths, {local: URL})."""
    remote = [f for f in files if is_remote(f)]
    if not remote:
        return files, {}
    from concurrent.futures import ThreadPoolExecutor

    from streaming.base.storage.download import CloudDownloader

    cache.mkdir(parents=True, exist_ok=True)
    local = {
        url: str(cache / f"{hashlib.sha1(url.encode()).hexdigest()[:12]}-{Path(url).name}")
        for url in remote
    }
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda u: CloudDownloader.direct_download(u, local[u], 600), remote))
    return [local.get(f, f) for f in files], {path: url for url, path in local.items()}


def splittable(path: str, split_blank_lines: bool) -> bool:
    """Files read record by record from byte offsets: JSONL, and text split on blank lines."""
    suffix = Path(path).suffix.lower()
    return suffix in JSON_SUFFIXES or (split_blank_lines and suffix not in PARQUET_SUFFIXES)


_BLANK_LINE = re.compile(rb"\n[ \t\r\f\v]*(\n|$)")


def spans(files: list[str], part_bytes: int, split_blank_lines: bool = False) -> list[Span]:
    """Every file as spans of about `part_bytes` (whole when it cannot be cut or is small)."""
    out: list[Span] = []
    for path in files:
        size = os.path.getsize(path)
        if size <= part_bytes or not splittable(path, split_blank_lines):
            out.append(Span(path))
            continue
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            start, line = 0, 1
            while size - start > part_bytes:
                cut = _cut(data, start + part_bytes, split_blank_lines)
                if cut is None:
                    break
                out.append(Span(path, start, cut, line))
                line += data[start:cut].count(b"\n")
                start = cut
            out.append(Span(path, start, None, line))
    return out


def _cut(data: mmap.mmap, at: int, split_blank_lines: bool) -> int | None:
    """The first record boundary at or after byte `at`: the start of a line (JSONL), or of a
    whitespace-only line (text split on blank lines); None when there is none."""
    if split_blank_lines:
        found = _BLANK_LINE.search(data, max(at - 1, 0))
        return None if found is None or found.end() >= len(data) else found.start() + 1
    newline = data.find(b"\n", max(at - 1, 0))
    return None if newline < 0 or newline + 1 >= len(data) else newline + 1


def raw_records(
    items: list[Span] | list[str], *, text_key: str = "text", split_blank_lines: bool = False
) -> Iterator[Record]:
    """The records of files (paths) or spans, in order."""
    for span in items:
        if isinstance(span, str):
            span = Span(span)
        path = span.file
        suffix = Path(path).suffix.lower()
        if suffix in JSON_SUFFIXES:
            for number, line in enumerate(_json_lines(span), span.line):
                if line.strip():
                    yield Record("bytes", line, path, number, json=True)
        elif suffix in PARQUET_SUFFIXES:
            yield from _parquet_records(path, text_key)
        else:
            yield from _text_records(span, split_blank_lines)


def _json_lines(span: Span) -> Iterator[bytes]:
    """The span's lines, read one at a time (memory stays bounded on a huge file)."""
    left = span.end - span.start if span.end is not None else None
    with open(span.file, "rb") as f:
        f.seek(span.start)
        for line in f:
            if left is not None:
                if left <= 0:
                    return
                left -= len(line)
            yield line


def _lines(data: bytes) -> list[bytes]:
    """Lines ending at b"\\n" (kept), as line numbers count them."""
    lines = data.split(b"\n")
    last = lines.pop()
    return [line + b"\n" for line in lines] + ([last] if last else [])


def _read(span: Span) -> bytes:
    with open(span.file, "rb") as f:
        f.seek(span.start)
        return f.read() if span.end is None else f.read(span.end - span.start)


def _text_records(span: Span, split_blank_lines: bool) -> Iterator[Record]:
    path, data = span.file, _read(span)
    if not split_blank_lines:
        yield Record("bytes", data, path, 1)
        return
    block: list[bytes] = []
    start = span.line
    for number, line in enumerate(_lines(data), span.line):
        if line.strip():
            if not block:
                start = number
            block.append(line)
        elif block:
            yield Record("bytes", b"".join(block), path, start)
            block = []
    if block:
        yield Record("bytes", b"".join(block), path, start)


def _parquet_records(path: str, text_key: str) -> Iterator[Record]:
    import pyarrow.parquet as pq

    table = pq.ParquetFile(path)
    if text_key not in table.schema_arrow.names:
        names = ", ".join(table.schema_arrow.names)
        yield Record("skip", f"no column {text_key!r} (columns: {names})", path, 0)
        return
    row = 0
    for batch in table.iter_batches(columns=[text_key], batch_size=8192):
        for value in batch.column(0).to_pylist():
            row += 1
            if value is None:
                yield Record("skip", f"{text_key!r} is null", path, row)
            elif not isinstance(value, str):
                yield Record("skip", f"{text_key!r} is not a string", path, row)
            else:
                yield Record("str", value, path, row)


def parse(record: Record, *, text_key: str = "text", bad_bytes: str = "replace") -> Document | Skip:
    """A record's document, or why it has none."""
    if record.kind == "skip":
        return Skip(record.file, record.line, str(record.payload))
    repaired = False
    if record.kind == "bytes":
        try:
            text = record.payload.decode("utf-8")
        except UnicodeDecodeError as e:
            if bad_bytes == "skip":
                return Skip(
                    record.file, record.line, f"undecodable bytes ({e.reason} at byte {e.start})"
                )
            text, repaired = record.payload.decode("utf-8", errors="replace"), True
    else:
        text = record.payload
    if record.json:
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            return Skip(record.file, record.line, f"malformed JSON ({e.msg})")
        if not isinstance(obj, dict) or text_key not in obj:
            return Skip(record.file, record.line, f"missing field {text_key!r}")
        text = obj[text_key]
        if not isinstance(text, str):
            return Skip(record.file, record.line, f"field {text_key!r} is not a string")
    if not text.strip():
        return Skip(record.file, record.line, "empty document")
    return Document(text, record.file, record.line, repaired)


@dataclass
class Corpus:
    """Documents of some inputs, read in one process (for the tokenizer's sample)."""

    files: list[str]
    text_key: str = "text"
    split_blank_lines: bool = False
    bad_bytes: str = "replace"
    skips: list[Skip] = field(default_factory=list)

    def documents(self) -> Iterator[Document]:
        records = raw_records(
            self.files, text_key=self.text_key, split_blank_lines=self.split_blank_lines
        )
        for record in records:
            item = parse(record, text_key=self.text_key, bad_bytes=self.bad_bytes)
            if isinstance(item, Skip):
                self.skips.append(item)
            else:
                yield item
