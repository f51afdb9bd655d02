"""Peak memory of `data prepare` on one long document, beside sentencepiece's own encode.

    .venv/bin/python benchmarks/prepare_memory.py            # one 50 MB document (about 3 min)
    .venv/bin/python benchmarks/prepare_memory.py --mb 2     # a quick look

The document: `--mb` MB of Python source (the standard library's files, concatenated), one
plain text file, so one document; a 1000-piece tokenizer trained on the stdlib's `json` package
(`rnnscale data tokenizer`). Every row is a fresh process whose peak resident memory is read
from the kernel when it ends (`os.wait4`):

- `rnnscale data prepare --workers 1` on the document (tokenized in the process that imported
  mosaicml-streaming and torch; with a pool, a forked worker tokenizes it, and its peak does
  not count the parent's pages it never touches, so that process's figure would say less);
- the same with long documents encoded whole, as `data prepare` did before it encoded them in
  pieces (`rnnscale.data.encoding.PIECE_CHARS` set past the document's length);
- the same command on a 1 KB document: the fixed cost (Python, mosaicml-streaming, torch);
- the peer: sentencepiece's own `encode` of the same text in one process (read, one call).

"Above the fixed cost" subtracts the 1 KB run's peak; "x document" divides that by the
document's size (UTF-8, MiB), "x tokens" by its `uint16` token array's. The document as a
Python `str` (what the reader hands the tokenizer) is printed too: 1, 2 or 4 bytes per
character, by the widest character in it. Nothing is asserted; the figures are in
docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PREPARE = """
import sys
import rnnscale.data.encoding as encoding
if sys.argv[1] == "whole":
    encoding.PIECE_CHARS = 1 << 62  # every document in one encode, as before
from rnnscale.launch.cli import main
sys.exit(main(sys.argv[2:]))
"""
PEER = """
import sys
import sentencepiece
sp = sentencepiece.SentencePieceProcessor(model_file=sys.argv[1])
ids = sp.encode(open(sys.argv[2], encoding="utf-8").read())
print(len(ids))
"""


def peak_mb(cmd: list[str]) -> tuple[float, float]:
    """(peak resident MiB of `cmd` and its waited-for children, seconds), in a fresh process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
    return usage.ru_maxrss / 1024, time.perf_counter() - start  # Linux reports KiB


def document(path: Path, mb: float) -> int:
    """Stdlib sources concatenated into one file of about `mb` MB; returns its size."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    want, parts, size = int(mb * 1e6), [], 0
    for source in sorted(stdlib.rglob("*.py")):
        text = source.read_text(encoding="utf-8", errors="replace")[: want - size]
        parts.append(text.encode("utf-8"))  # (a few test files are not UTF-8)
        size += len(parts[-1])
        if size >= want:
            break
    path.write_bytes(b"".join(parts))
    return size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=50.0, help="the document's size, MB")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="rnnscale-bench-prepmem-"))
    py = sys.executable
    try:
        size = document(work / "doc.txt", args.mb)
        (work / "tiny.txt").write_text("def f(x):\n    return x\n" * 40)
        json_py = str(Path(sysconfig.get_paths()["stdlib"]) / "json" / "*.py")
        tok = work / "tok" / "tokenizer.model"
        cli = [py, "-c", PREPARE]
        subprocess.run([*cli, "pieces", "data", "tokenizer", "--input", json_py,
                        "--vocab-size", "1000", "--out", str(work / "tok")], check=True,
                       cwd=ROOT, stdout=subprocess.DEVNULL)  # fmt: skip

        def prepare(how: str, doc: str, workers: int) -> tuple[float, float]:
            out = work / f"shards-{how}-{workers}-{Path(doc).stem}"
            cmd = [*cli, how, "data", "prepare", "--input", doc, "--tokenizer", str(tok),
                   "--out", str(out), "--workers", str(workers), "--no-progress"]  # fmt: skip
            try:
                return peak_mb(cmd)
            finally:
                if (out / "stats.json").exists():
                    shutil.copy(out / "stats.json", work / "stats.json")
                shutil.rmtree(out, ignore_errors=True)

        fixed, _ = prepare("pieces", str(work / "tiny.txt"), 1)
        peer, peer_s = peak_mb([py, "-c", PEER, str(tok), str(work / "doc.txt")])
        doc_mb = size / 2**20
        text = (work / "doc.txt").read_text(encoding="utf-8")
        str_mb, chars = sys.getsizeof(text) / 2**20, len(text)
        del text
        print(f"one document of {size / 1e6:.1f} MB ({doc_mb:.1f} MiB) of stdlib source, "
              f"{chars:,} characters, as a Python str {str_mb:.1f} MiB; tokenizer: 1000 pieces; "
              f"fixed cost (the same command on a 1 KB document): {fixed:,.0f} MiB")  # fmt: skip
        print()
        print("| run | peak RSS, MiB | above the fixed cost, MiB | x document | x tokens | "
              "seconds | peer: sentencepiece encode, 1 process, peak RSS MiB |")  # fmt: skip
        print("|---|---|---|---|---|---|---|")
        print(f"| sentencepiece encode (the peer) | {peer:,.0f} | | | | {peer_s:.1f} | "
              f"{peer:,.0f} |")  # fmt: skip
        for how, label in (("pieces", "in pieces"), ("whole", "whole (as before)")):
            mib, seconds = prepare(how, str(work / "doc.txt"), 1)
            tokens = json.loads((work / "stats.json").read_text())["tokens"] * 2 / 2**20
            print(f"| data prepare, 1 worker, long documents {label} | {mib:,.0f} | "
                  f"{mib - fixed:,.0f} | {(mib - fixed) / doc_mb:.1f} | "
                  f"{(mib - fixed) / tokens:.1f} | {seconds:.1f} | {peer:,.0f} |",
                  flush=True)  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
