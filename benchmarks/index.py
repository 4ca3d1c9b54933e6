"""ANN indexes against exact search: build time, size, query speed and recall@10 of every `build_index` kind.

    python benchmarks/index.py [--sizes 100000 1000000] [--dim 512] [--kinds ...] [--threads 2] [--json out.json]

Data: n + 1000 CLIP-like unit vectors (float32), made in one go with a fixed seed: a mixture of sqrt(n)/4 random
directions, each vector its centre plus noise of about the same norm whose variance falls as 1/i over the
dimensions of a random basis (real CLIP features also concentrate their variance in a few dozen directions). The
first n are indexed; the last 1000, from the same mixture but not indexed, are the queries.

For each size, every kind is built with `build_index` (which, for approximate kinds, tunes nprobe / efSearch to
recall@10 0.95 on its own sample of indexed vectors), then measured on the held-out queries:
- build: seconds of `build_index`, training and tuning included;
- size: `Index.nbytes` (what `save` writes: FAISS's index file and the ids);
- 1-query latency: median of single `Index.search(q, 10)` calls (the Python wrapper included);
- batch QPS: 1000 queries in one `search` call;
- recall@10 against the exact answers (FAISS's brute-force `knn`).
The exact baselines are `flat` (FAISS IndexFlatIP) and a per-query numpy `x @ q` + argpartition.
`auto-1/8` is `kind="auto"` with `memory_budget` an eighth of the raw float32 vectors. An explicit kind whose build
would repeat `auto`'s choice (same kind and parameters) is reported from that build instead of built twice.

OpenMP threads wait passively (OMP_WAIT_POLICY=PASSIVE, set before faiss loads): on a machine shared with other
jobs, FAISS's spinning threads otherwise slow k-means several times over. The load average is printed with the
results, because other jobs on the machine change every number.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import faiss
import numpy as np
import torch

from openclip_lite.index import SEARCH_KNOB, _build_params, build_index

QUERIES = 1000
K = 10
ALL_KINDS = ["flat", "auto", "auto-1/8", "hnsw", "ivf_flat", "ivf_sq8", "ivf_pq"]


def clustered(n: int, dim: int, seed: int = 0, chunk: int = 100_000) -> np.ndarray:
    """n CLIP-like unit vectors (see the module docstring), float32, shape = (n, dim); built a chunk at a time."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(8, int(np.sqrt(n)) // 4), dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    basis = np.linalg.qr(rng.standard_normal((dim, dim)))[0].astype(np.float32)
    scale = (1 / np.sqrt(np.arange(1, dim + 1))).astype(np.float32)
    scale /= np.linalg.norm(scale)
    x = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, chunk):
        rows = min(chunk, n - start)
        part = (
            centres[rng.integers(len(centres), size=rows)]
            + (rng.standard_normal((rows, dim), dtype=np.float32) * scale) @ basis.T
        )
        x[start : start + rows] = part / np.linalg.norm(part, axis=1, keepdims=True)
    return x


def build_key(kind: str, params: dict) -> str:
    """kind and build parameters (not the search knob, which tuning sets the same way for every build)."""
    return json.dumps([kind, {k: v for k, v in params.items() if k != SEARCH_KNOB.get(kind)}], sort_keys=True)


def recall(ids: np.ndarray, exact: np.ndarray) -> float:
    return sum(len(set(a) & set(b)) for a, b in zip(ids.tolist(), exact.tolist())) / exact.size


def single_query_ms(search, queries: np.ndarray, budget_s: float = 10.0, most: int = 300) -> float:
    """Median milliseconds of one-query calls `search(q, K)`, over up to `most` queries or `budget_s` seconds."""
    search(queries[0], K)  # warm-up
    times, started = [], time.perf_counter()
    for q in queries[:most]:
        t = time.perf_counter()
        search(q, K)
        times.append(time.perf_counter() - t)
        if time.perf_counter() - started > budget_s and len(times) >= 5:
            break
    return 1e3 * statistics.median(times)


def numpy_exact(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    """The exact top-k rows of x for one query q (dim,), best first: what a plain numpy search does."""
    scores = x @ q
    top = np.argpartition(-scores, k)[:k]
    return top[np.argsort(-scores[top])]


def bench_size(n: int, dim: int, kinds: list[str], target_recall: float, rows: list[dict], save) -> None:
    """Measure every kind at size n, appending a row to `rows` and calling `save()` after each."""
    t = time.perf_counter()
    data = clustered(n + QUERIES, dim)
    x, queries = data[:n], data[n:]
    print(f"\n## n = {n:,} x {dim}  (data made in {time.perf_counter() - t:.1f} s)", flush=True)
    t = time.perf_counter()
    _, exact = faiss.knn(queries, x, K, faiss.METRIC_INNER_PRODUCT)
    print(f"exact answers for {QUERIES} queries: {time.perf_counter() - t:.1f} s", flush=True)
    numpy_ms = single_query_ms(lambda q, k: numpy_exact(x, q, k), queries, budget_s=5, most=50)
    rows.append({"n": n, "dim": dim, "kind": "numpy exact", "one_query_ms": numpy_ms, "recall": 1.0})
    print(f"numpy exact (x @ q + argpartition): {numpy_ms:.2f} ms a query", flush=True)
    raw = x.nbytes
    built: dict[str, dict] = {}  # kind + build parameters -> row, so that no index is built twice
    for name in kinds:
        options = {"memory_budget": raw // 8} if name == "auto-1/8" else {}
        kind = "auto" if name.startswith("auto") else name
        if kind != "auto":
            # the parameters build_index would give this kind (its private helper: the same defaults, no build)
            key = build_key(kind, _build_params(kind, n, dim, "cosine", None, {}))
            if key in built:
                rows.append({**built[key], "kind": name, "same_as": built[key]["kind"]})
                save()
                print(f"{name:9s} same index as {built[key]['kind']} ({built[key]['params']})", flush=True)
                continue
        t = time.perf_counter()
        index = build_index(x, kind=kind, target_recall=target_recall, **options)
        build_s = time.perf_counter() - t
        t = time.perf_counter()
        _, ids = index.search(queries, K)
        batch_s = time.perf_counter() - t
        row = {
            "n": n,
            "dim": dim,
            "kind": name,
            "chose": index.kind,
            "params": index.params,
            "build_s": build_s,
            "nbytes": index.nbytes,
            "raw_fraction": index.nbytes / raw,
            "one_query_ms": single_query_ms(index.search, queries),
            "batch_qps": QUERIES / batch_s,
            "recall": recall(ids.numpy(), exact),
            "tuned_recall": index.tuned_recall,
            "load_average": os.getloadavg()[0],
        }
        built[build_key(index.kind, index.params)] = row
        rows.append(row)
        save()
        print(
            f"{name:9s} {index.kind:8s} {json.dumps(index.params):58s} build {build_s:7.1f} s  "
            f"{row['nbytes'] / 2**20:8.1f} MiB ({row['raw_fraction']:.3f} of raw)  "
            f"1 query {row['one_query_ms']:8.3f} ms  "
            f"batch {row['batch_qps']:9.0f} q/s  recall@10 {row['recall']:.3f} (tuned on its sample: "
            f"{row['tuned_recall'] if row['tuned_recall'] is None else round(row['tuned_recall'], 3)})",
            flush=True,
        )
        del index


def markdown(rows: list[dict]) -> str:
    lines = [
        (
            "| n | kind | index (params) | build s | size MiB (of raw) | 1 query ms | × vs flat | × vs numpy "
            "| batch q/s | recall@10 |"
        ),
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    exact_ms = {(r["n"], r["kind"]): r["one_query_ms"] for r in rows if r["kind"] in ("flat", "numpy exact")}

    def times(r: dict, baseline: str) -> str:
        if (r["n"], baseline) not in exact_ms:
            return "-"
        ratio = exact_ms[r["n"], baseline] / r["one_query_ms"]
        return f"{ratio:.0f}" if ratio >= 10 else f"{ratio:.2g}"

    for r in rows:
        if r["kind"] == "numpy exact":
            lines.append(
                f"| {r['n']:,} | numpy exact | x @ q + argpartition | - | - | {r['one_query_ms']:.2f} | "
                f"{times(r, 'flat')} | 1 | - | 1.000 |"
            )
            continue
        params = ", ".join(f"{k}={v}" for k, v in r["params"].items())
        note = f" (= {r['same_as']})" if "same_as" in r else ""
        lines.append(
            f"| {r['n']:,} | {r['kind']}{note} | {r['chose']} ({params}) | {r['build_s']:.0f} | "
            f"{r['nbytes'] / 2**20:.0f} ({r['raw_fraction']:.3f}) | {r['one_query_ms']:.3f} | "
            f"{times(r, 'flat')} | {times(r, 'numpy exact')} | "
            f"{r['batch_qps']:.0f} | {r['recall']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--kinds", nargs="+", default=ALL_KINDS, choices=ALL_KINDS)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="FAISS's OpenMP threads")
    parser.add_argument("--target-recall", type=float, default=0.95, help="build_index's target_recall")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    faiss.omp_set_num_threads(args.threads)
    cpu = platform.processor() or "?"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    print(
        f"{time.strftime('%Y-%m-%d %H:%M')}  {cpu}, {os.cpu_count()} cores, FAISS threads {args.threads}, "
        f"load average {os.getloadavg()[0]:.1f}, target_recall {args.target_recall}\n"
        f"python {platform.python_version()}, numpy {np.__version__}, "
        f"torch {torch.__version__}, faiss {faiss.__version__}",
        flush=True,
    )
    rows: list[dict] = []

    def save() -> None:
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)

    for n in args.sizes:
        bench_size(n, args.dim, args.kinds, args.target_recall, rows, save)
        print(f"(load average now {os.getloadavg()[0]:.1f})", flush=True)
    print("\n" + markdown(rows))


if __name__ == "__main__":
    sys.exit(main())
