"""Embedding many images and texts, and exact top-k search over the features.

- `list_images`: the image files of folders, recursively, sorted (the same order on every machine);
- `encode_images`: paths or PIL images -> L2-normalised features, decoded and preprocessed by a DataLoader's
  workers while the model runs, so the accelerator is kept fed; bad files are skipped (or raise) and the result
  says which inputs were kept;
- `encode_texts`: texts -> L2-normalised features;
- `search`: exact top-k by cosine similarity, a chunk of the index at a time, so memory stays bounded;
- `save_embeddings` / `load_embeddings`: features + paths + model name in one safetensors file (never a pickle).

The features equal those of OpenAI's `clip` (`encode_image(preprocess(image))`, normalised) for every batch size
and worker count: the DataLoader only moves where the preprocessing runs, not what it computes.
"""

from __future__ import annotations

import json
import os
import stat
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, get_worker_info
from torchvision.transforms import Compose, Normalize, ToTensor

from .errors import ImageError, InputError
from .tokenizer import tokenize
from .transform import open_image

__all__ = [
    "IMAGE_EXTENSIONS",
    "Embeddings",
    "EncodedImages",
    "SkippedImageWarning",
    "encode_images",
    "encode_texts",
    "list_images",
    "load_embeddings",
    "open_search_index",
    "save_embeddings",
    "save_search_index",
    "search",
]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})

# `search` scores at most QUERY_BLOCK x chunk_size similarities at once: 1024 x 32768 float32 = 128 MiB
QUERY_BLOCK = 1024
DEFAULT_CHUNK_SIZE = 32_768

EMBEDDINGS_FORMAT = "openclip-lite.embeddings"
EMBEDDINGS_SUFFIXES = (".safetensors", ".pt")  # `save_search_index` writes an embeddings file for these names
EMBEDDINGS_VERSION = "1"

PathLike = Union[str, "os.PathLike[str]"]
ImageLike = Union[str, "os.PathLike[str]", Image.Image]


class SkippedImageWarning(UserWarning):
    """An input image that could not be read and was left out (`encode_images(..., on_error="skip")`)."""


class EncodedImages(NamedTuple):
    """What `encode_images` returns; unpacks as `features, kept, skipped = encode_images(...)`.

    features : shape = (len(kept), embed_dim), float32, L2-normalised, on the model's device; row i belongs to
        input `kept[i]`
    kept : indices into the `images` given, in order, of the inputs that were embedded
    skipped : (index, reason) for each input that was left out, in order; the reason names the file
    """

    features: Tensor
    kept: list[int]
    skipped: list[tuple[int, str]]


@dataclass(frozen=True)
class Embeddings:
    """An embeddings file's contents: features (n, embed_dim) float32, the n image paths, the model's name.

    Searched like an `openclip_lite.index.Index` (the same `search`, `paths`, `model`), exactly.
    """

    features: Tensor
    paths: list[str]
    model: str

    def search(self, queries: Tensor, k: int = 10) -> tuple[Tensor, Tensor]:
        """Exact top-k rows by cosine similarity: (scores, row numbers), both (num_queries, min(k, n))."""
        return search(queries, self.features, k, device=torch.as_tensor(queries).device)

    def __len__(self) -> int:
        return len(self.paths)


# ---------------------------------------------------------------------------------------------------- listing


def list_images(inputs: PathLike | Iterable[PathLike]) -> list[str]:
    """The image files named by `inputs`: each folder is listed recursively, each file is kept as given.

    In a folder, files count as images by extension (case-insensitive: jpg, jpeg, png, webp, bmp, gif, tif,
    tiff); hidden files and folders (names starting with ".", e.g. macOS "._x.jpg" resource forks) are left out,
    and so are links to folders (a link back up the tree would never end; name such a folder directly).
    A folder's files come sorted by path, so that the same folder gives the same order (and the same index rows)
    on every machine. A file named directly is kept whatever its extension: naming it is asking for it. A file
    reached twice (a folder and a file in it, or the same folder twice) is listed once, where it first comes.
    Raises FileNotFoundError for an input that does not exist.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    paths: list[str] = []
    seen: set[str] = set()
    for item in inputs:
        item = os.fspath(item)
        if os.path.isdir(item):
            found = sorted(_walk_images(item))
        elif os.path.exists(item):
            found = [item]
        else:
            raise FileNotFoundError(f"no such file or folder: {item}")
        for path in found:
            key = os.path.normcase(os.path.abspath(path))
            if key not in seen:
                seen.add(key)
                paths.append(path)
    return paths


def _walk_images(folder: str) -> Iterable[str]:
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # in place: os.walk then skips them
        for name in files:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                yield os.path.join(root, name)


# ---------------------------------------------------------------------------------------------------- images


class _ImageDataset(Dataset):
    """Item i -> (i, pixels or None, the exception or None, warnings); runs in the DataLoader's workers.

    A file that cannot be read is returned in the item rather than raised, so that one bad file neither stops
    the workers nor arrives in the main process wrapped in a worker traceback. Warnings raised in a worker
    process (a 16-bit image clipped) come back in the item too, to be warned again in the main process, where the
    caller can see and filter them; in the main process they are warned as they happen.
    """

    def __init__(self, images: Sequence[ImageLike], transform: Callable, uint8_output: bool):
        self.images = images
        self.transform = transform
        self.uint8_output = uint8_output

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[int, Tensor | None, Exception | None, list[tuple]]:
        if get_worker_info() is None:
            return (*self._load(i), [])
        with warnings.catch_warnings(record=True) as caught:  # a worker process runs one item at a time
            warnings.simplefilter("always")
            item = self._load(i)
        # (text, category, file, line): what warn_explicit needs, and picklable whatever the warning held
        return (*item, [(str(w.message), w.category, w.filename, w.lineno) for w in caught])

    def _load(self, i: int) -> tuple[int, Tensor | None, Exception | None]:
        item = self.images[i]
        name = f"image {i}" if isinstance(item, Image.Image) else os.fspath(item)
        try:
            image = item if isinstance(item, Image.Image) else open_image(item)
        except (ImageError, FileNotFoundError) as e:
            return i, None, e
        try:
            pixels = self.transform(image)
        except (OSError, ValueError) as e:  # PIL's errors for pixels it cannot resize or convert
            return i, None, ImageError(f"cannot preprocess {name} ({e})")
        if self.uint8_output:
            pixels = _to_uint8_tensor(pixels)
        return i, pixels, None


def _to_uint8_tensor(image: Image.Image | Tensor) -> Tensor:
    """A PIL image as ToTensor's (channels, height, width) layout, but still uint8 (4x fewer bytes to move).

    Modes whose pixels are not bytes ("1", "I", "I;16", "F") go through ToTensor itself, as float.
    """
    if isinstance(image, Image.Image) and image.mode not in ("1", "I", "I;16", "I;16B", "I;16L", "F"):
        array = np.array(image, dtype=np.uint8, copy=True)
        return torch.from_numpy(array).view(image.size[1], image.size[0], -1).permute(2, 0, 1).contiguous()
    return ToTensor()(image)


def _collate(items: list[tuple]) -> tuple[Tensor, Tensor | None, list[tuple[int, Exception]], list[tuple]]:
    """-> (indices of the good items (b,), their pixels stacked (b, 3, res, res) or None, [(index, exception)],
    the warnings the workers caught)"""
    good = [(i, pixels) for i, pixels, error, _ in items if error is None]
    failed = [(i, error) for i, pixels, error, _ in items if error is not None]
    caught = [warning for *_, notes in items for warning in notes]
    if not good:
        return torch.empty(0, dtype=torch.long), None, failed, caught
    tensors = [pixels for _, pixels in good]
    if any(t.dtype != torch.uint8 for t in tensors):  # a mixed batch: bring all to ToTensor's float
        tensors = [t.float().div(255) if t.dtype == torch.uint8 else t for t in tensors]
    return torch.tensor([i for i, _ in good]), torch.stack(tensors), failed, caught


def _split_normalisation(preprocess: Callable) -> tuple[Callable, Normalize | None]:
    """Split OpenAI-style preprocessing (a Compose ending in ToTensor, Normalize) into what the workers run and
    the normalisation the main process runs on the batch, on the model's device.

    The workers then send uint8 pixels instead of float32: a quarter of the bytes through shared memory, pinned
    memory and the host-to-device copy, and no float arithmetic on the CPU. The numbers do not change: uint8 ->
    float32, / 255, - mean, / std are the same IEEE operations in the same order wherever they run.
    Any other callable runs whole in the workers (returns it and None).
    """
    if isinstance(preprocess, Compose) and len(preprocess.transforms) >= 2:
        *head, to_tensor, normalize = preprocess.transforms
        if type(to_tensor) is ToTensor and type(normalize) is Normalize:
            return Compose(head), normalize
    return preprocess, None


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, where the OS has one), not the machine's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _default_workers(num_images: int, batch_size: int) -> int:
    if num_images <= batch_size:
        return 0  # one batch: starting worker processes costs more than it saves
    return min(16, usable_cpus())


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def encode_images(
    model: torch.nn.Module,
    preprocess: Callable,
    images: ImageLike | Sequence[ImageLike],
    batch_size: int = 64,
    num_workers: int | None = None,
    progress: bool | None = None,
    on_error: str = "raise",
) -> EncodedImages:
    """L2-normalised image features of many images, decoded and preprocessed in parallel with the model.

    model, preprocess : as `openclip_lite.load` returns them (OpenAI's `clip.load` works too)
    images : file paths and/or PIL images (a single one is a list of one); see `list_images` for folders
    batch_size : images per forward pass; the features do not depend on it
    num_workers : DataLoader worker processes that decode and preprocess; None: 0 for a single batch, else one
        per CPU core (at most 16); 0 does everything in this process
    progress : show a tqdm bar; None: only for 1,000 images or more, and only on a terminal
    on_error : "raise": the first unreadable image raises (ImageError, or FileNotFoundError); "skip": leave it
        out with a SkippedImageWarning naming it and go on

    Returns EncodedImages(features, kept, skipped): features (len(kept), embed_dim) float32 on the model's device,
    row i being input kept[i]; skipped lists (index, reason) of the inputs left out. With on_error="raise",
    kept is every index and skipped is empty.
    """
    if on_error not in ("raise", "skip"):
        raise InputError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, not {batch_size}")
    if isinstance(images, (str, os.PathLike)) and os.path.isdir(images):  # not an image to skip: the ones in it
        raise IsADirectoryError(f"{os.fspath(images)} is a folder; pass list_images({os.fspath(images)!r}) for the images in it")
    if isinstance(images, (str, os.PathLike, Image.Image)):
        images = [images]
    if isinstance(images, (Tensor, np.ndarray)):
        raise TypeError(
            "encode_images takes image files or PIL images; for preprocessed pixels (batch, 3, size, size) call "
            "model.encode_image(pixels) and normalise its rows"
        )
    images = list(images)
    device = _device(model)
    if num_workers is None:
        num_workers = _default_workers(len(images), batch_size)
    worker_transform, normalize = _split_normalisation(preprocess)
    if normalize is not None:
        mean = torch.as_tensor(normalize.mean, dtype=torch.float32, device=device).view(-1, 1, 1)
        std = torch.as_tensor(normalize.std, dtype=torch.float32, device=device).view(-1, 1, 1)
    loader = DataLoader(
        _ImageDataset(images, worker_transform, uint8_output=normalize is not None),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",  # page-locked batches make the non_blocking copies below truly async
    )
    from tqdm.auto import tqdm

    if progress is None:
        disable = None if len(images) >= 1000 else True  # tqdm's None: shown on a terminal only
    else:
        disable = not progress
    bar = tqdm(total=len(images), desc="embedding images", unit="img", disable=disable)
    features: Tensor | None = None  # allocated at the first batch, when embed_dim is known
    kept: list[Tensor] = []
    skipped: list[tuple[int, str]] = []
    count = 0
    try:
        for indices, pixels, failed, caught in loader:
            for text, category, filename, lineno in caught:
                warnings.warn_explicit(text, category, filename, lineno)
            for i, error in failed:
                if on_error == "raise":
                    raise error
                warnings.warn(f"skipped: {error}", SkippedImageWarning, stacklevel=3)
                skipped.append((i, str(error)))
            bar.update(len(indices) + len(failed))
            if pixels is None:
                continue
            # Nothing here waits for the device: the copy, the model and the writes into `features` are queued,
            # and the loop goes on to fetch the next batch, which the workers have prepared meanwhile.
            pixels = pixels.to(device, non_blocking=True)
            if pixels.dtype == torch.uint8:
                pixels = pixels.float().div_(255)  # ToTensor's arithmetic, on the device
            if normalize is not None:
                pixels = pixels.sub_(mean).div_(std)  # Normalize's arithmetic, on the device
            batch = model.encode_image(pixels).float()
            if features is None:
                features = torch.empty(len(images), batch.shape[1], dtype=torch.float32, device=device)
            features[count : count + len(batch)] = batch / batch.norm(dim=-1, keepdim=True)
            kept.append(indices)
            count += len(batch)
    finally:
        bar.close()
    if features is None:
        features = torch.empty(0, embed_dim(model), dtype=torch.float32, device=device)
    elif count < len(features):
        features = features[:count].clone()  # let the rows of skipped images go
    kept_indices = torch.cat(kept).tolist() if kept else []
    return EncodedImages(features, kept_indices, skipped)


def embed_dim(model: torch.nn.Module) -> int:
    """The size of the model's features (both towers): 512 for ViT-B/32, 768 for ViT-L/14."""
    return model.text_projection.shape[1]


# ---------------------------------------------------------------------------------------------------- texts


@torch.no_grad()
def encode_texts(model: torch.nn.Module, texts: str | Sequence[str], batch_size: int = 256, truncate: bool = False) -> Tensor:
    """L2-normalised text features, shape = (len(texts), embed_dim), float32, on the model's device.

    texts : a str (one row) or a list of str
    truncate : cut texts longer than the context (77 tokens) instead of raising TextTooLongError

    Texts are batched by length (the text tower stops at the longest text of a batch, so similar lengths waste no
    work) and returned in the order given; the features do not depend on the batching.
    """
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, not {batch_size}")
    device = _device(model)
    tokens = tokenize(texts, context_length=model.context_length, truncate=truncate)
    if len(tokens) == 0:
        return torch.empty(0, embed_dim(model), dtype=torch.float32, device=device)
    lengths = tokens.argmax(dim=-1)  # the end-of-text token has the largest id
    order = lengths.argsort(descending=True, stable=True)
    features = torch.empty(len(tokens), embed_dim(model), dtype=torch.float32, device=device)
    for start in range(0, len(tokens), batch_size):
        rows = order[start : start + batch_size]
        batch = model.encode_text(tokens[rows].to(device)).float()
        features[rows.to(device)] = batch / batch.norm(dim=-1, keepdim=True)
    return features


# ---------------------------------------------------------------------------------------------------- search


def search(
    queries: Tensor,
    index: Tensor,
    k: int = 10,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    device: str | torch.device | None = None,
) -> tuple[Tensor, Tensor]:
    """Exact top-k by cosine similarity of each query against the rows of `index`.

    queries : shape = (num_queries, dim), or (dim,) for one query; any float dtype, normalised here
    index : shape = (n, dim), the features to search (normalised here, a chunk at a time); or an object with
        a `search(queries, k)` method (an `openclip_lite.index.Index`), which is then called as it is
    k : results per query; fewer when the index has fewer than k rows
    chunk_size : index rows scored at once: memory is O(min(num_queries, 1024) x chunk_size), whatever n is
    device : where to compute; None: the index's device. A CPU index can be streamed through a GPU this way.

    Returns (scores, indices), both shape = (num_queries, min(k, n)), best first: cosine similarities (float32)
    and row numbers of `index` (int64), on `device`. Equal scores come in row order; which of several equal rows
    takes the k-th place is unspecified, as in `torch.topk`. An all-zero row scores 0; a query or row with NaN or
    infinite values is a ValueError.
    """
    if not isinstance(index, (Tensor, np.ndarray)) and hasattr(index, "search"):
        return index.search(queries, k)
    queries, index = torch.as_tensor(queries), torch.as_tensor(index)
    if queries.dim() == 1:
        queries = queries.unsqueeze(0)
    if index.dim() != 2 or queries.dim() != 2:
        raise InputError(f"search needs queries (num_queries, dim) and an index (n, dim); got {tuple(queries.shape)} and {tuple(index.shape)}")
    if queries.shape[1] != index.shape[1]:
        raise InputError(
            f"the queries have {queries.shape[1]} dimensions but the index has {index.shape[1]}: "
            "encode the queries with the model that made the index"
        )
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise InputError(f"k must be a positive integer, not {k!r}")
    if chunk_size < 1:
        raise InputError(f"chunk_size must be at least 1, not {chunk_size}")
    device = torch.device(device) if device is not None else index.device
    k = min(k, len(index))
    queries = queries.to(device, torch.float32)
    norms = queries.norm(dim=1)
    if not (torch.isfinite(norms) & (norms > 0)).all():  # a NaN query would score NaN everywhere, a zero one 0
        row = int((~(torch.isfinite(norms) & (norms > 0))).nonzero()[0])
        raise InputError(f"query {row} is all zeros or holds NaN or infinite values, so it has no cosine similarity; drop it")
    queries = queries / norms[:, None]
    # the running top-k of every query; -inf loses to any cosine, and k <= n real rows replace every one of them
    best_scores = torch.full((len(queries), k), float("-inf"), device=device)
    best_indices = torch.full((len(queries), k), -1, dtype=torch.long, device=device)
    for start in range(0, len(index), chunk_size):
        rows = F.normalize(index[start : start + chunk_size].to(device, torch.float32), dim=-1)  # once per chunk; a zero row scores 0
        for first in range(0, len(queries), QUERY_BLOCK):  # so that only (QUERY_BLOCK, chunk_size) scores exist
            block = slice(first, first + QUERY_BLOCK)
            scores, indices = (queries[block] @ rows.T).topk(min(k, len(rows)), dim=1)
            scores = torch.cat([best_scores[block], scores], dim=1)
            indices = torch.cat([best_indices[block], indices + start], dim=1)
            scores, order = scores.sort(dim=1, descending=True, stable=True)  # 2k columns; earlier rows win ties
            best_scores[block], best_indices[block] = scores[:, :k], indices.gather(1, order[:, :k])
    # A row with NaN or infinite values scores NaN, which sorts above every number: so it is among the results of
    # every query, and checking the (q, k) answers finds it without a pass over the whole index.
    bad = torch.isnan(best_scores)
    if bad.any():
        row = int(best_indices[bad][0])
        raise InputError(f"index row {row} holds NaN or infinite values; check the encoder's output")
    # equal scores in row order (which of several equal rows makes the k-th place is left to topk, as in torch)
    best_indices, order = best_indices.sort(dim=1, stable=True)
    best_scores, order = best_scores.gather(1, order).sort(dim=1, descending=True, stable=True)
    return best_scores, best_indices.gather(1, order)


def _check_finite(x: Tensor, what: str) -> None:
    finite = torch.isfinite(x).all(dim=1)
    if not finite.all():
        raise InputError(f"{what} row {int((~finite).nonzero()[0])} holds NaN or infinite values; check the encoder's output")


# ---------------------------------------------------------------------------------------------------- files


def save_embeddings(path: PathLike, features: Tensor, paths: Sequence[str], model: str) -> None:
    """Write features (n, dim), their n image paths and the model's name to one safetensors file.

    The file holds two tensors, "features" (n, dim) float32 and "paths" (uint8: the UTF-8 bytes of a JSON list
    of the paths, kept out of the header because safetensors caps headers at 100 MB, which a few million paths
    would pass), and the header metadata {"format": "openclip-lite.embeddings", "version": "1", "model": ...}.
    Nothing in it is pickled, so loading it runs no code. Written to a temporary file and renamed, so an
    interrupted run never leaves a half-written file under `path`. A file already at `path` is replaced only when
    it holds embeddings (or nothing); any other (a model checkpoint given by mistake) is an InputError.
    """
    from safetensors.torch import save_file

    path = os.fspath(path)
    check_replaceable(path)
    if len(features) != len(paths):
        raise InputError(f"{len(features)} feature rows but {len(paths)} paths; they must match one to one")
    paths = [os.fspath(p) for p in paths]  # TypeError for anything but str and PathLike
    features = features.detach().float().cpu()
    if len(features):
        _check_finite(features, "features")
    paths_bytes = np.frombuffer(json.dumps(list(paths), ensure_ascii=False).encode("utf-8"), dtype=np.uint8)
    tensors = {"features": features.contiguous(), "paths": torch.from_numpy(paths_bytes.copy())}
    metadata = {"format": EMBEDDINGS_FORMAT, "version": EMBEDDINGS_VERSION, "model": model or ""}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = f"{path}.tmp{os.getpid()}"
    try:
        # safetensors' save_file makes its files 0600, unreadable to the other users of a shared folder: the file
        # gets the mode any new file gets here (0666 less the umask), read from one open() makes first
        open(temporary, "wb").close()
        mode = stat.S_IMODE(os.stat(temporary).st_mode)
        save_file(tensors, temporary, metadata=metadata)
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def check_replaceable(path: str) -> None:
    """ValueError unless `path` is free or holds embeddings (a re-run of `embed` replaces its own file): a model
    checkpoint or any other file given as the output by mistake is never overwritten."""
    if os.path.isdir(path):
        raise InputError(f"{path} is a folder; give the embeddings file a name ending in {' or '.join(EMBEDDINGS_SUFFIXES)}")
    if os.path.exists(path) and os.path.getsize(path) and _header_format(path) != EMBEDDINGS_FORMAT:
        raise InputError(
            f"{path} exists and is not an embeddings file (a model checkpoint?), so it is kept; write the "
            "embeddings to a new file, e.g. photos.safetensors"
        )


def _header_format(path: str) -> str | None:
    """The "format" in a safetensors file's header metadata, read from the header alone (so a file whose tensors
    were cut short still says what it is); None for anything else."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 2 <= size <= 100_000_000:  # safetensors' own cap on headers
                return None
            metadata = json.loads(f.read(size)).get("__metadata__") or {}
    except (OSError, ValueError, AttributeError):  # unreadable, not JSON (UnicodeDecodeError is a ValueError), not an object
        return None
    return metadata.get("format") if isinstance(metadata, dict) else None


def is_embeddings_file(path: PathLike) -> bool:
    """Whether `path` is a safetensors file (by its bytes: an 8-byte header length, then a JSON object)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < os.path.getsize(path)


def load_embeddings(path: PathLike) -> Embeddings:
    """Read a file written by `save_embeddings` (features on the CPU). Runs no code from the file.

    Raises FileNotFoundError, or ValueError saying what the file is instead.
    """
    from safetensors import SafetensorError, safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"embeddings file not found: {path}")
    if not is_embeddings_file(path):
        raise InputError(f"{path} is not an embeddings file (safetensors); make one with: openclip-lite embed FOLDER --out photos.safetensors")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != EMBEDDINGS_FORMAT or set(f.keys()) != {"features", "paths"}:
                raise InputError(
                    f"{path} is a safetensors file but not openclip-lite embeddings (a model checkpoint?); make "
                    f"embeddings with it as the model: openclip-lite embed FOLDER --out photos.safetensors --model {path}"
                )
            if metadata.get("version") != EMBEDDINGS_VERSION:
                raise InputError(f"{path} has embeddings format version {metadata.get('version')}, this openclip-lite reads {EMBEDDINGS_VERSION}; upgrade openclip-lite")
            features = f.get_tensor("features")
            paths = json.loads(f.get_tensor("paths").numpy().tobytes().decode("utf-8"))
    except (SafetensorError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"could not read {path} as an embeddings file ({e}); it may be truncated: embed again") from e
    if features.dim() != 2 or len(features) != len(paths):
        raise InputError(f"{path} is inconsistent ({tuple(features.shape)} features, {len(paths)} paths); embed again")
    return Embeddings(features, paths, metadata.get("model", ""))


# ---------------------------------------------------------------------------------------------------- either kind


def save_search_index(path: PathLike, features: Tensor, paths: Sequence[str], model: str, kind: str | None = None, **build_options) -> str:
    """Save image features for `openclip-lite search`, in the kind of file the name asks for. Returns which.

    - a name ending in .safetensors or .pt: one embeddings file (`save_embeddings`), searched exactly; `kind`
      must then be None or "flat";
    - any other name (a folder): a FAISS index (`openclip_lite.index.build_index(features, kind=kind or "flat",
      paths=paths, model=model, **build_options)`, then `Index.save(path)`), which needs the [index] extra.

    Returns "embeddings" or "index".
    """
    path = os.fspath(path)
    if _is_single_file(path, kind, build_options):
        save_embeddings(path, features, paths, model)
        return "embeddings"
    build_index = _index_module(path).build_index
    build_index(features, kind=kind or "flat", paths=list(paths), model=model, **build_options).save(path)
    return "index"


def check_search_index_target(path: PathLike, n: int, dim: int, kind: str | None = None, memory_budget: int | str | None = None) -> None:
    """Raise now what `save_search_index` would refuse for n features of dim values, before they are computed:
    a kind a single file cannot be, a missing [index] extra, an unknown kind, a memory budget the index cannot
    fit, a file or a foreign folder where the index folder would go."""
    path = os.fspath(path)
    options = {"memory_budget": memory_budget} if memory_budget is not None else {}
    if _is_single_file(path, kind, options):
        check_replaceable(path)
        return
    index = _index_module(path)
    index.plan(n, dim, kind or "flat", **options)
    index.check_save_path(path)


def _is_single_file(path: str, kind: str | None, build_options: dict) -> bool:
    """Whether `path` names one embeddings file; ValueError when it does but `kind` / `build_options` ask for FAISS."""
    if not path.lower().endswith(EMBEDDINGS_SUFFIXES) or os.path.isdir(path):
        return False
    if kind not in (None, "flat") or build_options:
        raise InputError(
            f"{path} names a single embeddings file, which is always searched exactly (flat); for a "
            f"{kind or 'tuned'} FAISS index give a folder name instead, e.g. {os.path.splitext(path)[0]}"
        )
    return True


def open_search_index(path: PathLike):
    """Open what `save_search_index` wrote: an `Embeddings` (single file) or an `openclip_lite.index.Index`.

    Both have `search(queries, k) -> (scores, ids)`, `paths` and `model`. Nothing in either runs code when read.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no index or embeddings file at {path}; make one with: openclip-lite embed FOLDER --out {path}")
    if is_embeddings_file(path) or (os.path.isfile(path) and path.lower().endswith(EMBEDDINGS_SUFFIXES)):
        return load_embeddings(path)  # for a damaged one, its error says what is wrong with the file
    return _index_module(path).load_index(path)


def _index_module(path: str):
    import importlib

    try:
        index = importlib.import_module(f"{__package__}.index")
    except ModuleNotFoundError as e:
        if e.name != f"{__package__}.index":  # index.py exists but lacks a dependency: its own error says which
            raise
        raise InputError(
            f"{path} would be a FAISS index, which this version of openclip-lite cannot write or read; "
            f"use a single embeddings file instead (a name ending in {' or '.join(EMBEDDINGS_SUFFIXES)})"
        ) from e
    return index
