"""Documents to `[BOS] + ids + [EOS]` token arrays, a long document in pieces (bounded memory).

sentencepiece's encode of one string keeps state per character (BPE symbols and merge queue)
and returns a Python list of ints: a 50 MB document took 2.4 GB over the process's baseline,
sentencepiece alone 2.5 GB (docs/performance.md). So a document longer than `PIECE_CHARS`
characters is encoded piece by piece, each piece's ids turned into a compact array at once:
memory then grows with the document's token array, not with its characters times 50.

The pieces give exactly the ids of one encode. A cut goes just before a run of spaces (`' '`,
or `'\u2581'`, which sentencepiece reads as the same) that follows another character: no token
can cross it, because no piece of the vocabulary holds `\u2581` after another character
(sentencepiece's rule when trained with split_by_whitespace, as `data tokenizer` does; checked on
the model, see `seam_problem`), so BPE merges (and a unigram lattice) on either side never meet.
A piece is at most `PIECE_CHARS` characters, unless a stretch holds no such point (one 'word'
longer than that, or a long run of spaces): it then reaches the next one. A tokenizer for which
the rule does not hold (another normalization, a dummy prefix, pieces across whitespace) has its
long documents encoded whole, as before, with the memory that takes.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator

import numpy as np

from rnnscale.data.tokenizer import BOS, EOS

PIECE_CHARS = 1 << 16  # longest piece handed to sentencepiece (characters)
SPACES = " \u2581"
_SEAM = re.compile("[^ \u2581][ \u2581]")  # the character before a cut, and the first space


def seam_problem(sp) -> str | None:
    """Why this tokenizer cannot be encoded in pieces at space runs, or None when it can (its
    ids are then exactly those of one encode)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    model = pb.ModelProto()
    model.ParseFromString(sp.serialized_model_proto())
    norm = model.normalizer_spec
    if norm.name != "identity" or norm.precompiled_charsmap:
        return f"normalization {norm.name!r} (not identity)"
    if norm.add_dummy_prefix or norm.remove_extra_whitespaces or not norm.escape_whitespaces:
        return "add_dummy_prefix, remove_extra_whitespaces or unescaped whitespace"
    if model.trainer_spec.treat_whitespace_as_suffix:
        return "treat_whitespace_as_suffix"
    matched = (pb.ModelProto.SentencePiece.NORMAL, pb.ModelProto.SentencePiece.USER_DEFINED)
    for piece in model.pieces:
        if piece.type in matched and re.search("[^\u2581]\u2581", piece.piece):
            return f"piece {piece.piece!r} holds a space after another character"
    if sp.piece_to_id("\u2581") == sp.unk_id():
        return "no piece for a space"
    return None


def pieces(text: str, limit: int = PIECE_CHARS) -> Iterator[str]:
    """`text` cut just before space runs into pieces of at most `limit` characters (longer only
    where no cut point exists within `limit`); their concatenation is `text`."""
    start, n = 0, len(text)
    while n - start > limit:
        end = start + limit
        cut = max(text.rfind(" ", start + 1, end + 1), text.rfind("\u2581", start + 1, end + 1))
        while cut > start and text[cut - 1] in SPACES:
            cut -= 1  # back to the start of the run
        if cut <= start:  # no cut point within the limit: the first one after it
            found = _SEAM.search(text, end)
            if found is None:
                break
            cut = found.start() + 1
        yield text[start:cut]
        start = cut
    yield text[start:]


class DocumentEncoder:
    """`encode(texts)`: `[BOS] + ids + [EOS]` arrays of `dtype`. Documents up to `limit`
    characters go to sentencepiece in one batch (as they always have); longer ones in pieces
    when the tokenizer allows it (`seam_problem`), else whole."""

    def __init__(self, sp, dtype: str, limit: int | None = None):
        self.sp, self.dtype = sp, dtype
        self.limit = PIECE_CHARS if limit is None else limit
        self.problem = seam_problem(sp)
        self.warned = False

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        short = iter(self.sp.encode([t for t in texts if len(t) <= self.limit], num_threads=1))
        out = []
        for text in texts:
            if len(text) <= self.limit:
                out.append(np.array([BOS, *next(short), EOS], dtype=self.dtype))
            else:
                out.append(self._long(text))
        return out

    def _long(self, text: str) -> np.ndarray:
        if self.problem is not None:
            if not self.warned:
                print(f"rnnscale: note: long documents are encoded whole with this tokenizer "
                      f"({self.problem}): memory grows about 50 bytes per character",
                      file=sys.stderr)  # fmt: skip
                self.warned = True
            return np.array([BOS, *self.sp.encode(text), EOS], dtype=self.dtype)
        parts = [np.array([BOS], dtype=self.dtype)]
        for piece in pieces(text, self.limit):
            parts.append(np.array(self.sp.encode(piece), dtype=self.dtype))
        parts.append(np.array([EOS], dtype=self.dtype))
        return np.concatenate(parts)


def utf8_length(text: str, chunk: int = 1 << 20) -> int:
    """len(text.encode("utf-8", errors="replace")) without a copy of a long text at once."""
    if len(text) <= chunk:
        return len(text.encode("utf-8", errors="replace"))
    return sum(
        len(text[i : i + chunk].encode("utf-8", errors="replace"))
        for i in range(0, len(text), chunk)
    )
