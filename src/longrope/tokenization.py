"""A byte-level tokenizer that needs no files: every UTF-8 byte is one token.

Used by the small models this project pretrains, so that they (and the tests) need nothing
downloaded. Ids: 0 <pad>, 1 <s> (BOS, prepended), 2 </s>, then the 256 bytes.
"""

from __future__ import annotations

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<s>", "</s>"]
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
BYTE_OFFSET = len(SPECIALS)  # token id = byte + BYTE_OFFSET
VOCAB_SIZE = len(SPECIALS) + 256


def encode(text: str | bytes) -> np.ndarray:
    """The byte tokenizer's ids of `text` without BOS (every UTF-8 byte + BYTE_OFFSET), as int64:
    what `byte_tokenizer()` gives, without building it."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return np.frombuffer(data, dtype=np.uint8).astype(np.int64) + BYTE_OFFSET


def decode_bytes(ids: np.ndarray) -> bytes:
    """The bytes of byte-tokenizer ids; special tokens (below BYTE_OFFSET) become byte 0."""
    return bytes((np.asarray(ids, dtype=np.int64) - BYTE_OFFSET).clip(0, 255).astype(np.uint8))


def byte_tokenizer():
    alphabet = pre_tokenizers.ByteLevel.alphabet()  # 256 printable stand-ins for the bytes
    byte_order = sorted(alphabet, key=lambda ch: _BYTE_OF[ch])
    vocab = {tok: i for i, tok in enumerate(SPECIALS + byte_order)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   model_max_length=1 << 30, clean_up_tokenization_spaces=False)


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's reversible byte -> printable character table, which ByteLevel uses
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


_BYTE_OF = {ch: b for b, ch in _bytes_to_unicode().items()}
