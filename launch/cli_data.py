"""`rnnscale data tokenizer` and `rnnscale data prepare`: their options and how they run (the
work is in rnnscale.data.tokenizer and rnnscale.data.prepare)."""

from __future__ import annotations

import argparse
import os
import sys


def add_data_parser(commands) -> None:
    data = commands.add_parser("data", help="tokenizer and shards")
    actions = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    tok = actions.add_parser("tokenizer", help="train a sentencepiece BPE tokenizer")
    prep = actions.add_parser("prepare", help="tokenize a corpus into MDS shards")
    for p in (tok, prep):
        source = p.add_mutually_exclusive_group(required=True)
        source.add_argument("--input", action="extend", nargs="+", metavar="GLOB",
                            help="text, .jsonl or .parquet files or globs (several, or "
                            "repeated; an unquoted glob the shell expanded works too)")  # fmt: skip
        source.add_argument("--builtin", choices=["python-stdlib"],
                            help="a corpus already on this machine")  # fmt: skip
        p.add_argument("--out", required=True, metavar="DIR")
        p.add_argument("--text-key", default="text", help="JSONL field / Parquet column")
        p.add_argument("--split-blank-lines", action="store_true",
                       help="plain text: one document per blank-line-separated block (a "
                       "paragraph); without it a whole file is one document. The model's state "
                       "resets at every document start: keep a book or a play whole, split a "
                       "file of unrelated snippets (docs/data.md)")  # fmt: skip
    tok.add_argument("--vocab-size", type=int, required=True)
    tok.add_argument("--max-sentences", type=int, default=2_000_000,
                     help="lines sampled from the corpus (bounds memory)")  # fmt: skip
    prep.add_argument("--tokenizer", required=True, metavar="PATH", help="tokenizer.model")
    prep.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    prep.add_argument("--compression", default=None, help="e.g. zstd (MDS shard compression)")
    prep.add_argument(
        "--bad-bytes",
        choices=["replace", "skip"],
        default="replace",
        help="undecodable UTF-8: replace with U+FFFD (reported) or skip the item",
    )
    prep.add_argument(
        "--remote",
        metavar="URL",
        help="also upload the shards there (s3://, gs://, oci://, ...; a path copies), marker last",
    )
    prep.add_argument("--val-fraction", type=float, metavar="F",
                      help="hold out about this share of the documents (0 < F < 1; the same ones "
                      "on every run, chosen by a hash of each document's text): DIR/train and "
                      "DIR/val, each a shard set")  # fmt: skip
    prep.add_argument("--no-progress", action="store_true",
                      help="no progress bar (drawn only when stderr is a terminal)")  # fmt: skip


def run_data(args: argparse.Namespace) -> int:
    from rnnscale.data.builtin import builtin_inputs

    inputs = builtin_inputs(args.builtin) if args.builtin else args.input
    try:
        if args.data_command == "tokenizer":
            from rnnscale.data.tokenizer import report as tokenizer_report
            from rnnscale.data.tokenizer import train_tokenizer

            info = train_tokenizer(
                inputs,
                args.vocab_size,
                args.out,
                max_sentences=args.max_sentences,
                text_key=args.text_key,
                split_blank_lines=args.split_blank_lines,
            )
            print(tokenizer_report(info, args.out))
            return 0
        from rnnscale.data.prepare import prepare, report

        stats = prepare(inputs, args.tokenizer, args.out, text_key=args.text_key,
                        workers=args.workers, compression=args.compression,
                        split_blank_lines=args.split_blank_lines, bad_bytes=args.bad_bytes,
                        progress=not args.no_progress and sys.stderr.isatty(), remote=args.remote,
                        val_fraction=args.val_fraction)  # fmt: skip
        print(report(stats, args.out, args.tokenizer))
        return 0
    except (FileNotFoundError, ValueError) as e:
        print(f"rnnscale: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. a read-only --out
        print(f"rnnscale: {e.filename or args.out}: {e.strerror or e}: check the path and "
              f"its permissions (--out must be writable)", file=sys.stderr)  # fmt: skip
        return 2
