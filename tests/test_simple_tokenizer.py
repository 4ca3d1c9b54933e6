"""`openclip_lite.simple_tokenizer`: OpenAI's `clip.simple_tokenizer` names, each checked against OpenAI's."""

import clip.simple_tokenizer as openai_tokenizer
import pytest
from reference import openai_clip  # noqa: F401 (imports OpenAI's package with its pkg_resources warning silenced)

from openclip_lite import simple_tokenizer

TEXTS = [
    "a photo of a dog.",
    "  Crème brûlée &amp;amp; naïve café \t\n ",
    "\u00a0non\u2009breaking\u3000spaces\x1c\x1dand\u180eseparators\u2028",
    "mojibake: Ã©tÃ© Ã  la plage",
    "&lt;b&gt;bold&lt;/b&gt; &#39;quoted&#39;",
    "",
]


def test_module_names_are_openais():
    names = {n for n in dir(openai_tokenizer) if not n.startswith("_") and callable(getattr(openai_tokenizer, n))}
    names -= {"lru_cache"}  # imported there, not part of it
    assert names <= set(dir(simple_tokenizer))


@pytest.mark.parametrize("text", TEXTS)
def test_cleaning_helpers_match_openais(text):
    assert simple_tokenizer.basic_clean(text) == openai_tokenizer.basic_clean(text)
    assert simple_tokenizer.whitespace_clean(text) == openai_tokenizer.whitespace_clean(text)


def test_pairs_vocabulary_and_byte_map_match_openais():
    for word in [("h", "e", "l", "l", "o</w>"), ("a</w>",), ("a", "a", "a")]:
        assert simple_tokenizer.get_pairs(word) == openai_tokenizer.get_pairs(word)
    assert simple_tokenizer.bytes_to_unicode() == openai_tokenizer.bytes_to_unicode()
    with open(simple_tokenizer.default_bpe(), "rb") as ours, open(openai_tokenizer.default_bpe(), "rb") as theirs:
        assert ours.read() == theirs.read()


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_from_this_module_gives_openais_ids(text):
    # CoOp: `from clip.simple_tokenizer import SimpleTokenizer as _Tokenizer`, then the lengths of class names
    ours, theirs = simple_tokenizer.SimpleTokenizer(), openai_tokenizer.SimpleTokenizer()
    assert ours.encode(text) == theirs.encode(text)
    assert ours.decode(ours.encode(text)) == theirs.decode(theirs.encode(text))
