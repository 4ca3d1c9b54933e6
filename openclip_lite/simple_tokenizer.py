"""OpenAI's `clip.simple_tokenizer` module by its names: `from openclip_lite.simple_tokenizer import SimpleTokenizer`.

The tokenizer is ours (tokenizer.py: the same ids, faster); the helpers are OpenAI's, for code that calls them.
"""

import html

from .tokenizer import DEFAULT_BPE_PATH, SimpleTokenizer, bytes_to_unicode

__all__ = ["SimpleTokenizer", "basic_clean", "bytes_to_unicode", "default_bpe", "get_pairs", "whitespace_clean"]


def default_bpe() -> str:
    """The path of the BPE merges file shipped with the package."""
    return DEFAULT_BPE_PATH


def get_pairs(word: tuple[str, ...]) -> set[tuple[str, str]]:
    """The adjacent symbol pairs of a word given as a tuple of symbols."""
    return set(zip(word[:-1], word[1:]))


def basic_clean(text: str) -> str:
    """ftfy's fix_text, then HTML entities unescaped twice, then stripped."""
    import ftfy  # ~50 ms to import: only when called

    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


def whitespace_clean(text: str) -> str:
    """Every run of whitespace (`regex`'s \\s, as OpenAI's) made one space, then stripped."""
    import regex

    return regex.sub(r"\s+", " ", text).strip()
