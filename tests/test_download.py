"""download.py against real HTTP: a loopback Hub and a loopback file host, started here, serving a tiny CLIP."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import io
import os
import re
import socket
import stat
import subprocess
import sys
import textwrap
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hub_server import FileServer
from huggingface_hub import constants as hf_constants
from huggingface_hub import try_to_load_from_cache
from PIL import Image
from safetensors.torch import save as safetensors_bytes

import openclip_lite
from openclip_lite import download as dl
from openclip_lite import pretrained
from openclip_lite.errors import ChecksumError, DownloadError, InputError, OpenCLIPLiteError, UnknownModelError

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # clip-anytorch imports pkg_resources, which warns
    from clip.model import CLIP as ReferenceCLIP

REPO_ROOT = Path(__file__).resolve().parents[1]
NAME = "Test-Tiny"
REPO = "openclip-lite-test/tiny-clip"
SAFETENSORS, BIN = pretrained.HUB_FILES
OPENAI_FILE = "Test-Tiny.pt"
TINY = {
    "embed_dim": 64,
    "image_resolution": 32,
    "vision_layers": 2,
    "vision_width": 64,
    "vision_patch_size": 16,
    "context_length": 77,
    "vocab_size": 49408,
    "transformer_width": 64,
    "transformer_heads": 1,
    "transformer_layers": 2,
}
OFFLINE_VARS = ("HF_HUB_OFFLINE", dl.OFFLINE_ENV)
# the env vars set while running, or HF_HUB_OFFLINE set before huggingface_hub was imported (it reads it then)
OFFLINE_WAYS = (*OFFLINE_VARS, "HF_HUB_OFFLINE at import")


@dataclass(frozen=True)
class Tiny:
    model: torch.nn.Module
    safetensors: bytes  # the hub's open_clip_model.safetensors: fp32, no int entries
    bin: bytes  # the hub's open_clip_pytorch_model.bin: the same state dict, torch.save'd
    openai: bytes  # stands in for OpenAI's fp16 archive: download only checks its SHA256

    @property
    def openai_sha256(self) -> str:
        return hashlib.sha256(self.openai).hexdigest()


@pytest.fixture(scope="module")
def tiny() -> Tiny:
    torch.manual_seed(0)
    model = ReferenceCLIP(**TINY).float().eval()
    state = {
        k: v.contiguous()
        for k, v in model.state_dict().items()
        if k not in ("input_resolution", "context_length", "vocab_size")
    }
    return Tiny(
        model, safetensors_bytes(state), _torch_bytes(state), _torch_bytes({k: v.half() for k, v in state.items()})
    )


def _torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """No setting of the machine running the tests leaks in, and nothing is written to its real caches."""
    for var in (*OFFLINE_VARS, dl.SOURCE_ENV, dl.OPENAI_URL_ENV, "HF_ENDPOINT", "HF_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf-default-cache"))


@pytest.fixture
def server():
    with FileServer() as s:
        yield s


@pytest.fixture
def hub(server, tiny, monkeypatch) -> FileServer:
    """The loopback server as the Hub (HF_ENDPOINT) and as OpenAI's host, with Test-Tiny registered."""
    server.add_hub_file(REPO, SAFETENSORS, tiny.safetensors)
    server.add_hub_file(REPO, BIN, tiny.bin)
    url = server.add(f"/clip/models/{tiny.openai_sha256}/{OPENAI_FILE}", tiny.openai)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setitem(pretrained.MODELS, NAME, pretrained.Pretrained(REPO, url, 32))
    return server


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "cache"


def hub_path(name: str) -> str:
    return f"/{REPO}/resolve/main/{name}"


def openai_path(tiny: Tiny) -> str:
    return f"/clip/models/{tiny.openai_sha256}/{OPENAI_FILE}"


def files_under(root: Path) -> list[str]:
    """Every file and link under `root`, relative, sorted."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.is_symlink())


def assert_nothing_trusted(root: Path) -> None:
    """No cached Hub file a later call would use, no blob, no partial download left behind."""
    for filename in pretrained.HUB_FILES:
        assert not isinstance(try_to_load_from_cache(REPO, filename, cache_dir=root), str)
    leftovers = [f for f in files_under(root) if "/blobs/" in f or "/snapshots/" in f or f.endswith(".incomplete")]
    assert leftovers == []


def go_offline(monkeypatch, way: str) -> None:
    if way == "HF_HUB_OFFLINE at import":
        monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    else:
        monkeypatch.setenv(way, "1")


_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH = 1, 2  # linux/capability.h


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


@contextlib.contextmanager
def as_a_plain_user():
    """Permission bits hold in this block as they do for any user, also when the tests run as root.

    Root reads and writes past them through CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH; these leave this thread's
    effective capabilities for the block (they stay permitted, so they come back after it). The download code runs
    in this thread; the loopback server's threads keep theirs.
    """
    if os.geteuid() != 0:
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if not hasattr(libc, "capset"):
        pytest.skip("running as root where capabilities cannot be dropped, so permission bits do not apply")
    header, data = _CapHeader(0x20080522, 0), (_CapData * 2)()  # _LINUX_CAPABILITY_VERSION_3
    assert libc.capget(ctypes.byref(header), data) == 0, ctypes.get_errno()
    effective = data[0].effective
    data[0].effective &= ~((1 << _CAP_DAC_OVERRIDE) | (1 << _CAP_DAC_READ_SEARCH))
    assert libc.capset(ctypes.byref(header), data) == 0, ctypes.get_errno()
    try:
        yield
    finally:
        data[0].effective = effective
        assert libc.capset(ctypes.byref(header), data) == 0, ctypes.get_errno()


@contextlib.contextmanager
def read_only(root: Path):
    """Every folder under `root` (and `root`) read-only for the block, as a cache another user set up."""
    folders = [root, *(p for p in root.rglob("*") if p.is_dir() and not p.is_symlink())]
    for folder in folders:
        folder.chmod(0o555)
    try:
        yield
    finally:
        for folder in folders:
            folder.chmod(0o755)


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# ---- names and sources -------------------------------------------------------------------------------------------


def test_unknown_name_lists_models_and_suggests_a_close_match(server):
    with pytest.raises(UnknownModelError) as info:
        dl.download("ViT-B-32")  # raised before any file or network access
    message = str(info.value)
    assert all(name in message for name in pretrained.available_models())
    assert "Did you mean 'ViT-B/32'" in message
    assert isinstance(info.value, ValueError) and isinstance(info.value, RuntimeError)  # what `clip` callers catch
    assert "no file at" not in str(pytest.raises(UnknownModelError, dl.download, "ViT-B/33").value)  # a typo, not a path
    assert "There is no file at " in str(pytest.raises(UnknownModelError, dl.download, "weights/clip.pt").value)
    assert server.requests() == []


def test_download_of_a_local_file_says_load_takes_it(server, tmp_path):
    checkpoint = tmp_path / "clip.pt"
    checkpoint.write_bytes(b"weights")
    with pytest.raises(UnknownModelError) as info:
        dl.download(str(checkpoint))
    message = str(info.value)
    assert f"is a local file ({checkpoint})" in message and f"load({str(checkpoint)!r})" in message
    assert f"--model {checkpoint}" in message and "no file at" not in message
    assert server.requests() == []


@pytest.mark.parametrize("how", ["load", "download"])
def test_a_folder_is_said_to_be_one(server, tmp_path, how):
    folder = tmp_path / "clip-vit-base-patch32"  # what transformers' save_pretrained writes
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights")
    call = (lambda: openclip_lite.load(str(folder), device="cpu")) if how == "load" else (lambda: dl.download(str(folder)))
    with pytest.raises(UnknownModelError, match=rf"is a folder \({re.escape(str(folder))}\).*the path of the file itself"):
        call()
    assert server.requests() == []


@pytest.mark.parametrize(
    "name, where", [("./my_model", "my_model"), ("checkpoints/my_model", "checkpoints/my_model"), ("~/my_model", "home/my_model")]
)
def test_a_missing_path_is_said_to_have_no_file(tmp_path, monkeypatch, name, where):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(UnknownModelError, match="available models") as info:
        openclip_lite.load(name, device="cpu")
    assert f"There is no file at {tmp_path / where}." in str(info.value)


def test_load_expands_the_home_folder(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "tiny.safetensors").write_bytes(tiny.safetensors)
    model, _ = openclip_lite.load("~/tiny.safetensors", device="cpu")
    torch.testing.assert_close(model.text_projection, tiny.model.text_projection, rtol=0, atol=0)


@pytest.mark.parametrize("source, env", [("OpenAI", None), (None, "OpenAI"), ("HUB", "openai")])
def test_source_names_in_any_case(hub, tiny, cache, monkeypatch, source, env):
    if env:
        monkeypatch.setenv(dl.SOURCE_ENV, env)
    path = dl.download(NAME, root=cache, source=source, progress=False)
    expected = SAFETENSORS if (source or env).lower() == "hub" else OPENAI_FILE
    assert Path(path).name == expected


@pytest.mark.parametrize("bad", ["source", "source for a file", "env", "dtype", "image_size"])
def test_bad_load_arguments_are_input_errors(tiny, tmp_path, monkeypatch, bad):
    checkpoint = tmp_path / "tiny.safetensors"
    checkpoint.write_bytes(tiny.safetensors)
    arguments = {"env": {}, "dtype": {"dtype": torch.int8}, "image_size": {"image_size": 33}}.get(bad, {"source": "hf"})
    if bad == "env":
        monkeypatch.setenv(dl.SOURCE_ENV, "azure")
    name = "ViT-B/32" if bad in ("source", "env") else str(checkpoint)  # the source is refused before any request
    with pytest.raises(InputError) as info:
        openclip_lite.load(name, device="cpu", download_root=str(tmp_path / "cache"), **arguments)
    assert isinstance(info.value, OpenCLIPLiteError) and isinstance(info.value, ValueError)
    expected = {"env": f"{dl.SOURCE_ENV}='azure'", "dtype": "torch.int8", "image_size": "multiple of 16"}.get(bad, "source='hf'")
    assert expected in str(info.value)
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    "argument, env, expected",
    [(None, None, "hub"), (None, "openai", "openai"), ("hub", "openai", "hub"), ("openai", None, "openai")],
)
def test_source_argument_and_env_var(hub, tiny, cache, monkeypatch, argument, env, expected):
    if env:
        monkeypatch.setenv(dl.SOURCE_ENV, env)
    path = dl.download(NAME, root=cache, source=argument, progress=False)
    if expected == "hub":
        assert Path(path).name == SAFETENSORS and hub.requests("GET", hub_path(SAFETENSORS))
        assert hub.requests(path=openai_path(tiny)) == []
    else:
        assert path == str(cache / OPENAI_FILE) and hub.requests("GET", openai_path(tiny))
        assert hub.requests(path=hub_path(SAFETENSORS)) == []


@pytest.mark.parametrize("where", ["argument", "env"])
def test_invalid_source_names_the_choices(hub, cache, monkeypatch, where):
    if where == "env":
        monkeypatch.setenv(dl.SOURCE_ENV, "azure")
    with pytest.raises(ValueError, match="hub, openai") as info:
        dl.download(NAME, root=cache, source="azure" if where == "argument" else None)
    assert (dl.SOURCE_ENV in str(info.value)) == (where == "env")


# ---- hub ---------------------------------------------------------------------------------------------------------


def test_hub_first_download_then_cached_without_requests(hub, tiny, cache):
    path = dl.download(NAME, root=cache, progress=False)
    assert Path(path).is_relative_to(cache) and Path(path).name == SAFETENSORS
    assert Path(path).read_bytes() == tiny.safetensors
    assert len(hub.requests("GET", hub_path(SAFETENSORS))) == 1

    hub.clear_log()
    assert dl.download(NAME, root=cache, progress=False) == path
    assert hub.requests() == []


@pytest.mark.parametrize("offline", OFFLINE_WAYS)
def test_hub_offline_uses_cache_without_requests(hub, tiny, cache, monkeypatch, offline):
    path = dl.download(NAME, root=cache, progress=False)
    go_offline(monkeypatch, offline)
    hub.clear_log()
    assert dl.download(NAME, root=cache, progress=False) == path
    assert hub.requests() == []


@pytest.mark.parametrize("offline", OFFLINE_WAYS)
def test_hub_offline_without_cache_says_how_to_get_the_model(hub, cache, monkeypatch, offline):
    go_offline(monkeypatch, offline)
    with pytest.raises(DownloadError, match=f"'{NAME}'.*offline") as info:
        dl.download(NAME, root=cache, progress=False)
    assert f"openclip-lite download {NAME}" in str(info.value)
    assert hub.requests() == []


def test_hub_unreachable_uses_the_cache(hub, tiny, cache, monkeypatch):
    path = dl.download(NAME, root=cache, progress=False)
    monkeypatch.setenv("HF_ENDPOINT", closed_port_url())
    assert dl.download(NAME, root=cache, progress=False) == path


@pytest.mark.slow  # huggingface_hub retries an unreachable Hub for ~23 s (1+2+4+8+8 s) before it gives up
def test_hub_unreachable_without_cache_says_how_to_get_the_model(tiny, cache, monkeypatch):
    monkeypatch.setitem(pretrained.MODELS, NAME, pretrained.Pretrained(REPO, "unused/0/x.pt", 32))
    monkeypatch.setenv("HF_ENDPOINT", closed_port_url())
    with pytest.raises(DownloadError, match=f"Could not reach the Hub.*'{NAME}'.*ConnectError") as info:
        dl.download(NAME, root=cache, progress=False)
    assert f"openclip-lite download {NAME}" in str(info.value) and info.value.__cause__ is not None


def test_hub_falls_back_to_bin_when_safetensors_is_missing(hub, tiny, cache):
    del hub.files[hub_path(SAFETENSORS)]
    path = dl.download(NAME, root=cache, progress=False)
    assert Path(path).name == BIN and Path(path).read_bytes() == tiny.bin

    hub.clear_log()  # the missing safetensors is remembered too: no request at all next time
    assert dl.download(NAME, root=cache, progress=False) == path
    assert hub.requests() == []


def test_hub_repo_without_either_file_is_one_error(hub, cache):
    del hub.files[hub_path(SAFETENSORS)], hub.files[hub_path(BIN)]
    with pytest.raises(DownloadError, match=f"{REPO}.*{SAFETENSORS}.*{BIN}.*'{NAME}'") as info:
        dl.download(NAME, root=cache, progress=False)
    assert info.value.__cause__ is not None
    assert_nothing_trusted(cache)


def test_hub_missing_repo_is_one_error(hub, cache, monkeypatch):
    monkeypatch.setitem(pretrained.MODELS, NAME, pretrained.Pretrained("nobody/nothing", "unused/0/x.pt", 32))
    with pytest.raises(DownloadError, match="'Test-Tiny'.*nobody/nothing.*RepositoryNotFoundError"):
        dl.download(NAME, root=cache, progress=False)
    assert_nothing_trusted(cache)


def test_hub_retries_a_download_cut_once(hub, tiny, cache):
    hub.fault(hub_path(SAFETENSORS), "cut-once")
    path = dl.download(NAME, root=cache, progress=False)
    assert Path(path).read_bytes() == tiny.safetensors
    # huggingface_hub resumes from the last whole 10 MiB chunk it wrote: here the start of the file
    assert len(hub.requests("GET", hub_path(SAFETENSORS))) == 2


def test_hub_connection_cut_for_good_is_an_error_then_a_retry_works(hub, tiny, cache):
    hub.fault(hub_path(SAFETENSORS), "cut")  # huggingface_hub retries 5 times, a second apart, then gives up
    with pytest.raises(DownloadError, match=f"'{NAME}'.*failed") as info:
        dl.download(NAME, root=cache, progress=False)
    assert info.value.__cause__ is not None
    assert_nothing_trusted(cache)

    hub.fault(hub_path(SAFETENSORS), None)
    assert Path(dl.download(NAME, root=cache, progress=False)).read_bytes() == tiny.safetensors


def test_hub_tampered_file_is_rejected_and_not_cached(hub, tiny, cache):
    hub.fault(hub_path(SAFETENSORS), "tamper")
    with pytest.raises(ChecksumError, match=f"'{NAME}'"):
        dl.download(NAME, root=cache, progress=False)
    assert_nothing_trusted(cache)

    hub.fault(hub_path(SAFETENSORS), None)
    assert Path(dl.download(NAME, root=cache, progress=False)).read_bytes() == tiny.safetensors


def test_hub_corrupt_cached_file_is_downloaded_again(hub, tiny, cache, monkeypatch):
    path = dl.download(NAME, root=cache, progress=False)
    blob = Path(os.path.realpath(path))
    blob.write_bytes(b"\0" * len(tiny.safetensors))

    monkeypatch.setenv(dl.OFFLINE_ENV, "1")
    with pytest.raises(ChecksumError, match="corrupt"):  # offline, a corrupt file is an error, never a result
        dl.download(NAME, root=cache, progress=False)

    monkeypatch.delenv(dl.OFFLINE_ENV)
    with pytest.warns(UserWarning, match="corrupt"):
        path = dl.download(NAME, root=cache, progress=False)
    assert Path(path).read_bytes() == tiny.safetensors
    assert len(hub.requests("GET", hub_path(SAFETENSORS))) == 2


@pytest.mark.parametrize("status", ["401", "403"])
def test_hub_refusing_access_is_said_to_be_a_refusal(hub, cache, status):
    hub.fault(hub_path(SAFETENSORS), status)
    with pytest.raises(DownloadError, match=rf"refused access to {REPO}/{SAFETENSORS} for model '{NAME}' \(HTTP {status}\)") as info:
        dl.download(NAME, root=cache, progress=False)
    message = str(info.value)
    assert "HF_TOKEN" in message and "gated or private" in message
    assert "Could not reach" not in message and "connection" not in message
    assert_nothing_trusted(cache)


@pytest.mark.slow  # huggingface_hub retries a server error for ~23 s (1+2+4+8+8 s) before it gives up
def test_hub_server_error_is_said_to_be_the_servers(hub, cache):
    hub.fault(hub_path(SAFETENSORS), "500")
    with pytest.raises(DownloadError, match=rf"answered with a server error \(HTTP 500\) for {REPO}/{SAFETENSORS} of model '{NAME}'") as info:
        dl.download(NAME, root=cache, progress=False)
    assert "Try again later" in str(info.value) and "Could not reach" not in str(info.value)


def test_read_only_hub_cache_with_a_corrupt_file_says_the_cache_is_not_writable(hub, tiny, cache):
    blob = Path(os.path.realpath(dl.download(NAME, root=cache, progress=False)))
    blob.write_bytes(b"\0" * len(tiny.safetensors))
    hub.clear_log()
    unwritable = f"Cannot write model '{NAME}' into the cache folder {cache} .*download_root="
    with read_only(cache), as_a_plain_user(), pytest.warns(UserWarning, match="corrupt"), pytest.raises(DownloadError, match=unwritable):
        dl.download(NAME, root=cache, progress=False)
    assert blob.read_bytes() == b"\0" * len(tiny.safetensors) and hub.requests() == []


@pytest.mark.parametrize("offline", [None, dl.OFFLINE_ENV])
def test_hub_cached_file_this_user_cannot_read_is_said_to_be_unreadable(hub, tiny, cache, monkeypatch, offline):
    blob = Path(os.path.realpath(dl.download(NAME, root=cache, progress=False)))
    if offline:
        monkeypatch.setenv(offline, "1")
    hub.clear_log()
    blob.chmod(0)
    unreadable = f"cached file {blob} of model '{NAME}' cannot be read by this user.*download_root="
    try:
        with read_only(cache), as_a_plain_user(), pytest.raises(DownloadError, match=unreadable):
            dl.download(NAME, root=cache, progress=False)
    finally:
        blob.chmod(0o644)
    assert blob.read_bytes() == tiny.safetensors and hub.requests() == []


# ---- openai ------------------------------------------------------------------------------------------------------


def test_openai_first_download_then_cached_without_requests(hub, tiny, cache, capfd):
    path = dl.download(NAME, root=cache, source="openai")
    assert path == str(cache / OPENAI_FILE) and Path(path).read_bytes() == tiny.openai
    assert f"{NAME}: 100%" in capfd.readouterr().err  # the tqdm bar
    assert len(hub.requests("GET", openai_path(tiny))) == 1
    assert files_under(cache) == [OPENAI_FILE, OPENAI_FILE + ".lock"]

    hub.clear_log()
    assert dl.download(NAME, root=cache, source="openai", progress=False) == path
    assert hub.requests() == []


@pytest.mark.parametrize("offline", OFFLINE_WAYS)
def test_openai_offline(hub, tiny, cache, monkeypatch, offline):
    path = dl.download(NAME, root=cache, source="openai", progress=False)
    go_offline(monkeypatch, offline)
    hub.clear_log()
    assert dl.download(NAME, root=cache, source="openai", progress=False) == path

    with pytest.raises(DownloadError, match=f"'{NAME}'.*offline") as info:
        dl.download(NAME, root=cache / "empty", source="openai", progress=False)
    assert f"openclip-lite download {NAME}" in str(info.value)
    assert hub.requests() == []


def test_openai_unreachable_says_how_to_get_the_model(tiny, cache, monkeypatch):
    url = f"{closed_port_url()}/clip/models/{tiny.openai_sha256}/{OPENAI_FILE}"
    monkeypatch.setitem(pretrained.MODELS, NAME, pretrained.Pretrained(REPO, url, 32))
    with pytest.raises(DownloadError, match=f"'{NAME}'.*ConnectionRefusedError") as info:
        dl.download(NAME, root=cache, source="openai", progress=False)
    assert f"openclip-lite download {NAME}" in str(info.value) and info.value.__cause__ is not None


def test_openai_connection_cut_is_an_error_then_a_retry_works(hub, tiny, cache):
    hub.fault(openai_path(tiny), "cut")
    with pytest.raises(DownloadError, match=f"closed after {len(tiny.openai) // 2} of {len(tiny.openai)} bytes"):
        dl.download(NAME, root=cache, source="openai", progress=False)
    assert files_under(cache) == [OPENAI_FILE + ".lock"]

    hub.fault(openai_path(tiny), None)
    assert Path(dl.download(NAME, root=cache, source="openai", progress=False)).read_bytes() == tiny.openai


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)], ids=["022", "002", "077"])
def test_openai_download_gets_the_mode_a_new_file_gets(hub, tiny, cache, umask, mode):
    # as open() would create it, and as huggingface_hub and OpenAI's package leave their downloads: a shared cache
    # stays readable to the other users the umask lets in
    before = os.umask(umask)
    try:
        path = dl.download(NAME, root=cache, source="openai", progress=False)
    finally:
        os.umask(before)
    assert stat.S_IMODE(os.stat(path).st_mode) == mode


@pytest.mark.parametrize("offline", [None, dl.OFFLINE_ENV])
def test_openai_cached_file_this_user_cannot_read_is_said_to_be_unreadable(hub, tiny, cache, monkeypatch, offline):
    target = Path(dl.download(NAME, root=cache, source="openai", progress=False))
    if offline:
        monkeypatch.setenv(offline, "1")
    hub.clear_log()
    target.chmod(0)  # another user's file, say, in a shared cache
    unreadable = f"cached file {target} of model '{NAME}' cannot be read by this user.*download_root="
    try:
        with as_a_plain_user(), warnings.catch_warnings():
            warnings.simplefilter("error")  # not "does not match; downloading it again"
            with pytest.raises(DownloadError, match=unreadable) as info:
                dl.download(NAME, root=cache, source="openai", progress=False)
    finally:
        target.chmod(0o644)
    assert not isinstance(info.value, ChecksumError)
    assert target.read_bytes() == tiny.openai and hub.requests() == []


def test_openai_tampered_file_is_rejected_and_not_cached(hub, tiny, cache):
    hub.fault(openai_path(tiny), "tamper")
    with pytest.raises(ChecksumError, match=f"'{NAME}'.*{tiny.openai_sha256}"):
        dl.download(NAME, root=cache, source="openai", progress=False)
    assert files_under(cache) == [OPENAI_FILE + ".lock"]


def test_openai_corrupt_cached_file_is_downloaded_again(hub, tiny, cache, monkeypatch):
    cache.mkdir()
    (cache / OPENAI_FILE).write_bytes(b"not the model")

    monkeypatch.setenv(dl.OFFLINE_ENV, "1")
    with pytest.raises(ChecksumError, match="corrupt"):
        dl.download(NAME, root=cache, source="openai", progress=False)
    assert hub.requests() == []

    monkeypatch.delenv(dl.OFFLINE_ENV)
    with pytest.warns(UserWarning, match="does not match"):
        path = dl.download(NAME, root=cache, source="openai", progress=False)
    assert Path(path).read_bytes() == tiny.openai


@pytest.mark.parametrize("offline", [None, "HF_HUB_OFFLINE"])
def test_hub_source_uses_openai_archive_already_in_the_cache(hub, tiny, cache, monkeypatch, offline):
    # users coming from OpenAI's `clip` have its archives in ~/.cache/clip or their download_root: no download
    dl.download(NAME, root=cache, source="openai", progress=False)
    if offline:
        go_offline(monkeypatch, offline)
    hub.clear_log()
    assert dl.download(NAME, root=cache, progress=False) == str(cache / OPENAI_FILE)
    assert hub.requests() == []
    # a damaged archive is not trusted: the hub's file is downloaded instead
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    (cache / OPENAI_FILE).write_bytes(tiny.openai[:-1] + b"x")
    assert Path(dl.download(NAME, root=cache, progress=False)).read_bytes() == tiny.safetensors


def test_openai_unwritable_cache_is_a_download_error(hub, tiny, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(DownloadError, match=f"Cannot write model '{NAME}' into the cache folder .*download_root"):
        dl.download(NAME, root=blocker, source="openai", progress=False)
    assert blocker.read_text() == "not a folder"


def test_hub_unwritable_cache_is_said_to_be_the_cache(hub, tiny, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(DownloadError, match=f"Cannot write model '{NAME}' into the cache folder .*download_root"):
        dl.download(NAME, root=blocker, progress=False)
    assert blocker.read_text() == "not a folder"


def test_openai_partial_files_of_a_killed_download_are_removed(hub, tiny, cache):
    cache.mkdir()
    stale = cache / f".{OPENAI_FILE}.k1ll3d.part"  # what a download killed mid-file leaves (the process never cleaned up)
    stale.write_bytes(tiny.openai[:100])
    other = cache / ".Other.pt.x.part"  # another model's: not ours to remove
    other.write_bytes(b"x")
    dl.download(NAME, root=cache, source="openai", progress=False)
    assert not stale.exists() and other.exists()
    assert files_under(cache) == [".Other.pt.x.part", OPENAI_FILE, OPENAI_FILE + ".lock"]


@pytest.fixture
def no_symlinks(monkeypatch):
    """A Hugging Face cache without symlinks, as on Windows without Developer Mode: files keep their own names."""
    import huggingface_hub.file_download

    monkeypatch.setattr(huggingface_hub.file_download, "are_symlinks_supported", lambda *args, **kwargs: False)


def test_hub_cache_without_symlinks_still_checks_the_download(hub, tiny, cache, no_symlinks):
    hub.fault(hub_path(SAFETENSORS), "tamper")
    with pytest.raises(ChecksumError, match=f"'{NAME}'.*SHA256"):
        dl.download(NAME, root=cache, progress=False)
    assert_nothing_trusted(cache)

    hub.fault(hub_path(SAFETENSORS), None)
    path = dl.download(NAME, root=cache, progress=False)
    assert not os.path.islink(path) and Path(path).read_bytes() == tiny.safetensors
    hub.clear_log()
    assert dl.download(NAME, root=cache, progress=False) == path and hub.requests() == []


def test_hub_mirror_without_sha256_says_the_download_is_unverified(hub, tiny, cache, no_symlinks):
    hub.fault(hub_path(SAFETENSORS), "md5-etag")
    with pytest.warns(UserWarning, match="gives no SHA256 .*could not be verified"):
        path = dl.download(NAME, root=cache, progress=False)
    assert Path(path).read_bytes() == tiny.safetensors


def test_openai_404_is_one_error(hub, tiny, cache):
    del hub.files[openai_path(tiny)]
    with pytest.raises(DownloadError, match="HTTP 404") as info:
        dl.download(NAME, root=cache, source="openai", progress=False)
    assert info.value.__cause__ is not None
    assert files_under(cache) == [OPENAI_FILE + ".lock"]


def test_openai_base_url_override(server, tiny, cache, monkeypatch):
    official = f"https://openaipublic.azureedge.net/clip/models/{tiny.openai_sha256}/{OPENAI_FILE}"
    monkeypatch.setitem(pretrained.MODELS, NAME, pretrained.Pretrained(REPO, official, 32))
    mirrored = f"/mirror/clip/models/{tiny.openai_sha256}/{OPENAI_FILE}"
    server.add(mirrored, tiny.openai)
    monkeypatch.setenv(dl.OPENAI_URL_ENV, server.url + "/mirror/clip/models/")

    path = dl.download(NAME, root=cache, source="openai", progress=False)
    assert Path(path).read_bytes() == tiny.openai
    assert [r.path for r in server.requests()] == [mirrored]
    assert dl.openai_url(pretrained.MODELS["ViT-B/32"]) == server.url + "/mirror/clip/models/" + "/".join(
        pretrained.MODELS["ViT-B/32"].url.split("/")[-2:]
    )


# ---- two processes -----------------------------------------------------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import sys
    from openclip_lite import download, pretrained
    name, repo, url = sys.argv[1:]
    pretrained.MODELS[name] = pretrained.Pretrained(repo, url, 32)
    print(download.download(name, progress=False))  # the source comes from OPENCLIP_LITE_SOURCE
    print(download.download(name, source="hub" if download.resolve_source() == "openai" else "openai", progress=False))
    """
)


def test_two_processes_download_the_same_model_once(hub, tiny, tmp_path):
    """Both sources, default caches (HF_HOME, ~/.cache/clip), settings from the environment, at the same time."""
    hub.delay_s = 1.5  # every body is held back, so both processes are inside download() while it is in flight
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(tmp_path / "hf"),
        "HOME": str(tmp_path / "home"),
        dl.SOURCE_ENV: "hub",  # hub first: once OpenAI's archive is cached, the hub source would use it instead
    }
    args = [sys.executable, "-c", _CHILD, NAME, REPO, hub.url + openai_path(tiny)]
    children = [
        subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in "ab"
    ]
    results = [child.communicate(timeout=90) for child in children]
    assert [child.returncode for child in children] == [0, 0], results
    paths = {tuple(out.split()) for out, _ in results}
    assert len(paths) == 1
    hub_file, openai_file = map(Path, paths.pop())

    assert openai_file == tmp_path / "home" / ".cache" / "clip" / OPENAI_FILE
    assert openai_file.read_bytes() == tiny.openai
    assert len(hub.requests("GET", openai_path(tiny))) == 1  # our file lock

    assert hub_file.is_relative_to(tmp_path / "hf" / "hub") and hub_file.read_bytes() == tiny.safetensors
    assert len(hub.requests("GET", hub_path(SAFETENSORS))) == 1  # huggingface_hub's file lock


# ---- load, end to end --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["hub", "openai"])
def test_load_by_name_through_each_source(hub, tiny, cache, source):
    model, preprocess = openclip_lite.load(NAME, device="cpu", download_root=str(cache), source=source)
    reference = tiny.model
    if source == "openai":  # OpenAI's archives hold fp16 weights; on the CPU they are used as fp32
        reference = ReferenceCLIP(**TINY).eval()
        reference.load_state_dict({k: v.half().float() for k, v in tiny.model.state_dict().items()})
    images = torch.stack([preprocess(Image.new("RGB", (40, 50), color)) for color in ("red", "teal")])
    text = openclip_lite.tokenize(["a photo of a cat", "a diagram"])
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), reference.encode_image(images), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model.encode_text(text), reference.encode_text(text), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_hub_and_openai_files_give_the_same_fp16_model(tmp_path, device):
    """The hub stores OpenAI's fp16 weights as fp32, OpenAI's archives as fp16: the fp16 models must be equal."""
    from reference import reference_model

    import openclip_lite as clip
    from openclip_lite.checkpoint import save_safetensors

    fp16 = {k: v.half() if v.is_floating_point() else v for k, v in reference_model("tiny-vit").state_dict().items()}
    hub, openai = tmp_path / "open_clip_model.safetensors", tmp_path / "openai.pt"
    save_safetensors({k: v.float() if v.is_floating_point() else v for k, v in fp16.items() if k not in ("input_resolution", "context_length", "vocab_size")}, hub)
    torch.save(fp16, openai)
    from_hub, _ = clip.load(str(hub), device=device, dtype=torch.float16)
    from_openai, _ = clip.load(str(openai), device=device, dtype=torch.float16)
    a, b = from_hub.state_dict(), from_openai.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    assert from_hub.dtype == torch.float16
