"""Shards checked against their index before they are used: every shard file that
mosaicml-streaming will read is there, at the size its `index.json` records and, where asked,
with the hash recorded when it was written (`data prepare` has streaming's `MDSWriter` record
`HASH` of every shard file in the index; streaming reads a local directory in place and checks
no size or hash itself, and checks a hash only on download).

What is checked when (docs/data.md, "Damaged shards"):
- the loader, and the launch's pre-flight before any worker starts: sizes (one `stat` per shard
  file; a truncated or missing shard is the usual damage, and the check stays cheap on a corpus
  of any size); a remote stream: the sizes of the shards already in its local cache, and every
  shard streaming downloads is checked against the hash by streaming (`validate_hash`);
- `data prepare` re-run over finished shards, or resuming an interrupted run: sizes and hashes
  of every shard (it reads each once, at the speed of the disk: the explicit check).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

HASH = "xxh3_64"  # fast (GB/s), in every streaming install (xxhash); not a security hash


class DamagedShards(ValueError):
    """A shard set that does not match its index: the message names the file and what to do."""


def _files(index: dict, root: Path) -> Iterator[tuple[Path, dict, bool]]:
    """(path, file info, required) of every shard file an index names. The file streaming reads
    in place must be there: the raw shard, or the compressed one when the shard is compressed;
    the raw copy streaming decompresses next to a compressed one is checked when present."""
    for shard in index["shards"]:
        compressed = bool(shard.get("zip_data"))
        for key in ("raw_data", "zip_data"):
            info = shard.get(key)
            if info:
                yield root / info["basename"], info, (key == "zip_data") == compressed


def file_problem(path: Path, info: dict, required: bool = True, hashes: bool = False) -> str | None:
    """What is wrong with one shard file against its index entry, or None."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return f"{path} is missing" if required else None
    if size != info["bytes"]:
        return f"{path} is {size:,} bytes, its index says {info['bytes']:,}"
    recorded = (info.get("hashes") or {}).get(HASH)
    if hashes and recorded is not None:
        from streaming.base.hashing import get_hash

        if get_hash(HASH, path.read_bytes()) != recorded:
            return f"{path} does not match its recorded {HASH} hash"
    return None


def read_index(root: Path) -> tuple[dict | None, str | None]:
    """(the index of the shards in `root`, None) or (None, what is wrong with it)."""
    path = root / "index.json"
    try:
        index = json.loads(path.read_text())
        if not isinstance(index.get("shards"), list):
            raise ValueError("no list of shards")
    except FileNotFoundError:
        return None, f"{path} is missing"
    except (OSError, ValueError, AttributeError) as e:
        return None, f"{path} cannot be read ({e})"
    return index, None


def problems(root: Path, hashes: bool = False) -> list[str]:
    """Everything wrong with the shard set in `root` against its index.json, one line each."""
    index, problem = read_index(root)
    if problem is not None:
        return [problem]
    found = [file_problem(*f, hashes=hashes) for f in _files(index, root)]
    return [p for p in found if p is not None]


def check_stream(root: str | Path) -> dict:
    """The index of the local shard set `root`, after checking every shard file's size and that
    it holds a document; raises DamagedShards naming the first damaged file and what to run."""
    root = Path(root)
    if not root.is_dir():
        raise DamagedShards(
            f"{root} does not exist: run `rnnscale data prepare` to make it, or fix the path"
        )
    found = problems(root)
    if found:
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        if (root / "prepare.json").exists():
            todo = (f"run the same `rnnscale data prepare` command again (--out {root}): it "
                    f"checks every shard and writes only the damaged parts again")  # fmt: skip
        else:
            todo = "write these shards again"
        raise DamagedShards(f"{root}: damaged shards: {found[0]}{more}: {todo}")
    index, _ = read_index(root)
    if sum(shard.get("samples", 0) for shard in index["shards"]) == 0:
        raise DamagedShards(
            f"{root}: the shards hold no documents (its index.json lists no samples): prepare "
            f"them from inputs with text (`rnnscale data prepare` reports what it skipped)"
        )
    return index


def check_cache(local: str | Path, remote: str) -> bool:
    """A remote stream's local cache (`local`, with the index streaming downloaded): every shard
    file already there has its indexed size (streaming would use a damaged one as it is).
    Returns whether every shard file's index entry carries `HASH` (then streaming can check
    each download against it). Raises DamagedShards naming the damaged copy."""
    local = Path(local)
    index, problem = read_index(local)
    if problem is not None:
        raise DamagedShards(f"{remote}: {problem}: delete {local} (a cache of {remote})")
    hashed = True
    for path, info, _ in _files(index, local):
        problem = file_problem(path, info, required=False)
        if problem is not None:
            raise DamagedShards(
                f"{remote}: damaged local copy: {problem}: delete {path} (a cache: streaming "
                f"downloads it again)"
            )
        hashed = hashed and HASH in (info.get("hashes") or {})
    return hashed
