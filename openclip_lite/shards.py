"""Reading the Parquet shards that `distributed.embed` writes: paths and features, a batch at a time.

A shards folder holds `part-*.parquet` files with the columns `path` (string) and `embedding` (list<float32>),
and, once the job is complete, `manifest.json` (model, dim, count, the shards in order). Readers take the rows in
file-name order (which is input order); a row's position across all shards is its id, as `load_shards_into_milvus`
and `build_index` number them. The folder may be local or any pyarrow filesystem URI (`s3://...`, `gs://...`,
`file://...`).

Only the rows asked for are read: `batches` streams every row once in bounded memory, `take` reads chosen rows
(a training sample) shard by shard.

pyarrow is imported when a folder is opened, never by `import openclip_lite`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from .distributed import MANIFEST_NAME, footer_metadata
from .errors import ShardError, require

__all__ = ["ShardError", "Shards", "open_shards"]

PATH_COLUMN, EMBEDDING_COLUMN = "path", "embedding"
BATCH_ROWS = 10_000


class Shards:
    """The embedding shards in one folder. `len(shards)` rows of `dim` features; `model` from the manifest."""

    has_paths = True  # every row carries the path of its image

    def __init__(self, folder: str, filesystem: Any, files: list[str], counts: list[int], dim: int, model: str | None):
        self.folder, self.files, self.counts = folder, files, counts
        self.dim, self.model = dim, model
        self._fs = filesystem
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # shard k holds rows starts[k]..starts[k + 1] - 1

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __repr__(self) -> str:
        return f"Shards({self.folder!r}, shards={len(self.files)}, rows={len(self)}, dim={self.dim}, model={self.model!r})"

    def batches(self, batch_size: int = BATCH_ROWS, start: int = 0) -> Iterator[tuple[int, list[str], np.ndarray]]:
        """(position of the first row, paths, features float32 (rows, dim)) for every row from `start` on."""
        for number, file in enumerate(self.files):
            position, end = int(self.starts[number]), int(self.starts[number + 1])
            if end <= start:
                continue  # wholly before `start`: not opened
            for batch in self._parquet(file).iter_batches(batch_size=batch_size, columns=[PATH_COLUMN, EMBEDDING_COLUMN]):
                rows, skip = batch.num_rows, max(0, start - position)
                if skip < rows:
                    batch = batch.slice(skip)
                    yield position + skip, _paths(batch.column(PATH_COLUMN)), self._matrix(batch.column(EMBEDDING_COLUMN), file)
                position += rows

    def take(self, rows: np.ndarray, batch_size: int = BATCH_ROWS) -> np.ndarray:
        """The features of the given rows (sorted, unique positions), float32 (len(rows), dim), in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        done = 0
        for number, file in enumerate(self.files):
            wanted = rows[(rows >= self.starts[number]) & (rows < self.starts[number + 1])] - self.starts[number]
            if not len(wanted):
                continue  # a shard none of the rows fall in is never opened
            position = 0
            for batch in self._parquet(file).iter_batches(batch_size=batch_size, columns=[EMBEDDING_COLUMN]):
                inside = wanted[(wanted >= position) & (wanted < position + batch.num_rows)] - position
                if len(inside):
                    out[done : done + len(inside)] = self._matrix(batch.column(0), file)[inside]
                    done += len(inside)
                position += batch.num_rows
        return out

    def _parquet(self, file: str) -> Any:
        pq = require("pyarrow.parquet", "ray")
        return pq.ParquetFile(self._fs.open_input_file(file))

    def _matrix(self, column: Any, file: str) -> np.ndarray:
        """A list<float> column as float32 (rows, dim); every row must have `dim` values."""
        import pyarrow.compute as pc

        if column.null_count:
            raise ShardError(f"{file} has rows without an embedding; embed that shard again (delete it and rerun embed)")
        if len(column):
            sizes = pc.min_max(pc.list_value_length(column))
            if sizes["min"].as_py() != self.dim or sizes["max"].as_py() != self.dim:
                raise ShardError(
                    f"{file} has embeddings of {sizes['min'].as_py()} to {sizes['max'].as_py()} values, not {self.dim} "
                    f"as the rest; shards of different models do not mix: embed into a new folder"
                )
        values = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
        return values.reshape(len(column), self.dim)


def _paths(column: Any) -> list[str]:
    return [p or "" for p in column.to_pylist()]


def open_shards(folder: str | os.PathLike) -> Shards:
    """The shards in `folder` (a local path or a pyarrow filesystem URI), checked: columns, row counts, dim."""
    pq = require("pyarrow.parquet", "ray")
    from pyarrow import fs as pafs

    folder = os.fspath(folder)
    try:
        filesystem, root = pafs.FileSystem.from_uri(folder) if "://" in folder else (pafs.LocalFileSystem(), os.path.abspath(folder))
        info = filesystem.get_file_info(root)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for unknown schemes and unreachable stores
        raise ShardError(f"cannot open {folder} ({e})") from e
    if info.type == pafs.FileType.File:
        raise ShardError(
            f"{folder} is a file, not a folder of embedding shards: give the folder of Parquet shards that "
            f"`openclip-lite embed SOURCE --engine ray --out FOLDER` writes{_embeddings_file_hint(folder)}"
        )
    if info.type != pafs.FileType.Directory:
        raise FileNotFoundError(f"shards folder {folder} does not exist; make one with: openclip-lite embed SOURCE --engine ray --out {folder}")
    names = sorted(i.base_name for i in filesystem.get_file_info(pafs.FileSelector(root)) if i.type == pafs.FileType.File)
    files = [f"{root}/{name}" for name in names if name.endswith(".parquet") and not name.startswith(".")]
    if not files:
        raise ShardError(f"{folder} holds no Parquet shards (*.parquet); make them with: openclip-lite embed SOURCE --engine ray --out {folder}")
    manifest = _manifest(filesystem, f"{root}/{MANIFEST_NAME}") if MANIFEST_NAME in names else {}
    counts, dim = [], manifest.get("dim")
    inputs: int | None = 0  # where the next shard of an embed job must start (None: unknown, after another file)
    for file in files:
        parquet = pq.ParquetFile(filesystem.open_input_file(file))
        missing = {PATH_COLUMN, EMBEDDING_COLUMN} - set(parquet.schema_arrow.names)
        if missing:
            raise ShardError(f"{file} lacks the column(s) {sorted(missing)}; it is not an embedding shard: move it out of {folder}")
        job = _job_metadata(parquet.schema_arrow)
        if job is None or job["count"] != parquet.metadata.num_rows:  # not embed's, or rewritten by another tool
            inputs = None
        elif inputs is not None:
            if job["start"] != inputs:
                # a job still running writes shards as they finish, in any order: reading past a missing one would
                # number every later row wrongly (and a Milvus load resumed later would skip and repeat rows)
                raise ShardError(
                    f"{file} starts at input {job['start']} but the shards before it end at input {inputs}: a shard is "
                    f"missing, so the embed writing {folder} has not finished; run it to the end (it resumes) first"
                )
            inputs = job["stop"]
        counts.append(parquet.metadata.num_rows)
        if dim is None and parquet.metadata.num_rows:  # no manifest (a job still running, or shards made elsewhere)
            first = next(parquet.iter_batches(batch_size=1, columns=[EMBEDDING_COLUMN])).column(0)
            dim = len(first[0]) if first.null_count == 0 else None
    if dim is None:
        raise ShardError(f"the shards in {folder} hold no embeddings; nothing to read")
    if "count" in manifest and manifest["count"] != sum(counts):
        raise ShardError(
            f"{folder}/{MANIFEST_NAME} says {manifest['count']} rows but the shards hold {sum(counts)}; shards were added "
            f"or removed after the job: rerun the same embed to bring them back in line"
        )
    return Shards(folder, filesystem, files, counts, int(dim), manifest.get("model"))


def _embeddings_file_hint(path: str) -> str:
    from .search import EMBEDDINGS_SUFFIXES  # here, not at the top: search imports torch and PIL

    if not path.lower().endswith(EMBEDDINGS_SUFFIXES):
        return ""
    return (
        "; an embeddings file that `embed --out FILE.safetensors` wrote is searched as it is, and for a FAISS "
        f"index embed into a folder instead: openclip-lite embed SOURCE --out {os.path.splitext(path)[0]}-index --index auto"
    )


def _job_metadata(schema: Any) -> dict | None:
    """The slice of inputs an embed shard covers and its rows ({"start", "stop", "count"}), from its footer; None
    for other Parquet files."""
    meta = footer_metadata(schema) or {}
    job = {key: meta.get(key) for key in ("start", "stop", "count")}
    return job if all(isinstance(value, int) for value in job.values()) else None


def _manifest(filesystem: Any, file: str) -> dict:
    try:
        with filesystem.open_input_stream(file) as f:
            manifest = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ShardError(f"{file} is not valid JSON ({e}); rerun the embed that wrote it, or remove it") from e
    if not isinstance(manifest, dict):
        raise ShardError(f"{file} is not an embed manifest (a JSON object); rerun the embed that wrote it, or remove it")
    return manifest
