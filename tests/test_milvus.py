"""MilvusIndex against real Milvus: embedded Milvus Lite (a .db directory) and a `milvus-lite server` over gRPC.

Reference answers come from torch (exact cosine top-k), never from the code under test.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from parquet_shards import write_shards

from openclip_lite.errors import MissingDependencyError, OpenCLIPLiteError
from openclip_lite.milvus import MilvusIndex, MilvusIndexError, MilvusLockedError, load_shards_into_milvus
from openclip_lite.shards import ShardError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIM = 32


def run_python(code: str, **kwargs) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter that imports this checkout."""
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
        **kwargs,
    )


def features(n: int, seed: int, dim: int = DIM) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


def exact_top_k(queries: torch.Tensor, data: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return (F.normalize(queries, dim=1) @ F.normalize(data, dim=1).T).topk(k)


def recall(ids: torch.Tensor, exact_ids: torch.Tensor) -> float:
    return sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(ids, exact_ids)) / exact_ids.numel()


@pytest.fixture(scope="module")
def server_uri(tmp_path_factory):
    """A `milvus-lite server` in a subprocess on a free local port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data_dir = tmp_path_factory.mktemp("milvus-server") / "data"
    command = [sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(data_dir)]
    with open(data_dir.parent / "server.log", "w+") as log:
        server = subprocess.Popen([*command, "--host", "127.0.0.1", "--port", str(port)], stdout=log, stderr=log)
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    server.kill()
                    log.seek(0)
                    pytest.fail(f"milvus-lite server did not start:\n{log.read()}")
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
        server.send_signal(signal.SIGINT)  # its graceful shutdown closes the database
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.fixture(params=["lite", "server"])
def uri(request, tmp_path):
    if request.param == "lite":
        return str(tmp_path / "milvus.db")
    return request.getfixturevalue("server_uri")


@pytest.fixture
def collection():
    return f"test_{uuid.uuid4().hex[:12]}"  # unique, as the server outlives each test


def test_flat_search_is_the_exact_top_k(uri, collection):
    data = features(1000, seed=0)
    queries = features(20, seed=1) * 3  # not normalised: cosine must not care
    with MilvusIndex(uri, collection, dim=DIM, model="ViT-B/32", batch_size=256) as index:
        assert (index.dim, index.model, index.kind, index.params) == (DIM, "ViT-B/32", "FLAT", {})
        index.add(data[:600])  # ids 0..599, in three insert requests
        index.add(data[600:].numpy())  # ids go on from len(index): 600..999
        assert len(index) == 1000

        exact_scores, exact_ids = exact_top_k(queries, data, 10)
        for q in (queries, queries.numpy()):
            scores, ids = index.search(q, k=10)
            assert scores.dtype == torch.float32 and ids.dtype == torch.int64 and ids.shape == (20, 10)
            torch.testing.assert_close(ids, exact_ids, rtol=0, atol=0)
            torch.testing.assert_close(scores, exact_scores, rtol=0, atol=1e-5)
        scores, ids = index.search(queries[3], k=5)  # one 1-D query
        torch.testing.assert_close(ids, exact_ids[3:4, :5], rtol=0, atol=0)


@pytest.mark.parametrize(
    "index_type, params, weak, strong, min_recall",
    [
        ("HNSW", {}, {"ef": 10}, {"ef": 128}, 0.95),
        ("IVF_FLAT", {"nlist": 16}, {"nprobe": 1}, {"nprobe": 16}, 1.0),  # all 16 cells scanned: exact
        ("IVF_SQ8", {"nlist": 16}, {"nprobe": 1}, {"nprobe": 16}, 0.9),  # 8-bit codes lose a little
    ],
)
def test_ann_recall_and_search_knobs(uri, collection, index_type, params, weak, strong, min_recall):
    data, queries = features(2000, seed=2), features(50, seed=3)
    _, exact_ids = exact_top_k(queries, data, 10)
    with MilvusIndex(uri, collection, dim=DIM, index_type=index_type.lower(), params=params) as index:
        assert (index.kind, index.params) == (index_type, params)
        index.add(data)
        index.flush()
        # Milvus builds ANN indexes in the background after a flush and searches unindexed rows exactly until
        # then; a weak knob (1 of 16 IVF cells, a 10-long HNSW candidate list) losing recall shows both that the
        # index is in use and that the knob reaches it.
        deadline = time.monotonic() + 30
        while recall(index.search(queries, 10, **weak)[1], exact_ids) > 0.9:
            assert time.monotonic() < deadline, f"the {index_type} index never came into use (or {weak} was ignored)"
            time.sleep(0.2)
        assert recall(index.search(queries, 10, **strong)[1], exact_ids) >= min_recall


def test_reopen_keeps_rows_paths_model_and_index(uri, collection):
    data, queries = features(300, seed=4), features(5, seed=5)
    paths = [f"images/{i:04d}.jpg" for i in range(299)] + ["café/ünïcode.png"]
    ids = torch.arange(1000, 1300)  # explicit ids, not positions
    with MilvusIndex(uri, collection, dim=DIM, model="RN50", index_type="HNSW", params={"M": 8}) as index:
        index.add(data, ids=ids, paths=paths)
        before = index.search(queries, k=7, ef=64)

    with MilvusIndex(uri, collection) as index:  # dim, model and index read from the collection
        assert (index.dim, index.model, index.kind, index.params, len(index)) == (DIM, "RN50", "HNSW", {"M": 8}, 300)
        after = index.search(queries, k=7, ef=64)
        torch.testing.assert_close(after, before)
        _, exact_positions = exact_top_k(queries, data, 7)
        assert recall(after[1], exact_positions + 1000) >= 0.9
        assert index.get_paths([1000, 1299, 1042, 5, -1, 2**63]) == [
            "images/0000.jpg",
            "café/ünïcode.png",
            paths[42],
            None,
            None,
            None,  # past int64, as a URL may ask: no such id, not an OverflowError
        ]


def test_invalid_arguments_raise_our_errors_before_milvus(uri, collection, tmp_path):
    lite_dir = tmp_path / "never-made.db"
    for bad in [
        {"index_type": "DISKANN"},  # Milvus Lite would store it and fail on the next open
        {"index_type": "HNSW", "params": {"efSearch": 64}},  # a search knob, and FAISS's name for it
        {"index_type": "IVF_FLAT", "params": {"nlist": 0}},
        {"params": {"nlist": 16}},
        {"dim": 0},
    ]:
        with pytest.raises(MilvusIndexError) as error:
            MilvusIndex(lite_dir, collection, **{"dim": DIM, **bad})
        assert isinstance(error.value, ValueError) and isinstance(error.value, OpenCLIPLiteError)
    assert not lite_dir.exists()  # rejected before Milvus Lite opened anything
    with pytest.raises(MilvusIndexError, match="end in .db"):
        MilvusIndex(tmp_path / "vectors", collection, dim=DIM)

    with pytest.raises(MilvusIndexError, match="pass dim"):
        MilvusIndex(uri, collection)  # a new collection needs its dimension
    with MilvusIndex(uri, collection, dim=DIM, model="ViT-B/32", index_type="IVF_FLAT") as index:
        index.add(features(10, seed=6))
        for call, match in [
            (lambda: index.add(features(3, seed=7, dim=DIM + 1)), r"shape \(n, 32\)"),
            (lambda: index.add(torch.full((2, DIM), float("nan"))), "NaN"),
            (lambda: index.add(features(2, seed=7), ids=[5, 5]), "unique"),
            (lambda: index.add(features(2, seed=7), paths=["only one"]), "2 strings"),
            (lambda: index.search(features(1, seed=8, dim=DIM - 1)), r"shape \(n, 32\)"),
            (lambda: index.search(features(1, seed=8), ef=64), "IVF_FLAT has no search parameter 'ef'"),
            (lambda: index.search(features(1, seed=8), k=0), "k must be"),
        ]:
            with pytest.raises(MilvusIndexError, match=match):
                call()
        assert len(index) == 10
    for mismatch, match in [
        ({"dim": DIM * 2}, "32-dimensional"),
        ({"model": "RN50"}, "ViT-B/32"),
        ({"index_type": "HNSW"}, "IVF_FLAT index"),
    ]:
        with pytest.raises(MilvusIndexError, match=match):
            MilvusIndex(uri, collection, **mismatch)
    with MilvusIndex(uri, collection) as index:
        assert len(index) == 10


def test_taken_ids_are_refused_and_nothing_is_inserted(uri, collection):
    # Milvus Lite overwrites a row whose id is taken and a Milvus server keeps both: either loses an image
    data = features(6, seed=30)
    with MilvusIndex(uri, collection, dim=DIM) as index:
        index.add(data[:2], ids=[1, 2], paths=["one", "two"])
        for call, match in [
            (lambda: index.add(data[2:5], paths=["a", "b", "c"]), r"\[2\]; give ids="),  # default ids 2, 3, 4
            (lambda: index.add(data[5:6], ids=[1], paths=["again"]), r"\[1\]; give new ids"),
            (lambda: index.add(data[2:4], ids=[7, 2]), r"\[2\]"),  # one new, one taken: neither goes in
        ]:
            with pytest.raises(MilvusIndexError, match="ids already in collection") as error:
                call()
            assert re.search(match, str(error.value)), error.value
        assert len(index) == 2
        assert index.get_paths([1, 2, 3, 4, 7]) == ["one", "two", None, None, None]
        torch.testing.assert_close(index.search(data[1], k=1)[1], torch.tensor([[2]]))  # its own vector still
        index.add(data[2:5], ids=[3, 4, 5], paths=["a", "b", "c"])
        assert len(index) == 5


def test_rows_and_values_milvus_cannot_keep_are_refused(tmp_path):
    with MilvusIndex(tmp_path / "m.db", "c", dim=DIM) as index:
        zero = torch.zeros(2, DIM)
        zero[0, 0] = 1.0
        for call, match in [
            (lambda: index.add(zero), "row 1 is all zeros"),
            (lambda: index.add(features(1, seed=31), paths=["x" * 65_536]), "65535 bytes"),
            (lambda: index.add(features(1, seed=31), ids=np.array([2**63], dtype=np.uint64)), "fit in int64"),
            (lambda: index.add(features(1, seed=31), ids=[1.5]), "integers"),
            (lambda: index.search(torch.zeros(DIM)), "row 0 is all zeros"),
        ]:
            with pytest.raises(MilvusIndexError, match=match):
                call()
        assert len(index) == 0
        index.add(features(3, seed=32), ids=np.array([5, 6, 7], dtype=np.uint64))
        _, ids = index.search(features(1, seed=32), k=np.int64(2))  # numpy ints, as Index.search takes
        assert ids.shape == (1, 2) and ids[0, 0] == 5


def test_opening_only_names_the_collections_there(tmp_path):
    with MilvusIndex(tmp_path / "m.db", "photos", dim=DIM):
        pass
    with pytest.raises(MilvusIndexError, match=r"'nope' does not exist .*the collections there: 'photos'"):
        MilvusIndex(tmp_path / "m.db", "nope", create=False)
    with MilvusIndex(tmp_path / "m.db", "photos", create=False) as index:
        assert index.dim == DIM


def test_search_answers_at_most_the_collection_size(tmp_path):
    # as FAISS's Index and `search`: k past the rows held is capped (the answer is allocated before searching, so a
    # k of a billion on three rows used to take gigabytes)
    with MilvusIndex(tmp_path / "small.db", "small", dim=DIM) as index:
        scores, ids = index.search(features(2, seed=10), k=5)
        assert scores.shape == ids.shape == (2, 0)  # empty
        index.add(features(3, seed=9))
        for k in (5, 10**9):
            scores, ids = index.search(features(2, seed=10), k=k)
            assert scores.shape == ids.shape == (2, 3) and torch.isfinite(scores).all()
            assert sorted(ids[0].tolist()) == [0, 1, 2]


def test_the_lock_error_does_not_depend_on_logging(tmp_path):
    # the first sign of the lock is a log record; a process that silenced logging must get the same error
    path = str(tmp_path / "held.db")
    with MilvusIndex(path, "held", dim=DIM):
        result = run_python(
            f"""
            import logging
            logging.disable(logging.CRITICAL)
            from openclip_lite.milvus import MilvusIndex, MilvusLockedError
            try:
                MilvusIndex({path!r}, "held")
            except MilvusLockedError as e:
                print("locked:", e)
            """
        )
    assert "locked:" in result.stdout and "LOCK" in result.stdout, result.stdout + result.stderr


def test_second_process_on_a_held_lite_directory_gets_the_lock_error(tmp_path):
    path = str(tmp_path / "held.db")
    data, queries = features(200, seed=11), features(4, seed=12)
    child = """
        import json, sys
        from openclip_lite.milvus import MilvusIndex, MilvusLockedError
        path = sys.argv[1]
        try:
            MilvusIndex(path, "held")
            print(json.dumps({"opened": True}), flush=True)
        except MilvusLockedError as e:
            print(json.dumps({"locked": str(e), "is_runtime_error": isinstance(e, RuntimeError)}), flush=True)
        sys.stdin.readline()  # the parent has closed its index
        with MilvusIndex(path, "held") as index:
            queries = [[float(v) for v in row] for row in json.loads(sys.argv[2])]
            print(json.dumps({"len": len(index), "model": index.model, "ids": index.search(queries, 5)[1].tolist(),
                              "paths": index.get_paths([0, 249])}), flush=True)
    """
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    index = MilvusIndex(path, "held", dim=DIM, model="ViT-L/14")
    index.add(data, paths=[f"{i}.jpg" for i in range(200)])
    second = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(child), path, json.dumps(queries.tolist())],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        first_answer = json.loads(second.stdout.readline() or "{}")
        assert "locked" in first_answer, second.stderr.read() if second.poll() is not None else first_answer
        assert os.path.join(path, "LOCK") in first_answer["locked"] and first_answer["is_runtime_error"]

        # nothing was harmed: the first process goes on reading and writing
        more = features(50, seed=13)
        index.add(more, paths=[f"{i}.jpg" for i in range(200, 250)])
        all_data = torch.cat([data, more])
        torch.testing.assert_close(index.search(queries, 5)[1], exact_top_k(queries, all_data, 5)[1])
        index.close()  # frees the LOCK: the second process may open the directory now

        second.stdin.write("go\n")
        second.stdin.flush()
        answer = json.loads(second.stdout.readline() or "{}")
        assert answer, second.stderr.read()
        assert answer["len"] == 250 and answer["model"] == "ViT-L/14" and answer["paths"] == ["0.jpg", "249.jpg"]
        assert answer["ids"] == exact_top_k(queries, all_data, 5)[1].tolist()
        _, stderr = second.communicate(timeout=60)
        assert second.returncode == 0, stderr
        assert "Traceback" not in stderr  # milvus-lite's own traceback is replaced by our one-line error
    finally:
        index.close()
        if second.poll() is None:
            second.kill()
            second.wait()


def write_milvus_shards(shards_dir, sizes, seed, manifest=None):
    """Random unit-length features as embedding shards; all rows' features (before normalising) and paths."""
    data = features(sum(sizes), seed=seed)
    paths = [f"photos/{i}.jpg" for i in range(len(data))]
    write_shards(shards_dir, paths, F.normalize(data, dim=1), sizes, manifest, row_group_size=100)
    return data, paths


def test_load_shards_into_milvus(uri, collection, tmp_path):
    sizes = [250, 0, 400, 130]  # shard order is file-name order; an empty shard is fine
    data, paths = write_milvus_shards(
        tmp_path / "shards", sizes, seed=14, manifest={"model": "ViT-B/16", "dim": DIM, "count": sum(sizes)}
    )
    queries = features(10, seed=15)
    with load_shards_into_milvus(tmp_path / "shards", uri, collection, batch_size=64) as index:
        assert (len(index), index.model, index.dim, index.kind) == (780, "ViT-B/16", DIM, "FLAT")
        torch.testing.assert_close(index.search(queries, 8)[1], exact_top_k(queries, data, 8)[1])
        assert index.get_paths([0, 249, 250, 779]) == [paths[0], paths[249], paths[250], paths[779]]

    # a second run finds every row loaded and adds none
    with load_shards_into_milvus(tmp_path / "shards", uri, collection, batch_size=64) as index:
        assert len(index) == 780


def test_load_shards_resumes_an_interrupted_load(tmp_path):
    data, paths = write_milvus_shards(tmp_path / "shards", [300, 300], seed=16)  # no manifest: dim from the rows
    uri = tmp_path / "resume.db"
    with MilvusIndex(uri, "photos", dim=DIM, index_type="IVF_FLAT", params={"nlist": 8}) as index:
        index.add(data[:370], paths=paths[:370])  # as if the first load stopped after 370 rows
    with load_shards_into_milvus(tmp_path / "shards", uri, "photos", batch_size=100) as index:
        assert (len(index), index.model, index.kind) == (600, None, "IVF_FLAT")
        assert index.get_paths([369, 370, 599]) == [paths[369], paths[370], paths[599]]
        queries = features(5, seed=17)
        torch.testing.assert_close(index.search(queries, 5, nprobe=8)[1], exact_top_k(queries, data, 5)[1])

    with pytest.raises(ShardError, match="no Parquet shards"):
        load_shards_into_milvus(tmp_path, uri, "photos")


def test_load_refuses_to_go_on_after_rows_of_other_shards(tmp_path):
    # counting rows alone would append these shards' rows 100..199 after another folder's 100 rows
    write_milvus_shards(tmp_path / "first", [100], seed=18)
    write_milvus_shards(tmp_path / "second", [100, 100], seed=19)
    uri = tmp_path / "mixed.db"
    load_shards_into_milvus(tmp_path / "first", uri, "photos").close()
    with pytest.raises(MilvusIndexError, match="row 0 is not row 0 of the shards"):
        load_shards_into_milvus(tmp_path / "second", uri, "photos")
    with MilvusIndex(uri, "photos") as index:
        assert len(index) == 100  # nothing added


def test_import_needs_no_pymilvus():
    result = run_python(
        """
        import sys
        import openclip_lite, openclip_lite.milvus
        assert not {"pymilvus", "milvus_lite", "pyarrow"} & set(sys.modules), "imported an optional engine"
        sys.modules["pymilvus"] = None  # as if the [milvus] extra were not installed
        try:
            openclip_lite.milvus.MilvusIndex("x.db", "c", dim=4)
        except openclip_lite.MissingDependencyError as e:
            print(e)
        """
    )
    assert result.returncode == 0, result.stderr
    assert 'pip install "openclip-lite[milvus]"' in result.stdout
    assert issubclass(MissingDependencyError, ImportError)
    assert issubclass(MilvusLockedError, OpenCLIPLiteError)
