"""OpenAI's CLIP tokenizer: the same ids as `clip.tokenize` for every input, ~10x faster on ASCII captions.

The pipeline is OpenAI's, step for step: `ftfy.fix_text`, `html.unescape` twice, strip, collapse whitespace,
strip, lowercase, split with OpenAI's regex, byte-level BPE with OpenAI's merges, SOT 49406 / EOT 49407, zero
padding. The speed comes from two places:

- a fast path for text that `ftfy` and `html.unescape` provably leave alone (see `_ftfy_leaves_alone`), which skips
  the ~70 us per text that OpenAI's tokenizer spends in `ftfy`;
- a cache from whitespace-separated words to ids on top of OpenAI's per-token BPE cache, looked up for a whole
  batch of texts at once, so a caption made of already-seen words costs a few C-level dictionary look-ups.

benchmarks/tokenizer.py measures it against OpenAI's on 20,000 distinct captions with cold caches.
"""

from __future__ import annotations

import gzip
import html
import operator
import os
import re
from collections.abc import Iterable
from itertools import chain, compress
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .errors import InputError, TextTooLongError, TextTypeError

if TYPE_CHECKING:
    import regex

__all__ = ["SimpleTokenizer", "TextTooLongError", "TextTypeError", "default_tokenizer", "tokenize"]

DEFAULT_BPE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bpe_simple_vocab_16e6.txt.gz")
SOT_TEXT = "<|startoftext|>"
EOT_TEXT = "<|endoftext|>"
# OpenAI keeps the first 49152 - 256 - 2 merges: 256 byte symbols + 256 byte symbols with </w> + merges + 2 specials
# gives the 49408-entry vocabulary the text towers were trained with.
_NUM_MERGES = 49152 - 256 - 2
# OpenAI's pre-tokenizer, verbatim (with `regex`, not `re`: it needs \p{L} / \p{N} and the same \s and case folding).
_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# The ASCII control characters that ftfy deletes (remove_control_chars, remove_terminal_escapes) or that need its
# line-break handling beyond \r: everything below 0x20 except \t \n \r, and DEL.
_ASCII_CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# An '&' that could start an HTML entity for ftfy (`&#?[0-9A-Za-z]{1,24};`) or html.unescape: anything but a
# following space, tab, CR, LF or the end of the text.
_AMP_ENTITY_RE = re.compile(r"&[^ \t\n\r]")

# `_PATTERN` on ASCII text, for the stdlib `re` (3x faster on short words): on ASCII, \p{L} is [A-Za-z], \p{N} is
# [0-9], and case-insensitive matching folds only ASCII letters. Checked against `_PATTERN` in the tests.
_ASCII_PATTERN = re.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[A-Za-z]+|[0-9]|[^\sA-Za-z0-9]+""",
    re.IGNORECASE | re.ASCII,
)

# Put after each text of a batch joined for one split(): a word of its own, which no fast-path text contains.
_END_OF_TEXT_WORD = "\x00"
_END_OF_TEXT = f" {_END_OF_TEXT_WORD} "

# Texts per batch in `tokenize`: its words and ids are held at once, so memory stays flat on millions of texts.
_BATCH = 4096


def bytes_to_unicode() -> dict[int, str]:
    """OpenAI's map from each of the 256 byte values to a printable character (the BPE works on these).

    Printable Latin-1 bytes map to themselves; the other 68 bytes (controls, space, 0x7f-0xa0, 0xad) map to
    U+0100 upwards, in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def _ftfy_leaves_alone(text: str) -> bool:
    """True when OpenAI's cleaning of `text` equals `" ".join(text.split()).lower()`, so ftfy can be skipped.

    Holds for ASCII text without control characters other than \\t \\n \\r, in which every '&' is followed by
    whitespace or ends the text. Why, fixer by fixer (ftfy 6.x `fix_text`): unescape_html needs '&' followed by
    [#0-9A-Za-z]; fix_encoding returns ASCII text unchanged; fix_c1_controls, fix_latin_ligatures,
    fix_character_width, uncurl_quotes and fix_surrogates touch only non-ASCII characters; remove_terminal_escapes
    needs \\x1b and remove_control_chars deletes only the excluded controls; NFC leaves ASCII alone; fix_line_breaks
    turns \\r\\n and \\r into \\n, which the whitespace collapse below makes irrelevant. `html.unescape` (run twice)
    needs '&' followed by a character other than space, \\t, \\n, \\f, and after ftfy no \\r is left. On ASCII,
    `regex`'s \\s is [ \\t\\n\\v\\f\\r], the same set `str.split()` uses once \\x1c-\\x1f are excluded.
    tests/test_tokenizer.py checks this against `ftfy.fix_text` on random strings.
    """
    if not text.isascii():
        return False
    if not text.isprintable() and _ASCII_CONTROL_RE.search(text):
        return False
    return "&" not in text or _AMP_ENTITY_RE.search(text) is None


class SimpleTokenizer:
    """OpenAI's byte-level BPE tokenizer for CLIP, with OpenAI's attributes (`encoder`, `decoder`, `bpe_ranks`,
    `byte_encoder`, `byte_decoder`, `pat`, `bpe`, `encode`, `decode`) and the same ids.

    bpe_path : the gzipped merges file; by default the one shipped with the package (OpenAI's)
    cache_size : entries kept in each of the two caches (per BPE token, per whitespace-separated word); a cache
        that fills up starts again empty, so memory stays bounded on corpora with millions of distinct words (the
        word cache can hold one batch of up to 4096 texts beyond it)

    Invalid Unicode: lone surrogates ("\\ud800") are replaced with U+FFFD by ftfy and surrogate pairs are joined
    into one character, exactly as in OpenAI's tokenizer, so every str has a defined tokenization.

    Safe to share between threads: the caches are only added to, or replaced by new ones, never emptied in place.
    """

    def __init__(self, bpe_path: str | os.PathLike[str] = DEFAULT_BPE_PATH, cache_size: int = 100_000):
        import regex  # imported here so that `import openclip_lite` stays cheap

        lines = _read_lines(bpe_path, 1 + _NUM_MERGES)  # a header line, then one merge per line
        # C-level map/zip throughout: building the tables is most of a tokenizer's start-up time
        merges = list(map(tuple, map(str.split, lines[1:])))
        if len(merges) != _NUM_MERGES or set(map(len, merges)) != {2}:
            raise InputError(
                f"{bpe_path} is not a CLIP BPE merges file: expected {_NUM_MERGES} lines of two symbols after the "
                "header; use the bpe_simple_vocab_16e6.txt.gz shipped with openclip_lite"
            )
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {char: byte for byte, char in self.byte_encoder.items()}
        vocab = list(self.byte_encoder.values())
        vocab += [symbol + "</w>" for symbol in vocab]
        vocab += map("".join, merges)
        vocab += [SOT_TEXT, EOT_TEXT]
        self.encoder: dict[str, int] = dict(zip(vocab, range(len(vocab))))
        self.decoder: dict[int, str] = dict(zip(self.encoder.values(), self.encoder.keys()))
        self.bpe_ranks: dict[tuple[str, str], int] = dict(zip(merges, range(len(merges))))
        self.sot_token: int = self.encoder[SOT_TEXT]
        self.eot_token: int = self.encoder[EOT_TEXT]
        self.pat: regex.Pattern[str] = regex.compile(_PATTERN, regex.IGNORECASE)
        self._whitespace_re: regex.Pattern[str] = regex.compile(r"\s+")
        self._cache_size = cache_size
        # OpenAI's cache starts with the special tokens, which is what makes a literal "<|endoftext|>" one token
        self._special_ids = {SOT_TEXT: (self.sot_token,), EOT_TEXT: (self.eot_token,)}
        self._bpe_cache: dict[str, tuple[int, ...]] = dict(self._special_ids)
        self._word_cache: dict[str, tuple[int, ...]] = {}

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def normalize(self, text: str) -> str:
        """OpenAI's cleaning: ftfy.fix_text, html.unescape twice, strip, collapse whitespace to ' ', strip, lower.

        The result is stripped, and its only whitespace (`\\s` of OpenAI's regex) is single spaces between words.
        """
        _check_str(text)
        if _ftfy_leaves_alone(text):
            return " ".join(text.split()).lower()
        import ftfy  # ~50 ms to import, and only needed off the fast path

        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
        return self._whitespace_re.sub(" ", text).strip().lower()

    def bpe(self, token: str) -> str:
        """OpenAI's `bpe`: the BPE symbols of one byte-encoded pre-token, joined by spaces (last one ends in </w>)."""
        return " ".join(self.decoder[i] for i in self._bpe_ids(token))

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without SOT/EOT: a list of ints in [0, 49407]."""
        _check_str(text)
        return self._encode(text)

    def decode(self, tokens: Iterable[int] | torch.Tensor) -> str:
        """OpenAI's `decode`: the UTF-8 text of the ids (invalid bytes become U+FFFD) with every '</w>' turned into
        a space.

        For any str `s`, `decode(encode(s))` is `normalize(s)` with exactly one space after each pre-token (word,
        digit, punctuation run) except literal <|startoftext|> / <|endoftext|>, and no other spaces: removing all
        spaces from both gives the same string. Padding zeros decode to '!' as in OpenAI's.
        """
        if isinstance(tokens, torch.Tensor):
            if tokens.dim() > 1:
                raise InputError(f"decode takes one sequence of ids, got a tensor of shape {tuple(tokens.shape)}")
            tokens = tokens.tolist()
        symbols = []
        for token in tokens:
            try:
                symbol = self.decoder.get(operator.index(token))
            except TypeError:
                symbol = None
            if symbol is None:
                raise InputError(f"{token!r} is not a token id; ids are ints from 0 to {len(self.decoder) - 1}")
            symbols.append(symbol)
        text = "".join(symbols)
        return bytearray(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace").replace("</w>", " ")

    def tokenize(self, texts: str | Iterable[str], context_length: int = 77, truncate: bool = False) -> torch.Tensor:
        """`tokenize` with this tokenizer (and its caches); see the module-level `tokenize`."""
        texts = _as_text_list(texts)
        context_length = _check_context_length(context_length)
        result = np.zeros((len(texts), context_length), dtype=np.int32)
        for start in range(0, len(texts), _BATCH):
            batch = texts[start : start + _BATCH]
            # Joined by '\n', the batch passes the check exactly when each of its texts does: one check, usually.
            if _ftfy_leaves_alone("\n".join(batch)):
                fast = np.ones(len(batch), dtype=bool)
            else:
                fast = np.fromiter(map(_ftfy_leaves_alone, batch), dtype=bool, count=len(batch))
            groups = [  # (rows of the batch, their ids back to back, ids per row)
                (np.flatnonzero(fast), *self._encode_fast_batch(list(compress(batch, fast)))),
                (np.flatnonzero(~fast), *self._encode_slow_batch(list(compress(batch, ~fast)))),
            ]
            lengths = np.zeros(len(batch), dtype=np.int64)
            for rows, _, group_lengths in groups:
                lengths[rows] = group_lengths
            too_long = np.flatnonzero(lengths + 2 > context_length)
            if len(too_long) and not truncate:
                raise TextTooLongError(
                    f"Input {batch[too_long[0]]} is too long for context length {context_length}; "
                    "pass truncate=True to keep its first tokens"
                )
            for rows, flat, group_lengths in groups:
                self._place(result[start : start + len(batch)], rows, flat, group_lengths)
        return torch.from_numpy(result)

    def _place(self, out: np.ndarray, rows: np.ndarray, flat: np.ndarray, lengths: np.ndarray) -> None:
        """Write SOT, ids, EOT into `out[rows]` (shape = (n, context_length), zeros), cutting what does not fit.

        flat : int32, the rows' ids back to back; lengths : int64, shape = (len(rows),), ids per row. As OpenAI's
        truncation, a cut row keeps its first context_length - 2 ids and ends with EOT.
        """
        kept = np.minimum(lengths, out.shape[1] - 2)
        out[rows, 0] = self.sot_token
        out[rows, kept + 1] = self.eot_token
        position = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)  # index within its row
        fits = position < np.repeat(kept, lengths)
        out[np.repeat(rows, lengths)[fits], position[fits] + 1] = flat[fits]

    def _encode(self, text: str) -> list[int]:
        """Ids of a str: the fast path when ftfy would leave it alone, else OpenAI's full cleaning."""
        if _ftfy_leaves_alone(text):
            return list(chain.from_iterable(self._lookup_words(text.lower().split())))
        return self._encode_normalized(self.normalize(text))

    def _encode_fast_batch(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Ids of texts that all pass `_ftfy_leaves_alone`: (the ids back to back, int32; ids per text, int64).

        One lower() and one split() for the whole batch, then C-level look-ups, so the Python work is per distinct
        new word, not per text. `_END_OF_TEXT_WORD` ends each text and encodes to -1.
        """
        words = _END_OF_TEXT.join([*texts, ""]).lower().split()
        ids = np.fromiter(chain.from_iterable(self._lookup_words(words)), dtype=np.int32)
        ends = np.flatnonzero(ids < 0)
        return ids[ids >= 0], np.diff(ends, prepend=-1) - 1

    def _encode_slow_batch(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Ids of texts that need ftfy: (the ids back to back, int32; ids per text, int64)."""
        ids_of_text = [self._encode_normalized(self.normalize(text)) for text in texts]
        lengths = np.fromiter(map(len, ids_of_text), dtype=np.int64, count=len(texts))
        return _flatten(ids_of_text, int(lengths.sum())), lengths

    def _lookup_words(self, words: list[str]) -> list[tuple[int, ...]]:
        """Ids of each word of normalised fast-path text (ASCII, split at whitespace).

        Exact: no match of OpenAI's regex contains or can depend on a space, so the matches of a text are the
        matches of its words, in order.
        """
        cache = self._word_cache
        missing = set(words).difference(cache)
        if missing:
            if len(cache) + len(missing) > self._cache_size:
                # a new dict rather than clear(): another thread still reading the old one finds what it expects
                cache = self._word_cache = {}
                missing = set(words)
            cache.update(zip(missing, map(self._encode_word, missing)))
        return list(map(cache.get, words))  # the common case, all cached: C-level loops only

    def _encode_word(self, word: str) -> tuple[int, ...]:
        """Ids of one word of normalised fast-path text (ASCII from '!' to '~', which is its own byte encoding)."""
        if word == _END_OF_TEXT_WORD:
            return (-1,)
        if word.isalpha():
            return self._bpe_ids(word)  # one match of `pat`
        return tuple(chain.from_iterable(map(self._bpe_ids, _ASCII_PATTERN.findall(word))))

    def _encode_normalized(self, text: str) -> list[int]:
        """Ids of already normalised text: OpenAI's regex, then BPE of each match's UTF-8 bytes."""
        ids: list[int] = []
        for token in self.pat.findall(text):
            # byte-encode: Latin-1 maps each UTF-8 byte to the code point of the same value, which byte_encoder maps
            ids += self._bpe_ids(token.encode("utf-8").decode("latin-1").translate(self.byte_encoder))
        return ids

    def _bpe_ids(self, token: str) -> tuple[int, ...]:
        """Ids of OpenAI's BPE of one byte-encoded pre-token (a match of `pat`)."""
        whole = self.encoder.get(token + "</w>")
        if whole is not None:
            # Every whole word of the vocabulary is reached by its own merges (checked for all of them against
            # OpenAI's `bpe` in tests/test_tokenizer.py), so it needs no merging.
            return (whole,)
        ids = self._bpe_cache.get(token)
        if ids is None:
            ids = tuple(self.encoder[symbol] for symbol in self._merge(token))
            if len(self._bpe_cache) >= self._cache_size:
                self._bpe_cache = dict(self._special_ids)
            self._bpe_cache[token] = ids
        return ids

    def _merge(self, token: str) -> list[str]:
        """OpenAI's BPE merge loop: take the lowest-ranked adjacent pair, merge every occurrence of it left to right
        (without overlap), repeat until no adjacent pair has a rank.

        Merging one occurrence creates pairs that cannot equal the pair being merged (the merged symbol is longer
        than either half), so only the ranks of the merged symbol's two new pairs are looked up, never the whole
        word's again. A pair that occurs once (most rounds of most words) is merged in place; several occurrences
        are merged in one pass, as OpenAI's does, since merging them one by one made a run of one repeated
        character ("!!!!...") quadratic in its length.
        """
        word = [*token[:-1], token[-1] + "</w>"]
        get, no_rank = self.bpe_ranks.get, len(self.bpe_ranks)
        # ranks[i] is the rank of (word[i], word[i + 1]); itertools.pairwise would need Python 3.10
        ranks = [get(pair, no_rank) for pair in zip(word, word[1:])]
        while ranks:
            best = min(ranks)
            if best == no_rank:
                break
            if ranks.count(best) == 1:
                i = ranks.index(best)
                merged = word[i] + word[i + 1]
                word[i : i + 2] = [merged]
                neighbours = []
                if i > 0:
                    neighbours.append(get((word[i - 1], merged), no_rank))
                if i + 1 < len(word):
                    neighbours.append(get((merged, word[i + 1]), no_rank))
                ranks[max(i - 1, 0) : i + 2] = neighbours
                continue
            new_word, new_ranks, i, was_merged = [], [], 0, False
            while i < len(word):
                merging = i < len(ranks) and ranks[i] == best  # ranks are unique: this is the best pair itself
                symbol = word[i] + word[i + 1] if merging else word[i]
                if new_word:  # an untouched neighbour pair keeps its rank
                    new_ranks.append(get((new_word[-1], symbol), no_rank) if merging or was_merged else ranks[i - 1])
                new_word.append(symbol)
                was_merged = merging
                i += 2 if merging else 1
            word, ranks = new_word, new_ranks
        return word


def _read_lines(path: str | os.PathLike[str], count: int) -> list[str]:
    """The first `count` lines of a gzipped UTF-8 file (fewer if it has fewer).

    OpenAI's file has 262,145 lines and CLIP uses the first 48,895: decompressing only those makes building a
    tokenizer twice as fast.
    """
    data = b""
    with gzip.open(path) as f:
        while data.count(b"\n") < count:
            chunk = f.read(1 << 18)
            if not chunk:
                break
            data += chunk
    return list(map(bytes.decode, data.split(b"\n", count)[:count]))  # bytes.decode is UTF-8


_TYPE_HINT = "pass text as str (decode bytes first, e.g. data.decode('utf-8'))"


def _check_str(text: Any) -> None:
    if not isinstance(text, str):
        raise TextTypeError(f"expected a str, got {type(text).__name__}; {_TYPE_HINT}")


def _as_text_list(texts: Any) -> list[str]:
    """`texts` as a list of str: a str alone, or any iterable of str (list, tuple, ...)."""
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, (bytes, bytearray, memoryview)) or not isinstance(texts, Iterable):
        raise TextTypeError(f"tokenize takes a str or a list of str, got {type(texts).__name__}; {_TYPE_HINT}")
    texts = list(texts)
    if not all(map(str.__instancecheck__, texts)):  # isinstance(text, str) for each, looped in C
        i, text = next((i, text) for i, text in enumerate(texts) if not isinstance(text, str))
        raise TextTypeError(f"texts[{i}] is a {type(text).__name__}, not a str; {_TYPE_HINT}")
    return texts


def _check_context_length(context_length: Any) -> int:
    if isinstance(context_length, bool):
        raise TextTypeError(f"context_length must be an int, got {context_length!r}")
    try:
        context_length = operator.index(context_length)
    except TypeError:
        raise TextTypeError(f"context_length must be an int, got {type(context_length).__name__}") from None
    if context_length < 2:
        raise InputError(f"context_length must be at least 2 (room for the SOT and EOT tokens), got {context_length}")
    return context_length


def _flatten(ids_of: list[tuple[int, ...]] | list[list[int]], total: int) -> np.ndarray:
    """Sequences of ids back to back, as one int32 array."""
    return np.fromiter(chain.from_iterable(ids_of), dtype=np.int32, count=total)


_default: SimpleTokenizer | None = None


def default_tokenizer() -> SimpleTokenizer:
    """The shared tokenizer behind `tokenize`, built (vocabulary read, ~0.1 s) on first use."""
    global _default
    if _default is None:
        _default = SimpleTokenizer()  # a race builds two identical tokenizers, and one wins: harmless
    return _default


def tokenize(texts: str | Iterable[str], context_length: int = 77, truncate: bool = False) -> torch.Tensor:
    """Token ids of one text or a list of texts, as OpenAI's `clip.tokenize` gives them.

    texts : a str or a list (any iterable) of str; anything else raises TextTypeError (a TypeError)
    context_length : tokens per row, at least 2; all released CLIP models use 77
    truncate : cut texts longer than context_length to their first context_length - 1 tokens plus EOT;
        without it such a text raises TextTooLongError (a RuntimeError, as OpenAI's)

    Returns a torch.int32 tensor, shape = (len(texts), context_length): SOT (49406), the text's ids, EOT (49407),
    then zeros. int32 as OpenAI's upstream `clip.tokenize` on torch >= 1.8 (clip-anytorch returns int64, same values).
    Every str has a defined result: lone surrogates become U+FFFD (ftfy's fix), as in OpenAI's tokenizer.
    """
    return default_tokenizer().tokenize(texts, context_length, truncate)
