"""`rnnscale data prepare`: a corpus to mosaicml-streaming MDS shards of token ids.

One sample per document: column `tokens`, `[BOS] + ids + [EOS]` as `ndarray:uint16` when the
vocabulary fits (else `uint32`). The main process slices the files into records in order
(`readers.raw_records`); worker processes decode, parse and tokenize batches of them
(`readers.parse`, sentencepiece); the main process writes the results in input order with one
`MDSWriter`, so the shards are the same whatever the number of workers.

Done-marker: `prepare.json`, written last, holds a fingerprint of the job (input files with
sizes and modification times, the tokenizer's fingerprint, the options). Re-running the same
command finds it and does nothing; a different job into the same directory is refused. A run
that was interrupted left no marker: a re-run removes its partial shards and writes them again,
the same as an uninterrupted run would have.

Report: `stats.json` (files, documents, tokens, repaired documents and every skipped item with
file, line and reason), also printed.

Remote output (`remote=`, `--remote URL`): `out` is the local copy; mosaicml-streaming uploads
each shard as it closes, then the index, the stats and the marker, in that order.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from itertools import islice
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from rnnscale.data.readers import BAD_BYTES, Document, Record, Skip, list_files, parse, raw_records
from rnnscale.data.tokenizer import BOS, EOS, fingerprint, load_tokenizer

MARKER, STATS = "prepare.json", "stats.json"
FORMAT = 1  # bump when the shard contents change for the same inputs
BATCH = 256  # records per task sent to a worker


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
        "files": [[f, os.path.getsize(f), os.stat(f).st_mtime_ns] for f in files],
        "tokenizer": fingerprint(tokenizer),
        "options": [text_key, split_blank_lines, bad_bytes, compression, dtype, remote],
    }
    job_id = hashlib.sha256(json.dumps(job).encode()).hexdigest()
    done = _finished(out, job_id)
    if done is not None:
        print(f"rnnscale: {out} already holds these shards ({MARKER} matches): nothing to do")
        return done
    _clear_partial(out)
    stats = _write(files, str(tokenizer), out, dtype, text_key, workers, compression,
                   split_blank_lines, bad_bytes, progress, remote)  # fmt: skip
    stats["tokenizer"] = job["tokenizer"]
    (out / STATS).write_text(json.dumps(stats, indent=2) + "\n")
    upload = _uploader(out, remote)
    upload(STATS)
    tmp = out / f".{MARKER}.tmp"
    tmp.write_text(json.dumps({"job": job_id, **job}, indent=2) + "\n")
    os.replace(tmp, out / MARKER)  # the commit: written last, atomically
    try:
        upload(MARKER)  # remote commit last too; a failed upload leaves no local marker either
    except Exception:
        (out / MARKER).unlink()
        raise
    return stats


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


def _clear_partial(out: Path) -> None:
    """Remove what an interrupted run left (only files prepare writes)."""
    if not out.exists():
        return
    for path in out.iterdir():
        name = path.name
        if name in ("index.json", STATS) or name.startswith(("shard.", f".{MARKER}")):
            path.unlink()


_SP = None  # the tokenizer of a worker process, loaded once


def _init_worker(tokenizer: str) -> None:
    global _SP
    _SP = load_tokenizer(tokenizer)


def _tokenize(task: tuple[list[Record], str, str, str]) -> list:
    """Worker: records -> [(token array, Document) or Skip]."""
    records, text_key, bad_bytes, dtype = task
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


def _batches(records: Iterator[Record], options: tuple) -> Iterator[tuple]:
    while batch := list(islice(records, BATCH)):
        yield (batch, *options)


def _write(files, tokenizer, out, dtype, text_key, workers, compression, split_blank_lines,
           bad_bytes, progress, remote) -> dict:  # fmt: skip
    from streaming import MDSWriter
    from tqdm import tqdm

    records = raw_records(files, text_key=text_key, split_blank_lines=split_blank_lines)
    tasks = _batches(records, (text_key, bad_bytes, dtype))
    stats = {"files": len(files), "documents": 0, "tokens": 0, "bytes": 0, "repaired": [],
             "skipped": []}  # fmt: skip
    start = time.perf_counter()
    bar = tqdm(desc="prepare", unit=" docs", disable=not progress, dynamic_ncols=True)
    columns = {"tokens": f"ndarray:{dtype}"}
    target = str(out) if remote is None else (str(out), remote)  # shards upload as they close
    with MDSWriter(out=target, columns=columns, compression=compression, exist_ok=True,
                   keep_local=True) as w:  # fmt: skip
        for results in _map(tasks, tokenizer, workers):
            for item in results:
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
            seconds = time.perf_counter() - start
            bar.update(sum(1 for item in results if not isinstance(item, Skip)))
            bar.set_postfix_str(f"{stats['tokens'] / seconds:,.0f} tok/s", refresh=False)
    bar.close()
    stats["seconds"] = round(time.perf_counter() - start, 3)
    return stats


def _map(tasks: Iterator[tuple], tokenizer: str, workers: int) -> Iterator[list]:
    """Results in task order: in this process for one worker, else a spawn pool."""
    if workers == 1:
        _init_worker(tokenizer)
        yield from map(_tokenize, tasks)
        return
    with get_context("spawn").Pool(workers, _init_worker, (tokenizer,)) as pool:
        yield from pool.imap(_tokenize, tasks, chunksize=1)


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
