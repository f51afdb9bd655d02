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
JSON_TYPES = {int: "number", float: "number", bool: "boolean", list: "array", dict: "object",
              type(None): "null"}  # fmt: skip
_SURROGATE = re.compile("[\ud800-\udfff]")


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

    row = 0
    try:
        table = pq.ParquetFile(path)
        names = table.schema_arrow.names
        if text_key not in names:
            listed = ", ".join(names)
            yield Record("skip", f"no column {text_key!r} (columns: {listed}; set --text-key)",
                         path, 0)  # fmt: skip
            return
        for batch in table.iter_batches(columns=[text_key], batch_size=8192):
            for value in batch.column(0).to_pylist():
                row += 1
                if value is None:
                    yield Record("skip", f"{text_key!r} is null", path, row)
                elif not isinstance(value, str):
                    kind = type(value).__name__
                    yield Record("skip", f"{text_key!r} is not a string ({kind})", path, row)
                else:
                    yield Record("str", value, path, row)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid / ArrowIOError: not Parquet
        where = f"after row {row}: " if row else ""
        yield Record("skip", f"unreadable Parquet file ({where}{e})", path, row)


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
            obj = json.loads(text.rstrip("\r\n"))  # not "control character" for a cut line
        except json.JSONDecodeError as e:
            return Skip(record.file, record.line, f"malformed JSON ({e.msg}, char {e.pos})")
        if not isinstance(obj, dict) or text_key not in obj:
            return Skip(record.file, record.line, _missing(obj, text_key))
        text = obj[text_key]
        if not isinstance(text, str):
            kind = JSON_TYPES.get(type(text), type(text).__name__)
            return Skip(record.file, record.line, f"field {text_key!r} is not a string ({kind})")
        if lone := _SURROGATE.search(text):  # a \ud800 escape alone: no UTF-8 encodes it
            if bad_bytes == "skip":
                at = lone.start()
                return Skip(record.file, record.line, f"unpaired surrogate escape at char {at}")
            text, repaired = _SURROGATE.sub("\ufffd", text), True
    if not text.strip():
        return Skip(record.file, record.line, "empty document")
    return Document(text, record.file, record.line, repaired)


def _missing(obj: object, text_key: str) -> str:
    if not isinstance(obj, dict):
        kind = JSON_TYPES.get(type(obj), type(obj).__name__)
        return f"missing field {text_key!r} (the line is a JSON {kind}, not an object)"
    keys = ", ".join(list(obj)[:8]) + (", ..." if len(obj) > 8 else "")
    return f"missing field {text_key!r} (keys: {keys}; set --text-key)"


def file_format(path: str) -> str:
    """ "json", "parquet" or "text", by the file's extension."""
    suffix = Path(path).suffix.lower()
    if suffix in JSON_SUFFIXES:
        return "json"
    return "parquet" if suffix in PARQUET_SUFFIXES else "text"


def looked_for(files: list[str], text_key: str, split_blank_lines: bool) -> str:
    """What reading `files` looks for, by format: "JSONL field 'text' in a.jsonl; plain text
    in 3 files" (for a message about a corpus that gave nothing)."""
    kinds = {
        "json": f"JSONL field {text_key!r}",
        "parquet": f"Parquet column {text_key!r}",
        "text": "plain text" + (" split at blank lines" if split_blank_lines else ""),
    }
    found: dict[str, list[str]] = {}
    for f in files:
        found.setdefault(file_format(f), []).append(f)
    return "; ".join(
        f"{kinds[k]} in {fs[0] if len(fs) == 1 else f'{len(fs)} files'}" for k, fs in found.items()
    )


def skip_lines(skipped: list[dict], limit: int = 20) -> list[str]:
    """The report's lines for skipped items (`Skip.as_dict()`s): file, line and reason of the
    first `limit`, then how many more."""
    lines = [f"  skipped {s['file']}:{s['line']}: {s['reason']}" for s in skipped[:limit]]
    if len(skipped) > limit:
        lines.append(f"  ... and {len(skipped) - limit} more")
    return lines


@dataclass
class Corpus:
    """Documents of some inputs, read in one process (for the tokenizer's sample). Besides
    what `parse` skips, a document holding a NUL character is skipped as binary (`data
    prepare` tokenizes it); documents whose undecodable bytes were replaced are listed."""

    files: list[str]
    text_key: str = "text"
    split_blank_lines: bool = False
    bad_bytes: str = "replace"
    skips: list[Skip] = field(default_factory=list)
    repaired: list[dict] = field(default_factory=list)  # {"file", "line"} of each

    def documents(self) -> Iterator[Document]:
        records = raw_records(
            self.files, text_key=self.text_key, split_blank_lines=self.split_blank_lines
        )
        for record in records:
            item = parse(record, text_key=self.text_key, bad_bytes=self.bad_bytes)
            if isinstance(item, Document) and (nul := item.text.find("\x00")) >= 0:
                item = Skip(item.file, item.line, f"binary data, not text (NUL at char {nul})")
            if isinstance(item, Skip):
                self.skips.append(item)
                continue
            if item.repaired:
                self.repaired.append({"file": item.file, "line": item.line})
            yield item
