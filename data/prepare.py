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
command finds it and does nothing; a different job into the same directory is refused. A run
that was interrupted left no marker: a re-run of the same job (`.prepare-job` names it) keeps
the parts that were finished (each shard file at its indexed size), redoes the others and
gives the same shards as an uninterrupted run; another job's leftovers are removed first.

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
from itertools import islice
from multiprocessing import get_context
from pathlib import Path

import numpy as np

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
    spans,
)
from rnnscale.data.tokenizer import BOS, EOS, fingerprint, load_tokenizer

MARKER, STATS, JOB, PART_STATS = "prepare.json", "stats.json", ".prepare-job", "part-stats.json"
INPUTS = ".inputs"  # downloaded remote inputs, removed when the shards are written
FORMAT = 2  # bump when the shard contents or layout change for the same inputs
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
    done = _finished(out, job_id)
    if done is not None:
        print(f"rnnscale: {out} already holds these shards ({MARKER} matches): nothing to do")
        return done
    _clear_partial(out, job_id)
    files, origin = localize(files, out / INPUTS)  # URLs downloaded; local paths stay
    if part_bytes is None:
        part_bytes = default_part_bytes(sum(os.path.getsize(f) for f in files))
    stats = _write(files, str(tokenizer), out, dtype, text_key, workers, compression,
                   split_blank_lines, bad_bytes, progress, remote, part_bytes)  # fmt: skip
    for item in stats["skipped"] + stats["repaired"]:
        item["file"] = origin.get(item["file"], item["file"])  # report URLs, not the cache
    shutil.rmtree(out / INPUTS, ignore_errors=True)
    stats["tokenizer"] = job["tokenizer"]
    _commit(out, remote, stats, {"job": job_id, **job})
    return stats


def _commit(out: Path, remote: str | None, stats: dict, marker: dict) -> None:
    """The stats, then the done-marker written last and atomically, each uploaded to `remote`
    too (a failed upload of the marker leaves no local marker either)."""
    (out / STATS).write_text(json.dumps(stats, indent=2) + "\n")
    upload = _uploader(out, remote)
    upload(STATS)
    tmp = out / f".{MARKER}.tmp"
    tmp.write_text(json.dumps(marker, indent=2) + "\n")
    os.replace(tmp, out / MARKER)  # the commit
    try:
        upload(MARKER)
    except Exception:
        (out / MARKER).unlink()
        raise


def _uploader(out: Path, remote: str | None):
    """`upload(name)`: copy out/name to the remote (a no-op without one)."""
    if remote is None:
        return lambda name: None
    from streaming.base.storage.upload import CloudUploader

    uploader = CloudUploader.get(out=(str(out), remote), keep_local=True, exist_ok=True)
    return uploader.upload_file


def _finished(out: Path, job_id: str) -> dict | None:
    marker = out / MARKER
    if not marker.exists():
        return None
    if json.loads(marker.read_text()).get("job") != job_id:
        raise ValueError(
            f"{out} holds shards from a different prepare (other inputs, tokenizer or options; "
            f"see {marker}): choose another --out, or delete that directory"
        )
    return json.loads((out / STATS).read_text())


def _clear_partial(out: Path, job_id: str) -> None:
    """Keep the whole parts an interrupted run of the same job left (`_write` checks each one);
    remove everything else prepare writes, and everything of another job's unfinished run."""
    out.mkdir(parents=True, exist_ok=True)
    job = out / JOB
    same_job = job.exists() and job.read_text().strip() == job_id
    for path in out.iterdir():
        name = path.name
        if name.startswith("part-") and path.is_dir():
            if not same_job:
                shutil.rmtree(path)
        elif (name.startswith(".part-") or name == INPUTS) and path.is_dir():
            shutil.rmtree(path)
        elif name in ("index.json", STATS) or name.startswith(("shard.", f".{MARKER}")):
            path.unlink()
    job.write_text(job_id + "\n")


_SP = None  # the tokenizer of a worker process, loaded once


def _init_worker(tokenizer: str) -> None:
    global _SP
    _SP = load_tokenizer(tokenizer)


def _tokenize(records: list[Record], text_key: str, bad_bytes: str, dtype: str) -> list:
    """Records -> [(token array, Document) or Skip], in order."""
    results = []
    items = [parse(r, text_key=text_key, bad_bytes=bad_bytes) for r in records]
    docs = [item for item in items if isinstance(item, Document)]
    # one thread per worker: the processes are the parallelism (sentencepiece's batch encode
    # would otherwise start a thread per core in every worker)
    encoded = iter(_SP.encode([d.text for d in docs], num_threads=1))
    for item in items:
        if isinstance(item, Skip):
            results.append(item)
        else:
            ids = np.array([BOS, *next(encoded), EOS], dtype=dtype)
            results.append((ids, item))
    return results


def _part_name(index: int) -> str:
    return f"part-{index:05d}"


def _write_part(task: tuple) -> dict:
    """Worker: one part (spans of input) -> MDS shards in out/part-NNNNN, renamed into place
    only when complete; returns the part's stats (also saved in the part)."""
    from streaming import MDSWriter

    index, part, out, remote, options = task
    text_key, split_blank_lines, bad_bytes, dtype, compression = options
    name = _part_name(index)
    tmp = Path(out) / f".{name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    stats = {"part": index, "documents": 0, "tokens": 0, "bytes": 0, "repaired": [],
             "skipped": []}  # fmt: skip
    records = raw_records(part, text_key=text_key, split_blank_lines=split_blank_lines)
    target = str(tmp) if remote is None else (str(tmp), f"{remote.rstrip('/')}/{name}")
    with MDSWriter(out=target, columns={"tokens": f"ndarray:{dtype}"}, compression=compression,
                   exist_ok=True, keep_local=True) as w:  # fmt: skip
        while batch := list(islice(records, BATCH)):
            for item in _tokenize(batch, text_key, bad_bytes, dtype):
                if isinstance(item, Skip):
                    stats["skipped"].append(item.as_dict())
                    continue
                ids, doc = item
                w.write({"tokens": ids})
                stats["documents"] += 1
                stats["tokens"] += len(ids)
                stats["bytes"] += len(doc.text.encode("utf-8", errors="replace"))
                if doc.repaired:
                    stats["repaired"].append({"file": doc.file, "line": doc.line})
    (tmp / PART_STATS).write_text(json.dumps(stats) + "\n")
    os.replace(tmp, Path(out) / name)  # a part directory exists only when it is whole
    return stats


def _complete_part(path: Path) -> dict | None:
    """A part left by an earlier run of the same job, if every shard file has its indexed size."""
    try:
        index = json.loads((path / "index.json").read_text())
        stats = json.loads((path / PART_STATS).read_text())
    except (OSError, ValueError):
        return None
    for shard in index["shards"]:
        for key in ("raw_data", "zip_data"):
            info = shard.get(key)
            if info and (path / info["basename"]).stat().st_size != info["bytes"]:
                return None
    return stats


def _write(files, tokenizer, out, dtype, text_key, workers, compression, split_blank_lines,
           bad_bytes, progress, remote, part_bytes) -> dict:  # fmt: skip
    import streaming  # noqa: F401  (imported once here: forked workers inherit it; ~5 s each)
    from tqdm import tqdm

    pieces = spans(files, part_bytes, split_blank_lines)
    parts = _group(pieces, part_bytes)
    options = (text_key, split_blank_lines, bad_bytes, dtype, compression)
    done = {i: _complete_part(out / _part_name(i)) for i in range(len(parts))}
    for i in range(len(parts)):
        if not done[i] and (out / _part_name(i)).exists():
            shutil.rmtree(out / _part_name(i))  # damaged: written again
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

    names = [_part_name(i) for i in range(count)]
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
    for skip in stats["skipped"][:20]:
        lines.append(f"  skipped {skip['file']}:{skip['line']}: {skip['reason']}")
    if len(stats["skipped"]) > 20:
        lines.append(f"  ... and {len(stats['skipped']) - 20} more")
    return "\n".join(lines)
