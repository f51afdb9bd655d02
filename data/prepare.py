"""`rnnscale data prepare`: a corpus to mosaicml-streaming MDS shards of token ids.

One sample per document: column `tokens`, `[BOS] + ids + [EOS]` as `ndarray:uint16` when the
vocabulary fits (else `uint32`).

Parts. The inputs are cut into parts of about `part_bytes` of input (`readers.spans`: whole
files, or large JSONL / blank-line text files cut at record boundaries); the part size depends
only on the inputs. Each part is one task: a worker process reads, decodes, parses and
tokenizes its records and writes them with its own `MDSWriter` into `part-NNNNN/` (under a
temporary name, renamed when whole). The main process only plans the parts and, at the end,
merges the parts' indexes in part order into one `index.json` (streaming's `merge_index`). So
the shards are the same for any number of workers, and the workers share no bottleneck.

Done-marker: `prepare.json`, written last, holds a fingerprint of the job (input files with
sizes and modification times, the tokenizer's fingerprint, the options). Re-running the same
command finds it, checks every shard (size and recorded hash, `integrity`) and does nothing,
or writes the damaged parts again; a different job into the same directory is refused. A run
that was interrupted left no marker: a re-run of the same job (`.prepare-job` names it) keeps
the parts that were finished (each shard file at its indexed size and hash), redoes the others
and gives the same shards as an uninterrupted run; another job's leftovers are removed first.
A run that read no usable document fails (`shardset.nothing_read`) and leaves no shards.

Long documents are encoded in pieces (`encoding`), with the same ids as one encode.

Report: `stats.json` (files, documents, tokens, repaired documents and every skipped item with
file, line and reason), also printed.

Remote inputs (`s3://bucket/corpus/*.jsonl`, any store streaming lists): downloaded into
`out/.inputs/` before the parts are planned, removed after; reports name the URLs.

Remote output (`remote=`, `--remote URL`): `out` is the local copy; mosaicml-streaming uploads
each shard as it closes (to `URL/part-NNNNN/`), then the merged index, the stats and the
marker, in that order.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from itertools import islice
from multiprocessing import get_context
from pathlib import Path

from rnnscale.data.encoding import DocumentEncoder, utf8_length
from rnnscale.data.integrity import HASH
from rnnscale.data.readers import (
    BAD_BYTES,
    Document,
    Record,
    Skip,
    Span,
    is_remote,
    list_files,
    localize,
    parse,
    raw_records,
    skip_lines,
    spans,
)
from rnnscale.data.shardset import (
    INPUTS,
    MARKER,
    PART_STATS,
    STATS,
    check_part,
    clear_partial,
    commit,
    finished,
    nothing_read,
    part_name,
    recheck,
)
from rnnscale.data.tokenizer import fingerprint, load_tokenizer

# bump when the samples or the layout change for the same inputs. Not bumped for the xxh3
# hashes recorded since 2026-12: they change the index and each shard's header only, so sets
# written before still match (and are checked by size).
FORMAT = 2
BATCH = 256  # records tokenized at a time


def default_part_bytes(total: int) -> int:
    """Input bytes per part: 1/64 of the corpus, within [1 MiB, 64 MiB]. It depends on the
    inputs only, never on the worker count, so the shards do not either."""
    return min(max(total // 64, 1 << 20), 64 << 20)


def prepare(
    inputs: list[str],
    tokenizer: str | Path,
    out: str | Path,
    *,
    text_key: str = "text",
    workers: int = 1,
    compression: str | None = None,
    split_blank_lines: bool = False,
    bad_bytes: str = "replace",
    progress: bool = True,
    remote: str | None = None,
    part_bytes: int | None = None,
) -> dict:
    """Write the shards (or find them written); returns the stats. With `remote` (an object
    store URL that mosaicml-streaming supports, or another directory), `out` is the local copy
    and every file is uploaded there as it is finished, the done-marker last."""
    if bad_bytes not in BAD_BYTES:
        raise ValueError(f"--bad-bytes must be one of {', '.join(BAD_BYTES)}, got {bad_bytes!r}")
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    files = list_files(inputs)
    out = Path(out)
    sp = load_tokenizer(tokenizer)
    dtype = "uint16" if sp.vocab_size() <= 1 << 16 else "uint32"
    job = {
        "format": FORMAT,
        # a URL is known by its name only (listings give no size or version: docs/data.md)
        "files": [
            [f] if is_remote(f) else [f, os.path.getsize(f), os.stat(f).st_mtime_ns] for f in files
        ],  # fmt: skip
        "tokenizer": fingerprint(tokenizer),
        "options": [text_key, split_blank_lines, bad_bytes, compression, dtype, remote, part_bytes],
    }
    job_id = hashlib.sha256(json.dumps(job).encode()).hexdigest()
    done, checked = finished(out, job_id), None
    if done is not None:
        checked = recheck(out, done["parts"])
        if (out / MARKER).exists():
            print(f"rnnscale: {out} already holds these shards ({MARKER} matches, every shard "
                  f"checked): nothing to do")  # fmt: skip
            return done
    created = not out.exists()
    clear_partial(out, job_id)
    files, origin = localize(files, out / INPUTS)  # URLs downloaded; local paths stay
    if part_bytes is None:
        part_bytes = default_part_bytes(sum(os.path.getsize(f) for f in files))
    stats = _write(files, str(tokenizer), out, dtype, text_key, workers, compression,
                   split_blank_lines, bad_bytes, progress, remote, part_bytes, checked)  # fmt: skip
    if stats["documents"] == 0:
        nothing_read(inputs, files, origin, stats, out, created, text_key, split_blank_lines)
    for item in stats["skipped"] + stats["repaired"]:
        item["file"] = origin.get(item["file"], item["file"])  # report URLs, not the cache
    shutil.rmtree(out / INPUTS, ignore_errors=True)
    stats["tokenizer"] = job["tokenizer"]
    commit(out, remote, stats, {"job": job_id, **job})
    return stats


_ENCODERS: dict = {}  # a worker process's encoder per dtype, on its tokenizer loaded once
_TOKENIZER = None


def _init_worker(tokenizer: str) -> None:
    global _TOKENIZER
    _TOKENIZER = load_tokenizer(tokenizer)
    _ENCODERS.clear()


def _tokenize(records: list[Record], text_key: str, bad_bytes: str, dtype: str) -> list:
    """Records -> [(token array, Document without its text, UTF-8 bytes) or Skip], in order.
    Empties `records` once parsed (a long document's raw bytes are not kept while encoding)."""
    items = [parse(r, text_key=text_key, bad_bytes=bad_bytes) for r in records]
    records.clear()
    if dtype not in _ENCODERS:
        _ENCODERS[dtype] = DocumentEncoder(_TOKENIZER, dtype)
    # one thread per worker (in the encoder): the processes are the parallelism
    docs = [item for item in items if isinstance(item, Document)]
    encoded = iter(_ENCODERS[dtype].encode([d.text for d in docs]))
    del docs
    results = []
    for i, item in enumerate(items):
        if isinstance(item, Skip):
            results.append(item)
        else:
            nbytes = utf8_length(item.text)
            items[i] = None  # the text goes as soon as it is encoded and counted
            results.append((next(encoded), replace(item, text=""), nbytes))
    return results


def _write_part(task: tuple) -> dict:
    """Worker: one part (spans of input) -> MDS shards in out/part-NNNNN, renamed into place
    only when complete; returns the part's stats (also saved in the part)."""
    from streaming import MDSWriter

    index, part, out, remote, options = task
    text_key, split_blank_lines, bad_bytes, dtype, compression = options
    name = part_name(index)
    tmp = Path(out) / f".{name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    stats = {"part": index, "documents": 0, "tokens": 0, "bytes": 0, "repaired": [],
             "skipped": []}  # fmt: skip
    records = raw_records(part, text_key=text_key, split_blank_lines=split_blank_lines)
    target = str(tmp) if remote is None else (str(tmp), f"{remote.rstrip('/')}/{name}")
    with MDSWriter(out=target, columns={"tokens": f"ndarray:{dtype}"}, compression=compression,
                   hashes=[HASH], exist_ok=True, keep_local=True) as w:  # fmt: skip
        while batch := list(islice(records, BATCH)):
            for item in _tokenize(batch, text_key, bad_bytes, dtype):
                if isinstance(item, Skip):
                    stats["skipped"].append(item.as_dict())
                    continue
                ids, doc, nbytes = item
                w.write({"tokens": ids})
                stats["documents"] += 1
                stats["tokens"] += len(ids)
                stats["bytes"] += nbytes
                if doc.repaired:
                    stats["repaired"].append({"file": doc.file, "line": doc.line})
    (tmp / PART_STATS).write_text(json.dumps(stats) + "\n")
    os.replace(tmp, Path(out) / name)  # a part directory exists only when it is whole
    return stats


def _write(files, tokenizer, out, dtype, text_key, workers, compression, split_blank_lines,
           bad_bytes, progress, remote, part_bytes, checked=None) -> dict:  # fmt: skip
    import streaming  # noqa: F401  (imported once here: forked workers inherit it; ~5 s each)
    from tqdm import tqdm

    pieces = spans(files, part_bytes, split_blank_lines)
    parts = _group(pieces, part_bytes)
    options = (text_key, split_blank_lines, bad_bytes, dtype, compression)
    if checked is None or len(checked) != len(parts):  # (already checked by `recheck`)
        checked = {i: check_part(out / part_name(i))[0] for i in range(len(parts))}
    done = dict(checked)
    for i in range(len(parts)):
        if not done[i] and (out / part_name(i)).exists():
            shutil.rmtree(out / part_name(i))  # damaged: written again
    todo = [(i, part, str(out), remote, options) for i, part in enumerate(parts) if not done[i]]
    start = time.perf_counter()
    total = sum(map(_span_bytes, pieces))
    bar = tqdm(desc="prepare", total=total, unit="B", unit_scale=True, disable=not progress,
               dynamic_ncols=True)  # fmt: skip
    bar.update(sum(_span_bytes(sp) for i, p in enumerate(parts) if done[i] for sp in p))
    documents = tokens = 0
    for stats in _map(todo, tokenizer, workers):
        done[stats["part"]] = stats
        documents, tokens = documents + stats["documents"], tokens + stats["tokens"]
        seconds = time.perf_counter() - start
        bar.update(sum(map(_span_bytes, parts[stats["part"]])))
        bar.set_postfix_str(
            f"{documents / seconds:,.0f} docs/s, {tokens / seconds:,.0f} tok/s", refresh=False
        )
    bar.close()
    _merge(out, remote, len(parts))
    total_stats = {"files": len(files), "parts": len(parts), "documents": 0, "tokens": 0,
                   "bytes": 0, "repaired": [], "skipped": []}  # fmt: skip
    for i in range(len(parts)):  # input order
        for key in ("documents", "tokens", "bytes", "repaired", "skipped"):
            total_stats[key] += done[i][key]
    total_stats["seconds"] = round(time.perf_counter() - start, 3)
    return total_stats


def _span_bytes(span: Span) -> int:
    end = span.end if span.end is not None else os.path.getsize(span.file)
    return end - span.start


def _group(pieces: list[Span], part_bytes: int) -> list[list[Span]]:
    """Consecutive spans into parts of at least `part_bytes` (the last may be smaller)."""
    parts: list[list[Span]] = [[]]
    size = 0
    for span in pieces:
        if size >= part_bytes:
            parts.append([])
            size = 0
        parts[-1].append(span)
        size += _span_bytes(span)
    return parts


def _merge(out: Path, remote: str | None, count: int) -> None:
    """One index.json over the parts, in part order (streaming's merge_index)."""
    from streaming.base.util import merge_index

    names = [part_name(i) for i in range(count)]
    if remote is None:
        urls, target = [str(out / n / "index.json") for n in names], str(out)
    else:
        base = remote.rstrip("/")
        urls = [(str(out / n / "index.json"), f"{base}/{n}/index.json") for n in names]
        target = (str(out), remote)
    logging.disable(logging.WARNING)  # merge_index logs its temporary folder at WARNING
    try:
        merge_index(urls, target, keep_local=True)
    finally:
        logging.disable(logging.NOTSET)


def _map(tasks: list[tuple], tokenizer: str, workers: int) -> Iterator[dict]:
    """Parts' stats as they finish: in this process for one worker, else a pool of processes,
    forked on Linux (they inherit the imported mosaicml-streaming instead of importing it, with
    torch, again each; they use no torch or OpenMP, which is what makes forking unsafe)."""
    if workers == 1:
        _init_worker(tokenizer)
        yield from map(_write_part, tasks)
        return
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    with get_context(method).Pool(workers, _init_worker, (tokenizer,)) as pool:
        yield from pool.imap_unordered(_write_part, tasks, chunksize=1)


def report(stats: dict, out: str | Path) -> str:
    """The end-of-run summary: counts, then every skipped item."""
    lines = [
        f"rnnscale: {out}: {stats['files']} files, {stats['documents']:,} documents, "
        f"{stats['tokens']:,} tokens; {len(stats['repaired'])} documents with undecodable "
        f"bytes replaced; {len(stats['skipped'])} items skipped (all in {Path(out) / STATS})"
    ]
    return "\n".join(lines + skip_lines(stats["skipped"]))
