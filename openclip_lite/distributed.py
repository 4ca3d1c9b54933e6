"""`embed`: many images -> resumable Parquet shards of L2-normalised features, on Ray Data.

What runs where:
- the driver (the process that calls `embed`) lists the inputs, cuts the list into fixed slices of `shard_size`
  (one shard each), leaves out the slices whose shard an earlier run finished, and writes each shard as soon as its
  last row arrives: to a temporary name, then renamed, so that a shard file is either complete or absent;
- CPU tasks read each file (a local path, or a URI of any pyarrow filesystem: `s3://`, `gs://`, `file://`, ...),
  decode it and preprocess it, sending uint8 pixels (a quarter of float32's bytes) to
- a pool of actors (`ray.data.ActorPoolStrategy`), each holding one model: one GPU each (`num_gpus=1`), or CPU
  threads where the cluster has no GPU; they normalise the pixels, run `encode_image` and L2-normalise.

Ray Data streams blocks between the stages with backpressure, so memory stays bounded whatever the number of
images: the driver holds the file list and the shards not yet complete, nothing else.

Fault tolerance: when a worker process dies, its decoding task is retried and a dead actor is restarted with its
batches retried. These are Ray Data's own defaults (`max_retries=-1` for tasks; `max_restarts=-1`,
`max_task_retries=-1` for actors), which are what we want, so they are not passed again: Ray 2.60 deprecates
passing remote args through `map_batches`. Each row carries its input position and the driver keeps the first
copy of each, so every input ends up in exactly one shard row (or in the skipped list) once, whatever Ray replays.
An error raised in our code (not a dead process) is not retried: it ends the run, and a re-run resumes it.

The output folder:
- `part-00000.parquet`, ...: columns `path` (string) and `embedding` (list<float32>, L2-normalised), rows in
  input order; shard k covers inputs [k * shard_size, (k + 1) * shard_size). The Parquet footer's key-value
  metadata `openclip_lite` holds the shard's slice, a SHA256 of its input paths, the model and its skipped inputs,
  so a later run can tell a finished shard of the same job from anything else;
- `manifest.json`: {"format", "version", "model", "dim", "count", "inputs", "source", "place", "shard_size", "shards":
  [{"file", "start", "stop", "count"}], "skipped": [{"path", "reason"}], "openclip_lite", "created"}; written
  last, so its presence says the job completed. `milvus.load_shards_into_milvus` reads this folder as it is.

Ray and pyarrow are imported when `embed` is called, so `import openclip_lite` never needs the `[ray]` extra.
"""

from __future__ import annotations

import fnmatch
import glob as globlib
import hashlib
import io
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import torch

from .errors import EmbedError, ImageError, InputError, require

__all__ = ["DEFAULT_SHARD_SIZE", "EmbedError", "EmbedResult", "embed", "list_source"]

logger = logging.getLogger(__name__)

FORMAT = "openclip-lite.shards"
VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARD_PREFIX = "part-"
SHARD_SUFFIX = ".parquet"
TEMPORARY_MARK = ".tmp-"  # part-00003.parquet.tmp-<id>: never matched by a "*.parquet" glob
METADATA_KEY = b"openclip_lite"

# 10,000 rows of 512 float32 are 20 MB: small enough to buffer a few in the driver, large enough that a billion
# images make 100,000 files, not millions
DEFAULT_SHARD_SIZE = 10_000
# rows per decoding task: enough to amortise a task's start (a few ms), few enough to spread over the cores
DECODE_ROWS = 64
GLOB_CHARACTERS = "*?["

Source = Union[str, "os.PathLike[str]", Sequence[Union[str, "os.PathLike[str]"]], Any]  # Any: a ray.data.Dataset


@dataclass(frozen=True)
class EmbedResult:
    """What `embed` did.

    output : the output folder (as given; a URI stays a URI)
    model : the model's name, or the absolute path of its checkpoint
    dim : the features' size
    count : rows written across all shards (inputs embedded)
    skipped : (path, reason) for each input that could not be read, in input order
    shards : every shard's file name, in order
    written : the shards this call wrote; reused : the shards an earlier run had finished, left untouched
    """

    output: str
    model: str
    dim: int
    count: int
    skipped: list[tuple[str, str]]
    shards: list[str]
    written: list[str]
    reused: list[str]


# ---------------------------------------------------------------------------------------------------- the API


def embed(
    source: Source,
    model: str = "ViT-B/32",
    output: str | os.PathLike[str] | None = None,
    *,
    batch_size: int = 256,
    actors: int | None = None,
    num_gpus: float | None = None,
    num_cpus: float | None = None,
    address: str | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    runtime_env: dict | None = None,
    download_root: str | None = None,
    progress: bool = True,
    on_shard: Callable[[str], None] | None = None,
) -> EmbedResult:
    """Embed many images on a Ray cluster into Parquet shards plus a manifest in `output`; resumable.

    source : a folder (searched recursively for image files, as `search.list_images`), a glob ("imgs/**/*.jpg",
        "s3://bucket/imgs/*.jpg"), a file, a URI of any pyarrow filesystem, or a list of these; or a
        `ray.data.Dataset` with a `path` column (files read as above) or with `image` (HWC arrays, as
        `ray.data.read_images(..., include_paths=True)` gives) and `path` columns
    model : a released model name (downloaded by the driver) or a checkpoint path, as for `openclip_lite.load`;
        the driver reads the weights and ships them to the actors through Ray's object store, so workers need
        neither the file nor network access
    output : the folder for the shards and the manifest: a local path or a pyarrow filesystem URI
    batch_size : images per forward pass in an actor
    actors : the size of the model actor pool; None: one per GPU (`num_gpus=1`), or on CPUs one per 8 cores
    num_gpus : GPUs per actor (Ray's knob); None: 1 if the cluster has GPUs, else 0 (CPU actors)
    num_cpus : Ray CPUs each actor reserves (Ray's knob); None: 1. A CPU actor runs torch on its node's cores
        divided among the node's actors, beside the decoding tasks, as `encode_images` does on one machine
    address : the Ray cluster ("ray://head:10001", "head:6379", "auto"); None: RAY_ADDRESS, else a local Ray
        started for this call (and stopped after it). A Ray already initialised in this process is used as it is
    shard_size : inputs per shard; changing it between a run and its resumption redoes every shard
    runtime_env : passed to `ray.init` when this call connects (e.g. {"pip": ["openclip-lite[ray]"]})
    download_root : the model download cache, as for `load`
    progress : show Ray Data's progress bars
    on_shard : called in the driver with each shard's file name once it is written (progress reports)

    Re-running with the same source, model and shard_size after a crash or Ctrl-C keeps the finished shards and
    writes the others; a complete output keeps every shard (its manifest is written again). Inputs that cannot be read are skipped and listed in
    the manifest with the reason. An `image`-column Dataset has no fixed slices before it is read, so it is
    embedded whole on every call (its shards follow the order rows arrive in).
    Features equal `search.encode_images`' for the same model and images (fp16 on GPU, fp32 on CPU, as `load`).
    """
    if output is None:
        raise InputError("give the folder to write the shards to: embed(source, model, output='shards/')")
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, not {batch_size}")
    if shard_size < 1:
        raise InputError(f"shard_size must be at least 1, not {shard_size}")
    if actors is not None and actors < 1:
        raise InputError(f"actors must be at least 1, not {actors}")
    if num_gpus is not None and num_gpus < 0:
        raise InputError(f"num_gpus must be 0 (CPU actors) or more, not {num_gpus}")
    ray = require("ray", "ray")
    require("ray.data", "ray")
    require("pyarrow.parquet", "ray")

    started = False  # whether this call started (or connected to) Ray, and so ends it
    try:
        if isinstance(source, ray.data.Dataset):
            started = _connect(ray, address, runtime_env)
            paths, description = _dataset_source(source)
        else:
            paths, description = list_source(source), _describe(source)
            if not paths:
                raise InputError(f"no image files in {description}")
        model_name, state_dict, n_px, dim = _read_model(model, download_root)
        job = _Job(_OutputFolder(output), model_name, dim, shard_size, paths)
        place = _place(os.fspath(source)) if isinstance(source, (str, os.PathLike)) else None
        pending = job.prepare(place)
        if paths is None or pending:  # a complete output needs no Ray at all
            started = started or _connect(ray, address, runtime_env)
            pool = _pool_size(ray, actors, num_gpus, num_cpus)
            if paths is None:
                decoded = source.map_batches(_decode_batch, fn_kwargs={"n_px": n_px}, batch_size=DECODE_ROWS, batch_format="numpy", num_cpus=1, max_calls=0)
            else:
                decoded = _decoded_paths(ray, paths, pending, shard_size, n_px, min(DECODE_ROWS, batch_size))
            stream = _encoded(ray, decoded, ray.put(state_dict), pool, batch_size)
            del state_dict  # the object store holds the weights now
            stream.context.enable_progress_bars = progress
            job.consume(stream.iter_batches(batch_size=None, batch_format="numpy"), on_shard)
        return job.finish(description, place)
    finally:
        if started:
            ray.shutdown()


# ---------------------------------------------------------------------------------------------------- inputs


def list_source(source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[str]:
    """The image files a source names, in a stable order: local ones as absolute paths, the others as URIs.

    Each folder is listed recursively (image extensions only, hidden files left out, sorted by path), each glob is
    expanded (sorted; every file it matches is kept, as a shell would), each file is kept as given; a list keeps
    its order. Raises FileNotFoundError for an input that does not exist or a glob that matches nothing.
    """
    from .search import list_images

    items = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    paths: list[str] = []
    for item in items:
        item = os.fspath(item)
        if not isinstance(item, str):
            raise TypeError(f"a source is a path, a URI, a glob, a list of these or a ray.data.Dataset, not {type(item).__name__}")
        if _is_uri(item):
            paths.extend(_list_uri(item))
        elif any(c in item for c in GLOB_CHARACTERS) and not os.path.exists(item):
            matches = sorted(globlib.glob(item, recursive=True))
            if not matches:
                raise FileNotFoundError(f"no files match {item}")
            paths.extend(os.path.abspath(p) for p in list_images(matches))
        else:
            paths.extend(os.path.abspath(p) for p in list_images(item))
    return paths


def _is_uri(path: str) -> bool:
    return "://" in path


def _list_uri(uri: str) -> list[str]:
    """The files a URI names (a file, a folder listed recursively, or a glob), as URIs of the same scheme."""
    from pyarrow import fs as pafs

    from .search import IMAGE_EXTENSIONS

    filesystem, path = pafs.FileSystem.from_uri(uri)
    prefix = uri.split("?", 1)[0]
    prefix = prefix[: len(prefix) - len(path)] if prefix.endswith(path) else prefix[: prefix.index("://") + 3]
    wildcard = next((i for i, c in enumerate(path) if c in GLOB_CHARACTERS), None)
    if wildcard is not None:
        base = path[: path.rfind("/", 0, wildcard) + 1].rstrip("/") or "/"
        infos = filesystem.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        files = sorted(i.path for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatchcase(i.path, path))
        if not files:
            raise FileNotFoundError(f"no files match {uri}")
    else:
        info = filesystem.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"no such file or folder: {uri}")
        if info.type == pafs.FileType.Directory:
            infos = filesystem.get_file_info(pafs.FileSelector(path, recursive=True))
            root = path.rstrip("/") + "/"
            files = sorted(
                i.path
                for i in infos
                if i.type == pafs.FileType.File
                and os.path.splitext(i.path)[1].lower() in IMAGE_EXTENSIONS
                and not any(part.startswith(".") for part in i.path[len(root) :].split("/"))
            )
        else:
            files = [path]
    return [prefix + f for f in files]


def _describe(source: Any) -> str | list[str]:
    """The source as the manifest records it: the string, or the list when it is short."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    items = [os.fspath(item) for item in source]
    return items if len(items) <= 100 else f"a list of {len(items)} paths, starting {items[0]}"


def _dataset_source(dataset: Any) -> tuple[list[str] | None, str]:
    """(its paths, or None for an image-column Dataset; how the manifest names it).

    A Dataset with an `image` column is embedded from those pixels; one with only a `path` column gives its paths
    (local ones made absolute), which are then read like a list of paths, and so resumable.
    """
    columns = dataset.schema().names
    if "path" not in columns:
        raise InputError(
            f"the Dataset needs a 'path' column (it has {columns}): files to read, or the names of the rows of its "
            "'image' column (ray.data.read_images(..., include_paths=True) gives both)"
        )
    if "image" in columns:
        return None, "ray.data.Dataset (image column)"
    paths: list[str] = []
    for batch in dataset.select_columns(["path"]).iter_batches(batch_size=None, batch_format="pyarrow"):
        paths.extend(batch.column("path").to_pylist())
    if not paths:
        raise InputError("the Dataset has no rows")
    return [p if _is_uri(p) else os.path.abspath(p) for p in paths], "ray.data.Dataset (path column)"


# ---------------------------------------------------------------------------------------------------- model


def _read_model(model: str, download_root: str | None) -> tuple[str, dict, int, int]:
    """-> (the name the manifest records, the fp32 state dict, input resolution, feature size).

    The model is built once here so that a bad checkpoint fails now, in the driver, with the checkpoint reader's
    own message, not later in every actor.
    """
    from .checkpoint import load_state_dict
    from .model import build_model

    if os.path.isfile(model):
        path, name = model, os.path.abspath(model)
    else:
        from .download import download

        path, name = download(model, root=download_root), model
    built = build_model(load_state_dict(path))
    state_dict = {k: v.detach().float() if v.is_floating_point() else v for k, v in built.state_dict().items()}
    return name, state_dict, built.visual.input_resolution, built.text_projection.shape[1]


class _ImageEncoder:
    """One model in one actor: uint8 pixels (b, 3, res, res) -> L2-normalised features (b, dim) float32.

    The arithmetic is `encode_images`': uint8 -> float32, / 255, - mean, / std (ToTensor's and Normalize's
    operations in the same order), `encode_image`, `.float()`, divide by the norm.
    """

    def __init__(self, weights: list, use_gpu: bool, threads: int | None):
        import ray

        from .model import build_model, convert_weights
        from .transform import MEAN, STD

        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device("cuda" if use_gpu else "cpu")  # Ray sets CUDA_VISIBLE_DEVICES to this actor's GPU
        model = build_model(ray.get(weights[0]))  # a list, so that Ray hands the reference over unresolved
        if self.device.type == "cuda":
            convert_weights(model, torch.float16)  # as `load` does on CUDA
        self.model = model.to(self.device).eval()
        self.dim = model.text_projection.shape[1]
        self.mean = torch.tensor(MEAN, dtype=torch.float32, device=self.device).view(-1, 1, 1)
        self.std = torch.tensor(STD, dtype=torch.float32, device=self.device).view(-1, 1, 1)

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        good = batch["error"] == ""
        embedding = np.zeros((len(good), self.dim), dtype=np.float32)  # rows of unreadable inputs stay zero
        if good.any():
            pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"][good])).to(self.device)
            if pixels.dtype == torch.uint8:
                pixels = pixels.float().div_(255)
            pixels = pixels.sub_(self.mean).div_(self.std)
            features = self.model.encode_image(pixels).float()
            embedding[good] = (features / features.norm(dim=-1, keepdim=True)).cpu().numpy()
        return {"index": batch["index"], "path": batch["path"], "embedding": embedding, "error": batch["error"]}


@dataclass(frozen=True)
class _Pool:
    actors: int
    num_gpus: float
    num_cpus: float  # what Ray reserves per actor
    threads: int | None  # torch threads per CPU actor


def _pool_size(ray: Any, actors: int | None, num_gpus: float | None, num_cpus: float | None) -> _Pool:
    """The actor pool for this cluster: one actor per GPU where there are GPUs, else CPU actors.

    A CPU actor reserves `num_cpus` (default 1) of Ray's CPUs, which leaves the others to the decoding tasks, but
    runs torch on its share of the node's cores, as `encode_images` runs its model beside its DataLoader workers:
    a fixed split of the cores between decoding and the model would leave one side idle whenever the other is the
    bottleneck (with 2 cores, the model would get half the machine).
    """
    resources = ray.cluster_resources()
    gpus, cpus = resources.get("GPU", 0.0), resources.get("CPU", 1.0)
    if num_gpus is None:
        num_gpus = 1.0 if gpus >= 1 else 0.0
    if num_gpus > 0:
        if gpus == 0:
            raise InputError(f"num_gpus={num_gpus} was asked for but the Ray cluster has no GPU; leave num_gpus out (or 0) to run on CPUs")
        actors = actors or max(1, int(gpus // num_gpus))
        if actors * num_gpus > gpus:
            logger.warning("%d actors x %s GPUs need more than the cluster's %s GPUs; the pool waits for the autoscaler", actors, num_gpus, gpus)
        return _Pool(actors, num_gpus, num_cpus or 1.0, None)
    nodes = max(1, sum(1 for node in ray.nodes() if node.get("Alive") and node.get("Resources", {}).get("CPU")))
    actors = actors or max(1, int(cpus // 8))
    actors_per_node = -(-actors // nodes)
    num_cpus = num_cpus or 1.0
    return _Pool(actors, 0.0, num_cpus, max(int(num_cpus), int(cpus / nodes // actors_per_node), 1))


def _encoded(ray: Any, decoded: Any, weights: Any, pool: _Pool, batch_size: int) -> Any:
    """The decoded Dataset run through the pool of model actors: rows (index, path, embedding, error)."""
    return decoded.map_batches(
        _ImageEncoder,
        fn_constructor_kwargs={"weights": [weights], "use_gpu": pool.num_gpus > 0, "threads": pool.threads},
        compute=ray.data.ActorPoolStrategy(size=pool.actors),
        batch_size=batch_size,
        batch_format="numpy",
        num_gpus=pool.num_gpus or None,
        num_cpus=pool.num_cpus,
        udf_modifying_row_count=False,
    )


# ---------------------------------------------------------------------------------------------------- decoding


def _decoded_paths(ray: Any, paths: list[str], pending: list[int], shard_size: int, n_px: int, rows: int) -> Any:
    """A Dataset of the pending shards' inputs, decoded by CPU tasks: rows (index, path, pixels, error).

    Its input is one item per `rows` paths (start, paths), not one per path: the driver then holds a small dict per
    chunk beside the path list, not a dict per image.
    """
    chunks = [
        {"start": first, "paths": paths[first : min(first + rows, (shard + 1) * shard_size, len(paths))]}
        for shard in pending
        for first in range(shard * shard_size, min((shard + 1) * shard_size, len(paths)), rows)
    ]
    # from_items builds the blocks here, in the driver (from_arrow would start a task per block to read its schema)
    return ray.data.from_items(chunks, override_num_blocks=len(chunks)).map_batches(
        _decode_chunks,
        fn_kwargs={"n_px": n_px},
        batch_size=None,
        batch_format="numpy",
        num_cpus=1,
        # Ray's default for tasks, named so that the remote args differ from the actors': Ray Data fuses maps whose
        # remote args are equal, which would put decoding into the model's actors, taking turns with the model
        max_calls=0,
    )


def _decode_chunks(batch: dict[str, np.ndarray], n_px: int) -> dict[str, np.ndarray]:
    """Chunks (start, paths) -> one row per path: (index, path, pixels uint8 (3, n_px, n_px), error)."""
    index = np.concatenate([np.arange(start, start + len(chunk)) for start, chunk in zip(batch["start"], batch["paths"])])
    paths = [str(p) for chunk in batch["paths"] for p in chunk]
    return _decode(index, paths, None, n_px)


def _decode_batch(batch: dict[str, np.ndarray], n_px: int) -> dict[str, np.ndarray]:
    """Rows of an image-column Dataset (path, image HWC) -> (index -1, path, pixels, error)."""
    paths = [str(p) for p in batch["path"]]
    return _decode(np.full(len(paths), -1, dtype=np.int64), paths, batch["image"], n_px)


def _decode(index: np.ndarray, paths: list[str], images: Any, n_px: int) -> dict[str, np.ndarray]:
    """Open (or take from `images`) and preprocess each input up to the normalisation: pixels (b, 3, n_px, n_px).

    An input that cannot be read gets zero pixels and the reason in `error` ("" for the others), so that one bad
    file costs one row, never the batch.
    """
    from PIL import Image

    head = _pixels_transform(n_px)
    pixels = np.zeros((len(paths), 3, n_px, n_px), dtype=np.uint8)
    errors = np.full(len(paths), "", dtype=object)
    filesystems: dict[str, tuple[Any, int]] = {}
    for i, path in enumerate(paths):
        try:
            image = Image.fromarray(np.asarray(images[i])) if images is not None else _open(path, filesystems)
        except (ImageError, FileNotFoundError) as e:  # their messages name the file
            errors[i] = str(e)
            continue
        except (OSError, ValueError, TypeError) as e:  # a filesystem's error (permission, network), a bad array
            errors[i] = f"cannot read {path} ({e})"
            continue
        try:
            pixels[i] = np.asarray(head(image), dtype=np.uint8).transpose(2, 0, 1)
        except (OSError, ValueError) as e:  # PIL's errors for pixels it cannot resize or convert
            errors[i] = f"cannot preprocess {path} ({e})"
    return {"index": index, "path": np.array(paths, dtype=object), "pixels": pixels, "error": errors}


def _pixels_transform(n_px: int) -> Callable:
    """`transform.preprocess(n_px)` up to its ToTensor and Normalize, which the actors run (PIL image -> RGB image)."""
    from torchvision.transforms import Compose, Normalize, ToTensor

    from .transform import preprocess

    *head, to_tensor, normalize = preprocess(n_px).transforms
    if type(to_tensor) is not ToTensor or type(normalize) is not Normalize:  # guards the split against a changed preprocess
        raise RuntimeError("transform.preprocess no longer ends in ToTensor, Normalize; update distributed._pixels_transform")
    return Compose(head)


def _open(path: str, filesystems: dict[str, tuple[Any, int]]) -> Any:
    """Open and fully decode an image: a local file through `transform.open_image`, a URI through pyarrow."""
    from .transform import decode_image, open_image

    if not _is_uri(path):
        return open_image(path)
    key = path[: path.find("/", path.index("://") + 3) + 1] or path  # scheme and host: one filesystem each
    if key not in filesystems:
        from pyarrow import fs as pafs

        filesystem, inner = pafs.FileSystem.from_uri(path)
        filesystems[key] = (filesystem, len(path) - len(inner))
    filesystem, cut = filesystems[key]
    with filesystem.open_input_file(path[cut:]) as f:
        data = f.read()
    return decode_image(io.BytesIO(data), path)


# ---------------------------------------------------------------------------------------------------- output


def footer_metadata(schema: Any) -> dict | None:
    """The `openclip_lite` key-value metadata a shard's Parquet schema carries, or None for a file not ours."""
    raw = (schema.metadata or {}).get(METADATA_KEY)
    try:
        meta = json.loads(raw) if raw else None
    except ValueError:
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None


def _place(source: str) -> str:
    """A folder, glob or URI resolved to one spelling: "photos" in /data, "/data/photos/", a link to it and
    "file:///data/photos" are one place."""
    if source.startswith("file://"):
        source = source[len("file://") :]
    elif _is_uri(source):
        return source.rstrip("/")
    return os.path.realpath(os.path.expanduser(source))


class _OutputFolder:
    """The output folder on its pyarrow filesystem: list, read a shard's metadata, write atomically, remove."""

    def __init__(self, output: str | os.PathLike[str]):
        from pyarrow import fs as pafs

        output = os.fspath(output)
        self.name = output
        if _is_uri(output):
            self.fs, self.root = pafs.FileSystem.from_uri(output)
        else:
            self.fs, self.root = pafs.LocalFileSystem(), os.path.abspath(output)
        self.root = self.root.rstrip("/") or "/"
        info = self.fs.get_file_info(self.root)
        if info.type == pafs.FileType.File:
            raise InputError(f"{output} is a file; give a folder for the shards")
        self.fs.create_dir(self.root, recursive=True)

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def names(self) -> list[str]:
        from pyarrow import fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(self.root))
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.File)

    def shard_metadata(self, name: str) -> dict | None:
        """The `openclip_lite` metadata of a shard file, or None for a Parquet file without it (not ours)."""
        import pyarrow.parquet as pq

        try:
            schema = pq.read_schema(self.path(name), filesystem=self.fs)
        except (OSError, ValueError):  # pyarrow's errors for a file that is not Parquet, or cut short
            return None
        return footer_metadata(schema)

    def write_atomically(self, name: str, write: Callable[[str], None]) -> None:
        """`write(temporary path)`, then rename to `name`: a reader never sees a half-written file under `name`."""
        temporary = self.path(f"{name}{TEMPORARY_MARK}{uuid.uuid4().hex[:12]}")
        try:
            write(temporary)
            self.fs.move(temporary, self.path(name))
        except BaseException:
            self.remove(temporary[len(self.root) + 1 :])
            raise

    def remove(self, name: str) -> None:
        try:
            self.fs.delete_file(self.path(name))
        except FileNotFoundError:
            pass


class _Shard:
    """The rows of one shard as they arrive, in any order, each kept once: (position in the shard) -> row."""

    def __init__(self, number: int, start: int, size: int, dim: int):
        self.number, self.start, self.size = number, start, size
        self.seen = np.zeros(size, dtype=bool)
        self.embedding = np.zeros((size, dim), dtype=np.float32)
        self.paths = np.empty(size, dtype=object)
        self.errors = np.full(size, "", dtype=object)
        self.duplicates = 0

    def add(self, positions: np.ndarray, paths: np.ndarray, embedding: np.ndarray, errors: np.ndarray) -> None:
        # A retried task may deliver rows again; the first copy is kept, so each input counts once
        positions, first = np.unique(positions, return_index=True)
        fresh = ~self.seen[positions]
        self.duplicates += int(len(paths) - fresh.sum())
        take, positions = first[fresh], positions[fresh]
        self.seen[positions] = True
        self.embedding[positions] = embedding[take]
        self.paths[positions] = paths[take]
        self.errors[positions] = errors[take]

    @property
    def complete(self) -> bool:
        return bool(self.seen.all())


class _Job:
    """One `embed` call's bookkeeping over the output folder: which shards to write, writing them, the manifest."""

    def __init__(self, folder: _OutputFolder, model: str, dim: int, shard_size: int, paths: list[str] | None):
        self.folder, self.model, self.dim, self.shard_size, self.paths = folder, model, dim, shard_size, paths
        self.done: dict[int, dict] = {}  # shard number -> its metadata
        self.written: list[str] = []
        self.reused: list[str] = []
        self.duplicates = 0

    # -- before the run

    def shard_count(self) -> int | None:
        return None if self.paths is None else -(-len(self.paths) // self.shard_size)

    def shard_name(self, number: int) -> str:
        count = self.shard_count() or 0
        return f"{SHARD_PREFIX}{number:0{max(5, len(str(count - 1)))}d}{SHARD_SUFFIX}"

    def fingerprint(self, number: int) -> str:
        start = number * self.shard_size
        slice_paths = self.paths[start : start + self.shard_size]
        return hashlib.sha256("\n".join(slice_paths).encode("utf-8", "surrogatepass")).hexdigest()

    def prepare(self, place: str | None) -> list[int]:
        """Clean the folder of what no run will use (temporary files, the old manifest, shards of other inputs)
        and return the numbers of the shards to write. Raises EmbedError for a folder holding files not ours, or
        the complete output of an embed of another folder, glob or URI than `place` (`_place` of the source;
        None for a list or a Dataset, not compared)."""
        names = self.folder.names()
        manifest = self.folder.path(MANIFEST_NAME)
        if MANIFEST_NAME in names:
            try:
                with self.folder.fs.open_input_stream(manifest) as f:
                    old = json.loads(f.read())
            except ValueError:
                old = None
            if not isinstance(old, dict) or old.get("format") != FORMAT:
                raise EmbedError(f"{manifest} was not written by openclip-lite's embed; give an empty or new folder")
            if isinstance(old.get("place"), str) and place is not None and old["place"] != place:
                # its shards would all be redone for the new inputs: a finished job lost to a mistyped --out
                raise EmbedError(
                    f"{self.folder.name} holds the finished embed of {old['place']} ({old.get('count')} images); "
                    f"embedding {place} there would replace it: give a new folder, or delete that one first"
                )
        keep = {self.shard_name(n): n for n in range(self.shard_count() or 0)}
        for name in names:
            if name.startswith(SHARD_PREFIX) and TEMPORARY_MARK in name:
                self.folder.remove(name)  # a write cut short by a crash
            elif name.startswith(SHARD_PREFIX) and name.endswith(SHARD_SUFFIX):
                meta = self.folder.shard_metadata(name)
                if meta is None:
                    raise EmbedError(f"{self.folder.path(name)} was not written by openclip-lite's embed; give an empty or new folder")
                number = keep.get(name)
                if number is not None and self._is_finished(number, meta):
                    self.done[number] = meta
                    self.reused.append(name)
                elif number is None:
                    if self.paths is not None:
                        logger.warning("removing %s: a shard of an earlier run over more inputs", name)
                    self.folder.remove(name)  # an image-column Dataset is embedded whole on every run
        if MANIFEST_NAME in names:
            self.folder.remove(MANIFEST_NAME)  # written again at the end: while it is absent, the job is not complete
        return [n for n in range(self.shard_count() or 0) if n not in self.done]

    def _is_finished(self, number: int, meta: dict) -> bool:
        start = number * self.shard_size
        return (
            meta.get("version") == VERSION
            and meta.get("model") == self.model
            and meta.get("dim") == self.dim
            and meta.get("start") == start
            and meta.get("stop") == min(start + self.shard_size, len(self.paths))
            and meta.get("inputs_sha256") == self.fingerprint(number)
        )

    # -- during the run

    def consume(self, batches: Any, on_shard: Callable[[str], None] | None) -> None:
        """Gather the rows of each shard from the stream and write each shard when its last row is in."""
        batches = iter(batches)
        try:
            open_shards = self._gather(batches, on_shard)
        finally:
            # On an exception (Ctrl-C included) this stops the Ray Data execution and its actors now; the
            # traceback would otherwise keep the iterator, and with it the actors' CPUs and GPUs, alive
            close = getattr(batches, "close", None)
            if close is not None:
                close()
        if self.paths is None:
            for number in sorted(open_shards):  # the last, short shard of an image-column Dataset
                shard = open_shards.pop(number)
                keep = shard.seen
                shard.size, shard.seen = int(keep.sum()), shard.seen[keep]
                shard.embedding, shard.paths, shard.errors = shard.embedding[keep], shard.paths[keep], shard.errors[keep]
                self._write(shard, on_shard)
        missing = sum(int((~s.seen).sum()) for s in open_shards.values())
        if missing:
            raise EmbedError(
                f"the Ray job ended without {missing} of its rows (shards {sorted(open_shards)}); "
                "the finished shards are kept: run the same embed again to write the others"
            )

    def _gather(self, batches: Any, on_shard: Callable[[str], None] | None) -> dict[int, _Shard]:
        """Sort the rows of the stream into shards, writing each complete one; returns the incomplete ones."""
        open_shards: dict[int, _Shard] = {}
        arrived = 0  # rows of an image-column Dataset are numbered as they arrive
        for batch in batches:
            index = np.asarray(batch["index"], dtype=np.int64)
            if self.paths is None:
                index = np.arange(arrived, arrived + len(index))
                arrived += len(index)
            numbers = index // self.shard_size
            for number in np.unique(numbers).tolist():
                rows = numbers == number
                shard = open_shards.get(number)
                if shard is None:
                    start = number * self.shard_size
                    size = self.shard_size if self.paths is None else min(self.shard_size, len(self.paths) - start)
                    shard = open_shards[number] = _Shard(number, start, size, self.dim)
                shard.add(index[rows] - shard.start, batch["path"][rows], batch["embedding"][rows], batch["error"][rows])
                if shard.complete:
                    self._write(open_shards.pop(number), on_shard)
        return open_shards

    def _write(self, shard: _Shard, on_shard: Callable[[str], None] | None) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        good = shard.errors == ""
        embedding = shard.embedding[good]
        table = pa.table(
            {
                "path": pa.array(shard.paths[good].tolist(), pa.string()),
                "embedding": pa.ListArray.from_arrays(
                    pa.array(np.arange(0, embedding.size + 1, self.dim, dtype=np.int32)), pa.array(embedding.reshape(-1))
                ),
            }
        )
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "model": self.model,
            "dim": self.dim,
            "shard": shard.number,
            "start": shard.start,
            "stop": shard.start + shard.size,
            "count": int(good.sum()),
            "inputs_sha256": self.fingerprint(shard.number) if self.paths is not None else None,
            "skipped": [[p, e] for p, e in zip(shard.paths[~good].tolist(), shard.errors[~good].tolist())],
        }
        table = table.replace_schema_metadata({METADATA_KEY: json.dumps(meta).encode("utf-8")})
        name = self.shard_name(shard.number)
        self.folder.write_atomically(name, lambda path: pq.write_table(table, path, filesystem=self.folder.fs))
        self.done[shard.number] = meta
        self.written.append(name)
        self.duplicates += shard.duplicates
        if on_shard is not None:
            on_shard(name)

    # -- after the run

    def finish(self, source: Any, place: str | None) -> EmbedResult:
        """Check that every shard is done, remove stale shards of an image-column Dataset, write the manifest."""
        expected = self.shard_count()
        numbers = sorted(self.done)
        if expected is not None and numbers != list(range(expected)):
            missing = sorted(set(range(expected)) - set(numbers))
            raise EmbedError(f"shards {missing} were not written; run the same embed again to write them")
        if expected is None:  # shards left by an earlier, longer run over the same Dataset
            for name in self.folder.names():
                if name.startswith(SHARD_PREFIX) and name.endswith(SHARD_SUFFIX) and name not in self.written:
                    self.folder.remove(name)
        if self.duplicates:
            logger.info("%d rows arrived twice (retried tasks) and were kept once", self.duplicates)
        shards = [self.shard_name(n) for n in numbers]
        skipped = [(p, e) for n in numbers for p, e in self.done[n]["skipped"]]
        count = sum(self.done[n]["count"] for n in numbers)
        inputs = len(self.paths) if self.paths is not None else sum(self.done[n]["stop"] - self.done[n]["start"] for n in numbers)
        from .version import __version__

        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "model": self.model,
            "dim": self.dim,
            "count": count,
            "inputs": inputs,
            "source": source,
            "place": place,  # the source resolved (an absolute path or a URI), to tell a later run of another apart
            "shard_size": self.shard_size,
            "shards": [{"file": name, "start": self.done[n]["start"], "stop": self.done[n]["stop"], "count": self.done[n]["count"]} for n, name in zip(numbers, shards)],
            "skipped": [{"path": p, "reason": e} for p, e in skipped],
            "openclip_lite": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        data = json.dumps(manifest, indent=1, ensure_ascii=False).encode("utf-8")

        def write(path: str) -> None:
            with self.folder.fs.open_output_stream(path) as f:
                f.write(data)

        self.folder.write_atomically(MANIFEST_NAME, write)
        return EmbedResult(self.folder.name, self.model, self.dim, count, skipped, shards, list(self.written), list(self.reused))


# ---------------------------------------------------------------------------------------------------- Ray


def _connect(ray: Any, address: str | None, runtime_env: dict | None) -> bool:
    """Connect to the cluster (address, else RAY_ADDRESS, else a new local Ray). True when this call started it."""
    if ray.is_initialized():
        if address:
            logger.info("Ray is already initialised in this process; address=%s is not used", address)
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=runtime_env)
    else:
        # Workers of a local Ray run on this machine: let them import openclip_lite from where this process did,
        # which also covers a source checkout that is not pip-installed
        runtime_env = runtime_env or {"env_vars": {"PYTHONPATH": _package_parent()}}
        # no dashboard: it would only slow the start of a Ray that lives for one call
        ray.init(include_dashboard=False, runtime_env=runtime_env)
    return True


def _package_parent() -> str:
    parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.pathsep.join([parent] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
