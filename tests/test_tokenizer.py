"""openclip_lite.tokenizer against OpenAI's own tokenizer (clip-anytorch's `clip.tokenize` and `SimpleTokenizer`).

Every expected value comes from the reference at test time: the committed corpus (tests/data/tokenizer_corpus.json)
holds only input texts, and hypothesis generates more.
"""

from __future__ import annotations

import gzip
import html
import json
import os
import string
import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ftfy
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # clip-anytorch imports pkg_resources, which warns
    import clip
    from clip import simple_tokenizer as reference_module

from openclip_lite import tokenizer as tokenizer_module
from openclip_lite.errors import OpenCLIPLiteError
from openclip_lite.tokenizer import SimpleTokenizer, TextTooLongError, TextTypeError, tokenize

CORPUS: dict[str, list[str]] = json.loads(
    (Path(__file__).parent / "data" / "tokenizer_corpus.json").read_text(encoding="utf-8")
)
ALL_TEXTS = [text for texts in CORPUS.values() for text in texts]
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
HYPOTHESIS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Fragments that exercise every branch of the fast-path check and of ftfy: printable ASCII, whitespace, ASCII
# controls, HTML entity pieces, special tokens, and non-ASCII characters that ftfy rewrites (mojibake, curly
# quotes, C1 controls, ligatures, fullwidth, NBSP, lone surrogates) or that change under lower() / case folding.
ASCII_FRAGMENTS = [
    *string.printable,
    *["&", "&", "& ", "&\n", "&\t", "&\r", "&amp;", "&amp", "&lt;", "&#39;", "&#x41;", "&#", "&#x", "&nbsp;", ";"],
    *["&NTILDE;", "&notit;", "amp;", "#", "\r\n", "\x00", "\x1b[31m", "\x7f", "\x0b", "\x0c", "\x1c", "\x1f"],
    *["'s", "'S", "'ll", "<|endoftext|>", "<|startoftext|>", "</w>", "<", "1234", "dog", "Cat", "  "],
]
NON_ASCII_FRAGMENTS = [
    *["é", "Ã", "Ã©", "â€™", "©", "\u2019", "\u201c", "\xa0", "\x85", "\x96", "ſ", "İ", "\u212a", "\ufb01", "Ｌ"],
    *["\u3000", "😀", "👍🏽", "\u200d", "\ufeff", "\u2028", "日本", "Привет", "\u0301", "\ud800", "\udc00", "½"],
]
ascii_heavy_texts = st.lists(st.sampled_from(ASCII_FRAGMENTS), max_size=30).map("".join)
mixed_texts = st.lists(st.sampled_from(ASCII_FRAGMENTS + NON_ASCII_FRAGMENTS), max_size=25).map("".join)
unicode_texts = st.text(max_size=40)
any_texts = st.one_of(ascii_heavy_texts, mixed_texts, unicode_texts)


@pytest.fixture(scope="module")
def ours() -> SimpleTokenizer:
    return SimpleTokenizer()


@pytest.fixture(scope="module")
def reference() -> reference_module.SimpleTokenizer:
    return reference_module.SimpleTokenizer()


def reference_normalize(text: str) -> str:
    """OpenAI's cleaning, as its `encode` applies it."""
    return reference_module.whitespace_clean(reference_module.basic_clean(text)).lower()


def spaced(tokenizer: SimpleTokenizer, normalized: str) -> str:
    """What `decode(encode(s))` is defined to be: each pre-token of the normalised text followed by one space,
    except the special tokens (which have no '</w>')."""
    return "".join(t if t in SPECIAL_TOKENS else t + " " for t in tokenizer.pat.findall(normalized))


def assert_tokenize_matches(texts: list[str], context_length: int, truncate: bool) -> None:
    """tokenize gives the reference's ids (as int32), or raises where the reference raises, naming the same text."""
    try:
        expected = clip.tokenize(texts, context_length=context_length, truncate=truncate)
    except RuntimeError as reference_error:
        with pytest.raises(TextTooLongError) as error:
            tokenize(texts, context_length=context_length, truncate=truncate)
        assert str(error.value).startswith(str(reference_error))
        return
    actual = tokenize(texts, context_length=context_length, truncate=truncate)
    assert actual.dtype == torch.int32
    assert actual.shape == (len(texts), context_length)
    assert torch.equal(actual.long(), expected.long())


# --- the vocabulary and BPE ---------------------------------------------------------------------------------------


def test_vocabulary_matches_reference(ours, reference):
    assert ours.encoder == reference.encoder
    assert ours.decoder == reference.decoder
    assert ours.bpe_ranks == reference.bpe_ranks
    assert ours.byte_encoder == reference.byte_encoder
    assert ours.byte_decoder == reference.byte_decoder
    assert (ours.sot_token, ours.eot_token) == (
        reference.encoder["<|startoftext|>"],
        reference.encoder["<|endoftext|>"],
    )
    assert ours.vocab_size == len(reference.encoder) == 49408


def test_every_whole_word_of_the_vocabulary_is_one_token(reference):
    """The exhaustive proof of the shortcut in `_bpe_ids`: OpenAI's BPE turns each whole word of the vocabulary
    (every entry ending in </w>) into that single entry."""
    wrong = [s for s in reference.encoder if s.endswith("</w>") and reference.bpe(s[: -len("</w>")]) != s]
    assert wrong == []


def test_a_file_that_is_not_a_merges_file_is_refused(tmp_path):
    path = tmp_path / "not_merges.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("#version: 0.2\na b\nc d e\n")
    with pytest.raises(ValueError, match="not a CLIP BPE merges file"):
        SimpleTokenizer(path)


@HYPOTHESIS
@given(
    word=st.text(
        alphabet=st.one_of(
            st.sampled_from(string.ascii_lowercase),
            st.sampled_from(sorted(reference_module.bytes_to_unicode().values())),
        ),
        min_size=1,
        max_size=20,
    )
)
def test_bpe_matches_reference(ours, reference, word):
    assert ours.bpe(word) == reference.bpe(word)


@pytest.mark.parametrize("unit", ["a", "!", "=", "ha", "ab", "\U0001f602", "1"])
@pytest.mark.parametrize("repeats", [2, 3, 7, 64, 1000, 5000])
def test_bpe_of_repeated_runs_matches_reference(ours, reference, unit, repeats):
    # a pair occurring many times in one word is merged in one pass per round (one at a time was quadratic)
    word = "".join(reference_module.bytes_to_unicode()[b] for b in (unit * repeats).encode())
    assert ours.bpe(word) == reference.bpe(word)


# --- the committed corpus -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("category", sorted(CORPUS))
def test_corpus_ids_match_reference(ours, reference, category):
    texts = CORPUS[category]
    mismatched = [text for text in texts if ours.encode(text) != reference.encode(text)]
    assert mismatched == []
    assert_tokenize_matches(texts, 77, truncate=True)
    for text in texts:  # without truncation: the same ids, or the same error
        assert_tokenize_matches([text], 77, truncate=False)


def test_corpus_in_one_call_mixing_fast_and_ftfy_paths(monkeypatch):
    assert_tokenize_matches(ALL_TEXTS, 77, truncate=True)
    monkeypatch.setattr(tokenizer_module, "_BATCH", 7)  # many batches, some all-ASCII, some mixed
    assert_tokenize_matches(ALL_TEXTS, 77, truncate=True)
    assert_tokenize_matches(ALL_TEXTS[::-1], 40, truncate=True)


@pytest.mark.parametrize("category", sorted(CORPUS))
def test_corpus_normalize_and_decode_match_reference(ours, reference, category):
    for text in CORPUS[category]:
        normalized = ours.normalize(text)
        assert normalized == reference_normalize(text), text
        decoded = ours.decode(ours.encode(text))
        assert decoded == reference.decode(reference.encode(text)), text
        assert decoded == spaced(ours, normalized), text
        assert decoded.replace(" ", "") == normalized.replace(" ", ""), text


# --- properties on generated text ---------------------------------------------------------------------------------


@HYPOTHESIS
@given(text=ascii_heavy_texts)
def test_fast_path_only_where_ftfy_and_unescape_change_nothing(text):
    """The claim `_ftfy_leaves_alone` makes, checked against ftfy itself: on text it accepts, ftfy only turns
    \\r\\n and \\r into \\n, html.unescape changes nothing, and OpenAI's cleaning is split + join + lower."""
    assume(tokenizer_module._ftfy_leaves_alone(text))
    fixed = ftfy.fix_text(text)
    assert fixed == text.replace("\r\n", "\n").replace("\r", "\n")
    assert html.unescape(html.unescape(fixed)) == fixed
    assert reference_normalize(text) == " ".join(text.split()).lower()


@HYPOTHESIS
@given(texts=st.lists(ascii_heavy_texts, max_size=6))
def test_a_batch_joined_by_newlines_passes_the_fast_path_check_exactly_when_each_text_does(texts):
    check = tokenizer_module._ftfy_leaves_alone
    assert check("\n".join(texts)) == all(map(check, texts))


@HYPOTHESIS
@given(text=st.text(alphabet=st.characters(max_codepoint=127)))
def test_ascii_pattern_matches_openai_regex(ours, text):
    assert tokenizer_module._ASCII_PATTERN.findall(text) == ours.pat.findall(text)


@HYPOTHESIS
@given(text=ascii_heavy_texts)
def test_ids_match_reference_on_ascii_heavy_text(ours, reference, text):
    assert ours.encode(text) == reference.encode(text)


@HYPOTHESIS
@given(text=mixed_texts)
def test_ids_match_reference_on_mixed_text(ours, reference, text):
    assert ours.encode(text) == reference.encode(text)


@HYPOTHESIS
@given(text=unicode_texts)
def test_ids_match_reference_on_any_unicode(ours, reference, text):
    assert ours.encode(text) == reference.encode(text)


@HYPOTHESIS
@given(text=st.text(alphabet=st.characters(categories=["Cs", "Ll", "Lu", "Nd", "Po", "Zs", "So", "Cc"]), max_size=20))
def test_ids_match_reference_with_lone_surrogates(ours, reference, text):
    assert ours.encode(text) == reference.encode(text)


@HYPOTHESIS
@given(text=any_texts)
def test_decode_encode_round_trips_normalized_text(ours, reference, text):
    normalized = ours.normalize(text)
    assert normalized == reference_normalize(text)
    decoded = ours.decode(ours.encode(text))
    assert decoded == reference.decode(reference.encode(text))
    assert decoded == spaced(ours, normalized)
    assert decoded.replace(" ", "") == normalized.replace(" ", "")


@HYPOTHESIS
@given(texts=st.lists(any_texts, max_size=8), context_length=st.integers(2, 40), truncate=st.booleans())
def test_tokenize_batches_match_reference(texts, context_length, truncate):
    assert_tokenize_matches(texts, context_length, truncate)


# --- tokenize's interface -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("context_length", [2, 3, 8, 20, 77, 200])
@pytest.mark.parametrize("truncate", [True, False])
def test_context_lengths(context_length, truncate):
    texts = CORPUS["prose"] + CORPUS["long"] + CORPUS["empty"] + CORPUS["special_tokens"] + CORPUS["cjk"]
    assert_tokenize_matches(texts, context_length, truncate)  # without truncate: the same first too-long text
    for text in texts:  # without truncate: each text that fits, and the same error for each that does not
        assert_tokenize_matches([text], context_length, truncate)


def test_too_long_raises_runtime_error_naming_the_first_text_that_does_not_fit():
    short, fast, slow = "a cat", "cat " * 20, "café " * 20  # `slow` takes the ftfy path, `fast` does not
    for texts in ([short, slow, fast], [short, fast, slow], [slow, fast]):
        with pytest.raises(RuntimeError) as reference_error:
            clip.tokenize(texts, context_length=10)
        with pytest.raises(TextTooLongError) as error:
            tokenize(texts, context_length=10)
        assert str(error.value).startswith(str(reference_error.value))  # "Input {text} is too long for ..."
        assert "truncate=True" in str(error.value)
    assert issubclass(TextTooLongError, RuntimeError) and issubclass(TextTooLongError, OpenCLIPLiteError)


def test_truncated_rows_end_with_eot():
    ids = tokenize(["dog " * 100, "é " * 100], context_length=16, truncate=True)
    assert ids[:, 0].tolist() == [49406, 49406] and ids[:, -1].tolist() == [49407, 49407]


def test_output_shape_and_dtype_for_each_input_form():
    assert tokenize("a dog").shape == (1, 77)
    assert tokenize("a dog").dtype == torch.int32
    assert tokenize([]).shape == (0, 77) and tokenize([]).dtype == torch.int32
    assert torch.equal(tokenize(("a dog", "a cat")), tokenize(["a dog", "a cat"]))
    assert torch.equal(tokenize(t for t in ["a dog", "a cat"]), tokenize(["a dog", "a cat"]))
    assert torch.equal(tokenize(np.array(["a dog", "é"])), tokenize(["a dog", "é"]))
    assert torch.equal(tokenize(["a dog"], context_length=np.int64(20)), tokenize(["a dog"], context_length=20))


@pytest.mark.parametrize(
    "texts", [None, 5, 3.5, b"a dog", bytearray(b"a dog"), object(), ["a", None], ["a", b"b"], [1]]
)
def test_non_string_input_raises_type_error(texts):
    with pytest.raises(TypeError) as error:
        tokenize(texts)
    assert isinstance(error.value, TextTypeError) and isinstance(error.value, OpenCLIPLiteError)


@pytest.mark.parametrize("method", ["encode", "normalize"])
@pytest.mark.parametrize("text", [None, b"a dog", 3, ["a dog"]])
def test_tokenizer_methods_reject_non_strings(ours, method, text):
    with pytest.raises(TextTypeError):
        getattr(ours, method)(text)


@pytest.mark.parametrize("context_length", [1, 0, -3])
def test_context_length_too_small_raises_value_error(context_length):
    with pytest.raises(ValueError, match="at least 2"):
        tokenize("a dog", context_length=context_length)


@pytest.mark.parametrize("context_length", [77.0, "77", True, None])
def test_context_length_not_an_int_raises_type_error(context_length):
    with pytest.raises(TypeError):
        tokenize("a dog", context_length=context_length)


@pytest.mark.parametrize(
    # chr() for the low surrogate: linters that cannot hold lone surrogates read "\udfff" as a duplicate of "\ud800"
    "text",
    ["\ud800", chr(0xDFFF), "a\ud83d\ude00b", "\ude00\ud83d", "x\ud800y", "\ud83d\ude00\ud800", "&#xd800;"],
)
def test_surrogates_follow_the_documented_rule(ours, reference, text):
    """Lone surrogates become U+FFFD and pairs become the character they encode (ftfy's fix, as in OpenAI's)."""
    assert ours.encode(text) == reference.encode(text)
    assert_tokenize_matches([text], 77, truncate=False)
    valid = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")  # pairs joined, lone ones U+FFFD
    assert torch.equal(tokenize(text), tokenize(html.unescape(valid)))


# --- decode --------------------------------------------------------------------------------------------------------


def test_decode_accepts_a_row_of_tokenize_output(ours, reference):
    row = tokenize("A photo of a café, 😀")[0]
    assert ours.decode(row) == reference.decode(row.tolist())  # padding zeros decode to '!' in both
    assert ours.decode(row[1:8].tolist()) == reference.decode(row[1:8].tolist())


@pytest.mark.parametrize("tokens", [[-1], [49408], ["a"], [1.5], [None]])
def test_decode_rejects_ids_outside_the_vocabulary(ours, tokens):
    with pytest.raises(ValueError, match="not a token id"):
        ours.decode(tokens)


def test_decode_rejects_a_batch_tensor(ours):
    with pytest.raises(ValueError, match="one sequence"):
        ours.decode(tokenize(["a", "b"]))


# --- caches, speed path and laziness ---------------------------------------------------------------------------------


def test_tiny_caches_give_the_same_ids(monkeypatch):
    tokenizer = SimpleTokenizer(cache_size=8)
    monkeypatch.setattr(tokenizer_module, "_BATCH", 16)
    expected = clip.tokenize(ALL_TEXTS, truncate=True)
    for _ in range(2):  # the second pass meets cleared, then refilled, caches
        assert torch.equal(tokenizer.tokenize(ALL_TEXTS, truncate=True).long(), expected)
    assert len(tokenizer._bpe_cache) <= 8


def test_threads_sharing_a_tokenizer_with_tiny_caches(monkeypatch):
    tokenizer = SimpleTokenizer(cache_size=16)  # caches replaced all the time while other threads read them
    monkeypatch.setattr(tokenizer_module, "_BATCH", 8)
    chunks = [ALL_TEXTS[i::4] for i in range(4)] * 3
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda texts: tokenizer.tokenize(texts, truncate=True), chunks))
    for texts, ids in zip(chunks, results):
        assert torch.equal(ids.long(), clip.tokenize(texts, truncate=True))


def test_ascii_captions_never_call_ftfy(monkeypatch):
    def fail(text, *args, **kwargs):
        raise AssertionError(f"ftfy.fix_text called on {text!r}")

    captions = ["A photo of a dog.", "salt & pepper", "two\tcats\r\non a mat", "it's 2024!", "<|endoftext|>"]
    expected = clip.tokenize(captions)
    monkeypatch.setattr(ftfy, "fix_text", fail)
    assert torch.equal(SimpleTokenizer().tokenize(captions).long(), expected)


@pytest.mark.slow  # a fresh interpreter importing torch
def test_import_is_cheap_and_the_default_tokenizer_lazy():
    code = (
        "import sys, openclip_lite.tokenizer as t\n"
        "assert t._default is None and 'ftfy' not in sys.modules and 'regex' not in sys.modules\n"
        "t.tokenize('a photo of a dog')\n"
        "assert t._default is not None and 'ftfy' not in sys.modules\n"
        "t.tokenize('a photo of a caf\\u00e9')\n"
        "assert 'ftfy' in sys.modules\n"
    )
    root = str(Path(__file__).parent.parent)
    env = {**os.environ, "PYTHONPATH": root}
    subprocess.run([sys.executable, "-W", "ignore", "-c", code], check=True, cwd=root, env=env)
