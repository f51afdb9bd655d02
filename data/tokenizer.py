"""Training the run's tokenizer: sentencepiece BPE with byte fallback.

`train_tokenizer(inputs, vocab_size, out_dir)` reads documents with `rnnscale.data.readers`,
samples at most `max_sentences` lines of them (reservoir sampling, seeded: memory stays bounded
however large the corpus, and the same inputs give the same tokenizer), and trains a
sentencepiece BPE model with byte fallback (no byte is ever unknown), digits split one by one,
and no whitespace normalisation (code and text keep their exact spacing). It writes
`DIR/tokenizer.model` and `DIR/tokenizer.json` with the model's SHA-256 fingerprint (checkpoints
record it, so a resume with another tokenizer is refused) and its special ids.

Ids: 0 unk, 1 BOS, 2 EOS (the synthetic data and the shards use the same), no padding id.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import tempfile
from collections.abc import Iterator
from pathlib import Path

import sentencepiece

from rnnscale.data.readers import Corpus, Document, list_files, localize

UNK, BOS, EOS = 0, 1, 2
MODEL_FILE, INFO_FILE = "tokenizer.model", "tokenizer.json"


def sample_lines(docs: Iterator[Document], max_sentences: int, seed: int) -> list[str]:
    """A uniform sample of at most `max_sentences` non-empty lines (reservoir sampling)."""
    rng = random.Random(seed)
    sample: list[str] = []
    seen = 0
    for doc in docs:
        for line in doc.text.splitlines():
            if not line.strip():
                continue
            seen += 1
            if len(sample) < max_sentences:
                sample.append(line)
            else:
                j = rng.randrange(seen)
                if j < max_sentences:
                    sample[j] = line
    return sample


def train_tokenizer(
    inputs: list[str],
    vocab_size: int,
    out_dir: str | Path,
    *,
    max_sentences: int = 2_000_000,
    text_key: str = "text",
    split_blank_lines: bool = False,
    seed: int = 0,
) -> dict:
    """Train and write the tokenizer; returns the contents of tokenizer.json."""
    if vocab_size < 260:
        raise ValueError(
            f"--vocab-size must be at least 260 (256 byte pieces + specials), got {vocab_size}"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = list_files(inputs)
    with tempfile.TemporaryDirectory(prefix="rnnscale-inputs-") as cache:
        files, _ = localize(files, Path(cache))  # URLs are downloaded, local paths stay
        corpus = Corpus(files, text_key=text_key, split_blank_lines=split_blank_lines)
        lines = sample_lines(corpus.documents(), max_sentences, seed)
    if not lines:
        raise ValueError(f"no text found in {inputs}: nothing to train a tokenizer on")
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_by_whitespace=True,
        max_sentence_length=1 << 16,
        unk_id=UNK,
        bos_id=BOS,
        eos_id=EOS,
        pad_id=-1,
        character_coverage=0.9995,
        num_threads=1,
        minloglevel=2,
    )
    data = model.getvalue()
    (out / MODEL_FILE).write_bytes(data)
    info = {
        "fingerprint": hashlib.sha256(data).hexdigest(),
        "vocab_size": vocab_size,
        "unk_id": UNK,
        "bos_id": BOS,
        "eos_id": EOS,
        "pad_id": None,
        "trained_on_lines": len(lines),
    }
    (out / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return info


def fingerprint(model_path: str | Path) -> str:
    return hashlib.sha256(Path(model_path).read_bytes()).hexdigest()


def load_tokenizer(model_path: str | Path) -> sentencepiece.SentencePieceProcessor:
    path = Path(model_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no tokenizer there (make one with rnnscale data tokenizer)"
        )
    return sentencepiece.SentencePieceProcessor(model_file=str(path))
