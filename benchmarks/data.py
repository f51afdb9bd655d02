"""Data path throughput: `data prepare` against sentencepiece's raw encode, and the loader
against what training consumes.

    .venv/bin/python benchmarks/data.py            # the stdlib corpus (about 30 MB)
    .venv/bin/python benchmarks/data.py --smoke    # a few files, seconds (the test runs it)

In one run, on the same text: sentencepiece's own `encode` of every document in one process
(the limit per core: no reading, no writing), then `data prepare` with 1 and 2 workers (reading,
decoding, tokenizing, writing MDS shards), as MB/s of input text and as a ratio to the raw
encode, end to end and after start-up (`stats.json`'s seconds: from the first record read to
the last shard written, without importing mosaicml-streaming; the pool start is included).
Then the loader: tokens/s of `PackedLoader` over the shards, as a multiple of the tokens/s a
training step of the debug and the 1.3B configs consumes on this machine (the
debug step measured here; the 1.3B from its FLOPs per token at this machine's matmul peak,
which is what a CPU step of it could do at best).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from measure import matmul_peak_gflops

from rnnscale.data.builtin import builtin_inputs
from rnnscale.data.loader import PackedLoader
from rnnscale.data.prepare import prepare
from rnnscale.data.readers import list_files
from rnnscale.data.tokenizer import load_tokenizer, train_tokenizer
from rnnscale.train.config import load_config
from rnnscale.train.model import build_model

ROOT = Path(__file__).resolve().parents[1]


def raw_encode_seconds(files: list[str], tokenizer: Path) -> tuple[float, int]:
    sp = load_tokenizer(tokenizer)
    texts = [Path(f).read_bytes().decode("utf-8", errors="replace") for f in files]
    start = time.perf_counter()
    for text in texts:
        sp.encode(text)
    return time.perf_counter() - start, sum(len(t.encode("utf-8", errors="replace")) for t in texts)


def step_tokens_per_s(config: str, steps: int = 3) -> float:
    cfg = load_config(ROOT / config)
    model = build_model(cfg.model, cfg.kernels)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    T, B = cfg.train.seq_len, cfg.train.micro_batch_size
    ids = torch.randint(0, cfg.model.vocab_size, (B, T + 1))
    best = float("inf")
    for i in range(steps + 1):
        start = time.perf_counter()
        model.loss(ids[:, :-1], ids[:, 1:]).backward()
        optimizer.step()
        optimizer.zero_grad()
        if i:
            best = min(best, time.perf_counter() - start)
    return B * T / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    files = list_files(builtin_inputs("python-stdlib"))
    if args.smoke:
        files = [f for f in files if f"{os.sep}json{os.sep}" in f]
    work = Path(tempfile.mkdtemp(prefix="rnnscale-bench-data-"))
    try:
        train_tokenizer(files, 4096, work / "tok", max_sentences=200_000)
        tok = work / "tok" / "tokenizer.model"
        raw_s, nbytes = raw_encode_seconds(files, tok)
        mb = nbytes / 1e6
        print(f"machine: {platform.machine()}, {os.cpu_count()} cores; corpus: {len(files)} "
              f"stdlib files, {mb:.1f} MB; tokenizer vocab 4096")  # fmt: skip
        raw = f"{mb / raw_s:.2f}"
        print("| step | MB/s | vs raw encode (1 core) | MB/s after start-up | "
              "peer: sentencepiece raw encode MB/s |")  # fmt: skip
        print("|---|---|---|---|---|")
        print(f"| sentencepiece encode, 1 process | {raw} | 1.00 | | {raw} |")
        for workers in (1, 2):
            out = work / f"shards-{workers}"
            start = time.perf_counter()
            stats = prepare(files, tok, out, workers=workers, progress=False)
            seconds = time.perf_counter() - start
            print(f"| data prepare, {workers} worker{'s' * (workers > 1)} | {mb / seconds:.2f} | "
                  f"{raw_s / seconds:.2f} | {mb / stats['seconds']:.2f} | {raw} |",
                  flush=True)  # fmt: skip
        loader = PackedLoader([(str(work / "shards-1"), None)], seq_len=2048,
                              micro_batch_size=8, seed=0)  # fmt: skip
        n = 5 if args.smoke else 50
        start = time.perf_counter()
        for _ in range(n):
            next(loader)
        loader_tps = n * 8 * 2048 / (time.perf_counter() - start)
        debug = step_tokens_per_s("configs/debug_cpu.yaml")
        cfg = load_config(ROOT / "configs/recipes/gla-1.3b.yaml")
        with torch.device("meta"):
            flops = build_model(cfg.model, cfg.kernels).flops_per_token(cfg.train.seq_len)
        big = matmul_peak_gflops() * 1e9 / (3 * flops)
        print()
        print("PackedLoader: seq_len 2048, 8 rows per batch, over the 1-worker shards")
        print()
        print("| loader, against | loader tokens/s | peer: a training step's tokens/s | "
              "multiple of the step's tokens/s |")  # fmt: skip
        print("|---|---|---|---|")
        print(f"| vs debug_cpu step | {loader_tps:,.0f} | {debug:,.0f} (measured) | "
              f"{loader_tps / debug:.0f}x |")  # fmt: skip
        print(f"| vs gla-1.3b step | {loader_tps:,.0f} | {big:,.1f} (its FLOPs at the matmul "
              f"peak) | {loader_tps / big:,.0f}x |")  # fmt: skip
        del loader
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
