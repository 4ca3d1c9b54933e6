"""`Index`: nearest-neighbour search over FAISS, exact or approximate, one class for every kind.

| kind       | FAISS index                          | search knob | memory per vector (d dims, float32)     |
| ---------- | ------------------------------------ | ----------- | ---------------------------------------- |
| `flat`     | IndexFlatIP / IndexFlatL2 (exact)    | -           | 4d                                       |
| `ivf_flat` | IndexIVFFlat (`nlist` k-means cells) | `nprobe`    | 4d + 8                                   |
| `ivf_sq8`  | IndexIVFScalarQuantizer, 8 bits      | `nprobe`    | d + 8: a quarter                         |
| `ivf_pq`   | IndexIVFPQ (`m` codes of `nbits`)    | `nprobe`    | m * nbits / 8 + 8: the least, lower recall |
| `hnsw`     | IndexHNSWFlat (`M` links), IDMap     | `efSearch`  | 4d + 8M + 24: fastest at high recall     |
| `auto`     | one of the above, by size and memory budget, then tuned to a target recall              |

Every kind also keeps 8 bytes per vector for the caller's ids (below).

Metrics: "cosine" (vectors and queries L2-normalised, then inner product), "ip" (inner product as given) and
"l2". Scores are "higher is better" for every metric: the cosine similarity, the inner product, or the NEGATIVE
SQUARED L2 distance (FAISS's own l2 distance is squared; we flip its sign so that one rule sorts every kind).

Ids: inside FAISS every vector's id is its row: 0, 1, ... in the order the caller added them (a flat index's own
numbering, the ids an IVF index keeps in its lists, and for HNSW, which has no `add_with_ids`, an IndexIDMap around
it); `Index` keeps an int64 array that maps rows to the caller's ids, the same way for every kind, so `ids` and
`paths` are in the order added. The caller's ids are non-negative and unique; by default they continue from the
largest id so far (0..n-1 for a new index). Rows rather than FAISS's insertion positions let `build_index` hold
its tuning queries out of the index until tuning is done (see `build_index`).
A result slot that an approximate search could not fill (an IVF search whose `nprobe` cells hold fewer than k
vectors) has id -1 and score -inf, as FAISS pads it.

Files (`Index.save(directory)`, `load_index(directory)`): FAISS's own `index.faiss` (faiss.write_index),
`ids.npy` (np.save, allow_pickle=False), `paths.json` (when paths are kept) and `meta.json` (format version, kind,
metric, dim, count, params, model, and the size and SHA256 of each file, checked before FAISS reads a byte).
Nothing is pickled, so loading runs no code from the files.

faiss is imported when an index is built or loaded, never by `import openclip_lite`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import warnings
from collections.abc import Sequence
from typing import Any, Union

import numpy as np
import torch
from torch import Tensor

from .errors import IndexFileError, InputError, require

__all__ = ["KINDS", "METRICS", "Index", "build_index", "estimate_bytes", "load_index", "parse_memory", "plan"]

ArrayLike = Union[Tensor, np.ndarray, Sequence]  # evaluated at run time: `|` needs Python 3.10

KINDS = ("flat", "ivf_flat", "ivf_sq8", "ivf_pq", "hnsw")
METRICS = ("cosine", "ip", "l2")
# The knobs each kind takes, in FAISS's names; the last one of each is its search knob, the rest build it.
KNOBS: dict[str, tuple[str, ...]] = {
    "flat": (),
    "ivf_flat": ("nlist", "nprobe"),
    "ivf_sq8": ("nlist", "nprobe"),
    "ivf_pq": ("nlist", "m", "nbits", "nprobe"),
    "hnsw": ("M", "efConstruction", "efSearch"),
}
SEARCH_KNOB = {"ivf_flat": "nprobe", "ivf_sq8": "nprobe", "ivf_pq": "nprobe", "hnsw": "efSearch"}

# Below this many vectors `auto` stays exact: a flat scan of 10k x 512 floats is ~5 MFLOP, well under a millisecond
# a query, and too few points to train IVF cells (4 * sqrt(10k) = 400 cells want 39 * 400 = 15.6k training points).
FLAT_THRESHOLD = 10_000
HNSW_M = 32  # FAISS's and autofaiss' usual M: recall@10 0.96 at efSearch 56-96 for 100k-1M CLIP-like vectors
HNSW_EF_CONSTRUCTION = 40  # FAISS's default: higher builds a slightly better graph for a proportionally longer build
MIN_POINTS_PER_CELL = 39  # FAISS's k-means warns below 39 training points per centroid
TRAIN_MAX = 100_000  # k-means costs points x cells x dim per iteration; this cap keeps a 1M build to minutes on 2 cores
# PQ codebooks live in d/m (2-8) dims, where 64 points per centroid and 10 k-means iterations (as FAISS uses for the
# cells) already settle: at 100k x 512, PQ128 trained so reached recall 0.756, FAISS's defaults (256, 25) 0.757, and
# 10 iterations take half the time of 25
PQ_POINTS_PER_CENTROID, PQ_KMEANS_ITERATIONS = 64, 10
DEFAULT_RECALL_QUERIES = 1000  # 10k (query, neighbour) pairs at k=10: recall known to about +-0.005
CHUNK_ROWS = 65_536  # rows copied at once when the held-out split needs a subset: 128 MB at 512 dims
FORMAT, FORMAT_VERSION = "openclip-lite.index", 1
FILES = {"index": "index.faiss", "ids": "ids.npy", "paths": "paths.json", "meta": "meta.json"}
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _faiss() -> Any:
    return require("faiss", "index")


# ---------------------------------------------------------------------------------------------------- inputs


def _as_matrix(x: ArrayLike, what: str) -> np.ndarray:
    """`x` as a C-contiguous float32 array, shape = (n, dim); a 1-D input is one row. Rejects NaN and inf."""
    if isinstance(x, Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2:
        raise InputError(f"{what} must have shape (n, dim) or (dim,), got {x.shape}")
    if not np.isfinite(x).all():
        bad = int(np.flatnonzero(~np.isfinite(x).all(axis=1))[0])
        raise InputError(f"{what} contain NaN or infinite values (row {bad} is the first); check the encoder's output")
    return x


def _normalised(x: np.ndarray, what: str) -> np.ndarray:
    """Rows of `x` scaled to unit L2 norm; a zero row has no direction, so it is an error.

    A new array, except when every row already has norm 1 (to float32 precision), as CLIP features usually do:
    then `x` itself, which saves a copy of all the features (2 GB for 1M x 512).
    """
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        bad = int(np.flatnonzero(norms[:, 0] == 0)[0])
        raise InputError(f"{what} row {bad} is all zeros, which has no cosine similarity; drop it or use metric='ip'")
    return x if np.all(np.abs(norms - 1) < 1e-6) else x / norms


def parse_memory(budget: int | str) -> int:
    """Bytes from an int or a size string: "4G", "512M", "1.5GB", "100KiB" (units of 1024, like autofaiss)."""
    if isinstance(budget, (int, np.integer)) and not isinstance(budget, bool):
        if budget <= 0:
            raise InputError(f"memory_budget must be positive, got {budget}")
        return int(budget)
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([KMGT]?)(?:I?B)?\s*", str(budget).upper())
    if isinstance(budget, bool) or match is None or float(match[1]) <= 0:
        raise InputError(f"memory_budget must be a byte count or a size such as '512M' or '4G', got {budget!r}")
    return int(float(match[1]) * _UNITS[match[2]])


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


# ---------------------------------------------------------------------------------------------------- sizes


def _default_nlist(n: int) -> int:
    """About 4 * sqrt(n) cells (FAISS's guideline), but at least 39 training points in each."""
    return max(1, min(round(4 * math.sqrt(n)), min(n, TRAIN_MAX) // MIN_POINTS_PER_CELL))


def _default_nbits(n: int) -> int:
    """8-bit PQ codebooks (256 centroids) when there are 39 training points for each, fewer bits below that."""
    return min(8, max(1, int(math.log2(max(1, min(n, TRAIN_MAX)) / MIN_POINTS_PER_CELL + 1e-9))))


def _pq_dims(m: int, dim: int) -> int:
    """The dimensions PQ's m codes cover: all dim when m divides it, else the m * (dim // m) of most variance."""
    return m * (dim // m)


def _pq_sizes(dim: int) -> list[int]:
    """The code sizes m that ivf_pq takes for `dim`-dimensional vectors, largest first: those that divide dim, and
    those that leave at most an eighth of the dimensions (the ones of least variance, after PCA) to drop.

    Why not only divisors: memory is bought a byte per vector at a time, and with 512 dims the divisors jump from
    128 to 256. At 100k x 512 with IVF cells, PCA to 468 dims and m = 234 reached recall@10 0.898 where m = 128
    reached 0.772 (and m = 256, at 22 more bytes a vector, 0.924); rotating into 702 dims, zero-padded, for 3-dim
    sub-vectors instead of dropping any reached 0.866 at three times the search time.
    """
    return [m for m in range(dim, 0, -1) if dim - _pq_dims(m, dim) <= dim // 8]


def estimate_bytes(kind: str, n: int, dim: int, metric: str = "cosine", **params: int) -> int:
    """The memory an index of `n` vectors takes (FAISS's structures plus our 8-byte ids), from its parameters.

    Within a few percent of the saved size; the in-memory size of IVF lists can be up to ~1.5x their codes while
    vectors are being added (std::vector grows by doubling).
    """
    ids = 8 * n
    if kind == "flat":
        return 4 * dim * n + ids
    if kind == "hnsw":
        # level 0 holds 2M int32 links per vector, the upper levels M * 1/(M-1) on average; plus an 8-byte offset
        # and a 4-byte level per vector
        M = params.get("M", HNSW_M)
        return n * (4 * dim + 4 * (2 * M + 1) + 12) + 8 * n + ids  # + the IDMap's row per vector
    nlist = params.get("nlist") or _default_nlist(n)
    coarse = 4 * dim * nlist + 8 * n  # the cell centroids, and FAISS's own 8-byte id per vector in its lists
    if kind == "ivf_flat":
        return coarse + 4 * dim * n + ids
    if kind == "ivf_sq8":
        return coarse + 2 * 4 * dim + dim * n + ids
    if kind == "ivf_pq":
        m, nbits = params["m"], params.get("nbits", 8)
        codebooks = 4 * _pq_dims(m, dim) * 2**nbits
        # PCA, when m does not divide dim: FAISS keeps the mean, the eigenvalues, all eigenvectors and the projection
        pca = 4 * (2 * dim + dim * dim + _pq_dims(m, dim) * dim) if dim % m else 0
        # for L2, IVFPQ precomputes a table of nlist x m x 2**nbits floats (when it is under FAISS's 2 GB limit)
        table = 4 * nlist * m * 2**nbits if metric == "l2" and 4 * nlist * m * 2**nbits <= 2**31 else 0
        return coarse + codebooks + pca + table + math.ceil(m * nbits / 8) * n + ids
    raise InputError(f"unknown index kind {kind!r}; use one of: {', '.join(KINDS)}")


def _choose(n: int, dim: int, metric: str, budget: int | None) -> tuple[str, dict]:
    """`auto`'s choice, as autofaiss makes it: exact when small, HNSW when it fits, then ever smaller IVF codes."""

    def fits(kind: str, **params: int) -> bool:
        return budget is None or estimate_bytes(kind, n, dim, metric, **params) <= budget

    if n < FLAT_THRESHOLD and fits("flat"):
        return "flat", {}
    for kind in ("hnsw", "ivf_flat", "ivf_sq8"):
        if fits(kind):
            return kind, {}
    nbits = _default_nbits(n)
    # the most bytes per code that fit: PQ's error falls with every bit, so recall rises with m
    for m in _pq_sizes(dim):
        if fits("ivf_pq", m=m, nbits=nbits):
            return "ivf_pq", {"m": m, "nbits": nbits}
    smallest = estimate_bytes("ivf_pq", n, dim, metric, m=1, nbits=nbits)
    raise InputError(
        f"memory_budget of {budget:,} bytes is too small for {n:,} vectors: even the smallest index (IVF-PQ with "
        f"one {nbits}-bit code per vector, mostly ids and centroids) needs {smallest:,}; raise the budget"
    )


# ---------------------------------------------------------------------------------------------------- the index


class Index:
    """Nearest-neighbour search over a FAISS index: `add`, `search -> (scores, ids)`, `len`.

    Made by `build_index` or `load_index`. Attributes: `kind`, `metric`, `dim`, `params` (the knobs in FAISS's
    names: nlist / m / nbits / nprobe, or M / efConstruction / efSearch), `model` (the name of the model that made
    the features, or None), `ids` (int64 tensor, shape = (n,)), `paths` (one string per vector, or None),
    `tuned_recall` (what the last `tune` measured, or None), `nbytes`.
    """

    def __init__(
        self,
        faiss_index: Any,
        kind: str,
        metric: str,
        ids: np.ndarray,
        paths: list[str] | None = None,
        model: str | None = None,
        params: dict | None = None,
        *,
        read_only: bool = False,
        tuned_recall: float | None = None,
    ):
        self._faiss = faiss_index
        self.kind, self.metric, self.model = kind, metric, model
        self.dim = int(faiss_index.d)
        self.params = dict(params or {})
        self.tuned_recall = tuned_recall
        self._ids = np.asarray(ids, dtype=np.int64)
        self._paths = paths
        self._order: np.ndarray | None = None  # argsort of the ids, for get_paths; made when first needed
        self._read_only = read_only  # mmap'd files: FAISS aborts the process (not an exception) on writes to them
        self._file_bytes: int | None = None  # an mmap'd index's file size: write_index writes only a reference to mmap'd lists
        self._gpu_resources: Any = None  # kept alive as long as a GPU index uses it
        if kind in SEARCH_KNOB and SEARCH_KNOB[kind] in self.params:
            self._set_knob(self.params[SEARCH_KNOB[kind]])

    # ---- the three verbs

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, features: ArrayLike, ids: ArrayLike | None = None, paths: Sequence[str] | None = None) -> None:
        """Add vectors (trained kinds keep the cells and codebooks they were built with).

        features : torch.Tensor or np.ndarray, shape = (n, dim) or (dim,); L2-normalised here for cosine
        ids : n non-negative unique integers not in the index yet; default: continuing from the largest id
        paths : n strings, one per vector; needed exactly when the index keeps paths
        """
        if self._read_only:
            raise InputError("this index was loaded with mmap=True and is read-only; load it with mmap=False to add")
        x = self._prepare(features, "features")
        new_ids = _check_ids(ids, len(x), self._ids)
        if (paths is None) != (self._paths is None) and len(x):
            keeps = (
                "keeps a path for every vector; pass paths=[...]"
                if paths is None
                else "keeps no paths; leave paths out"
            )
            raise InputError(f"this index {keeps} with the features")
        paths = _check_paths(paths, len(x))
        self._add_rows(x, np.arange(len(self), len(self) + len(x)))
        self._ids = np.concatenate([self._ids, new_ids])
        if paths is not None:
            self._paths.extend(paths)

    def search(self, queries: ArrayLike, k: int = 10) -> tuple[Tensor, Tensor]:
        """The k best vectors for each query, best first.

        queries : torch.Tensor or np.ndarray, shape = (q, dim) or (dim,) for one query (answered as q = 1)
        k : results per query, at least 1; fewer when the index holds fewer (as `openclip_lite.search`)

        Returns (scores, ids): float32 and int64 tensors, shape = (q, min(k, len(index))). Scores are higher-is-better for every
        metric (cosine similarity, inner product, or negative squared L2 distance). A slot an approximate search
        could not fill has id -1 and score -inf.
        """
        if len(self) == 0:
            raise InputError("the index is empty; add vectors to it before searching")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise InputError(f"k must be a positive integer, got {k!r}")
        k = min(k, len(self))
        x = self._prepare(queries, "queries")
        scores, positions = self._faiss.search(x, int(k))
        return self._answer(scores, positions)

    # ---- recall

    def measure_recall(
        self,
        k: int = 10,
        queries: ArrayLike | None = None,
        *,
        features: ArrayLike | None = None,
        n_queries: int = DEFAULT_RECALL_QUERIES,
    ) -> float:
        """Recall@k of `search` against exact search: the mean fraction of the true k best that it returns.

        queries : shape = (q, dim), e.g. encoded texts (for text search, pass these: text features sit apart from
            image features in CLIP's space, and recall on them can be lower). By default `n_queries` of the
            indexed vectors (a fixed random sample), each left out of both answers: otherwise every query finds
            itself, which is easy and would lift recall by up to 1/k. For hnsw this is still optimistic, since the
            graph links each indexed vector to its neighbours (`build_index` tunes with held-out vectors instead);
            pass new queries there.
        features : the indexed vectors in the order added (shape = (len, dim)), for the exact answers. By default
            they are read back from the index: exact for flat, ivf_flat and hnsw; for ivf_sq8 and ivf_pq those
            are the quantised vectors, so the figure then leaves out the quantisation error (pass the features).
        """
        exact, approximate = self._recall_answers(k, queries, features, n_queries)
        return _recall(exact, approximate(self))

    def tune(
        self,
        target_recall: float = 0.95,
        k: int = 10,
        queries: ArrayLike | None = None,
        *,
        features: ArrayLike | None = None,
        n_queries: int = DEFAULT_RECALL_QUERIES,
    ) -> dict:
        """Set the search knob (nprobe or efSearch) to the smallest value whose recall@k reaches `target_recall`.

        Recall is measured as `measure_recall` does (same arguments), and must reach the target with two standard
        errors to spare (about +0.006 with 1000 queries at 0.95, counting the queries as independent). Other
        queries get another figure: on clustered features, where the queries of one cluster are alike, another
        1000 can differ by 0.01-0.02, so ask for a little more than you need. Values are tried doubling (nprobe 1,
        2, 4, ...; efSearch 16, 32, ..., never below 16), then the last step is halved twice; when recall stops
        rising short of the target (PQ's quantisation error caps it), the smallest value at the plateau is kept
        and a warning says so.
        Returns `params` (with the new knob); `tuned_recall` holds the recall measured with it.
        """
        if not 0 < target_recall <= 1:
            raise InputError(f"target_recall must be in (0, 1], got {target_recall}")
        exact, approximate = self._recall_answers(k, queries, features, n_queries)
        return self._tune_with(exact, approximate, target_recall)

    def _tune_with(self, exact: np.ndarray, approximate, target_recall: float) -> dict:
        """`tune` on given answers: exact rows (q, k) and a function index -> approximate rows (q, k)."""
        k = exact.shape[1]
        if self.kind == "flat":
            self.tuned_recall = _recall(exact, approximate(self))
            return dict(self.params)
        name = SEARCH_KNOB[self.kind]
        ceiling = self.params["nlist"] if name == "nprobe" else max(4096, 2 * k)
        values = [v for v in (2**i for i in range(30)) if v < ceiling and (name == "nprobe" or v >= max(16, k))]
        values.append(ceiling)
        tried: dict[int, float] = {}

        def reaches(value: int) -> bool:
            if value not in tried:
                self._set_knob(value)
                recalls = _recalls(exact, approximate(self))
                tried[value] = float(recalls.mean())
                margins[value] = 2 * float(recalls.std()) / math.sqrt(len(recalls))
            return tried[value] - margins[value] >= target_recall

        margins: dict[int, float] = {}
        chosen = None
        for i, value in enumerate(values):
            if reaches(value):
                chosen = value
                # efSearch stays >= 16 (FAISS's default): below it the walk costs little less, and recall swings
                # with every query set (at efSearch = k = 10 two samples of 1000 queries differed by 0.025)
                low = values[i - 1] if i else chosen
                for _ in range(2):  # the doubling overshoots; two halvings get within a quarter of a step
                    middle = (low + chosen) // 2
                    if middle in (low, chosen):
                        break
                    if reaches(middle):
                        chosen = middle
                    else:
                        low = middle
                break
            if (
                i >= 2
                and tried[value] - tried[values[i - 1]] < 0.002
                and tried[values[i - 1]] - tried[values[i - 2]] < 0.01
            ):
                break  # a plateau: more cells or candidates no longer help
        if chosen is None:
            best = max(tried.values())
            chosen = min(v for v, r in tried.items() if r >= best - 0.002)
            warnings.warn(
                f"{self.kind} reached recall@{k} {best:.3f}, short of the target {target_recall} ({name} up to "
                f"{max(tried)}); kept {name}={chosen}. For more recall, use a larger m (ivf_pq), ivf_sq8, or hnsw.",
                stacklevel=3,
            )
        self._set_knob(chosen)
        self.tuned_recall = tried[chosen]
        return dict(self.params)

    def _recall_answers(self, k: int, queries: ArrayLike | None, features: ArrayLike | None, n_queries: int):
        """(exact rows (q, k), a function index -> approximate rows (q, k)) for recall@k."""
        faiss = _faiss()
        n = len(self)
        leave_one_out = queries is None
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n - leave_one_out:
            raise InputError(f"k must be from 1 to {n - leave_one_out} for an index of {n} vectors, got {k!r}")
        if features is None:
            base = self._reconstruct_all()
        else:
            base = self._prepare(features, "features")
            if len(base) != n:
                raise InputError(f"features must be the {n} indexed vectors in the order added, got {len(base)} rows")
        metric = faiss.METRIC_L2 if self.metric == "l2" else faiss.METRIC_INNER_PRODUCT
        if leave_one_out:
            chosen = np.sort(
                np.random.default_rng(0).choice(n, min(_positive_int("n_queries", n_queries), n), replace=False)
            )
            xq = np.ascontiguousarray(base[chosen])
            _, exact = faiss.knn(xq, base, k + 1, metric)
            exact = _without(exact, chosen, k)
            return exact, lambda index: _without(index._faiss.search(xq, k + 1)[1], chosen, k)
        xq = self._prepare(queries, "queries")
        _, exact = faiss.knn(xq, base, k, metric)
        return exact, lambda index: index._faiss.search(xq, k)[1]

    # ---- files

    def save(self, path: str | os.PathLike) -> None:
        """Write the index to the directory `path` (created; an existing index there is replaced).

        Files: index.faiss (faiss.write_index), ids.npy, paths.json (when paths are kept), meta.json. Each file is
        written under a temporary name and renamed, meta.json last, so a reader never mixes old and new files
        unnoticed (meta.json holds the size and SHA256 of the others).
        """
        if self._read_only:  # write_index writes mmap'd IVF lists as a reference to the file they are read from
            raise InputError("this index was loaded with mmap=True and is read-only; load it with mmap=False to save it")
        faiss = _faiss()
        path = os.fspath(path)
        check_save_path(path)
        os.makedirs(path, exist_ok=True)
        files: dict[str, dict] = {}

        def write(name: str, writer) -> None:
            temporary = os.path.join(path, f".{name}.tmp{os.getpid()}")
            try:
                writer(temporary)
                files[name] = _file_record(temporary)
                os.replace(temporary, os.path.join(path, name))
            finally:
                if os.path.exists(temporary):
                    os.remove(temporary)

        def write_ids(file: str) -> None:
            with open(file, "wb") as f:
                np.save(f, self._ids, allow_pickle=False)

        def write_text(text: str):
            def writer(file: str) -> None:
                with open(file, "w", encoding="utf-8") as f:
                    f.write(text)

            return writer

        write(FILES["index"], lambda file: faiss.write_index(self._cpu_index(), file))
        write(FILES["ids"], write_ids)
        if self._paths is not None:
            write(FILES["paths"], write_text(json.dumps(self._paths, ensure_ascii=False)))
        elif os.path.exists(os.path.join(path, FILES["paths"])):
            os.remove(os.path.join(path, FILES["paths"]))
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "metric": self.metric,
            "dim": self.dim,
            "count": len(self),
            "params": self.params,
            "model": self.model,
            "tuned_recall": self.tuned_recall,
            "faiss_version": faiss.__version__,
            "files": files,
        }
        write(FILES["meta"], write_text(json.dumps(meta, indent=1)))

    # ---- properties

    @property
    def ids(self) -> Tensor:
        """The id of every vector in the order added, int64, shape = (n,) (a copy)."""
        return torch.from_numpy(self._ids.copy())

    @property
    def paths(self) -> list[str] | None:
        """The path kept with every vector in the order added, or None when the index keeps none (do not modify)."""
        return self._paths

    def get_paths(self, ids: ArrayLike) -> list[str | None]:
        """The path kept with each id, as `search` returns them (None for an id not in the index, or -1)."""
        values = ids.cpu().numpy() if isinstance(ids, Tensor) else np.asarray(ids, dtype=object)
        wanted = [int(i) for i in values.reshape(-1).tolist()]  # Python ints: an id past int64 is just not there
        if self._paths is None:
            return [None] * len(wanted)
        if self._order is None or len(self._order) != len(self):
            self._order = np.argsort(self._ids, kind="stable")
        sorted_ids = self._ids[self._order]
        found = []
        for i in wanted:
            at = int(np.searchsorted(sorted_ids, i)) if 0 <= i <= np.iinfo(np.int64).max else len(sorted_ids)
            found.append(self._paths[self._order[at]] if at < len(sorted_ids) and sorted_ids[at] == i else None)
        return found

    @property
    def nbytes(self) -> int:
        """The index's size in bytes: what faiss.write_index writes (codes, lists' ids, graph, centroids) + ids."""
        if self._file_bytes is not None:
            return self._file_bytes + self._ids.nbytes
        faiss = _faiss()
        size = 0

        def count(chunk: bytes) -> None:
            nonlocal size
            size += len(chunk)

        faiss.write_index(self._cpu_index(), faiss.PyCallbackIOWriter(count))
        return size + self._ids.nbytes

    def __repr__(self) -> str:
        return (
            f"Index(kind={self.kind!r}, metric={self.metric!r}, dim={self.dim}, len={len(self)}, params={self.params})"
        )

    # ---- inside

    def _prepare(self, x: ArrayLike, what: str) -> np.ndarray:
        x = _as_matrix(x, what)
        if x.shape[1] != self.dim:
            made_by = f" ({self.model})" if self.model else ""
            raise InputError(
                f"{what} have {x.shape[1]} dimensions but this index holds {self.dim}-dimensional vectors; "
                f"use features from the model that made the index{made_by}"
            )
        return _normalised(x, what) if self.metric == "cosine" else x

    def _answer(self, scores: np.ndarray, positions: np.ndarray) -> tuple[Tensor, Tensor]:
        missing = positions < 0
        ids = np.where(missing, -1, self._ids[np.maximum(positions, 0)])
        if self.metric == "l2":
            scores = -scores
        scores = np.where(missing, -np.inf, scores).astype(np.float32)
        return torch.from_numpy(scores), torch.from_numpy(ids.astype(np.int64))

    def _set_knob(self, value: int) -> None:
        name = SEARCH_KNOB[self.kind]
        value = _positive_int(name, value)
        faiss = _faiss()
        if self._gpu_resources is not None:
            faiss.GpuParameterSpace().set_index_parameter(self._faiss, name, value)
        elif self.kind == "hnsw":
            faiss.downcast_index(self._faiss.index).hnsw.efSearch = value
        else:
            faiss.extract_index_ivf(self._faiss).nprobe = value
        self.params[name] = value

    def _cpu_index(self) -> Any:
        return self._faiss if self._gpu_resources is None else _faiss().index_gpu_to_cpu(self._faiss)

    def _reconstruct_all(self) -> np.ndarray:
        """The indexed vectors by row, shape = (n, dim), as the index stores them (decoded, for sq8 and pq)."""
        faiss_index = self._cpu_index()
        if self.kind == "hnsw":  # the graph's storage is in insertion order; the IDMap says which row each is
            vectors = np.empty((len(self), self.dim), dtype=np.float32)
            vectors[_faiss().vector_to_array(faiss_index.id_map)] = faiss_index.index.reconstruct_n(0, len(self))
            return vectors
        # IndexIVF.reconstruct_n(0, n) looks the rows up in its lists, so it needs no direct map
        return faiss_index.reconstruct_n(0, len(self))

    def _add_rows(self, x: np.ndarray, rows: np.ndarray) -> None:
        if self.kind == "flat":
            self._faiss.add(x)  # a flat index's own numbering is the row
        else:
            self._faiss.add_with_ids(x, rows.astype(np.int64))

    def _to_gpu(self, gpu: int | None) -> Index:
        """Move a flat or IVF index to GPU number `gpu` (faiss-gpu; see `_gpu_number`), or leave it (None)."""
        if gpu is None:
            return self
        faiss = _faiss()
        resources = faiss.StandardGpuResources()
        try:
            self._faiss = faiss.index_cpu_to_gpu(resources, gpu, self._faiss)
        except RuntimeError as e:
            raise InputError(
                f"FAISS could not move this {self.kind} index to cuda:{gpu} ({e}); use device='cpu'"
            ) from e
        self._gpu_resources = resources
        if self.kind in SEARCH_KNOB and SEARCH_KNOB[self.kind] in self.params:
            self._set_knob(self.params[SEARCH_KNOB[self.kind]])
        return self


def _gpu_number(device: str | torch.device, kind: str, read_only: bool = False) -> int | None:
    """None for device "cpu", else the GPU to put a `kind` index on; ValueError when FAISS cannot (checked before
    any work is done)."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InputError(f"unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:N'") from e
    if device.type == "cpu":
        return None
    faiss = _faiss()
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if device.type != "cuda" or gpus == 0 or (device.index or 0) >= gpus:
        raise InputError(
            f"device {str(device)!r}: this faiss ({faiss.__version__}) sees {gpus} GPUs; install faiss-gpu "
            f"(e.g. pip install faiss-gpu-cu12) on a CUDA machine, or use device='cpu'"
        )
    if kind == "hnsw":
        raise InputError("FAISS has no GPU HNSW; use device='cpu', or kind='ivf_flat' / 'ivf_sq8' on the GPU")
    if read_only:
        raise InputError("an mmap'd index cannot be copied to the GPU; load it with mmap=False")
    return device.index or 0


def _check_ids(ids: ArrayLike | None, n: int, existing: np.ndarray) -> np.ndarray:
    """`ids` as int64, shape = (n,), checked: non-negative, unique, none of `existing`; default: after the largest."""
    if ids is None:
        start = int(existing.max()) + 1 if len(existing) else 0
        return np.arange(start, start + n, dtype=np.int64)
    ids = ids.detach().cpu().numpy() if isinstance(ids, Tensor) else np.asarray(ids)
    if ids.ndim != 1 or len(ids) != n or (n and not np.issubdtype(ids.dtype, np.integer)):
        raise InputError(f"ids must be {n} integers (one per feature row), got {ids.dtype} {ids.shape}")
    if n and (ids.min() < 0 or ids.max() > np.iinfo(np.int64).max):
        raise InputError("ids must be non-negative int64 values; -1 marks an empty result slot")
    ids = ids.astype(np.int64)
    if len(np.unique(ids)) != n:
        raise InputError("ids must be unique; the same id twice would make search answers ambiguous")
    taken = ids[np.isin(ids, existing)]
    if len(taken):
        raise InputError(f"ids already in the index: {taken[:5].tolist()}; give new ids or leave ids out")
    return ids


def _check_paths(paths: Sequence[str] | None, n: int) -> list[str] | None:
    if paths is None:
        return None
    if isinstance(paths, (str, bytes)) or len(paths) != n or not all(isinstance(p, str) for p in paths):
        raise InputError(f"paths must be a list of {n} strings (one per feature row)")
    return list(paths)


def _without(positions: np.ndarray, own: np.ndarray, k: int) -> np.ndarray:
    """Each row of `positions` (q, k + 1) without its own query's position, cut to k (the last dropped if absent)."""
    keep = positions != own[:, None]
    keep[keep.all(axis=1), -1] = False
    return positions[keep].reshape(len(positions), k)


def _recalls(exact: np.ndarray, approximate: np.ndarray) -> np.ndarray:
    """|approximate ∩ exact| / k for each query, shape = (q,); -1 (an unfilled slot) matches nothing."""
    hits = (approximate[:, :, None] == exact[:, None, :]) & (approximate[:, :, None] >= 0)
    return hits.any(axis=2).mean(axis=1)


def _recall(exact: np.ndarray, approximate: np.ndarray) -> float:
    return float(_recalls(exact, approximate).mean())


# ---------------------------------------------------------------------------------------------------- build


def build_index(
    features: ArrayLike | str | os.PathLike,
    ids: ArrayLike | None = None,
    kind: str = "auto",
    metric: str = "cosine",
    *,
    paths: Sequence[str] | None = None,
    model: str | None = None,
    memory_budget: int | str | None = None,
    target_recall: float | None = 0.95,
    device: str | torch.device = "cpu",
    **params: int,
) -> Index:
    """Build an index over `features` and, for approximate kinds, tune its search knob to `target_recall`.

    features : torch.Tensor or np.ndarray, shape = (n, dim); float, finite (L2-normalised here for cosine); or
        the folder of Parquet shards that `distributed.embed` writes (local or a pyarrow URI), streamed a shard
        batch at a time (IVF kinds train on a random sample), its paths and model kept unless given
    ids : n non-negative unique integers (default 0..n-1: for shards, the row's position across them)
    kind : "flat", "ivf_flat", "ivf_sq8", "ivf_pq", "hnsw" or "auto" (picks by n and memory_budget: flat below
        10k vectors, else HNSW when it fits, else ivf_flat, ivf_sq8, then ivf_pq with the largest m that fits)
    metric : "cosine", "ip" or "l2"
    paths : one string per vector (the image it came from), kept with the index; default for shards: theirs
    model : the name of the model that made the features, kept with the index; default for shards: the manifest's
    memory_budget : bytes (int) or a size ("512M", "4G") the index may take; checked for every kind
    target_recall : recall@10 to tune nprobe / efSearch to (see `Index.tune`), measured against exact search
        with 1000 of the vectors (a tenth of them, when fewer) as queries, held out of the index until tuning is
        done and added then; None skips tuning, as does giving nprobe / efSearch yourself
    device : "cpu", or "cuda" / "cuda:N" to search flat and IVF indexes on a GPU (needs faiss-gpu)
    params : knobs in FAISS's names: nlist, m, nbits, nprobe (IVF kinds); M, efConstruction, efSearch (hnsw).
        Defaults: nlist ~ 4 sqrt(n), m the most that fits memory_budget (else dim / 4), nbits 8 (fewer below
        ~10k vectors, so that each of the 2**nbits centroids has 39 training points), M 32, efConstruction 40
    """
    faiss = _faiss()
    if target_recall is not None and not 0 < target_recall <= 1:
        raise InputError(f"target_recall must be in (0, 1], or None to skip tuning; got {target_recall}")
    _check_kind_and_metric(kind, metric)
    source = _source(features)
    n, dim = len(source), source.dim
    ids = _check_ids(ids, n, np.zeros(0, dtype=np.int64))
    paths = _check_paths(paths, n)
    model = model or source.model
    kind, params = plan(n, dim, kind, metric, memory_budget, **params)
    gpu = _gpu_number(device, kind)

    def prepare(x: np.ndarray, first_row: int = 0) -> np.ndarray:
        x = _as_matrix(x, f"features (from row {first_row})" if first_row else "features")
        return _normalised(x, "features") if metric == "cosine" else x

    faiss_metric = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
    faiss_index = faiss.index_factory(dim, _factory_string(kind, params, dim), faiss_metric)
    rng = np.random.default_rng(0)  # fixed: the same features give the same index
    if kind.startswith("ivf"):  # cells (and codebooks) learnt from up to TRAIN_MAX vectors drawn at random
        sample = np.arange(n) if n <= TRAIN_MAX else np.sort(rng.choice(n, TRAIN_MAX, replace=False))
        _train(faiss, faiss_index, prepare(source.take(sample)), kind)
    elif kind == "hnsw":
        faiss.downcast_index(faiss_index.index).hnsw.efConstruction = params["efConstruction"]
    paths_from_source = paths is None and source.has_paths  # shards carry each row's path: kept, unless given
    if paths_from_source:
        paths = []
    index = Index(faiss_index, kind, metric, ids, paths, model, params)  # `paths` is filled below, batch by batch
    knob = SEARCH_KNOB.get(kind)
    held_out = min(DEFAULT_RECALL_QUERIES, n // 10)
    tuning = knob is not None and knob not in params and target_recall is not None and held_out >= 2
    # Tuning queries are indexed vectors held out of the index until tuning is done, so that they are new points
    # to it as real queries are: a vector already in an HNSW graph is linked to its own neighbours, which would
    # make recall look higher than new queries get. Their exact answers are gathered batch by batch as the rest
    # is added, so the features are read once.
    is_query = np.zeros(n, dtype=bool)
    if tuning:
        is_query[np.sort(rng.choice(n, held_out, replace=False))] = True
    query_rows = np.flatnonzero(is_query)
    xq, k = prepare(source.take(query_rows)), min(10, n - held_out)
    exact = faiss.ResultHeap(len(xq), k, keep_max=metric != "l2") if tuning else None
    for start, batch_paths, batch in source.batches():
        rows = np.arange(start, start + len(batch))
        batch = prepare(batch, start)
        if paths_from_source:
            paths.extend(batch_paths)
        if tuning:
            keep = ~is_query[rows]
            rows, batch = rows[keep], batch[keep]
            if len(rows):
                scores, found = faiss.knn(xq, batch, min(k, len(rows)), faiss_metric)
                exact.add_result(scores, np.where(found >= 0, rows[np.maximum(found, 0)], -1))
        index._add_rows(batch, rows)
    if not tuning:
        if knob is not None and knob not in params:  # FAISS's default (nprobe 1, efSearch 16), recorded
            index._set_knob(1 if knob == "nprobe" else 16)
        return index._to_gpu(gpu)
    exact.finalize()
    index._tune_with(exact.I, lambda index: index._faiss.search(xq, k)[1], target_recall)
    index._add_rows(xq, query_rows)
    return index._to_gpu(gpu)


class _Matrix:
    """Features in memory, read as `shards.Shards` reads a folder (`batches`, `take`): one path in build_index."""

    has_paths, model = False, None

    def __init__(self, x: np.ndarray):
        self.x, self.dim = x, x.shape[1]

    def __len__(self) -> int:
        return len(self.x)

    def batches(self, batch_size: int = CHUNK_ROWS):
        for start in range(0, len(self.x), batch_size):
            yield start, None, self.x[start : start + batch_size]

    def take(self, rows: np.ndarray) -> np.ndarray:
        return self.x if len(rows) == len(self.x) else self.x[rows]  # all of them: no copy


def _source(features: ArrayLike | str | os.PathLike) -> Any:
    """`features` as something with `len`, `dim`, `model`, `has_paths`, `batches()` and `take(rows)`."""
    if isinstance(features, (str, os.PathLike)):
        from .shards import open_shards

        return open_shards(features)
    return _Matrix(_as_matrix(features, "features"))


def check_save_path(path: str | os.PathLike) -> None:
    """ValueError unless `Index.save(path)` may write there: a new path, an empty folder or a saved index."""
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f"{path} exists and is a file; an index is saved as a directory: choose another path")
    if os.path.isdir(path) and os.listdir(path) and not os.path.exists(os.path.join(path, FILES["meta"])):
        raise InputError(f"{path} is a non-empty directory that holds no index; choose a new or empty directory")


def _check_kind_and_metric(kind: str, metric: str) -> None:
    if metric not in METRICS:
        raise InputError(f"unknown metric {metric!r}; use one of: {', '.join(METRICS)}")
    if kind != "auto" and kind not in KINDS:
        raise InputError(f"unknown index kind {kind!r}; use one of: auto, {', '.join(KINDS)}")


def plan(
    n: int, dim: int, kind: str = "auto", metric: str = "cosine", memory_budget: int | str | None = None, **params: int
) -> tuple[str, dict]:
    """The kind and knobs `build_index` would use for n vectors of dim values; ValueError for any it would refuse
    (unknown kind or knob, a knob n cannot support, over `memory_budget`). Needs no features: a caller can check
    its options before spending the time to compute them."""
    _check_kind_and_metric(kind, metric)
    budget = None if memory_budget is None else parse_memory(memory_budget)
    if kind == "auto":
        if params:
            raise InputError(f"kind='auto' chooses its own parameters; got {sorted(params)}: name a kind to set them")
        kind, params = _choose(n, dim, metric, budget)
    params = _build_params(kind, n, dim, metric, budget, params)
    if budget is not None and estimate_bytes(kind, n, dim, metric, **params) > budget:
        need = estimate_bytes(kind, n, dim, metric, **params)
        raise InputError(
            f"a {kind} index of {n:,} vectors needs about {need:,} bytes, over memory_budget={budget:,}; "
            f"use kind='auto' to pick one that fits, or raise the budget"
        )
    return kind, params


def _build_params(kind: str, n: int, dim: int, metric: str, budget: int | None, given: dict) -> dict:
    """The build and search knobs of `kind`, with defaults filled in and checked against n and dim."""
    unknown = sorted(set(given) - set(KNOBS[kind]))
    if unknown:
        raise InputError(
            f"{kind} takes no parameter {unknown[0]!r}; its parameters are: {', '.join(KNOBS[kind]) or 'none'}"
        )
    params = {name: _positive_int(name, value) for name, value in given.items()}
    if kind.startswith("ivf"):
        if n == 0:
            raise InputError(f"{kind} learns its cells from the features; build it from at least one vector")
        params.setdefault("nlist", _default_nlist(n))
        if params["nlist"] > min(n, TRAIN_MAX):
            raise InputError(f"nlist={params['nlist']} cells need at least as many training vectors; got {n}")
    if kind == "ivf_pq":
        params.setdefault("nbits", _default_nbits(n))
        if n < 2:  # even 1-bit codes need two centroids, learnt from two vectors
            raise InputError(f"ivf_pq learns its codebooks from the features; build it from at least two vectors (got {n})")
        if params["nbits"] > 16 or 2 ** params["nbits"] > min(n, TRAIN_MAX):
            raise InputError(
                f"nbits={params['nbits']} needs 2**nbits <= 65536 codebook centroids and at least as many training "
                f"vectors; got {n} vectors: use nbits <= {max(1, int(math.log2(max(n, 2))))}"
            )
        if "m" not in params:
            fitting = [m for m in _pq_sizes(dim) if m <= max(1, dim // 4) and dim % m == 0]  # 1/16 of the floats
            if budget is not None:
                fitting = [
                    m
                    for m in _pq_sizes(dim)
                    if estimate_bytes("ivf_pq", n, dim, metric, m=m, nbits=params["nbits"]) <= budget
                ] or fitting
            params["m"] = fitting[0]
        elif params["m"] not in _pq_sizes(dim):
            divisors = ", ".join(str(m) for m in _pq_sizes(dim) if dim % m == 0)
            raise InputError(
                f"m={params['m']} codes would cover {_pq_dims(params['m'], dim)} of the {dim} dimensions, dropping "
                f"more than an eighth; use an m that divides {dim} ({divisors}) or nearly does"
            )
    if kind == "hnsw":
        params.setdefault("M", HNSW_M)
        params.setdefault("efConstruction", HNSW_EF_CONSTRUCTION)
    return {name: params[name] for name in KNOBS[kind] if name in params}


def _factory_string(kind: str, params: dict, dim: int) -> str:
    """FAISS's index_factory description of the index ("np": no polysemous training, which takes minutes)."""
    if kind == "ivf_pq" and dim % params["m"]:  # PCA to the dims the codes cover, then a random rotation that
        # spreads the variance evenly over the m sub-vectors (PCA alone would give the first ones most of it)
        return "PCAR{d},IVF{nlist},PQ{m}x{nbits}np".format(d=_pq_dims(params["m"], dim), **params)
    return {
        "flat": "Flat",
        "ivf_flat": "IVF{nlist},Flat",
        "ivf_sq8": "IVF{nlist},SQ8",
        "ivf_pq": "IVF{nlist},PQ{m}x{nbits}np",
        "hnsw": "IDMap,HNSW{M},Flat",
    }[kind].format(**params)


def _train(faiss: Any, faiss_index: Any, sample: np.ndarray, kind: str) -> None:
    """Train the cells (and the PCA and codebooks of ivf_pq) on `sample`, shape = (<= TRAIN_MAX, dim)."""
    if kind == "ivf_pq":
        pq = faiss.downcast_index(faiss.extract_index_ivf(faiss_index)).pq
        pq.cp.max_points_per_centroid, pq.cp.niter = PQ_POINTS_PER_CENTROID, PQ_KMEANS_ITERATIONS
    faiss_index.train(sample)


# ---------------------------------------------------------------------------------------------------- load


def _file_record(file: str) -> dict:
    sha256 = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            sha256.update(block)
    return {"bytes": os.path.getsize(file), "sha256": sha256.hexdigest()}


def load_index(path: str | os.PathLike, mmap: bool = False, device: str | torch.device = "cpu") -> Index:
    """Read an index that `Index.save` wrote. Runs no code from the files.

    mmap : map the vectors from the file instead of reading them (FAISS's IO_FLAG_MMAP for IVF lists,
        IO_FLAG_MMAP_IFC for flat and HNSW storage): quick to open, memory shared with the page cache; read-only
    device : "cpu", or "cuda" / "cuda:N" for flat and IVF kinds (needs faiss-gpu)

    Raises IndexFileError for a missing, truncated, corrupt, foreign or newer index.
    """
    faiss = _faiss()
    path = os.fspath(path)
    if not os.path.isdir(path):
        what = "is a file, not" if os.path.exists(path) else "does not exist; expected"
        raise IndexFileError(f"{path} {what} an index directory (index.faiss, meta.json, ids.npy) as Index.save writes")
    meta = _read_meta(path)
    for name, record in meta["files"].items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise IndexFileError(f"{file} is missing; the index in {path} is incomplete: save it again")
        if os.path.getsize(file) != record.get("bytes") or _file_record(file)["sha256"] != record.get("sha256"):
            raise IndexFileError(
                f"{file} is truncated or corrupt (its size or SHA256 differs from meta.json's); save the index again"
            )
    count = meta["count"]
    try:
        with open(os.path.join(path, FILES["ids"]), "rb") as f:
            ids = np.load(f, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise IndexFileError(f"{path}/{FILES['ids']} is not a readable int64 array ({e}); save the index again") from e
    if ids.dtype != np.int64 or ids.shape != (count,):
        raise IndexFileError(f"{path}/{FILES['ids']} holds {ids.dtype} {ids.shape}, not {count} int64 ids")
    paths = None
    if FILES["paths"] in meta["files"]:
        with open(os.path.join(path, FILES["paths"]), encoding="utf-8") as f:
            paths = json.load(f)
        if not isinstance(paths, list) or len(paths) != count or not all(isinstance(p, str) for p in paths):
            raise IndexFileError(f"{path}/{FILES['paths']} is not a list of {count} strings; save the index again")
    gpu = _gpu_number(device, meta["kind"], mmap)
    flags = 0
    if mmap:
        flags = faiss.IO_FLAG_MMAP if meta["kind"].startswith("ivf") else faiss.IO_FLAG_MMAP_IFC
    try:
        faiss_index = faiss.read_index(os.path.join(path, FILES["index"]), flags)
    except (RuntimeError, MemoryError) as e:
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise IndexFileError(f"FAISS cannot read {path}/{FILES['index']} ({reason}); save the index again") from e
    if not _has_structure(faiss, faiss_index, meta["kind"]):
        raise IndexFileError(
            f"{path}/{FILES['index']} holds a FAISS {type(faiss_index).__name__}, not the {meta['kind']} index that "
            f"meta.json describes; the files do not belong together: save the index again"
        )
    expected_metric = faiss.METRIC_L2 if meta["metric"] == "l2" else faiss.METRIC_INNER_PRODUCT
    if faiss_index.ntotal != count or faiss_index.d != meta["dim"] or faiss_index.metric_type != expected_metric:
        raise IndexFileError(
            f"{path}/{FILES['index']} holds {faiss_index.ntotal} vectors of {faiss_index.d} dims, but meta.json says "
            f"{count} {meta['metric']} vectors of {meta['dim']}; the files do not belong together: save it again"
        )
    index = Index(
        faiss_index,
        meta["kind"],
        meta["metric"],
        ids,
        paths,
        meta.get("model"),
        meta["params"],
        read_only=mmap,
        tuned_recall=meta.get("tuned_recall"),
    )
    if mmap:
        index._file_bytes = os.path.getsize(os.path.join(path, FILES["index"]))
    return index._to_gpu(gpu)


def _has_structure(faiss: Any, faiss_index: Any, kind: str) -> bool:
    """Whether a FAISS index read from a file is what `build_index` makes for `kind`."""
    if kind == "flat":
        return isinstance(faiss_index, faiss.IndexFlat)
    if kind == "hnsw":
        return isinstance(faiss_index, faiss.IndexIDMap) and isinstance(
            faiss.downcast_index(faiss_index.index), faiss.IndexHNSWFlat
        )
    expected = {"ivf_flat": faiss.IndexIVFFlat, "ivf_sq8": faiss.IndexIVFScalarQuantizer, "ivf_pq": faiss.IndexIVFPQ}
    if kind == "ivf_pq" and isinstance(faiss_index, faiss.IndexPreTransform):  # PCA first (see _factory_string)
        transforms = [faiss.downcast_VectorTransform(faiss_index.chain.at(i)) for i in range(faiss_index.chain.size())]
        if len(transforms) != 1 or not isinstance(transforms[0], faiss.PCAMatrix):
            return False
        faiss_index = faiss.downcast_index(faiss_index.index)
    return isinstance(faiss_index, expected[kind])


def _read_meta(path: str) -> dict:
    """meta.json, checked: our format, a version we read, and the fields we need with the right types."""
    file = os.path.join(path, FILES["meta"])
    if not os.path.isfile(file):
        from .distributed import MANIFEST_NAME  # no Ray needed to import it

        if os.path.isfile(os.path.join(path, MANIFEST_NAME)):  # what `embed --engine ray` writes beside its shards
            raise IndexFileError(f"{path} holds embedding shards, not an index; build one from them: openclip-lite index build {path} --out INDEX_DIR")
        raise IndexFileError(f"{path} is not an openclip-lite index (no meta.json); make one with: openclip-lite embed FOLDER --out INDEX_DIR (or build_index(...).save)")
    try:
        with open(file, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IndexFileError(f"{file} is not valid JSON ({e}); the index is corrupt: save it again") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise IndexFileError(f"{path} is not an openclip-lite index ({file} is some other JSON file)")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise IndexFileError(f"{file} has no format_version; the index is corrupt: save it again")
    if version > FORMAT_VERSION:
        raise IndexFileError(
            f"{path} was written by a newer openclip-lite (index format {version}; this version reads up to "
            f"{FORMAT_VERSION}); upgrade: pip install -U openclip-lite"
        )
    checks = {
        "kind": lambda v: v in KINDS,
        "metric": lambda v: v in METRICS,
        "dim": lambda v: isinstance(v, int) and v > 0,
        "count": lambda v: isinstance(v, int) and v >= 0,
        "params": lambda v: isinstance(v, dict) and all(isinstance(x, int) for x in v.values()),
        "files": lambda v: (
            isinstance(v, dict) and FILES["index"] in v and FILES["ids"] in v and set(v) <= set(FILES.values())
            and all(isinstance(record, dict) for record in v.values())
        ),
        # optional: None when the index names no model or was never tuned
        "model": lambda v: v is None or isinstance(v, str),
        "tuned_recall": lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1),
    }
    optional = ("model", "tuned_recall")
    for field, ok in checks.items():
        if (field not in meta and field not in optional) or not ok(meta.get(field)):
            raise IndexFileError(f"{file} has a missing or invalid {field!r}; the index is corrupt: save it again")
    return meta
