"""Tokenizer throughput: openclip_lite.tokenize against OpenAI's clip.tokenize, in one process, cold caches.

    python benchmarks/tokenizer.py [--n 20000] [--repeats 3] [--seed 0]

Each caption set holds `n` distinct captions made deterministically (seeded RNG) from words of the CLIP vocabulary
(whole words, drawn with Zipf weights by merge rank, so frequent words repeat and rare ones appear), numbers,
capitals, commas, contractions, end punctuation and typos (3% of words, mostly words the vocabulary lacks, so that
cold BPE is measured too). Sets:

- vocab: words from the 20,000 most frequent whole words of the vocabulary, all ASCII (the headline number);
- common: words from the 500 most frequent whole words (small vocabulary, as in templated prompts);
- mixed: like vocab, with an accented, CJK, emoji or '&amp;' word in every 10th caption (those take the ftfy path).

Every run starts from a freshly built tokenizer on both sides (cold BPE caches); building one is timed separately.
The ids are checked to be identical before any number is printed. Reports the best of `repeats` runs, in wall time
and in CPU time of this process (the fairer of the two when other jobs share the machine).

Last results (`PYTHONPATH=. python benchmarks/tokenizer.py --repeats 5`, a 2-CPU machine shared with other jobs,
load average 13.6, Python 3.11.7, ftfy 6.3.1, torch 2.14.1):

    vocab  (10.3 words/caption)  cpu: OpenAI  110.6 us/text | openclip_lite 10.8 us/text | 10.2x  (wall 10.9x)
    common (10.3 words/caption)  cpu: OpenAI   73.7 us/text | openclip_lite  5.2 us/text | 14.1x  (wall 15.4x)
    mixed  (10.4 words/caption)  cpu: OpenAI  111.0 us/text | openclip_lite 17.5 us/text |  6.3x  (wall 6.3x)
    building a tokenizer (cpu): OpenAI 79 ms, openclip_lite 51 ms

The vocab set's extra cost is cold BPE: ~36,000 distinct words in its 20,000 captions, each encoded once. The
mixed set is bounded by ftfy itself on its non-ASCII tenth (~100 us per such caption on both sides).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import time
import warnings
from collections.abc import Callable
from typing import TypeVar

import ftfy
import torch

from openclip_lite.tokenizer import SimpleTokenizer

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # clip-anytorch imports pkg_resources, which warns
    import clip
    import clip.clip
    from clip.simple_tokenizer import SimpleTokenizer as ReferenceTokenizer

T = TypeVar("T")

_NON_ASCII_WORDS = [
    "café",
    "naïve",
    "Zürich",
    "東京",
    "猫",
    "😀",
    "👍🏽",
    "Ελλάδα",
    "Москва",
    "salt&amp;pepper",
    "don’t",
]


def vocabulary_words(tokenizer: SimpleTokenizer, count: int) -> list[str]:
    """The `count` most frequent whole alphabetic words of the BPE vocabulary, most frequent first."""
    words = []
    for (first, second), _rank in sorted(tokenizer.bpe_ranks.items(), key=lambda item: item[1]):
        word = first + second
        if word.endswith("</w>") and word[:-4].isascii() and word[:-4].isalpha() and len(word) > 5:
            words.append(word[:-4])
            if len(words) == count:
                break
    return words


def typo(word: str, rng: random.Random) -> str:
    """`word` with one letter dropped, doubled or swapped with the next: mostly words the vocabulary lacks."""
    i = rng.randrange(len(word) - 1)
    return rng.choice(
        [word[:i] + word[i + 1 :], word[: i + 1] + word[i:], word[:i] + word[i + 1] + word[i] + word[i + 2 :]]
    )


def make_captions(words: list[str], n: int, seed: int, non_ascii_every: int = 0) -> list[str]:
    """`n` distinct captions of 5 to 15 words, deterministic in `seed`."""
    rng = random.Random(seed)
    weights = [1.0 / (rank + 10) for rank in range(len(words))]  # Zipf-like: frequent words repeat
    captions: dict[str, None] = {}
    while len(captions) < n:
        parts = [
            typo(word, rng) if rng.random() < 0.03 else word
            for word in rng.choices(words, weights, k=rng.randint(5, 15))
        ]
        if rng.random() < 0.3:
            parts.insert(rng.randrange(len(parts)), str(rng.randint(0, 2024)))
        if rng.random() < 0.2:
            i = rng.randrange(len(parts))
            parts[i] += rng.choice(["'s", "'t", "'re", "'ll"])
        if rng.random() < 0.3:
            parts[rng.randrange(len(parts))] += ","
        if non_ascii_every and len(captions) % non_ascii_every == 0:
            parts.insert(rng.randrange(len(parts)), rng.choice(_NON_ASCII_WORDS))
        caption = " ".join(parts) + rng.choice(["", ".", ".", "!", "?"])
        if rng.random() < 0.5:
            caption = caption[0].upper() + caption[1:]
        captions[caption] = None
    return list(captions)


def timed(function: Callable[[], T]) -> tuple[float, float, T]:
    """(wall seconds, CPU seconds of this process, result). CPU time is the fairer measure on a shared machine."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = function()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def time_reference(captions: list[str]) -> tuple[float, float, torch.Tensor]:
    clip.clip._tokenizer = ReferenceTokenizer()  # cold cache: clip.tokenize uses this module-level instance
    return timed(lambda: clip.tokenize(captions, truncate=True))


def time_ours(captions: list[str]) -> tuple[float, float, torch.Tensor]:
    tokenizer = SimpleTokenizer()  # cold caches
    return timed(lambda: tokenizer.tokenize(captions, truncate=True))


def time_construction(repeats: int) -> tuple[float, float]:
    """Best CPU seconds to build each tokenizer (read the vocabulary, build the tables)."""
    reference_s = min(timed(ReferenceTokenizer)[1] for _ in range(repeats))
    ours_s = min(timed(SimpleTokenizer)[1] for _ in range(repeats))
    return reference_s, ours_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20_000, help="distinct captions per set")
    parser.add_argument("--repeats", type=int, default=3, help="runs per tokenizer and set; the best is reported")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    tokenizer = SimpleTokenizer()
    sets = {
        "vocab": make_captions(vocabulary_words(tokenizer, 20_000), args.n, args.seed),
        "common": make_captions(vocabulary_words(tokenizer, 500), args.n, args.seed),
        "mixed": make_captions(vocabulary_words(tokenizer, 20_000), args.n, args.seed, non_ascii_every=10),
    }
    print(
        f"{args.n} distinct captions per set, best of {args.repeats} runs, cold caches; Python "
        f"{platform.python_version()}, ftfy {ftfy.__version__}, load average {os.getloadavg()[0]:.1f} on "
        f"{os.cpu_count()} CPUs"
    )
    for name, captions in sets.items():
        assert len(set(captions)) == args.n
        best = {"OpenAI": [float("inf")] * 2, "openclip_lite": [float("inf")] * 2}  # [wall, cpu]
        for _ in range(args.repeats):  # alternate, so that both see the same machine load
            *reference_seconds, reference_ids = time_reference(captions)
            *our_seconds, ids = time_ours(captions)
            if not torch.equal(ids.long(), reference_ids.long()):
                raise SystemExit(f"ids differ from OpenAI's on the {name!r} set")
            for who, seconds in (("OpenAI", reference_seconds), ("openclip_lite", our_seconds)):
                best[who] = [min(b, s) for b, s in zip(best[who], seconds)]
        words = sum(len(c.split()) for c in captions) / len(captions)
        print(f"{name} ({words:.1f} words/caption), ids identical:")
        for clock, i in (("wall", 0), ("cpu", 1)):
            reference_s, ours_s = best["OpenAI"][i], best["openclip_lite"][i]
            print(
                f"  {clock:>4}: OpenAI {args.n / reference_s:8,.0f} texts/s ({1e6 * reference_s / args.n:5.1f} us/text)"
                f" | openclip_lite {args.n / ours_s:8,.0f} texts/s ({1e6 * ours_s / args.n:5.1f} us/text)"
                f" | {reference_s / ours_s:5.1f}x"
            )
    reference_init, ours_init = time_construction(args.repeats)
    print(f"building a tokenizer (cpu): OpenAI {1e3 * reference_init:.0f} ms, openclip_lite {1e3 * ours_init:.0f} ms")


if __name__ == "__main__":
    main()
