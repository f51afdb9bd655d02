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

Held-out split (`val_fraction`, `split`): each document goes to `out/train` or `out/val` by a
hash of its text; every part is then written as two parts, one per set (a part is whole only
when both are), and each set is merged, checked, resumed and committed as a shard set of its
own, with its own job fingerprint. Without a split `out` is the one set, as before.

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
from contextlib import ExitStack
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
    MARKER,  # noqa: F401  (imported from here by callers and tests)
    PART_STATS,
    STATS,
    already_done,
    clear_partial,
    commit,
    nothing_read,
    part_name,
    whole_parts,
)
from rnnscale.data.split import (
    SETS,
    check_fraction,
    check_layout,
    held_out,
    overrides,
    refuse_empty_side,
    set_dirs,
    set_job_ids,
    set_remotes,
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


def _job(files: list[str], tokenizer, val_fraction: float | None, options: list) -> dict:
    """What identifies a prepare job: its inputs, tokenizer and options."""
    job = {
        "format": FORMAT,
        # a URL is known by its name only (listings give no size or version: docs/data.md)
        "files": [
            [f] if is_remote(f) else [f, os.path.getsize(f), os.stat(f).st_mtime_ns] for f in files
        ],  # fmt: skip
        "tokenizer": fingerprint(tokenizer),
        "options": options,
    }
    if val_fraction is not None:  # only then: a job without a split keeps its fingerprint
        job["val_fraction"] = val_fraction
    return job


def _check_options(bad_bytes: str, workers: int, val_fraction: float | None) -> None:
    if bad_bytes not in BAD_BYTES:
        raise ValueError(f"--bad-bytes must be one of {', '.join(BAD_BYTES)}, got {bad_bytes!r}")
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    check_fraction(val_fraction)


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
    val_fraction: float | None = None,
) -> dict:
    """Write the shards (or find them written); returns the stats. With `remote` (an object
    store URL that mosaicml-streaming supports, or another directory), `out` is the local copy
    and every file is uploaded there as it is finished, the done-marker last. With
    `val_fraction`, `out/train` and `out/val` (`split`), and the stats are {"train": ...,
    "val": ...}."""
    _check_options(bad_bytes, workers, val_fraction)
    files = list_files(inputs)
    out = Path(out)
    check_layout(out, val_fraction)
    sp = load_tokenizer(tokenizer)
    dtype = "uint16" if sp.vocab_size() <= 1 << 16 else "uint32"
    options = [text_key, split_blank_lines, bad_bytes, compression, dtype, remote, part_bytes]
    job = _job(files, tokenizer, val_fraction, options)
    job_id = hashlib.sha256(json.dumps(job).encode()).hexdigest()
    dirs, ids = set_dirs(out, val_fraction), set_job_ids(job_id, val_fraction)
    done, checked = already_done(out, dirs, ids)
    if done is not None:
        return _result(done, val_fraction)
    created = not out.exists()
    for d, i in zip(dirs, ids):
        clear_partial(d, i)
    shutil.rmtree(out / INPUTS, ignore_errors=True)
    files, origin = localize(files, out / INPUTS)  # URLs downloaded; local paths stay
    if part_bytes is None:
        part_bytes = default_part_bytes(sum(os.path.getsize(f) for f in files))
    options = (text_key, split_blank_lines, bad_bytes, dtype, compression, val_fraction)
    stats = _write(files, str(tokenizer), dirs, set_remotes(remote, val_fraction), options,
                   workers, progress, part_bytes, checked)  # fmt: skip
    if sum(s["documents"] for s in stats) == 0:
        nothing_read(inputs, files, origin, stats[0], dirs, out, created, text_key,
                     split_blank_lines)  # fmt: skip
    if val_fraction is not None:
        refuse_empty_side(stats, val_fraction, dirs, out, created)
    shutil.rmtree(out / INPUTS, ignore_errors=True)
    for d, r, i, s in zip(dirs, set_remotes(remote, val_fraction), ids, stats):
        for item in s["skipped"] + s["repaired"]:
            item["file"] = origin.get(item["file"], item["file"])  # report URLs, not the cache
        s["tokenizer"] = job["tokenizer"]
        commit(d, r, s, {"job": i, **job})
    return _result(stats, val_fraction)


def _result(stats: list[dict], val_fraction: float | None) -> dict:
    return stats[0] if val_fraction is None else dict(zip(SETS, stats))


_ENCODERS: dict = {}  # a worker process's encoder per dtype, on its tokenizer loaded once
_TOKENIZER = None


def _init_worker(tokenizer: str) -> None:
    global _TOKENIZER
    _TOKENIZER = load_tokenizer(tokenizer)
    _ENCODERS.clear()


def _tokenize(records: list[Record], text_key: str, bad_bytes: str, dtype: str,
              val_fraction: float | None = None) -> list:  # fmt: skip
    """Records -> [(token array, Document without its text, UTF-8 bytes, set) or Skip], in
    order; set 1 (validation) for a document `split.held_out` picks, else 0. Empties `records`
    once parsed (a long document's raw bytes are not kept while encoding)."""
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
            side = int(val_fraction is not None and held_out(item.text, val_fraction))
            items[i] = None  # the text goes as soon as it is encoded and counted
            results.append((next(encoded), replace(item, text=""), nbytes, side))
    return results


def _write_part(task: tuple) -> list[dict]:
    """Worker: one part (spans of input) -> MDS shards in out/part-NNNNN of every set `outs`
    (one, or train and validation), each renamed into place only when complete; returns the
    part's stats per set (also saved in each). Skipped items are listed with the first set."""
    from streaming import MDSWriter

    index, part, outs, remotes, options = task
    text_key, split_blank_lines, bad_bytes, dtype, compression, val_fraction = options
    name = part_name(index)
    tmps = [Path(out) / f".{name}.tmp" for out in outs]
    for tmp in tmps:
        if tmp.exists():
            shutil.rmtree(tmp)
    stats = [{"part": index, "documents": 0, "tokens": 0, "bytes": 0, "repaired": [],
              "skipped": []} for _ in outs]  # fmt: skip
    records = raw_records(part, text_key=text_key, split_blank_lines=split_blank_lines)
    with ExitStack() as stack:
        writers = [
            stack.enter_context(MDSWriter(
                out=str(tmp) if remote is None else (str(tmp), f"{remote.rstrip('/')}/{name}"),
                columns={"tokens": f"ndarray:{dtype}"}, compression=compression, hashes=[HASH],
                exist_ok=True, keep_local=True))
            for tmp, remote in zip(tmps, remotes)
        ]  # fmt: skip
        while batch := list(islice(records, BATCH)):
            for item in _tokenize(batch, text_key, bad_bytes, dtype, val_fraction):
                if isinstance(item, Skip):
                    stats[0]["skipped"].append(item.as_dict())
                    continue
                ids, doc, nbytes, side = item
                writers[side].write({"tokens": ids})
                counts = stats[side]
                counts["documents"] += 1
                counts["tokens"] += len(ids)
                counts["bytes"] += nbytes
                if doc.repaired:
                    counts["repaired"].append({"file": doc.file, "line": doc.line})
    for tmp, counts in zip(tmps, stats):
        (tmp / PART_STATS).write_text(json.dumps(counts) + "\n")
    for tmp, out in zip(tmps, outs):
        os.replace(tmp, Path(out) / name)  # a part directory exists only when it is whole
    return stats


def _write(files, tokenizer, outs: list[Path], remotes, options, workers, progress, part_bytes,
           checked=None) -> list[dict]:  # fmt: skip
    """Every part not yet whole in every set of `outs`, written by `workers` processes, then
    each set's merged index; returns each set's stats."""
    import streaming  # noqa: F401  (imported once here: forked workers inherit it; ~5 s each)
    from tqdm import tqdm

    pieces = spans(files, part_bytes, options[1])
    parts = _group(pieces, part_bytes)
    done = whole_parts(outs, len(parts), checked)
    todo = [(i, part, [str(o) for o in outs], remotes, options)
            for i, part in enumerate(parts) if done[i] is None]  # fmt: skip
    start = time.perf_counter()
    total = sum(map(_span_bytes, pieces))
    bar = tqdm(desc="prepare", total=total, unit="B", unit_scale=True, disable=not progress,
               dynamic_ncols=True)  # fmt: skip
    bar.update(sum(_span_bytes(sp) for i, p in enumerate(parts) if done[i] for sp in p))
    documents = tokens = 0
    for stats in _map(todo, tokenizer, workers):
        done[stats[0]["part"]] = stats
        documents += sum(s["documents"] for s in stats)
        tokens += sum(s["tokens"] for s in stats)
        seconds = time.perf_counter() - start
        bar.update(sum(map(_span_bytes, parts[stats[0]["part"]])))
        bar.set_postfix_str(
            f"{documents / seconds:,.0f} docs/s, {tokens / seconds:,.0f} tok/s", refresh=False
        )
    bar.close()
    for out, remote in zip(outs, remotes):
        _merge(out, remote, len(parts))
    seconds = round(time.perf_counter() - start, 3)
    return [_totals([done[i][k] for i in range(len(parts))], len(files), seconds)
            for k in range(len(outs))]  # fmt: skip


def _totals(parts: list[dict], files: int, seconds: float) -> dict:
    """One set's stats: its parts' counts and lists added up, in input order."""
    total = {"files": files, "parts": len(parts), "documents": 0, "tokens": 0, "bytes": 0,
             "repaired": [], "skipped": []}  # fmt: skip
    for stats in parts:
        for key in ("documents", "tokens", "bytes", "repaired", "skipped"):
            total[key] += stats[key]
    total["seconds"] = seconds
    return total


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


def report(stats: dict, out: str | Path, tokenizer: str | Path = "TOKENIZER") -> str:
    """The end-of-run summary: counts (of each set of a split, and how to train on it), then
    every skipped item."""
    sets = [stats[name] for name in SETS] if SETS[0] in stats else [stats]
    dirs = [Path(out)] if len(sets) == 1 else [Path(out) / name for name in SETS]
    lines = [
        f"rnnscale: {d}: {s['files']} files, {s['documents']:,} documents, {s['tokens']:,} "
        f"tokens; {len(s['repaired'])} documents with undecodable bytes replaced; "
        f"{len(s['skipped'])} items skipped (all in {d / STATS})"
        for d, s in zip(dirs, sets)
    ]
    if len(sets) > 1:
        lines.append(overrides(Path(out), sets, tokenizer))
    return "\n".join(lines + skip_lines(sets[0]["skipped"]))
