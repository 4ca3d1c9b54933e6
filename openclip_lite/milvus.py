"""`MilvusIndex`: the `Index` verbs (add, search -> (scores, ids), len) over a Milvus collection.

One class for both deployments, told apart by the URI only:
- a local path ending in `.db` opens Milvus Lite embedded in this process (a directory of Parquet files, a WAL and
  a LOCK file that one process at a time may hold);
- `http://host:19530` (with `token` where the server wants one) talks to a Milvus server or cluster, or to
  `milvus-lite server --data-dir DIR`, which lets several processes share one Lite directory.

A collection holds three fields: `id` (INT64, primary key), `embedding` (FLOAT_VECTOR, L2-normalised, COSINE
metric) and `path` (VARCHAR). The model name is kept in the collection's description and in a collection
property, because Milvus Lite 3 does not store descriptions.

pymilvus is imported only when a `MilvusIndex` is made, so `import openclip_lite` never needs the `[milvus]` extra.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from torch import Tensor

from .errors import MilvusIndexError, MilvusLockedError, require

__all__ = ["INDEX_TYPES", "MilvusIndex", "MilvusIndexError", "MilvusLockedError", "load_shards_into_milvus"]

# The index types Milvus Lite 3 can build, with the build knobs and the search knobs each one takes (Milvus's
# names). Milvus Lite stores any other index type string and fails only when the collection is reopened, so we
# check before Milvus sees it.
INDEX_TYPES: dict[str, tuple[frozenset, frozenset]] = {
    "FLAT": (frozenset(), frozenset()),
    "IVF_FLAT": (frozenset({"nlist"}), frozenset({"nprobe"})),
    "IVF_SQ8": (frozenset({"nlist"}), frozenset({"nprobe"})),
    "HNSW": (frozenset({"M", "efConstruction"}), frozenset({"ef"})),
}

ID_FIELD, VECTOR_FIELD, PATH_FIELD = "id", "embedding", "path"
MODEL_PROPERTY = "openclip_lite.model"
MAX_PATH_LENGTH = 65_535  # Milvus's largest VARCHAR
SEARCH_BATCH = 1024  # queries per search request, well under Milvus's nq limit (16384) and message size
GET_BATCH = 10_000  # ids per get request
INT64_MAX = 2**63 - 1  # the largest id an INT64 primary key holds

ArrayLike = Union[Tensor, np.ndarray, Sequence]  # evaluated at run time: `|` needs Python 3.10


# Milvus Lite runs one in-process server per directory, which pymilvus starts and never stops; we count the open
# MilvusIndex objects per directory and stop the server (which flushes and releases the LOCK) after the last close.
_lite_users: dict[str, int] = {}
_lite_users_lock = threading.Lock()


def _is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://", "tcp://", "unix:"))


class _KeepStartError(logging.Filter):
    """Keeps the exception milvus-lite logs when it cannot open a directory.

    pymilvus replaces it by a bare "Open local milvus failed"; we keep it to say what happened (and to drop the
    traceback that milvus-lite would otherwise print before our own error).
    """

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self.error: BaseException | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.args, tuple) and self.path in record.args:
            self.error = record.exc_info[1]
            return False
        return True


def _connect_lite(pymilvus: Any, path: str) -> Any:
    """A MilvusClient on the Milvus Lite directory `path` (absolute, ending in .db)."""
    # pymilvus' own hint for a missing milvus-lite names its [milvus_lite] extra, which allows releases that
    # cannot open milvus-lite 3 files; ours names the pinned one.
    milvus_lite = require("milvus_lite", "milvus")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger("milvus_lite.server_manager")
    keep = _KeepStartError(path)
    # Held while connecting, so that no other thread's last close stops the server this client is about to use.
    with _lite_users_lock:
        logger.addFilter(keep)
        try:
            client = pymilvus.MilvusClient(uri=path)
        except pymilvus.exceptions.MilvusException as e:
            # this process's own lock (a client still open here) is not another process's
            if isinstance(keep.error, milvus_lite.DataDirLockedError) or (path not in _lite_users and _locked_elsewhere(path)):
                raise MilvusLockedError(
                    f"Milvus Lite data at '{path}' is in use by another process, which holds its lock file "
                    f"'{os.path.join(path, 'LOCK')}'; close the MilvusIndex (or MilvusClient) there first, or share "
                    f"the data by running `milvus-lite server --data-dir {path}` and connecting every process to it "
                    f"with uri='http://127.0.0.1:19530'."
                ) from keep.error
            raise e from keep.error
        finally:
            logger.removeFilter(keep)
        _lite_users[path] = _lite_users.get(path, 0) + 1
    return client


def _locked_elsewhere(path: str) -> bool:
    """Whether another process holds the Lite directory's LOCK (milvus-lite's flock), asked of the file itself:
    the log record `_KeepStartError` reads is never made when the caller has silenced logging."""
    try:
        import fcntl
    except ImportError:  # Windows: milvus-lite locks with msvcrt there; its log record is all we have
        return False
    try:
        with open(os.path.join(path, "LOCK"), "rb") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(lock, fcntl.LOCK_UN)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False


def _release_lite(path: str) -> None:
    with _lite_users_lock:
        _lite_users[path] -= 1
        if _lite_users[path] == 0:
            del _lite_users[path]
            from milvus_lite.server_manager import server_manager_instance

            server_manager_instance.release_server(path)


def _check_positive_ints(knobs: dict, allowed: frozenset, index_type: str, what: str) -> dict:
    """`knobs` with every name in `allowed` and every value a positive int, else MilvusIndexError."""
    for name, value in knobs.items():
        if name not in allowed:
            names = ", ".join(sorted(allowed)) or "none"
            raise MilvusIndexError(f"{index_type} has no {what} '{name}'; its {what}s are: {names}.")
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise MilvusIndexError(f"{what} '{name}' must be a positive integer, got {value!r}.")
    return {name: int(value) for name, value in knobs.items()}


def _as_matrix(x: ArrayLike, dim: int, what: str) -> Tensor:
    """`x` as a float32 CPU tensor, shape = (n, dim); a 1-D input is one row."""
    # np.array copies, so arrays that torch may not share (read-only ones from Parquet) never reach it
    x = x.detach() if isinstance(x, Tensor) else torch.from_numpy(np.array(x, dtype=np.float32))
    if x.ndim == 1:
        x = x.unsqueeze(0)
    if x.ndim != 2 or x.shape[1] != dim:
        raise MilvusIndexError(f"{what} must have shape (n, {dim}) for this index, got {tuple(x.shape)}.")
    x = x.to("cpu", torch.float32)
    if not torch.isfinite(x).all():
        raise MilvusIndexError(f"{what} contain NaN or infinite values; check the encoder's output.")
    return x


def _check_nonzero(x: Tensor, what: str) -> None:
    """A zero row has no direction, so no cosine similarity: an error, as in `Index`."""
    zero = (x == 0).all(dim=1)
    if zero.any():
        raise MilvusIndexError(f"{what} row {int(zero.nonzero()[0])} is all zeros, which has no cosine similarity; drop it.")


class MilvusIndex:
    """Cosine search over a Milvus collection, with `Index`'s verbs: `add`, `search -> (scores, ids)`, `len`.

    uri : a local path ending in .db (Milvus Lite, embedded) or http(s)://host:port (a Milvus server or cluster)
    collection : the collection's name; opened when it exists (dim, model, index type read from it), else created
    dim : the feature dimension; needed to create a collection, checked against an existing one
    model : the CLIP model that made the features, kept with the collection; checked against an existing one
    index_type : FLAT (exact), IVF_FLAT, IVF_SQ8 or HNSW; FLAT when creating, the collection's own when opening
    params : build knobs in Milvus's names: `nlist` for IVF_*, `M` and `efConstruction` for HNSW
    token : "user:password" or an API key, for servers with authentication
    batch_size : rows per insert request, so that adding millions of rows streams
    create : False to only open: a missing collection is then an error naming those there are
    """

    def __init__(
        self,
        uri: str | os.PathLike,
        collection: str,
        dim: int | None = None,
        model: str | None = None,
        index_type: str | None = None,
        params: dict | None = None,
        token: str | None = None,
        batch_size: int = 10_000,
        create: bool = True,
    ):
        if batch_size < 1:
            raise MilvusIndexError(f"batch_size must be a positive integer, got {batch_size}.")
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 1):
            raise MilvusIndexError(f"dim must be a positive integer, got {dim!r}.")
        if index_type is not None:
            index_type = index_type.upper()
            if index_type not in INDEX_TYPES:
                raise MilvusIndexError(
                    f"Unknown Milvus index type '{index_type}'; use one of: {', '.join(INDEX_TYPES)}."
                )
            params = _check_positive_ints(params or {}, INDEX_TYPES[index_type][0], index_type, "build parameter")
        elif params:
            raise MilvusIndexError("params need an index_type to go with; pass index_type as well.")

        uri = os.fspath(uri)
        self._lite_path: str | None = None
        if not _is_remote(uri):
            uri = os.path.abspath(os.path.expanduser(uri))
            if not uri.endswith(".db"):
                raise MilvusIndexError(
                    f"A Milvus Lite path must end in .db (pymilvus reads other paths as server addresses), "
                    f"got '{uri}'; for a server use http://host:19530."
                )
        pymilvus = require("pymilvus", "milvus")
        if _is_remote(uri):
            self._client = pymilvus.MilvusClient(uri=uri, token=token or "")
        else:
            self._client = _connect_lite(pymilvus, uri)
            self._lite_path = uri
        self.uri, self.collection, self.batch_size = uri, collection, batch_size
        try:
            if self._client.has_collection(collection):
                self._open(dim, model, index_type)
            elif not create:
                there = ", ".join(repr(name) for name in sorted(self._client.list_collections())) or "none"
                raise MilvusIndexError(f"Collection '{collection}' does not exist at {uri}; the collections there: {there}.")
            else:
                self._create(pymilvus, dim, model, index_type or "FLAT", params or {})
        except BaseException:
            self.close()
            raise

    def _create(self, pymilvus: Any, dim: int | None, model: str | None, index_type: str, params: dict):
        if dim is None:
            raise MilvusIndexError(
                f"Collection '{self.collection}' does not exist at {self.uri}; pass dim=... (the features' size) to "
                f"create it."
            )
        schema = pymilvus.MilvusClient.create_schema(auto_id=False, description=model or "")
        schema.add_field(ID_FIELD, pymilvus.DataType.INT64, is_primary=True)
        schema.add_field(VECTOR_FIELD, pymilvus.DataType.FLOAT_VECTOR, dim=dim)
        schema.add_field(PATH_FIELD, pymilvus.DataType.VARCHAR, max_length=MAX_PATH_LENGTH)
        index_params = self._client.prepare_index_params()
        # The build knobs go nested under "params", as pymilvus 2.x sent them: Milvus servers read that form, and
        # Milvus Lite 3 reads only that form (it drops the flat keys pymilvus 3 sends).
        index_params.add_index(
            field_name=VECTOR_FIELD, index_type=index_type, metric_type="COSINE", params={"params": params}
        )
        self._client.create_collection(
            self.collection,
            schema=schema,
            # Strong, so that a search sees the rows added just before it, as with a FAISS index.
            consistency_level="Strong",
            properties={MODEL_PROPERTY: model} if model else None,
        )
        # Not waiting for the index of an empty collection saves pymilvus' 0.5 s poll, and the AllocTimestamp call
        # behind it, which Milvus Lite does not implement and logs as an error with a traceback.
        self._client.create_index(self.collection, index_params, sync=False)
        self._client.load_collection(self.collection)
        self.dim, self.model, self.kind, self.params = dim, model, index_type, dict(params)

    def _open(self, dim: int | None, model: str | None, index_type: str | None):
        described = self._client.describe_collection(self.collection)
        fields = {field["name"]: field for field in described["fields"]}
        vector = fields.get(VECTOR_FIELD)
        if vector is None or ID_FIELD not in fields or PATH_FIELD not in fields:
            raise MilvusIndexError(
                f"Collection '{self.collection}' has fields {sorted(fields)}, not the {ID_FIELD}, {VECTOR_FIELD} and "
                f"{PATH_FIELD} of a MilvusIndex; choose another collection name."
            )
        self.dim = int(vector["params"]["dim"])
        self.model = (described.get("properties") or {}).get(MODEL_PROPERTY) or described.get("description") or None
        index = self._client.describe_index(self.collection, VECTOR_FIELD) or {}
        self.kind = index.get("index_type", "FLAT")
        build_knobs = INDEX_TYPES.get(self.kind, (frozenset(), frozenset()))[0]
        self.params = dict(index.get("params") or {k: int(v) for k, v in index.items() if k in build_knobs})
        if dim is not None and dim != self.dim:
            raise MilvusIndexError(
                f"Collection '{self.collection}' holds {self.dim}-dimensional features, not {dim}; use another "
                f"collection for this model."
            )
        if model is not None and self.model is not None and model != self.model:
            raise MilvusIndexError(
                f"Collection '{self.collection}' holds features of {self.model}, not {model}; use another collection "
                f"for this model."
            )
        if index_type is not None and index_type != self.kind:
            raise MilvusIndexError(
                f"Collection '{self.collection}' has a {self.kind} index, not {index_type}; leave index_type out to "
                f"open it, or use another collection."
            )
        self._client.load_collection(self.collection)  # a no-op when loaded; Milvus searches loaded collections only

    def add(self, features: ArrayLike, ids: ArrayLike | None = None, paths: Sequence[str] | None = None) -> None:
        """Insert features, in requests of `batch_size` rows.

        features : torch.Tensor or np.ndarray, shape = (n, dim) or (dim,); L2-normalised here
        ids : int64, shape = (n,), none of them in the collection yet; by default len(index), len(index) + 1, ...
            (give ids when several writers add, or after adding rows with ids of your own)
        paths : n strings (image paths or URLs) kept with the rows

        Nothing is inserted when an argument is refused: Milvus Lite would overwrite a row whose id is taken, and a
        Milvus server would keep both, so taken ids are an error here, as in `Index.add`. The check and the insert
        are separate requests: processes adding at the same time must give ids of their own (disjoint ranges).
        """
        features = _as_matrix(features, self.dim, "features")
        _check_nonzero(features, "features")
        n = features.shape[0]
        features = torch.nn.functional.normalize(features, dim=1).numpy()
        given = ids is not None
        if ids is None:
            start = len(self)
            ids = torch.arange(start, start + n, dtype=torch.int64)
        else:
            values = (ids.detach().cpu().numpy() if isinstance(ids, Tensor) else np.array(ids)).reshape(-1)
            if not np.issubdtype(values.dtype, np.integer) or values.shape[0] != n:
                raise MilvusIndexError(
                    f"ids must be {n} integers (one per feature row), got {values.dtype} {tuple(values.shape)}."
                )
            if n and int(values.min()) < 0:
                raise MilvusIndexError("ids must be non-negative; -1 marks a missing result in search.")
            if n and int(values.max()) > INT64_MAX:  # uint64 ids: Milvus's primary key is INT64
                raise MilvusIndexError(f"ids must fit in int64 (at most {INT64_MAX}), got {int(values.max())}.")
            ids = torch.from_numpy(values.astype(np.int64))
            if torch.unique(ids).shape[0] != n:
                raise MilvusIndexError("ids must be unique; Milvus keeps one row per id.")
        if paths is None:
            paths = [""] * n
        elif isinstance(paths, str) or len(paths) != n:
            raise MilvusIndexError(f"paths must be a list of {n} strings (one per feature row).")
        else:
            paths = [os.fspath(p) for p in paths]
            long = [i for i, p in enumerate(paths) if len(p.encode("utf-8", "surrogatepass")) > MAX_PATH_LENGTH]
            if long:
                raise MilvusIndexError(
                    f"paths[{long[0]}] is longer than the {MAX_PATH_LENGTH} bytes a Milvus VARCHAR holds; store a "
                    f"shorter key (a relative path, a hash) for it."
                )
        ids_list = ids.tolist()
        taken = self._taken(ids_list)
        if taken:
            hint = "give new ids" if given else "give ids= (the collection's ids are not 0 .. len - 1)"
            raise MilvusIndexError(f"ids already in collection '{self.collection}': {taken[:5]}; {hint}.")
        for start in range(0, n, self.batch_size):
            stop = min(start + self.batch_size, n)
            rows = [
                {ID_FIELD: ids_list[i], VECTOR_FIELD: features[i], PATH_FIELD: str(paths[i])}
                for i in range(start, stop)
            ]
            self._client.insert(self.collection, rows)

    def search(
        self, queries: ArrayLike, k: int = 10, *, nprobe: int | None = None, ef: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """The k nearest rows by cosine similarity, best first.

        queries : torch.Tensor or np.ndarray, shape = (q, dim) or (dim,)
        nprobe : IVF_FLAT / IVF_SQ8: how many of the `nlist` cells to scan (Milvus's default 10)
        ef : HNSW: the candidate list size (FAISS's efSearch); at least k
        returns (scores, ids): float32 and int64 tensors, shape = (q, min(k, len(self))); rows short of that
            many results end in score -inf and id -1
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise MilvusIndexError(f"k must be a positive integer, got {k!r}.")
        k = min(int(k), len(self))  # the answer is allocated up front: k past the collection's size is only memory
        knobs = {name: value for name, value in (("nprobe", nprobe), ("ef", ef)) if value is not None}
        if self.kind in INDEX_TYPES:
            knobs = _check_positive_ints(knobs, INDEX_TYPES[self.kind][1], self.kind, "search parameter")
        queries = _as_matrix(queries, self.dim, "queries")
        _check_nonzero(queries, "queries")
        queries = queries.numpy()
        scores = torch.full((len(queries), k), float("-inf"), dtype=torch.float32)
        ids = torch.full((len(queries), k), -1, dtype=torch.int64)
        if k == 0:  # an empty collection (Milvus refuses limit=0)
            return scores, ids
        for start in range(0, len(queries), SEARCH_BATCH):
            results = self._client.search(
                self.collection,
                data=queries[start : start + SEARCH_BATCH],
                limit=k,
                anns_field=VECTOR_FIELD,
                search_params={"metric_type": "COSINE", "params": knobs},
            )
            for row, hits in enumerate(results, start):
                for col, hit in enumerate(hits):
                    scores[row, col] = hit["distance"]
                    ids[row, col] = hit["id"]
        return scores, ids

    def _taken(self, ids: list[int]) -> list[int]:
        """Those of `ids` that the collection holds, sorted (for a run of consecutive ids, the first few)."""
        if ids and ids == list(range(ids[0], ids[0] + len(ids))):  # default ids, a shard load: one range query
            rows = self._client.query(
                self.collection, filter=f"{ID_FIELD} >= {ids[0]} and {ID_FIELD} <= {ids[-1]}", output_fields=[ID_FIELD], limit=5
            )
            return sorted(row[ID_FIELD] for row in rows)
        taken: list[int] = []
        for start in range(0, len(ids), GET_BATCH):
            rows = self._client.get(self.collection, ids=ids[start : start + GET_BATCH], output_fields=[ID_FIELD])
            taken.extend(row[ID_FIELD] for row in rows)
        return sorted(taken)

    def get_paths(self, ids: ArrayLike) -> list[str | None]:
        """The path stored with each id (None for an id that is not in the collection, -1, or added without one)."""
        # as Python ints, so that an id past int64 (from a URL, say) is one the collection lacks, not an OverflowError
        values = ids.cpu().numpy() if isinstance(ids, Tensor) else np.asarray(ids, dtype=object)
        ids = [int(i) for i in values.reshape(-1).tolist()]
        found: dict[int, str] = {}
        wanted = sorted({i for i in ids if 0 <= i <= INT64_MAX})
        for start in range(0, len(wanted), GET_BATCH):
            for row in self._client.get(
                self.collection, ids=wanted[start : start + GET_BATCH], output_fields=[PATH_FIELD]
            ):
                found[row[ID_FIELD]] = row[PATH_FIELD]
        return [found.get(i) or None for i in ids]

    def __len__(self) -> int:
        rows = self._client.query(self.collection, output_fields=["count(*)"], consistency_level="Strong")
        return int(rows[0]["count(*)"])

    def flush(self) -> None:
        """Seal the rows added so far into data files (Milvus Lite builds IVF/HNSW indexes for them then)."""
        self._client.flush(self.collection)

    def close(self) -> None:
        """Disconnect; for Milvus Lite, the last close in this process writes pending rows and frees the LOCK."""
        client, self._client = getattr(self, "_client", None), None
        if client is None:
            return
        client.close()
        if self._lite_path is not None:
            _release_lite(self._lite_path)

    def __enter__(self) -> MilvusIndex:  # noqa: PYI034 (typing.Self needs Python 3.11)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"MilvusIndex(uri={self.uri!r}, collection={self.collection!r}, dim={getattr(self, 'dim', None)}, "
            f"model={getattr(self, 'model', None)!r}, kind={getattr(self, 'kind', None)!r})"
        )


def load_shards_into_milvus(
    shards_dir: str | os.PathLike,
    uri: str | os.PathLike,
    collection: str,
    batch_size: int = 10_000,
    index_type: str | None = None,
    model: str | None = None,
    params: dict | None = None,
    token: str | None = None,
) -> MilvusIndex:
    """Stream Parquet shards (columns `path`, `embedding`) into a Milvus collection; returns the open index.

    Shards are read in file-name order, `batch_size` rows at a time; a row's id is its position across them.
    `model` and `dim` come from the directory's manifest.json when there is one. A collection that already holds
    rows is taken as an interrupted load of the same shards, and the load goes on after its last row; it is
    checked to be one (its first row of each shard and its last row must be the shards' own), else
    MilvusIndexError: appending after rows of other shards would skip some images and repeat others.
    """
    from .shards import open_shards

    shards = open_shards(shards_dir)
    model = model or shards.model
    total, dim = len(shards), shards.dim
    index = MilvusIndex(
        uri,
        collection,
        dim=int(dim),
        model=model,
        index_type=index_type,
        params=params,
        token=token,
        batch_size=batch_size,
    )
    try:
        done = len(index)
        if done > total:
            raise MilvusIndexError(
                f"Collection '{collection}' already holds {done} rows, more than the {total} in {shards_dir}; load "
                f"into a new collection."
            )
        if done:
            _check_loaded_prefix(index, shards, done, shards_dir)
        for position, paths, features in shards.batches(batch_size, start=done):
            index.add(features, ids=torch.arange(position, position + len(paths)), paths=paths)
        index.flush()
    except BaseException:
        index.close()
        raise
    return index


def _check_loaded_prefix(index: MilvusIndex, shards: Any, done: int, shards_dir: Any) -> None:
    """The collection's `done` rows must be the first `done` rows of `shards`, for a load to go on after them."""
    rows = sorted({int(s) for s in shards.starts[:-1] if s < done} | {done - 1})
    expected = torch.nn.functional.normalize(torch.from_numpy(shards.take(np.array(rows))), dim=1)
    found = {
        row[ID_FIELD]: row[VECTOR_FIELD]
        for start in range(0, len(rows), SEARCH_BATCH)  # vectors: a smaller batch than GET_BATCH's ids
        for row in index._client.get(index.collection, ids=rows[start : start + SEARCH_BATCH], output_fields=[VECTOR_FIELD])
    }
    for row, vector in zip(rows, expected):
        stored = found.get(row)
        if stored is None or not torch.allclose(torch.tensor(stored, dtype=torch.float32), vector, atol=1e-5):
            raise MilvusIndexError(
                f"Collection '{index.collection}' holds {done} rows, but its row {row} is not row {row} of the shards "
                f"in {shards_dir}: it was loaded from other shards (or from a folder with a shard missing); load "
                f"into a new collection."
            )
