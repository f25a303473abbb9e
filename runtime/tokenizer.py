"""Tokenizer: a thin wrapper over `tokenizers.Tokenizer` plus a byte-level tokenizer builder.

The byte-level tokenizer gives random checkpoints and the built-in tiny model a real text
interface: ids 0..255 are the 256 bytes (GPT-2 byte-to-unicode alphabet, so any text round-trips
exactly), then the special tokens, then reserved fillers up to `vocab_size` so every id decodes.
Fillers are ordinary BPE vocab entries rather than added tokens: the `tokenizers` library builds
a matcher over added tokens at load, which is slow for 200k of them; vocab entries are a plain map.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

# The tiny preset's specials (vocab 259): 256 start, 257 end (its EOS), 258 pad.
TINY_SPECIALS: dict[int, str] = {256: "<|startoftext|>", 257: "<|endoftext|>", 258: "<|pad|>"}

# gpt-oss's harmony specials at their o200k_harmony ids, so random 20b/120b checkpoints name
# their EOS ids (200002 <|return|>, 199999 <|endoftext|>, 200012 <|call|>) like the real one.
HARMONY_SPECIALS: dict[int, str] = {
    199998: "<|startoftext|>",
    199999: "<|endoftext|>",
    200002: "<|return|>",
    200003: "<|constrain|>",
    200005: "<|channel|>",
    200006: "<|start|>",
    200007: "<|end|>",
    200008: "<|message|>",
    200012: "<|call|>",
    200018: "<|endofprompt|>",
}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character map (what the ByteLevel decoder inverts)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def default_specials(vocab_size: int) -> dict[int, str]:
    """The specials a byte-level tokenizer of this vocab size carries by default."""
    if vocab_size > max(HARMONY_SPECIALS):
        return dict(HARMONY_SPECIALS)
    return {i: name for i, name in TINY_SPECIALS.items() if i < vocab_size}


class Tokenizer:
    """Text ↔ token ids. `encode` never inserts special tokens; `decode` never raises."""

    def __init__(self, inner: _HFTokenizer) -> None:
        self._tok = inner

    # ---- constructors ---------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        return cls(_HFTokenizer.from_file(str(path)))

    @classmethod
    def from_str(cls, text: str) -> Tokenizer:
        return cls(_HFTokenizer.from_str(text))

    @classmethod
    def byte_level(
        cls, vocab_size: int, specials: Mapping[int, str] | None = None
    ) -> Tokenizer:
        """256 byte tokens, then `specials` (id → text; default: see `default_specials`), every
        other id up to `vocab_size` a `<|reserved_N|>` filler."""
        if vocab_size < 256:
            raise ValueError(f"a byte-level tokenizer needs vocab_size ≥ 256, got {vocab_size}")
        specials = default_specials(vocab_size) if specials is None else dict(specials)
        bad = [i for i in specials if not 256 <= i < vocab_size]
        if bad:
            raise ValueError(f"special ids {bad} outside 256..{vocab_size - 1}")
        return cls.from_str(json.dumps(_byte_level_json(vocab_size, specials)))

    # ---- use ------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Invalid UTF-8 (e.g. half of a multi-byte character) comes out as U+FFFD."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def to_str(self) -> str:
        return self._tok.to_str()

    def to_file(self, path: str | Path) -> None:
        self._tok.save(str(path))

    @property
    def inner(self) -> _HFTokenizer:
        """The wrapped `tokenizers.Tokenizer` (for callers that need its full API)."""
        return self._tok


def _byte_level_json(vocab_size: int, specials: Mapping[int, str]) -> dict:
    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    for i in range(256, vocab_size):
        vocab[specials.get(i, f"<|reserved_{i}|>")] = i
    added = [
        {
            "id": i,
            "content": name,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i, name in sorted(specials.items())
    ]
    byte_level = {
        "type": "ByteLevel",
        "add_prefix_space": False,
        "trim_offsets": False,
        "use_regex": True,
    }
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": byte_level,
        "post_processor": None,
        "decoder": byte_level,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [],
        },
    }
