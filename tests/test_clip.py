"""`from openclip_lite import clip`: OpenAI's `clip.clip` names, each checked against OpenAI's module.

The recipe of CoOp and its family is run as written there: the URL from `_MODELS`, the archive from `_download`
(here from a loopback mirror of OpenAI's host), `torch.jit.load`, `build_model` on its state dict.
"""

import hashlib
import io
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from hub_server import FileServer
from huggingface_hub import constants as hf_constants
from PIL import Image
from reference import openai_clip, reference_model, relative_error

import openclip_lite
from openclip_lite import clip, pretrained
from openclip_lite import download as dl
from openclip_lite.errors import ChecksumError, UnknownModelError

NAME = "Test-Tiny"
OPENAI_HOST = "https://openaipublic.azureedge.net/clip/models"


def test_the_names_of_openais_module():
    assert clip.__all__ == openai_clip.clip.__all__
    assert clip._MODELS == openai_clip.clip._MODELS  # the nine URLs, the SHA256 in each
    for name in ("available_models", "load", "tokenize", "build_model", "_download", "_transform", "_tokenizer", "_convert_image_to_rgb"):
        assert hasattr(clip, name), name
    assert clip.BICUBIC == openai_clip.clip.BICUBIC
    assert clip.available_models() == openai_clip.clip.available_models()


def test_the_package_has_openais_submodules():
    # `import clip` gives clip.clip, clip.model and clip.simple_tokenizer; so does `import openclip_lite as clip`
    for name in ("clip", "model", "simple_tokenizer"):
        assert isinstance(getattr(openai_clip, name), types.ModuleType)
        assert isinstance(getattr(openclip_lite, name), types.ModuleType), name


def test_importing_the_package_downloads_nothing_and_builds_no_tokenizer():
    # OpenAI's `clip.clip` builds its tokenizer and imports its downloader at import; ours waits for their first use
    code = (
        "import sys, openclip_lite, openclip_lite.tokenizer as t\n"
        "assert openclip_lite.clip and t._default is None, 'tokenizer built'\n"
        "assert not {'huggingface_hub', 'filelock', 'openclip_lite.download'} & set(sys.modules), 'downloader imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("n_px", [224, 288, 336])
def test_transform_gives_openais_tensor(n_px):
    g = torch.Generator().manual_seed(n_px)
    pixels = torch.randint(0, 256, (300, 451, 4), dtype=torch.uint8, generator=g).numpy()
    for image in (Image.fromarray(pixels, "RGBA"), Image.fromarray(pixels[..., :3], "RGB").convert("L")):
        assert torch.equal(clip._transform(n_px)(image), openai_clip.clip._transform(n_px)(image))


def test_module_tokenizer_gives_openais_ids():
    texts = ["a photo of a dog.", "  Crème brûlée &amp; naïve café ", "日本語のテキスト", "!!!???", ""]
    for text in texts:
        assert clip._tokenizer.encode(text) == openai_clip.clip._tokenizer.encode(text), text


@pytest.fixture
def mirror(monkeypatch, tmp_path):
    """A loopback server as OpenAI's host (OPENCLIP_LITE_OPENAI_URL), holding a tiny OpenAI model as a TorchScript
    archive, registered under its real-looking URL."""
    for var in ("HF_HUB_OFFLINE", dl.OFFLINE_ENV, dl.SOURCE_ENV):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    ref = reference_model("tiny-vit")
    image = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    text = openai_clip.tokenize(["a diagram"])
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.trace_module(ref, {"encode_image": image, "encode_text": text}, check_trace=False), buffer)
    archive = buffer.getvalue()
    sha256 = hashlib.sha256(archive).hexdigest()
    url = f"{OPENAI_HOST}/{sha256}/{NAME}.pt"
    monkeypatch.setitem(pretrained.MODELS, NAME, pretrained.Pretrained("openai/test-tiny", url, 32))
    monkeypatch.setitem(clip._MODELS, NAME, url)
    with FileServer() as server:
        server.add(f"/clip/models/{sha256}/{NAME}.pt", archive)
        monkeypatch.setenv(dl.OPENAI_URL_ENV, server.url + "/clip/models")
        yield server, ref, archive


@torch.no_grad()
def test_coops_recipe_builds_openais_model(mirror, tmp_path):
    server, ref, archive = mirror
    url = clip._MODELS[NAME]
    model_path = clip._download(url, str(tmp_path))
    assert Path(model_path).read_bytes() == archive
    model = clip.build_model(torch.jit.load(model_path, map_location="cpu").eval().state_dict()).float()

    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    texts = clip.tokenize(["a diagram", "a dog", "a cat"])
    assert relative_error(model.encode_image(images), ref.encode_image(images)) < 1e-5
    assert relative_error(model.encode_text(texts), ref.encode_text(texts)) < 1e-5

    server.clear_log()
    assert clip._download(url, str(tmp_path)) == model_path  # cached: checked, not fetched again
    assert server.requests() == []


def test_download_rejects_a_tampered_archive(mirror, tmp_path):
    server, _, _ = mirror
    for path in server.files:
        server.fault(path, "tamper")
    with pytest.raises(ChecksumError):
        clip._download(clip._MODELS[NAME], str(tmp_path))
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_download_of_an_unknown_url_says_what_it_takes(tmp_path):
    url = f"{OPENAI_HOST}/{'0' * 64}/ViT-B-33.pt"
    with pytest.raises(UnknownModelError, match=r"not the URL of a released CLIP model.*_MODELS.*ViT-B/32"):
        clip._download(url, str(tmp_path))
