"""The output directory of `data prepare`: its done-marker, an interrupted run's leftovers, the
check of finished shards, the commit (docs/data.md, "Shards").

`prepare.json` is written last: the job's fingerprint. `.prepare-job` names the job whose parts
the directory holds; a part directory `part-NNNNN/` gets its name only when whole, with its
`part-stats.json`. Finished shards found again are checked (sizes and hashes, `integrity`), and
damaged parts written again; a run that read no usable document leaves nothing done-marked.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from rnnscale.data.integrity import problems

MARKER, STATS, JOB, PART_STATS = "prepare.json", "stats.json", ".prepare-job", "part-stats.json"
INPUTS = ".inputs"  # downloaded remote inputs, removed when the shards are written


def part_name(index: int) -> str:
    return f"part-{index:05d}"


def finished(out: Path, job_id: str) -> dict | None:
    """The stats of a finished run of this job into `out` (None: not finished; its marker is
    then removed if it has no readable stats, so the run resumes)."""
    marker = out / MARKER
    if not marker.exists():
        return None
    if json.loads(marker.read_text()).get("job") != job_id:
        raise ValueError(
            f"{out} holds shards from a different prepare (other inputs, tokenizer or options; "
            f"see {marker}): choose another --out, or delete that directory"
        )
    try:
        stats = json.loads((out / STATS).read_text())
        if stats["documents"] > 0:
            return stats
    except (OSError, ValueError, KeyError, TypeError):
        pass
    marker.unlink()  # no stats, or an empty set marked done by an older version: run again
    return None


def already_done(out: Path, dirs: list[Path], ids: list[str]) -> tuple[list | None, list | None]:
    """(every set's stats, None) when each set of `dirs` (under `out`) is finished by its job
    and whole: nothing to do. Else (None, each set's parts as `recheck` found them, or None
    when a set is not finished), with every set's marker removed: the sets of a split are
    committed again together (one may be done and another not)."""
    done, checked = [finished(d, i) for d, i in zip(dirs, ids)], None
    if all(d is not None for d in done):
        checked = [recheck(d, x["parts"]) for d, x in zip(dirs, done)]
        if all((d / MARKER).exists() for d in dirs):
            print(f"rnnscale: {out} already holds these shards ({MARKER} matches, every shard "
                  f"checked): nothing to do")  # fmt: skip
            return done, None
    for d in dirs:
        (d / MARKER).unlink(missing_ok=True)
    return None, checked


def check_part(path: Path) -> tuple[dict | None, str | None]:
    """(the part's stats, None) for a part an earlier run of the same job wrote whole: its index,
    stats, and every shard file at its indexed size and recorded hash (integrity.problems);
    else (None, what is wrong)."""
    found = problems(path, hashes=True)
    if found:
        return None, found[0]
    try:
        return json.loads((path / PART_STATS).read_text()), None
    except (OSError, ValueError) as e:
        return None, f"{path / PART_STATS} cannot be read ({e})"


def recheck(out: Path, count: int) -> dict[int, dict | None]:
    """Finished shards checked again (sizes and hashes): every part's stats, None for a damaged
    one (named on stdout). Any damage, or a damaged merged index, removes the done-marker: the
    run goes on as a resumed one, writing only the damaged parts again."""
    checked, damage = {}, []
    for i in range(count):
        checked[i], problem = check_part(out / part_name(i))
        if problem is not None:
            damage.append(f"{part_name(i)}: {problem}")
    if not damage:  # the parts are whole: is the merged index too?
        damage = [f"merged index: {p}" for p in problems(out)]
    if damage:
        more = f" (and {len(damage) - 1} more)" if len(damage) > 1 else ""
        print(f"rnnscale: {out}: damaged shards: {damage[0]}{more}: writing "
              f"{sum(v is None for v in checked.values())} of {count} parts again")  # fmt: skip
        (out / MARKER).unlink()
    return checked


def whole_parts(outs: list[Path], count: int, checked) -> dict[int, list[dict] | None]:
    """Each part's stats per set where an earlier run of the job wrote it whole in every set
    (`checked`, per set, when `recheck` did it already), else None: its directories are
    removed, and it is written again."""
    if checked is None or any(len(c) != count for c in checked):
        checked = [{i: check_part(out / part_name(i))[0] for i in range(count)} for out in outs]
    done = {}
    for i in range(count):
        found = [c[i] for c in checked]
        done[i] = None if None in found else found
        for out in outs if done[i] is None else ():
            if (out / part_name(i)).exists():
                shutil.rmtree(out / part_name(i))  # damaged, or its other set is: again
    return done


def clear_partial(out: Path, job_id: str) -> None:
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


def discard(dirs: list[Path], out: Path, created: bool) -> None:
    """Remove what a refused run wrote into the shard sets `dirs` under `out` (no done-marked
    set is left; the inputs are untouched), and `out` when this run made it and it is empty."""
    for path in dirs:
        for part in path.glob("part-*"):
            shutil.rmtree(part)
        for name in ("index.json", JOB):
            (path / name).unlink(missing_ok=True)
        if path != out and path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    shutil.rmtree(out / INPUTS, ignore_errors=True)
    if created and not any(out.iterdir()):
        out.rmdir()


def nothing_read(inputs, files, origin, stats, dirs, out, created, text_key, split_blank_lines):
    """No usable document: remove what this run wrote (`discard`) and raise one line naming
    the inputs, what was looked for, and why each item was skipped."""
    discard(dirs, out, created)
    skipped = [f"{origin.get(s['file'], s['file'])}:{s['line']}: {s['reason']}"
               for s in stats["skipped"]]  # fmt: skip
    listed = ": " + "; ".join(skipped[:5]) if skipped else ""
    if len(skipped) > 5:
        listed += f"; ... and {len(skipped) - 5} more"
    plain = "blank-line blocks" if split_blank_lines else "whole files"
    raise ValueError(
        f"--input {' '.join(map(repr, inputs))} ({len(files)} files): no usable document (the "
        f"text is read from JSON field / Parquet column {text_key!r}, set by --text-key, and "
        f"from plain text as {plain}): {len(skipped)} items skipped{listed}. Fix the inputs "
        f"or --text-key; nothing was written to {out}"
    )


def commit(out: Path, remote: str | None, stats: dict, marker: dict) -> None:
    """The stats, then the done-marker written last and atomically, each uploaded to `remote`
    too (a failed upload of the marker leaves no local marker either)."""
    (out / STATS).write_text(json.dumps(stats, indent=2) + "\n")
    upload = uploader(out, remote)
    upload(STATS)
    tmp = out / f".{MARKER}.tmp"
    tmp.write_text(json.dumps(marker, indent=2) + "\n")
    os.replace(tmp, out / MARKER)  # the commit
    try:
        upload(MARKER)
    except Exception:
        (out / MARKER).unlink()
        raise


def uploader(out: Path, remote: str | None):
    """`upload(name)`: copy out/name to the remote (a no-op without one)."""
    if remote is None:
        return lambda name: None
    from streaming.base.storage.upload import CloudUploader

    uploader = CloudUploader.get(out=(str(out), remote), keep_local=True, exist_ok=True)
    return uploader.upload_file
