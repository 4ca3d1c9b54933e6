"""Getting a released model's weights into the local cache, verified, from the Hugging Face Hub or OpenAI's URLs.

Two sources, chosen by `source=` or the env var OPENCLIP_LITE_SOURCE (default "hub"):
- "hub": `open_clip_model.safetensors` (else `open_clip_pytorch_model.bin`) from the model's Hub repo, through
  `huggingface_hub.hf_hub_download`, so HF_ENDPOINT, HF_HOME, HF_HUB_OFFLINE, tokens and the shared cache work
  as they do for every other Hub library. An OpenAI archive already in ~/.cache/clip (or `root`), as OpenAI's
  `clip` package leaves it, is used instead when its SHA256 matches: no download for its users.
- "openai": OpenAI's original TorchScript archives, checked against the SHA256 in their URLs and cached as
  `<root>/<file>` (default ~/.cache/clip, the folder OpenAI's `clip` package uses, so its downloads are reused).
  OPENCLIP_LITE_OPENAI_URL replaces https://openaipublic.azureedge.net/clip/models for mirrors, which must keep
  OpenAI's layout `<base>/<sha256>/<file>`.

A cached file whose hash matches is used without any request. Offline mode (HF_HUB_OFFLINE=1 or
OPENCLIP_LITE_OFFLINE=1) never makes a request, for either source.
"""

from __future__ import annotations

import difflib
import glob
import hashlib
import http.client
import os
import re
import secrets
import urllib.error
import urllib.request
import warnings

from filelock import FileLock
from huggingface_hub import constants as hf_constants
from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url, try_to_load_from_cache
from huggingface_hub.utils import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError
from tqdm import tqdm

from . import pretrained
from .errors import ChecksumError, DownloadError, InputError, UnknownModelError
from .version import __version__

SOURCES = ("hub", "openai")
SOURCE_ENV = "OPENCLIP_LITE_SOURCE"
OFFLINE_ENV = "OPENCLIP_LITE_OFFLINE"
OPENAI_URL_ENV = "OPENCLIP_LITE_OPENAI_URL"
OPENAI_ROOT = os.path.join("~", ".cache", "clip")

_TIMEOUT_S = 60  # per socket operation, not for the whole file: a slow link still finishes
_CHUNK = 1 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")
# hf_hub_download raises HfHubHTTPError or OSError for HTTP and disk problems, and its HTTP client's own base error
# (httpx2.HTTPError in huggingface_hub 2.x) for a connection that stayed cut after its retries; HfHubHTTPError
# derives from that base, so its bases name it whichever client the installed version is built on.
_HUB_ERRORS = (OSError, *HfHubHTTPError.__bases__)


def download(name: str, root: str | os.PathLike | None = None, source: str | None = None, progress: bool = True) -> str:
    """Download a released model into the cache (or find it there) and return the local file's path.

    name : one of `available_models()`, e.g. "ViT-B/32"
    root : the cache directory; by default Hugging Face's cache (HF_HOME, for "hub") or ~/.cache/clip (for "openai")
    source : "hub" (safetensors from the Hugging Face Hub) or "openai" (OpenAI's TorchScript archives, fp16);
        None reads the env var OPENCLIP_LITE_SOURCE, then defaults to "hub"
    progress : show a tqdm progress bar while downloading

    A download is verified before it is returned: against the SHA256 in OpenAI's URL, or for the hub against the
    SHA256 the Hub gives as the file's ETag; a download that fails leaves nothing in the cache that a later call
    would trust. A cached file is checked again on every call, and downloaded again when it is corrupt, where the
    cache keeps its hash: OpenAI's archives (the SHA256 is in the URL) and a Hugging Face cache with symlinks
    (blobs are named by their SHA256). A Hugging Face cache without symlinks (Windows without Developer Mode)
    keeps no hash, so its files are checked only when downloaded and are trusted afterwards. With
    HF_HUB_OFFLINE=1 or OPENCLIP_LITE_OFFLINE=1 no request is made and only cached files are used.

    Raises UnknownModelError for a name that is not a released model, DownloadError when the file can neither be
    found in the cache nor downloaded, and ChecksumError when the downloaded or cached bytes do not match.
    """
    model = _lookup(name)
    source = resolve_source(source)
    if source == "hub":
        return _download_hub(name, model, root, progress)
    return _download_openai(name, model, root, progress)


def resolve_source(source: str | None = None) -> str:
    """The source to use: the argument, else env OPENCLIP_LITE_SOURCE, else "hub" (in any case: "OpenAI" is "openai")."""
    chosen = source if source is not None else (os.environ.get(SOURCE_ENV) or "hub")
    if not isinstance(chosen, str) or chosen.strip().lower() not in SOURCES:
        origin = "source" if source is not None else SOURCE_ENV
        raise InputError(f"{origin}={chosen!r} is not a download source; use one of {', '.join(SOURCES)}")
    return chosen.strip().lower()


def is_offline() -> bool:
    """Whether downloads are switched off: HF_HUB_OFFLINE (read now, not only at import) or OPENCLIP_LITE_OFFLINE."""
    return bool(hf_constants.HF_HUB_OFFLINE) or _env_true("HF_HUB_OFFLINE") or _env_true(OFFLINE_ENV)


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").upper() in {"1", "ON", "YES", "TRUE"}  # huggingface_hub's spelling of true


def openai_url(model: pretrained.Pretrained) -> str:
    """The model's OpenAI URL, on the mirror named by OPENCLIP_LITE_OPENAI_URL when that is set."""
    base = os.environ.get(OPENAI_URL_ENV)
    if not base:
        return model.url
    return f"{base.rstrip('/')}/{model.sha256}/{model.filename}"


def _lookup(name: str) -> pretrained.Pretrained:
    if name in pretrained.MODELS:
        return pretrained.MODELS[name]
    available = list(pretrained.MODELS)
    path = os.path.abspath(os.path.expanduser(name))
    if os.path.isdir(path):  # e.g. a transformers `save_pretrained` folder
        raise UnknownModelError(
            f"{name!r} is a folder ({path}), not a released model name or a checkpoint file; to load a checkpoint, "
            "pass the path of the file itself (load(path), --model PATH on the command line)."
        )
    if os.path.exists(path):  # only `download` gets here with a file: `load` reads files itself
        raise UnknownModelError(
            f"{name!r} is a local file ({path}), and download takes the name of a released model "
            f"({', '.join(available)}). Load the file with load({name!r}) (--model {name} on the command line)."
        )
    close = difflib.get_close_matches(name, available, n=3, cutoff=0.6)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    if _looks_like_a_path(name, close):
        hint += f" There is no file at {path}."
    raise UnknownModelError(
        f"Model {name!r} not found; available models: {', '.join(available)}.{hint} "
        "To load your own checkpoint, pass the path of an existing file."
    )


def _looks_like_a_path(name: str, close: list[str]) -> bool:
    """Whether `name` was meant as a file path: an extension, a start no model name has, or a path separator in a
    name that is not a near miss of a model name (ViT names have a "/": "ViT-B/33" is a typo, not a path)."""
    separators = [sep for sep in (os.sep, os.altsep, "/") if sep]
    return (
        bool(os.path.splitext(name)[1])
        or name.startswith((".", "~"))
        or os.path.isabs(name)
        or (not close and any(sep in name for sep in separators))
    )


def _how_to_get(name: str, source: str) -> str:
    env = f"{SOURCE_ENV}=openai " if source == "openai" else ""
    return (
        f"On a connected machine run `{env}openclip-lite download {name}` and copy its cache here "
        "(the same download_root), or pass the path of a checkpoint file instead of the name."
    )


# ---- hub -----------------------------------------------------------------------------------------------------------


def _download_hub(name: str, model: pretrained.Pretrained, root: str | os.PathLike | None, progress: bool) -> str:
    cache_dir = os.fspath(root) if root is not None else None
    where = cache_dir or hf_constants.HF_HUB_CACHE
    corrupt = None
    for filename in pretrained.HUB_FILES:
        # The released weights never change, so a verified cached file is used without asking the Hub.
        cached = try_to_load_from_cache(model.hub_repo, filename, cache_dir=cache_dir)
        if not isinstance(cached, str):
            continue
        try:
            intact = _hub_file_is_intact(cached)
        except PermissionError as e:
            raise _unreadable(name, os.path.realpath(cached), e) from e
        if intact is not False:  # None: no hash kept to check against; it was checked when downloaded
            return cached
        corrupt = (filename, cached)
        break

    # Users of OpenAI's `clip` have its archives in ~/.cache/clip (or their download_root): verified, they serve.
    openai_file = _openai_file(model, root)
    try:
        if _matches(openai_file, model.sha256):
            return openai_file
    except OSError:  # another user's archive, say: the Hub's copy serves as well
        pass

    if corrupt is not None:
        filename, cached = corrupt
        if is_offline():
            raise ChecksumError(
                f"The cached {filename} of model {name!r} ({os.path.realpath(cached)}) is corrupt and offline mode "
                f"is on, so it cannot be downloaded again. {_how_to_get(name, 'hub')}"
            )
        warnings.warn(f"{cached} is corrupt (SHA256 mismatch); downloading it again", stacklevel=3)
        _forget_hub_file(cached, name, where)

    if is_offline():
        raise DownloadError(
            f"Model {name!r} is not in the cache ({where}) and offline mode is on (HF_HUB_OFFLINE / {OFFLINE_ENV}). "
            + _how_to_get(name, "hub")
        )

    # Read at call time: huggingface_hub reads HF_ENDPOINT only when it is first imported.
    endpoint = os.environ.get("HF_ENDPOINT") or None
    server = (endpoint or hf_constants.ENDPOINT).rstrip("/")
    missing: EntryNotFoundError | None = None
    for filename in pretrained.HUB_FILES:
        try:
            path = hf_hub_download(
                model.hub_repo,
                filename,
                cache_dir=cache_dir,
                endpoint=endpoint,
                tqdm_class=None if progress else _SilentBar,
            )
        except LocalEntryNotFoundError as e:  # an EntryNotFoundError too, so it is caught first
            raise _hub_answered(name, f"{model.hub_repo}/{filename}", server, e) or DownloadError(
                f"Could not reach the Hub at {server} to download model {name!r} ({model.hub_repo}/{filename}) and "
                f"it is not in the cache ({where}) ({_root_cause(e)}). Check the connection (or HF_ENDPOINT). "
                + _how_to_get(name, "hub")
            ) from e
        except EntryNotFoundError as e:  # a 404 for this file in a repo that exists
            missing = e  # the next file name is the fallback
            continue
        except (PermissionError, FileExistsError, NotADirectoryError) as e:  # the cache, not the connection
            raise _unwritable(name, where, e) from e
        except _HUB_ERRORS as e:
            raise _hub_answered(name, f"{model.hub_repo}/{filename}", server, e) or DownloadError(
                f"Downloading model {name!r} ({model.hub_repo}/{filename}) from {server} failed: "
                f"{type(e).__name__}: {_first_line(e)}. Nothing was cached; check the connection, HF_ENDPOINT and "
                "your Hub token (HF_TOKEN), then run it again."
            ) from e
        intact = _hub_file_is_intact(path)
        if intact is None:
            try:
                intact = _matches_hub_etag(path, model.hub_repo, filename, endpoint, server)
            except _HUB_ERRORS as e:
                _forget_hub_file(path, name, where)
                raise DownloadError(
                    f"The {filename} of model {name!r} was downloaded, but asking {server} for its SHA256 failed "
                    f"({type(e).__name__}: {_first_line(e)}), so it was not kept. Run it again."
                ) from e
        if not intact:
            _forget_hub_file(path, name, where)
            raise ChecksumError(
                f"The {filename} of model {name!r} downloaded from {server}/{model.hub_repo} does not match the "
                "SHA256 the Hub announced; it was deleted. Run it again to retry; if this keeps happening, a proxy "
                "or mirror is altering the file."
            )
        return path
    raise DownloadError(
        f"The Hub repo {model.hub_repo} at {server} has none of {', '.join(pretrained.HUB_FILES)} for model "
        f"{name!r}. Try source='openai' ({SOURCE_ENV}=openai), or pass the path of a checkpoint file."
    ) from missing


def _hub_file_is_intact(path: str) -> bool | None:
    """Check a cached Hub file against its blob name, which is the file's SHA256 for LFS files such as weights.

    None where the cache holds no hash to check against: a cache without symlinks (Windows without Developer Mode)
    keeps the file under its own name, and a mirror whose ETags are not SHA256 names blobs by something else.
    """
    blob = os.path.realpath(path)
    expected = os.path.basename(blob)
    if not _SHA256.fullmatch(expected):
        return None
    return _sha256(blob) == expected


def _matches_hub_etag(path: str, repo: str, filename: str, endpoint: str | None, server: str) -> bool:
    """For a file just downloaded into a cache that keeps no hash: ask the Hub again for its SHA256 (an LFS file's
    ETag) and compare. A server that gives no SHA256 leaves nothing to compare: say so, and trust the download."""
    etag = get_hf_file_metadata(hf_hub_url(repo, filename, endpoint=endpoint), endpoint=endpoint).etag or ""
    if not _SHA256.fullmatch(etag):
        warnings.warn(
            f"{server} gives no SHA256 for {repo}/{filename} (ETag {etag!r}), so the download could not be verified; "
            f"source='openai' ({SOURCE_ENV}=openai) checks OpenAI's archives against their published SHA256",
            stacklevel=4,
        )
        return True
    return _sha256(path) == etag


def _hub_answered(name: str, file: str, server: str, error: BaseException) -> DownloadError | None:
    """The error for a Hub that answered with a refusal (401, 403) or a server error (5xx): the connection works,
    so advice about it would mislead. None for any other failure."""
    status = _http_status(error)
    if status in (401, 403):
        return DownloadError(
            f"The Hub at {server} refused access to {file} for model {name!r} (HTTP {status}). The repo may be gated "
            "or private, or the token wrong or expired: set HF_TOKEN to a token that may read it, or use "
            f"source='openai' ({SOURCE_ENV}=openai)."
        )
    if status is not None and status >= 500:
        return DownloadError(
            f"The Hub at {server} answered with a server error (HTTP {status}) for {file} of model {name!r}; the "
            f"problem is on its side, not the connection. Try again later, or use source='openai' ({SOURCE_ENV}=openai)."
        )
    return None


def _http_status(error: BaseException | None) -> int | None:
    """The HTTP status of the response behind `error` (huggingface_hub chains the HTTP error under its own)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        status = getattr(getattr(error, "response", None), "status_code", None)
        if isinstance(status, int):
            return status
        error = error.__cause__ or error.__context__
    return None


def _forget_hub_file(path: str, name: str, folder: str) -> None:
    """Remove a cached Hub file and its snapshot link, so the next call downloads it again."""
    blob = os.path.realpath(path)
    try:
        for p in (blob, path):
            if os.path.lexists(p):
                os.remove(p)
    except OSError as e:  # a read-only cache
        raise _unwritable(name, folder, e) from e


class _SilentBar(tqdm):
    """The bar huggingface_hub draws, switched off (for progress=False)."""

    def __init__(self, *args, **kwargs):
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


# ---- openai --------------------------------------------------------------------------------------------------------


def _openai_file(model: pretrained.Pretrained, root: str | os.PathLike | None) -> str:
    """Where the "openai" source keeps a model's archive: `<root>/<file>`, by default in ~/.cache/clip."""
    return os.path.join(os.path.expanduser(os.fspath(root) if root is not None else OPENAI_ROOT), model.filename)


def _unwritable(name: str, folder: str, e: OSError) -> DownloadError:
    return DownloadError(
        f"Cannot write model {name!r} into the cache folder {folder} ({type(e).__name__}: {e}); pass "
        "download_root= a writable folder, or the path of a checkpoint file instead of the name."
    )


def _unreadable(name: str, path: str, e: OSError) -> DownloadError:
    return DownloadError(
        f"The cached file {path} of model {name!r} cannot be read by this user ({type(e).__name__}: {e.strerror}); "
        "it may belong to another user. Pass download_root= a folder of your own (--root on the command line), or "
        "ask its owner to make it readable."
    )


def _download_openai(name: str, model: pretrained.Pretrained, root: str | os.PathLike | None, progress: bool) -> str:
    target = _openai_file(model, root)
    folder = os.path.dirname(target)
    # Checked before taking the lock, so a read-only cache with good files works.
    if _cached(name, target, model.sha256):
        return target
    if is_offline():
        state = "is corrupt (SHA256 mismatch)" if os.path.exists(target) else "is not in the cache"
        error = ChecksumError if os.path.exists(target) else DownloadError
        raise error(
            f"Model {name!r} ({target}) {state} and offline mode is on (HF_HUB_OFFLINE / {OFFLINE_ENV}). "
            + _how_to_get(name, "openai")
        )
    try:  # network failures and unreadable files are DownloadErrors already; an OSError here is the cache folder's
        os.makedirs(folder, exist_ok=True)
        with FileLock(target + ".lock"):
            # Another process may have finished this file while we waited for the lock.
            if _cached(name, target, model.sha256):
                return target
            if os.path.exists(target):
                warnings.warn(f"{target} exists, but its SHA256 does not match; downloading it again", stacklevel=3)
            # Holding the lock, no other process is writing this file: partial files of a killed download are stale.
            for stale in glob.glob(os.path.join(glob.escape(folder), f".{glob.escape(model.filename)}.*.part")):
                os.remove(stale)
            _fetch_verified(name, openai_url(model), model.sha256, target, progress)
    except OSError as e:  # a file where the folder should be, a read-only folder, a full disk
        raise _unwritable(name, folder, e) from e
    return target


def _matches(path: str, sha256: str) -> bool:
    """Whether `path` is a file whose SHA256 is `sha256`; OSError when it is there but cannot be read."""
    return os.path.isfile(path) and _sha256(path) == sha256


def _cached(name: str, target: str, sha256: str) -> bool:
    """Whether the "openai" source's cached file is there and intact. One this user may not read is an error, not a
    corrupt file to download again: replacing it would fail (another user's folder) or take another user's file."""
    try:
        return _matches(target, sha256)
    except PermissionError as e:
        raise _unreadable(name, target, e) from e
    except OSError:  # there but unreadable otherwise (an I/O error): not a file to trust, so it is replaced
        return False


def _fetch_verified(name: str, url: str, sha256: str, target: str, progress: bool) -> None:
    """Stream `url` into a temporary file next to `target`, and rename it into place only if its SHA256 matches."""
    partial = os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.{secrets.token_hex(8)}.part")
    # Created as open() creates files (0666 less the umask, as huggingface_hub's and OpenAI's downloads are), not
    # with tempfile.mkstemp's 0600, which would leave the cached weights unreadable to the other users of a shared cache.
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as out:
            digest = _stream(name, url, out, progress)
        if digest != sha256:
            raise ChecksumError(
                f"The file downloaded for model {name!r} from {url} has SHA256 {digest}, not {sha256}; it was not "
                "kept. Run it again to retry; if this keeps happening, a proxy or mirror is altering the file."
            )
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def _stream(name: str, url: str, out, progress: bool) -> str:
    """Copy the body at `url` into `out` with a progress bar; return its SHA256 hex digest."""
    request = urllib.request.Request(url, headers={"User-Agent": f"openclip-lite/{__version__}"})
    digest = hashlib.sha256()
    received = 0
    expected: int | None = None
    try:
        with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response:
            length = response.headers.get("Content-Length")
            expected = int(length) if length and length.isdigit() else None
            with tqdm(
                total=expected, unit="iB", unit_scale=True, unit_divisor=1024, desc=name, disable=not progress
            ) as bar:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as e:
        raise DownloadError(
            f"Downloading model {name!r} from {url} failed: HTTP {e.code} {e.reason}. "
            f"If {OPENAI_URL_ENV} points at a mirror, check that it holds <base>/<sha256>/<file>."
        ) from e
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        reason = e.reason if isinstance(e, urllib.error.URLError) else e
        raise DownloadError(
            f"Downloading model {name!r} from {url} failed: {type(reason).__name__}: {reason}. Nothing was cached; "
            f"check the connection (or {OPENAI_URL_ENV}) and run it again. {_how_to_get(name, 'openai')}"
        ) from e
    # http.client returns a short body without an error when the server closes the connection early.
    if expected is not None and received != expected:
        raise DownloadError(
            f"Downloading model {name!r} from {url} failed: the connection closed after {received} of {expected} "
            "bytes. Nothing was cached; run it again to retry."
        )
    return digest.hexdigest()


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _root_cause(error: BaseException) -> str:
    """The innermost exception of a chain, as "Type: message" (what actually went wrong on the wire)."""
    while error.__cause__ is not None:
        error = error.__cause__
    return f"{type(error).__name__}: {_first_line(error)}"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
