"""The tokenizer of an exported rnnscale model for transformers (`AutoTokenizer.from_pretrained(
DIR, trust_remote_code=True)`): the run's own sentencepiece model (`tokenizer.model`), whose
`encode` gives exactly the ids rnnscale trained on (byte fallback, digits split, no dummy prefix,
no normalisation), with BOS before every text as rnnscale's documents start. Padding is on the
left with EOS (the vocabulary has no padding piece; rnnscale models never see padded positions).
Special tokens decode to their own text ("<s>"), and the same text in an input is text.
Imports nothing from rnnscale."""

from __future__ import annotations

import os
import shutil

import sentencepiece as spm
from transformers import PreTrainedTokenizer


class RnnscaleTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                 pad_token="</s>", add_bos_token=True, add_eos_token=False, **kwargs):  # fmt: skip
        self.vocab_file = vocab_file
        self.sp = spm.SentencePieceProcessor(model_file=vocab_file)
        self.add_bos_token, self.add_eos_token = add_bos_token, add_eos_token
        kwargs.setdefault("padding_side", "left")
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        # "<s>" written in a text is text, as rnnscale's data prepare encodes it
        kwargs.setdefault("split_special_tokens", True)
        super().__init__(unk_token=unk_token, bos_token=bos_token, eos_token=eos_token,
                         pad_token=pad_token, add_bos_token=add_bos_token,
                         add_eos_token=add_eos_token, **kwargs)  # fmt: skip

    def __getstate__(self):
        state = self.__dict__.copy()
        state["sp"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.sp = spm.SentencePieceProcessor(model_file=self.vocab_file)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def get_vocab(self) -> dict:
        vocab = {self.sp.id_to_piece(i): i for i in range(self.vocab_size)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def _tokenize(self, text, **kwargs):
        return self.sp.encode(text, out_type=str)

    def _convert_token_to_id(self, token):
        return self.sp.piece_to_id(token)

    def _convert_id_to_token(self, index):
        return self.sp.id_to_piece(index)

    def convert_tokens_to_string(self, tokens):
        """The pieces' text; a special token as its own text ("<s>"), which sentencepiece
        would decode to nothing."""
        out, pieces = "", []
        for token in tokens:
            if token in self.all_special_tokens:
                out += self.sp.decode_pieces(pieces) + token
                pieces = []
            else:
                pieces.append(token)
        return out + self.sp.decode_pieces(pieces)

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        bos = [self.bos_token_id] if self.add_bos_token else []
        eos = [self.eos_token_id] if self.add_eos_token else []
        out = bos + token_ids_0 + eos
        return out if token_ids_1 is None else out + bos + token_ids_1 + eos

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None,
                                already_has_special_tokens=False):  # fmt: skip
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, True)
        bos, eos = [1] * self.add_bos_token, [1] * self.add_eos_token
        mask = bos + [0] * len(token_ids_0) + eos
        return mask if token_ids_1 is None else mask + bos + [0] * len(token_ids_1) + eos

    def save_vocabulary(self, save_directory, filename_prefix=None):
        out = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "")
                           + "tokenizer.model")  # fmt: skip
        if os.path.abspath(self.vocab_file) != os.path.abspath(out):
            shutil.copyfile(self.vocab_file, out)
        return (out,)
