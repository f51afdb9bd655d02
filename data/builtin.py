"""Corpora that are already on every machine, so a first run needs no download.

`python-stdlib`: the Python standard library's own source files (`*.py` under
`sysconfig.get_paths()["stdlib"]`, installed packages left out), one document per file:
about 1,800 files and 30 MB of real code (Python 3.11), some with a non-UTF-8 encoding (which `data
prepare` reports).
"""

from __future__ import annotations

import glob
import sysconfig
from pathlib import Path

BUILTIN = ("python-stdlib",)


def builtin_inputs(name: str) -> list[str]:
    """The input globs of a built-in corpus (escaped file paths)."""
    if name not in BUILTIN:
        raise ValueError(f"--builtin must be one of {', '.join(BUILTIN)}, got {name!r}")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = (p for p in stdlib.rglob("*.py") if "site-packages" not in p.parts and p.is_file())
    return sorted(glob.escape(str(p)) for p in files)
