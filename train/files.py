"""Files that another process may read while they change: written whole or not at all
(`write_atomic`: config.yaml, a checkpoint's manifest and meta, the preemption notice), and
JSON-lines logs whose last record a kill cut short (`end_torn_line`)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, text: str) -> None:
    """`path` holds `text` whole or not at all: written to a temporary file of its own (no
    other thread or process writes the same one) and renamed over the name."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # as a plain write would leave it (mkstemp makes it 0600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def end_torn_line(path: Path) -> None:
    """Give a JSON-lines file whose last line was cut (a kill or a full disk mid-write) the
    newline it lacks, so the next record starts a line of its own: only the cut record is
    unreadable (readers skip it), not the next one too."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) != b"\n":
            f.write(b"\n")
