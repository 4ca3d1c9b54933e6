"""Whatever a user feeds the SDK: broken and exotic images, odd texts, devices that are not there, one model used
from several threads. Each failure is one exception that names the file, text or device and says what to do;
nothing crashes, hangs or answers wrong in silence. (Checkpoints: test_checkpoint.py. Two processes downloading
the same model: test_download.py. Skipping broken files in batch embedding: test_search.py.)
"""

from __future__ import annotations

import contextlib
import io
import struct
import threading
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from reference import openai_clip, reference_model

import openclip_lite as clip
from openclip_lite.errors import DeviceError, ImageError, OpenCLIPLiteError
from openclip_lite.tokenizer import SimpleTokenizer, TextTooLongError, TextTypeError
from openclip_lite.transform import open_image, preprocess

SOT, EOT = 49406, 49407
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    """(checkpoint path, model, preprocess) of the tiny ViT, loaded on the CPU."""
    path = tmp_path_factory.mktemp("robust") / "tiny-vit.pt"
    torch.save(reference_model("tiny-vit").state_dict(), path)
    model, transform = clip.load(str(path), device="cpu")
    return path, model, transform


def picture(size=(48, 40), seed=0) -> Image.Image:
    """An RGB image with structure (a gradient plus noise), so that every conversion changes some pixels."""
    w, h = size
    rng = np.random.default_rng(seed)
    gradient = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3))
    return Image.fromarray(np.clip(gradient * [1, 0.5, 0.2] + rng.integers(0, 60, (h, w, 3)), 0, 255).astype(np.uint8))


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims `width` x `height` pixels and whose data is empty: a decompression-bomb lookalike."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def tiff_with_float_strip_offsets() -> bytes:
    """A TIFF whose StripOffsets tag has type DOUBLE: PIL's TIFF reader raises TypeError on it, not OSError."""
    data = bytearray(encoded(picture((20, 24)), "TIFF"))
    ifd = struct.unpack("<I", data[4:8])[0]
    for i in range(struct.unpack("<H", data[ifd : ifd + 2])[0]):
        entry = ifd + 2 + 12 * i
        if struct.unpack("<H", data[entry : entry + 2])[0] == 273:  # StripOffsets
            data[entry + 2 : entry + 4] = struct.pack("<H", 12)  # DOUBLE
            return bytes(data)
    raise AssertionError("PIL wrote a TIFF without StripOffsets")


@contextlib.contextmanager
def pil_pixel_limit(pixels: int):
    """PIL's decompression-bomb limit set to `pixels` for the body (PIL's own global, restored after)."""
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = pixels
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


# ------------------------------------------------------------------------------------------------------ images

JPEG = encoded(picture(), "JPEG")
PNG = encoded(picture(), "PNG")
BROKEN = {
    "empty.png": b"",
    "notes.png": b"shopping list: eggs, milk\n" * 20,
    "random.jpg": bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8)),
    "head-only.jpg": JPEG[:100],
    "half.jpg": JPEG[: len(JPEG) // 2],
    "two-bytes-short.jpg": JPEG[:-2],
    "cut-in-data.png": PNG[: len(PNG) // 2],
    "bomb.png": png_header(100_000, 100_000),
    "float-offsets.tif": tiff_with_float_strip_offsets(),
}


@pytest.mark.parametrize("name", BROKEN)
def test_unreadable_image_is_an_image_error_naming_the_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(BROKEN[name])
    with pytest.raises(ImageError, match=name) as raised:
        open_image(path)
    assert isinstance(raised.value, ValueError) and isinstance(raised.value, OpenCLIPLiteError)


def test_missing_image_directory_and_non_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="gone.jpg"):
        open_image(tmp_path / "gone.jpg")
    with pytest.raises(ImageError, match="not a regular file"):
        open_image(tmp_path)
    for not_a_path in (None, 3, [str(tmp_path / "a.jpg")]):
        with pytest.raises(TypeError, match="path of an image file"):
            open_image(not_a_path)


def test_decompression_bomb_limit_is_pils(tmp_path):
    """Past PIL's limit PIL warns and the image loads; past twice the limit it is an ImageError, not an allocation."""
    path = tmp_path / "big.png"
    picture((60, 50)).save(path)  # 3000 pixels
    with pil_pixel_limit(2000), pytest.warns(Image.DecompressionBombWarning):
        assert open_image(path).size == (60, 50)
    with pil_pixel_limit(1000), pytest.raises(ImageError, match="big.png.*too large"):
        open_image(path)


def exotic(mode: str) -> tuple[Image.Image, str, dict]:
    """An image of `mode`, and a format that stores that mode."""
    rgb = picture()
    if mode == "I;16":
        return Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 257), "PNG", {}  # full 16-bit range
    if mode == "P+transparency":
        return rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16), "PNG", {"transparency": 0}
    if mode == "F":
        return rgb.convert("F"), "TIFF", {}
    return rgb.convert(mode), {"CMYK": "JPEG", "I": "TIFF", "YCbCr": "JPEG"}.get(mode, "PNG"), {}


EXOTIC = ["1", "L", "LA", "P", "P+transparency", "RGBA", "CMYK", "YCbCr", "I", "I;16", "F"]


@pytest.mark.parametrize("mode", EXOTIC)
def test_exotic_modes_from_files_give_openais_pixels(tmp_path, mode):
    image, fmt, options = exotic(mode)
    path = tmp_path / f"exotic.{fmt.lower()}"
    image.save(path, fmt, **options)
    opened = open_image(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = preprocess(32)(opened)
    expected = openai_clip.clip._transform(32)(Image.open(path))
    assert torch.equal(ours, expected)
    clipped = [w for w in caught if "clips them" in str(w.message)]
    assert len(clipped) == (1 if mode == "I;16" else 0)  # 16-bit pixels lose the picture: said once; nothing else warns
    if clipped:
        assert "exotic.png" in str(clipped[0].message)


@pytest.mark.parametrize("size", [(0, 0), (0, 7), (7, 0)])
def test_zero_size_image_is_an_image_error(size):
    with pytest.raises(ImageError, match="no pixels"):
        preprocess(32)(Image.new("RGB", size))


def test_mode_with_no_way_to_rgb_is_an_image_error():
    image = picture().convert("LA").convert("La")
    with pytest.raises(ImageError, match="'La'.*convert"):
        preprocess(32)(image)


def test_classify_names_the_broken_file_and_reads_the_rest(vit, tmp_path):
    _, model, transform = vit
    good = [tmp_path / "a.png", tmp_path / "b.jpg"]
    picture(seed=1).save(good[0])
    picture(seed=2).save(good[1])
    broken = tmp_path / "half.jpg"
    broken.write_bytes(BROKEN["half.jpg"])
    with pytest.raises(ImageError, match="half.jpg"):
        clip.classify(model, transform, [str(good[0]), str(broken), str(good[1])], ["a cat", "a dog"])
    probs = clip.classify(model, transform, [str(p) for p in good] + [exotic(m)[0] for m in EXOTIC if m != "I;16"], ["a cat", "a dog"])
    assert probs.shape == (2 + len(EXOTIC) - 1, 2) and torch.allclose(probs.sum(dim=1), torch.ones(len(probs)))
    with pytest.raises(ImageError, match="no pixels"):
        clip.classify(model, transform, [Image.new("RGB", (0, 0))], ["a cat", "a dog"])
    with pytest.raises(TypeError, match="NoneType"):
        clip.classify(model, transform, [None], ["a cat", "a dog"])


SEEDS = {
    "png": PNG,
    "jpeg": JPEG,
    "gif": encoded(picture(), "GIF"),
    "bmp": encoded(picture(), "BMP"),
    "tiff": encoded(picture(), "TIFF"),
    "webp": encoded(picture(), "WEBP"),
    "png16": encoded(exotic("I;16")[0], "PNG"),
}


@pytest.mark.timeout(120)  # no hang: a stuck decoder fails the test
@FUZZ
@given(data=st.data(), fmt=st.sampled_from(sorted(SEEDS)))
def test_fuzz_damaged_images(tmp_path_factory, data, fmt):
    """Truncated or bit-flipped files of every common format: an ImageError naming the file, or a good tensor."""
    damaged = bytearray(SEEDS[fmt])
    if data.draw(st.booleans(), label="truncate"):
        damaged = damaged[: data.draw(st.integers(0, len(damaged) - 1), label="length")]
    else:
        for _ in range(data.draw(st.integers(1, 6), label="flips")):
            damaged[data.draw(st.integers(0, len(damaged) - 1), label="offset")] ^= 1 << data.draw(st.integers(0, 7), label="bit")
    path = tmp_path_factory.getbasetemp() / f"fuzz.{fmt}"
    path.write_bytes(damaged)
    with pil_pixel_limit(1 << 20), warnings.catch_warnings():  # a flipped size field may still ask for 1M pixels
        warnings.simplefilter("ignore")  # PIL warns about oddities it reads past; the fuzz is about exceptions
        try:
            pixels = preprocess(32)(open_image(path))
        except ImageError as e:
            assert str(path) in str(e) or "image" in str(e)
            return
    assert pixels.shape == (3, 32, 32) and pixels.dtype == torch.float32


# -------------------------------------------------------------------------------------------------------- text


@pytest.mark.parametrize("texts", [None, 3, b"a photo", [None], ["a photo", 3], [b"a photo"]])
def test_tokenize_rejects_what_is_not_text(texts):
    with pytest.raises(TextTypeError, match="str") as raised:
        clip.tokenize(texts)
    assert isinstance(raised.value, TypeError) and isinstance(raised.value, OpenCLIPLiteError)


def test_empty_text_is_start_and_end():
    assert clip.tokenize("")[0, :3].tolist() == [SOT, EOT, 0]


def test_over_long_text_raises_runtime_error_or_truncates():
    text = "a very long caption " * 40
    with pytest.raises(TextTooLongError, match="too long.*truncate=True") as raised:
        clip.tokenize(["short", text])
    assert isinstance(raised.value, RuntimeError)  # as OpenAI's clip.tokenize
    row = clip.tokenize(text, truncate=True)[0]
    assert row[0] == SOT and row[-1] == EOT and (row != 0).all()


def test_lone_surrogates_become_the_replacement_character(vit):
    """Documented in tokenizer.py: ftfy turns a lone surrogate into U+FFFD, as in OpenAI's tokenizer."""
    assert torch.equal(clip.tokenize("a \ud800 photo"), clip.tokenize("a \ufffd photo"))
    _, model, transform = vit
    probs = clip.classify(model, transform, [picture()], ["\udc80 cat", "dog"])
    assert torch.isfinite(probs).all()


@pytest.mark.parametrize("labels", [[None, "dog"], [3, 4]])
def test_classify_rejects_labels_that_are_not_text(vit, labels):
    _, model, transform = vit
    with pytest.raises(TypeError):
        clip.classify(model, transform, [picture()], labels)


def test_classify_rejects_a_template_without_a_slot_for_the_label(vit):
    _, model, transform = vit
    with pytest.raises(ValueError, match=r"\{\}"):
        clip.classify(model, transform, [picture()], ["cat", "dog"], templates=["a photo."])


TEXT = st.one_of(
    st.text(),
    st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)),  # lone surrogates only
    st.text(st.characters(exclude_categories=())),  # anything, surrogates and controls included
    # pieces that take the tokenizer's slow paths: HTML entities, combining marks, half a surrogate pair, specials
    st.lists(st.sampled_from(["&amp;", "&#x27;", " ", "\n", "a", "\u00e9", "\u0301", "\ud83d", "\ude00", "<|endoftext|>"])).map("".join),
)


@pytest.mark.timeout(120)
@FUZZ
@given(text=TEXT)
def test_fuzz_tokenize_any_text(text):
    """Any str: a row SOT, ids, EOT, zeros, or TextTooLongError; with truncate=True always a row.

    (The text "<|endoftext|>" is the EOT id itself, as in OpenAI's tokenizer, so EOT may also appear inside.)
    """
    rows = [clip.tokenize(text, truncate=True)[0]]
    try:
        rows.append(clip.tokenize(text)[0])
    except TextTooLongError:
        pass
    for row in rows:
        assert row.dtype == torch.int32 and row.shape == (77,)
        ids = row.tolist()
        while ids[-1] == 0:  # the padding (id 0 is also "!", which may end the text itself, before EOT)
            ids.pop()
        assert ids[0] == SOT and ids[-1] == EOT and len(ids) >= 2
    if len(rows) == 2:
        assert torch.equal(rows[0], rows[1])
        assert torch.equal(clip.tokenize(["x", text, "y"])[1], rows[1])


# ----------------------------------------------------------------------------------------------------- devices


def test_cuda_that_is_not_there(vit):
    path, _, _ = vit
    if torch.cuda.is_available():  # then the device past the last one is the one that is not there
        device, message = f"cuda:{torch.cuda.device_count()}", "does not exist"
    else:
        device, message = "cuda", "CUDA is not available.*device='cpu'"
    with pytest.raises(DeviceError, match=message) as raised:
        clip.load(str(path), device=device)
    assert isinstance(raised.value, ValueError) and isinstance(raised.value, RuntimeError)


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "CPU", "", 1.5, "meta"])
def test_unknown_device(vit, device):
    path, _, _ = vit
    with pytest.raises(DeviceError, match="'cpu'"):
        clip.load(str(path), device=device)


def test_mps_works_or_says_why_not(vit):
    path, cpu_model, _ = vit
    if not torch.backends.mps.is_available():
        with pytest.raises(DeviceError, match="MPS is not available"):
            clip.load(str(path), device="mps")
        return
    model, _ = clip.load(str(path), device="mps")
    image = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(image.to("mps")).cpu(), cpu_model.encode_image(image), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------- concurrency


def run_in_threads(work, threads: int = 8, rounds: int = 3) -> list:
    """`work()` from `threads` threads at once, `rounds` times each; every result."""
    start = threading.Barrier(threads)

    def worker(_):
        start.wait()  # all threads inside the model together
        return [work() for _ in range(rounds)]

    with ThreadPoolExecutor(threads) as pool:
        return [result for results in pool.map(worker, range(threads)) for result in results]


def encode_everything(model, images: torch.Tensor, texts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(texts)


def assert_threads_match_one_thread(model, device: str) -> None:
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)
    texts = clip.tokenize(["a photo of a cat", "a dog", "", "a much longer caption of a red bicycle"]).to(device)
    image_features, text_features = encode_everything(model, images, texts)
    for image_result, text_result in run_in_threads(lambda: encode_everything(model, images, texts)):
        if device == "cpu":
            assert torch.equal(image_result, image_features) and torch.equal(text_result, text_features)
        else:  # each thread has its own cuBLAS handle, which may pick another kernel; a race would be far off
            torch.testing.assert_close(image_result, image_features, rtol=2e-3, atol=2e-3)
            torch.testing.assert_close(text_result, text_features, rtol=2e-3, atol=2e-3)


def test_one_model_from_many_threads(vit):
    _, model, _ = vit
    assert_threads_match_one_thread(model, "cpu")


def test_classify_from_many_threads(vit):
    _, model, transform = vit
    images = [picture(seed=i) for i in range(3)]
    labels = ["a cat", "a dog", "a diagram"]
    expected = clip.classify(model, transform, images, labels)
    assert all(torch.equal(result, expected) for result in run_in_threads(lambda: clip.classify(model, transform, images, labels)))


def test_tokenizer_from_many_threads_with_tiny_caches():
    """Caches that fill and empty all the time while 8 threads read them: the same ids as one fresh tokenizer."""
    shared = SimpleTokenizer(cache_size=4)
    texts = [f"caption {i}: a {word} photo of {i * 7} {word}s &amp; more" for i, word in enumerate(["red", "blue", "tiny", "café", "naïve"] * 8)]
    expected = SimpleTokenizer().tokenize(texts)
    assert all(torch.equal(result, expected) for result in run_in_threads(lambda: shared.tokenize(texts), rounds=5))


@pytest.mark.cuda
def test_one_cuda_model_from_many_threads(vit):
    path, _, _ = vit
    model, _ = clip.load(str(path), device="cuda")  # fp16, as OpenAI's
    assert_threads_match_one_thread(model, "cuda")


def test_the_readmes_error_table_holds():
    # every row of the README's table: importable as clip.<name>, an OpenCLIPLiteError and the builtins it names
    import builtins
    import os
    import re

    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md"), encoding="utf-8") as f:
        readme = f.read()
    table = readme[readme.index("| error | also a | raised for |") :].split("\n\n")[0]
    rows = [line.split("|")[1:3] for line in table.splitlines()[2:]]
    assert len(rows) >= 10
    for names, bases in rows:
        for name in re.findall(r"`(\w+)`", names):
            error = getattr(clip, name)
            assert issubclass(error, OpenCLIPLiteError), name
            for base in re.findall(r"`(\w+)`", bases.split("(")[0]):
                expected = getattr(builtins, base, None) or getattr(clip, base)
                assert issubclass(error, expected), f"{name} is not a {base}"


def _mmap_index_add(tmp_path):
    features = torch.nn.functional.normalize(torch.randn(50, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    clip.build_index(features, kind="ivf_flat").save(tmp_path / "index")
    clip.load_index(tmp_path / "index", mmap=True).add(features[:1])


BAD_VALUES = {
    "template without {}": lambda tmp_path: clip.zero_shot_classifier(reference_model("tiny-vit"), ["cat"], templates=("a photo",)),
    "context of 1": lambda tmp_path: clip.tokenize("a", context_length=1),
    "top_k k=0": lambda tmp_path: clip.top_k(torch.rand(1, 2), ["a", "b"], k=0),
    "search k=0": lambda tmp_path: clip.search(torch.rand(1, 4), torch.rand(3, 4), k=0),
    "loss of a non-square matrix": lambda tmp_path: clip.contrastive_loss(torch.rand(2, 3)),
    "memory budget too small": lambda tmp_path: clip.build_index(torch.rand(100, 8), kind="flat", memory_budget=1000),
    "add to an mmap'd index": _mmap_index_add,
    "decode of a 2-d tensor": lambda tmp_path: SimpleTokenizer().decode(torch.zeros(2, 2, dtype=torch.long)),
}


@pytest.mark.parametrize("case", BAD_VALUES)
def test_every_bad_value_is_one_of_our_errors_and_a_value_error(case, tmp_path):
    # README: every error raised on purpose is an OpenCLIPLiteError, and the builtin a caller already catches
    with pytest.raises(OpenCLIPLiteError) as raised:
        BAD_VALUES[case](tmp_path)
    assert isinstance(raised.value, ValueError)
