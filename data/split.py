"""The held-out split of `data prepare --val-fraction F` (docs/data.md, "Held-out split").

Which side a document goes to is decided by its text alone: a keyed 64-bit BLAKE2b hash of
its UTF-8 bytes, read as a number u in [0, 1); u < F holds it out. So the same corpus always
gives the same split, for any --workers, part size or file order, and identical documents
(exact duplicates) always land on the same side: a duplicate never leaks from training into
validation.

Layout: with a split, `--out DIR` gets `DIR/train` and `DIR/val`, each a complete shard set
(its own parts, merged index, stats.json and prepare.json, checked and resumed like any
other); without one, DIR is the shard set, as it always was. A directory of one layout is
refused for the other.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from rnnscale.data.shardset import JOB, MARKER, discard

SETS = ("train", "val")
_KEY = b"rnnscale-val"  # the split's own hash: independent of any other use of BLAKE2b
_CHUNK = 1 << 20  # characters hashed at a time: a long document is not copied whole


def check_fraction(fraction: float | None) -> None:
    if fraction is not None and not 0 < fraction < 1:
        raise ValueError(
            f"--val-fraction must be between 0 and 1, exclusive (e.g. 0.01 holds out about 1% "
            f"of the documents), got {fraction}"
        )


def held_out(text: str, fraction: float) -> bool:
    """Whether the document `text` goes to the validation set (probability `fraction`)."""
    h = hashlib.blake2b(digest_size=8, key=_KEY)
    for i in range(0, len(text), _CHUNK):
        h.update(text[i : i + _CHUNK].encode("utf-8", errors="replace"))
    return int.from_bytes(h.digest(), "big") / 2**64 < fraction


def set_dirs(out: Path, fraction: float | None) -> list[Path]:
    """The shard sets a prepare writes: [out], or [out/train, out/val] with a split."""
    return [out] if fraction is None else [out / name for name in SETS]


def set_remotes(remote: str | None, fraction: float | None) -> list[str | None]:
    if fraction is None or remote is None:
        return [remote] * (1 if fraction is None else len(SETS))
    return [f"{remote.rstrip('/')}/{name}" for name in SETS]


def set_job_ids(job_id: str, fraction: float | None) -> list[str]:
    """Each set's job fingerprint (the job's own without a split: sets written before keep
    theirs)."""
    if fraction is None:
        return [job_id]
    return [hashlib.sha256(f"{job_id}/{name}".encode()).hexdigest() for name in SETS]


def check_layout(out: Path, fraction: float | None) -> None:
    """Refuse to write a split into a directory that holds an unsplit set, or the reverse."""
    unsplit = (out / MARKER).exists() or (out / JOB).exists()
    split = any((out / name / f).exists() for name in SETS for f in (MARKER, JOB))
    if fraction is not None and unsplit:
        raise ValueError(
            f"--out {out} holds shards prepared without --val-fraction: choose another --out "
            f"for the split (it writes {out}/train and {out}/val), or delete that directory"
        )
    if fraction is None and split:
        raise ValueError(
            f"--out {out} holds a held-out split ({out}/train, {out}/val): give the same "
            f"--val-fraction to use it, choose another --out, or delete that directory"
        )


def refuse_empty_side(stats: list[dict], fraction: float, dirs: list[Path], out: Path,
                      created: bool) -> None:  # fmt: skip
    """A split that leaves a side with no document: what this run wrote is removed
    (`shardset.discard`), and one line says what to give instead."""
    train, val = (s["documents"] for s in stats)
    total, problem = train + val, None
    if val == 0:
        problem = (f"--val-fraction {fraction} holds out none of the {total:,} documents (each "
                   f"goes to the validation set with that probability): give --val-fraction of "
                   f"at least {min(0.5, 3 / total):.3g}, or more documents")  # fmt: skip
    elif train == 0:
        problem = (f"--val-fraction {fraction} leaves none of the {total:,} documents for "
                   f"training: give a smaller --val-fraction")  # fmt: skip
    if problem is not None:
        discard(dirs, out, created)
        raise ValueError(f"{problem}; nothing was kept in {out}")


def overrides(out: Path, stats: list[dict], tokenizer: str | Path) -> str:
    """The config overrides that train on the split, with the whole validation set evaluated."""
    train, val = (s["documents"] for s in stats)
    share = val / (train + val)
    return (
        f"rnnscale: held out {val:,} of {train + val:,} documents ({share:.1%}, chosen by a hash "
        f"of each document's text); train on the split with:\n"
        f'  data.source=mds "data.streams=[{{path: {out / SETS[0]}}}]" '
        f'"data.val_streams=[{{path: {out / SETS[1]}}}]" '
        f"data.tokenizer={tokenizer} train.eval_interval=N train.eval_batches=0  (0: the "
        f"whole validation set at each evaluation)"
    )
