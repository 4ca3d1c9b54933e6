"""server.py over HTTP: a real uvicorn on a free 127.0.0.1 port, spoken to with the standard library's http.client
(which sends paths exactly as written, `..` included), over images drawn by tools/shapes.py and a tiny CLIP with
random weights (the answers' shapes and the security rules do not depend on what the model knows); and over a
Milvus Lite collection of examples/assets/*.jpg embedded by the demo model, which knows those shapes."""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPConnection

import pytest
import torch
from PIL import Image, ImageChops, ImageStat
from reference import reference_model

import openclip_lite as clip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
from shapes import LABELS, draw

uvicorn = pytest.importorskip("uvicorn")  # the [serve] extra; CI installs it with [test]
from openclip_lite.milvus import MilvusIndex
from openclip_lite.search import (
    Embeddings,
    encode_texts,
    open_search_index,
    save_search_index,
)
from openclip_lite.server import MAX_K, MAX_UPLOAD_BYTES, create_app

TRACEBACK = re.compile(r"Traceback|File \"|line \d+, in ")
ASSETS = os.path.join(ROOT, "examples", "assets")
DEMO = os.path.join(ASSETS, "demo-model.safetensors")


# ---------------------------------------------------------------------------------------------------- helpers


def draw_images(folder, labels, per_label: int, size: int = 96, seed: int = 0) -> list[str]:
    """per_label images of each label, as PNG files named like red_circle_0.png; returns their paths, sorted."""
    rng = random.Random(seed)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for label in labels:
        for n in range(per_label):
            path = os.path.join(folder, f"{label.replace(' ', '_')}_{n}.png")
            draw(label, rng, size).save(path)
            paths.append(path)
    return sorted(paths)


@contextlib.contextmanager
def running(app):
    """Serve `app` with uvicorn in a thread on a free 127.0.0.1 port; yields the port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))  # the kernel picks a free port: no race with other test runs
    sock.listen(64)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


class Answer:
    def __init__(self, status: int, headers: dict, body: bytes):
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        return json.loads(self.body)


def http(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None, chunks: list | None = None) -> Answer:
    """One request, sent as written (no normalisation of the path); chunks: a chunked body, piece by piece."""
    connection = HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        if chunks is not None:
            connection.putrequest(method, path, skip_accept_encoding=True)
            for name, value in (headers or {}).items():
                connection.putheader(name, value)
            connection.putheader("Transfer-Encoding", "chunked")
            connection.endheaders()
            try:
                for chunk in chunks:
                    connection.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                connection.send(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server answered and closed before the whole body was sent: read its answer
        else:
            connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        connection.close()


def multipart(fields: dict | None = None, files: dict | None = None) -> tuple[bytes, dict]:
    """A multipart/form-data body: fields {name: str}, files {name: (filename, bytes, content type)}."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in (fields or {}).items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, (filename, data, content_type) in (files or {}).items():
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\nContent-Type: {content_type}\r\n\r\n'
        parts.append(head.encode() + data + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def upload(port: int, data: bytes, filename: str = "query.png", **fields) -> Answer:
    body, headers = multipart({k: str(v) for k, v in fields.items()}, {"image": (filename, data, "application/octet-stream")})
    return http(port, "POST", "/api/search", body, headers)


def png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def assert_json_error(answer: Answer, status: int, *words: str) -> None:
    """A 4xx answer with a JSON {"detail": sentence} body naming `words`, and no traceback anywhere in it."""
    text = answer.body.decode("utf-8", "replace")
    assert answer.status == status, text
    assert answer.headers["content-type"].startswith("application/json"), answer.headers
    detail = answer.json()["detail"]
    assert isinstance(detail, str) and len(detail) > 10, detail
    for word in words:
        assert word.lower() in detail.lower(), detail
    assert not TRACEBACK.search(text), text
    assert "root:" not in text and "import " not in text  # nothing of /etc/passwd or of our source


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(checkpoint path, model, preprocess) of a tiny CLIP with random weights, saved as a torch state dict."""
    checkpoint = str(tmp_path_factory.mktemp("model") / "tiny-vit.pt")
    torch.save(reference_model("tiny-vit").state_dict(), checkpoint)
    model, preprocess = clip.load(checkpoint, device="cpu")
    return checkpoint, model, preprocess


@pytest.fixture(scope="module")
def indexed(tiny, tmp_path_factory):
    """(index path, paths): 3 images of each of 8 labels, embedded into an embeddings file as `embed` writes it."""
    checkpoint, model, preprocess = tiny
    folder = tmp_path_factory.mktemp("photos")
    paths = draw_images(folder, LABELS[:8], per_label=3)
    features = clip.encode_images(model, preprocess, paths, num_workers=0).features
    out = str(folder / "index.safetensors")
    save_search_index(out, features, paths, checkpoint)
    return out, paths


@pytest.fixture(scope="module")
def server(tiny, indexed):
    """(port, index) of the app over the embeddings file, served by uvicorn for the whole module."""
    _, model, preprocess = tiny
    index = open_search_index(indexed[0])
    with running(create_app(index, model, preprocess)) as port:
        yield port, index


# ---------------------------------------------------------------------------------------------------- answers


def test_info(server, tiny, indexed):
    port, _ = server
    answer = http(port, "GET", "/api/info")
    assert answer.status == 200
    info = answer.json()
    assert info["count"] == len(indexed[1]) == 24
    assert info["model"] == tiny[0]  # the name stored in the index
    assert (info["default_k"], info["per_page"], info["max_k"]) == (50, 20, MAX_K)


def test_page_files_are_served_and_load_nothing_from_elsewhere(server):
    port, _ = server
    page = http(port, "GET", "/")
    assert page.status == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    html = page.body.decode()
    assert '<script src="app.js"' in html and 'href="style.css"' in html
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
        answer = http(port, "GET", f"/{name}")
        assert answer.status == 200 and answer.headers["content-type"].startswith(kind)
        assert not re.search(r"https?://", answer.body.decode()), f"{name} loads something from another site"
    assert not re.search(r"(src|href)=\"(https?:)?//", html)


def test_docs_and_openapi(server):
    port, _ = server
    assert http(port, "GET", "/docs").status == 200
    spec = http(port, "GET", "/openapi.json").json()
    assert {"/api/info", "/api/search", "/api/thumb/{id}"} <= set(spec["paths"])
    assert {"get", "post"} <= set(spec["paths"]["/api/search"])


def test_text_search_is_the_library_search_cut_into_pages(server, tiny):
    port, index = server
    _, model, _ = tiny
    scores, ids = index.search(encode_texts(model, ["a photo of a red circle"]), 7)
    one = http(port, "GET", "/api/search?q=a+photo+of+a+red+circle&k=7&per_page=7").json()
    assert one["query"] == {"text": "a photo of a red circle"}
    assert (one["k"], one["total"], one["page"], one["pages"]) == (7, 7, 1, 1)
    assert [r["id"] for r in one["results"]] == ids[0].tolist()
    assert [r["score"] for r in one["results"]] == pytest.approx(scores[0].tolist(), abs=1e-5)
    assert [r["rank"] for r in one["results"]] == list(range(1, 8))

    pages = [http(port, "GET", f"/api/search?q=a+photo+of+a+red+circle&k=7&per_page=3&page={p}").json() for p in (1, 2, 3)]
    assert [a["pages"] for a in pages] == [3, 3, 3] and [a["total"] for a in pages] == [7, 7, 7]
    assert [len(a["results"]) for a in pages] == [3, 3, 1]
    assert [r for a in pages for r in a["results"]] == one["results"]
    first = one["results"][0]
    assert first["thumb"] == f"/api/thumb/{first['id']}" and first["name"] == os.path.basename(index.paths[first["id"]])


def test_k_past_the_index_size_gives_every_image_once(server):
    port, index = server
    answer = http(port, "GET", f"/api/search?q=shapes&k={MAX_K}&per_page=100").json()
    assert answer["total"] == len(index) and answer["pages"] == 1
    assert sorted(r["id"] for r in answer["results"]) == list(range(len(index)))
    scores = [r["score"] for r in answer["results"]]
    assert scores == sorted(scores, reverse=True)


def test_default_k_and_page_size(server):
    port, index = server
    answer = http(port, "GET", "/api/search?q=a+blue+square").json()
    assert (answer["k"], answer["per_page"], answer["total"], answer["pages"]) == (50, 20, len(index), 2)
    assert len(answer["results"]) == 20


def test_image_search_finds_the_image_itself_first(server, indexed):
    port, _ = server
    for row in (0, 7, 23):
        with open(indexed[1][row], "rb") as f:
            answer = upload(port, f.read(), filename=os.path.basename(indexed[1][row]), k=5)
        assert answer.status == 200, answer.body
        body = answer.json()
        assert body["query"] == {"image": os.path.basename(indexed[1][row])}
        assert body["results"][0]["id"] == row
        assert body["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)
        assert len(body["results"]) == 5


def test_image_search_takes_any_mode_and_format(server, indexed):
    port, _ = server
    image = Image.open(indexed[1][4])
    for mode, fmt in (("L", "JPEG"), ("RGBA", "PNG"), ("P", "GIF"), ("RGB", "WEBP"), ("CMYK", "TIFF")):
        out = io.BytesIO()
        image.convert(mode).save(out, fmt)
        answer = upload(port, out.getvalue(), filename=f"query.{fmt.lower()}", k=3)
        assert answer.status == 200, (mode, fmt, answer.body)


def test_thumbnail(server, indexed):
    port, _ = server
    answer = http(port, "GET", "/api/thumb/5")
    assert answer.status == 200 and answer.headers["content-type"] == "image/jpeg"
    thumb = Image.open(io.BytesIO(answer.body))
    assert thumb.format == "JPEG" and max(thumb.size) <= 256
    assert thumb.size == Image.open(indexed[1][5]).size  # 96 px drawings are not enlarged


def serving_one_image(tiny, path: str):
    """A running server whose index holds the one image at `path`, as id 0; yields its port."""
    _, model, preprocess = tiny
    index = Embeddings(torch.nn.functional.normalize(torch.randn(1, 32), dim=-1), [path], "tiny")
    return running(create_app(index, model, preprocess))


def test_large_photos_are_thumbnailed(tiny, tmp_path):
    path = str(tmp_path / "big.jpg")
    Image.new("RGB", (1200, 800), (200, 30, 30)).save(path)
    with serving_one_image(tiny, path) as port:
        answer = http(port, "GET", "/api/thumb/0")
    assert answer.status == 200 and Image.open(io.BytesIO(answer.body)).size == (256, 171)


def mean_colour(answer: Answer) -> tuple[float, ...]:
    return tuple(ImageStat.Stat(Image.open(io.BytesIO(answer.body)).convert("RGB")).mean)


def test_a_replaced_or_deleted_image_is_never_served_from_the_cache(tiny, tmp_path):
    path = str(tmp_path / "photo.png")
    Image.new("RGB", (64, 64), (220, 20, 20)).save(path)
    with serving_one_image(tiny, path) as port:
        first = http(port, "GET", "/api/thumb/0")
        assert mean_colour(first) == pytest.approx((220, 20, 20), abs=8)
        # the browser keeps its copy but asks each time it shows it: unchanged, the answer is a bodiless 304
        assert first.headers["cache-control"] == "private, no-cache" and first.headers["etag"]
        again = http(port, "GET", "/api/thumb/0", headers={"If-None-Match": first.headers["etag"]})
        assert (again.status, again.body, again.headers["etag"]) == (304, b"", first.headers["etag"])

        # edited in place: same inode, same size (a plain colour PNG), only the mtime tells
        Image.new("RGB", (64, 64), (20, 20, 220)).save(path)
        later = os.stat(path).st_mtime + 10
        os.utime(path, (later, later))
        changed = http(port, "GET", "/api/thumb/0", headers={"If-None-Match": first.headers["etag"]})  # the browser's copy is stale
        assert changed.status == 200 and mean_colour(changed) == pytest.approx((20, 20, 220), abs=8)
        assert changed.headers["etag"] != first.headers["etag"]

        # replaced by another file with the same mtime, as a sync tool restoring dates leaves it: the inode tells
        other = str(tmp_path / "other.png")
        Image.new("RGB", (64, 64), (20, 220, 20)).save(other)
        os.utime(other, (later, later))
        os.replace(other, path)
        assert mean_colour(http(port, "GET", "/api/thumb/0")) == pytest.approx((20, 220, 20), abs=8)

        os.remove(path)  # deleted: no thumbnail of it is served any more
        assert_json_error(http(port, "GET", "/api/thumb/0"), 404, "image 0 (photo.png) cannot be read from disk any more")


def test_a_server_capped_below_the_default_k_answers_its_cap(tiny, indexed):
    _, model, preprocess = tiny
    with running(create_app(open_search_index(indexed[0]), model, preprocess, max_k=10)) as port:
        assert http(port, "GET", "/api/info").json()["default_k"] == 10
        for query in ("/api/search?q=a+dog", "/api/search?q=a+dog&k="):
            answer = http(port, "GET", query)
            assert answer.status == 200 and (answer.json()["k"], answer.json()["total"]) == (10, 10), answer.body
        assert_json_error(http(port, "GET", "/api/search?q=a+dog&k=11"), 422, "from 1 to 10")


def test_mounted_under_a_prefix(tiny, indexed):
    from fastapi import FastAPI

    _, model, preprocess = tiny
    parent = FastAPI()
    parent.mount("/photos", create_app(open_search_index(indexed[0]), model, preprocess))
    with running(parent) as port:
        answer = http(port, "GET", "/photos/api/search?q=a+red+circle&k=2").json()
        thumb = answer["results"][0]["thumb"]
        assert thumb.startswith("/photos/api/thumb/")
        assert http(port, "GET", thumb).status == 200
        assert http(port, "GET", "/photos/").status == 200
        assert http(port, "GET", "/photos/docs").status == 200
        # the errors point to the routes where they are: under the prefix
        routes = ["/photos/api/info", "/photos/api/search", "/photos/api/thumb/{id}", "(see /photos/docs)"]
        assert_json_error(http(port, "GET", "/photos/api/nothing"), 404, "nothing at /photos/api/nothing", *routes)
        assert_json_error(http(port, "DELETE", "/photos/api/search"), 405, "see /photos/docs")
        assert http(port, "GET", "/photos/api/info").status == 200


def test_errors_at_the_top_level_point_to_unprefixed_routes(server):
    detail = http(server[0], "GET", "/api/nothing").json()["detail"]
    assert detail == "there is nothing at /api/nothing; the API is /api/info, /api/search and /api/thumb/{id} (see /docs)"


def test_a_faiss_index_is_served_like_an_embeddings_file(server, tiny, indexed, tmp_path):
    pytest.importorskip("openclip_lite.index", reason="index.py (the FAISS Index) is not in this checkout yet")
    _, model, preprocess = tiny
    port, embeddings = server
    folder = str(tmp_path / "faiss-index")
    save_search_index(folder, embeddings.features, embeddings.paths, embeddings.model, kind="flat")
    with running(create_app(open_search_index(folder), model, preprocess)) as faiss_port:
        for path in ("/api/info", "/api/search?q=a+green+triangle&k=30&per_page=30", "/api/search?q=a+green+triangle&k=30&page=2"):
            ours, theirs = http(faiss_port, "GET", path).json(), http(port, "GET", path).json()
            if "results" in ours:
                assert [r["id"] for r in ours["results"]] == [r["id"] for r in theirs["results"]]
                assert [r["score"] for r in ours["results"]] == pytest.approx([r["score"] for r in theirs["results"]], abs=1e-5)
                ours.pop("results"), theirs.pop("results")
            assert ours == theirs
        with open(indexed[1][9], "rb") as f:
            first = upload(faiss_port, f.read(), k=3).json()["results"][0]
        assert first["id"] == 9 and first["score"] == pytest.approx(1.0, abs=1e-4)


# ---------------------------------------------------------------------------------------------------- bad requests


BAD_GETS = [
    # path traversal, in the id and around it
    ("/api/thumb/..%2F..%2Fetc%2Fpasswd", 404, ["nothing at"]),
    ("/api/thumb/..%2f..%2f..%2f..%2fetc%2fpasswd", 404, ["nothing at"]),
    ("/api/thumb/%2e%2e%2f%2e%2e%2fetc%2fpasswd", 404, ["nothing at"]),
    ("/api/thumb/../../etc/passwd", 404, ["nothing at"]),
    ("/api/thumb/0/../../../etc/passwd", 404, ["nothing at"]),
    ("/api/thumb/%2Fetc%2Fpasswd", 404, ["nothing at"]),
    ("/api/thumb/..", 422, ["id must be a whole number"]),
    ("/api/thumb/%00", 422, ["id must be a whole number"]),
    ("/../openclip_lite/server.py", 404, ["nothing at"]),
    ("/app.js/../../server.py", 404, ["nothing at"]),
    ("/static/index.html", 404, ["nothing at"]),
    ("/%2e%2e/%2e%2e/etc/passwd", 404, ["nothing at"]),
    # ids that are not ids of this index
    ("/api/thumb/-1", 422, ["id must be a whole number from 0 to 23", "-1"]),
    ("/api/thumb/1e9", 422, ["id must be a whole number", "1e9"]),
    ("/api/thumb/abc", 422, ["id must be a whole number", "abc"]),
    ("/api/thumb/1.5", 422, ["id must be a whole number"]),
    ("/api/thumb/0x1", 422, ["id must be a whole number"]),
    ("/api/thumb/24", 404, ["no image has id 24", "0 to 23"]),
    ("/api/thumb/1000000000", 404, ["no image has id"]),
    ("/api/thumb/99999999999999999999999999999", 404, ["no image has id"]),
    # queries
    ("/api/search", 422, ["query is empty"]),
    ("/api/search?q=", 422, ["query is empty"]),
    ("/api/search?q=%20%20%09", 422, ["query is empty"]),
    ("/api/search?q=" + "a" * 1001, 422, ["at most 1000 characters"]),
    ("/api/search?q=dog&k=0", 422, ["k, the number of results, must be a whole number from 1 to 1000", "'0'"]),
    ("/api/search?q=dog&k=-3", 422, ["from 1 to 1000"]),
    ("/api/search?q=dog&k=1001", 422, ["from 1 to 1000", "1001"]),
    ("/api/search?q=dog&k=1000000000000", 422, ["from 1 to 1000"]),
    ("/api/search?q=dog&k=1e9", 422, ["from 1 to 1000"]),
    ("/api/search?q=dog&k=abc", 422, ["from 1 to 1000"]),
    ("/api/search?q=dog&k=2.5", 422, ["from 1 to 1000"]),
    ("/api/search?q=dog&k=..%2F..%2Fetc%2Fpasswd", 422, ["from 1 to 1000"]),
    ("/api/search?q=dog&page=0", 422, ["page must be a whole number from 1"]),
    ("/api/search?q=dog&page=3", 422, ["page 3 does not exist", "2 pages"]),
    ("/api/search?q=dog&page=..%2F..", 422, ["page must be"]),
    ("/api/search?q=dog&per_page=0", 422, ["per_page"]),
    ("/api/search?q=dog&per_page=101", 422, ["per_page"]),
    # routes and methods that do not exist
    ("/api/nothing", 404, ["nothing at"]),
]


@pytest.mark.parametrize("path, status, words", BAD_GETS, ids=[p for p, _, _ in BAD_GETS])
def test_bad_get_is_a_4xx_json_error(server, path, status, words):
    assert_json_error(http(server[0], "GET", path), status, *words)


def test_a_description_longer_than_the_model_reads_is_refused_not_cut(server):
    port, _ = server
    fits = "a photo of " * 25  # 75 tokens, 77 with the start and end markers: all the model reads
    assert http(port, "GET", "/api/search?q=" + fits.strip().replace(" ", "+")).status == 200
    for text, tokens in ((fits + "a", 78), ("a photo of " * 30 + "a blue square", 95)):
        with pytest.raises(clip.TextTooLongError):  # the library's rule, which the server follows
            clip.tokenize(text)
        answer = http(port, "GET", "/api/search?q=" + text.replace(" ", "+"))
        assert_json_error(answer, 422, f"the description is too long for the model: {tokens} tokens where it reads at most 77; shorten it")


def test_a_path_in_the_query_is_only_text(server, indexed):
    answer = http(server[0], "GET", "/api/search?q=..%2F..%2F..%2Fetc%2Fpasswd&k=3")
    assert answer.status == 200
    names = {os.path.basename(p) for p in indexed[1]}
    assert all(r["name"] in names for r in answer.json()["results"])


def test_wrong_method_is_a_json_error(server):
    assert_json_error(http(server[0], "DELETE", "/api/search"), 405, "not allowed")
    assert_json_error(http(server[0], "POST", "/api/thumb/1"), 405, "not allowed")


def test_non_image_uploads(server):
    port, _ = server
    assert_json_error(upload(port, b"hello, I am not a picture\n" * 40, filename="notes.jpg"), 422, "notes.jpg", "not an image")
    assert_json_error(upload(port, b"", filename="empty.png"), 422, "empty.png is empty")
    truncated = png_bytes(Image.new("RGB", (64, 64), (255, 0, 0)))[:60]
    assert_json_error(upload(port, truncated, filename="cut.png"), 422, "cut.png")
    with open(__file__, "rb") as f:
        assert_json_error(upload(port, f.read(), filename="../../../etc/passwd"), 422, "passwd is not an image")


def test_16_bit_upload_is_encoded(server):
    port, _ = server
    out = io.BytesIO()
    Image.new("I;16", (8, 8)).save(out, "PNG")
    assert upload(port, out.getvalue(), filename="deep.png").status == 200  # 16-bit: encoded (with a warning)


def test_bad_form_fields(server):
    port, _ = server
    image = png_bytes(draw("red circle", random.Random(1), 64))
    for k, words in (("0", ["from 1 to 1000"]), ("1000000000000", ["from 1 to 1000"]), ("abc", ["from 1 to 1000"]), ("-1", ["from 1 to 1000"])):
        assert_json_error(upload(port, image, k=k), 422, *words)
    assert_json_error(upload(port, image, page="9"), 422, "page 9 does not exist")
    body, headers = multipart({"k": "5"})  # no file
    assert_json_error(http(port, "POST", "/api/search", body, headers), 422, "image must be an image file")
    body, headers = multipart({"image": "not a file", "k": "5"})  # a plain field where the file should be
    assert_json_error(http(port, "POST", "/api/search", body, headers), 422, "image must be an image file")
    assert_json_error(http(port, "POST", "/api/search", b'{"image": "x"}', {"Content-Type": "application/json"}), 422, "image")
    garbled = b"--zzz\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n\r\nabc"  # no closing boundary
    assert_json_error(http(port, "POST", "/api/search", garbled, {"Content-Type": "multipart/form-data; boundary=zzz"}), 422, "image must be")
    assert_json_error(http(port, "POST", "/api/search", b"\r\n\r\n--", {"Content-Type": "multipart/form-data"}), 400, "multipart")


def test_an_empty_number_is_its_default_in_text_and_image_search(server, indexed):
    """`k=` (a cleared K box) means the default K in both searches, and so does an empty page or per_page."""
    port, index = server
    plain = http(port, "GET", "/api/search?q=a+red+circle").json()
    for empty in ("k=", "k=&page=&per_page=", "k=%20"):
        answer = http(port, "GET", f"/api/search?q=a+red+circle&{empty}")
        assert answer.status == 200, (empty, answer.body)
        assert answer.json() == plain
    assert (plain["k"], plain["page"], plain["per_page"], plain["total"]) == (50, 1, 20, len(index))
    with open(indexed[1][3], "rb") as f:
        image = f.read()
    plain = upload(port, image).json()
    for empty in ({"k": ""}, {"k": "", "page": "", "per_page": ""}, {"k": " "}):
        answer = upload(port, image, **empty)
        assert answer.status == 200, (empty, answer.body)
        assert answer.json() == plain
    assert (plain["k"], plain["page"], plain["per_page"], plain["total"]) == (50, 1, 20, len(index))
    assert plain["results"][0]["id"] == 3


def test_oversized_uploads_are_refused(server):
    port, _ = server
    big = b"\xff" * (MAX_UPLOAD_BYTES + 1)
    assert_json_error(upload(port, big, filename="huge.jpg"), 413, "larger than 20 MiB")
    # a Content-Length that announces too much is refused before the body is read
    assert_json_error(http(port, "POST", "/api/search", b"x" * 10, {"Content-Length": str(10**12), "Content-Type": "multipart/form-data; boundary=x"}), 413, "larger than")
    # a chunked body (no Content-Length) is cut off once it passes the limit
    body, headers = multipart(files={"image": ("huge.png", b"\0" * (MAX_UPLOAD_BYTES + 2**17), "image/png")})
    chunks = [body[i : i + 2**20] for i in range(0, len(body), 2**20)]
    assert_json_error(http(port, "POST", "/api/search", headers=headers, chunks=chunks), 413, "larger than")
    # and the server still answers afterwards
    assert http(port, "GET", "/api/info").status == 200


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL's own warning, for the 100 Mpx one
@pytest.mark.parametrize("side", [10_000, 14_000])  # 100 Mpx: past PIL's limit (89 Mpx); 196 Mpx: past twice it
def test_decompression_bombs_are_refused(server, side):
    bomb = png_bytes(Image.new("1", (side, side)))  # a few kB on the wire, 100+ million pixels decoded
    assert len(bomb) < 100_000
    assert_json_error(upload(server[0], bomb, filename="bomb.png"), 413, "bomb.png", "pixels")


def test_pixel_limit_is_the_one_given(tiny, indexed):
    _, model, preprocess = tiny
    with running(create_app(open_search_index(indexed[0]), model, preprocess, max_pixels=64 * 64)) as port:
        assert upload(port, png_bytes(Image.new("RGB", (64, 64))), k=1).status == 200
        assert_json_error(upload(port, png_bytes(Image.new("RGB", (65, 64))), k=1), 413, "65x64", "4,096")


def test_a_missing_file_is_a_404_and_a_bug_a_500_without_traceback(tiny, tmp_path):
    _, model, preprocess = tiny

    class BrokenIndex:
        model = "tiny"
        paths = (str(tmp_path / "gone.jpg"),)

        def __len__(self):
            return 1

        def search(self, queries, k):
            raise RuntimeError("Traceback: an internal failure with a secret /home/path")

    with running(create_app(BrokenIndex(), model, preprocess)) as port:
        assert_json_error(http(port, "GET", "/api/thumb/0"), 404, "gone.jpg", "cannot be read")
        answer = http(port, "GET", "/api/search?q=dog")
        assert answer.status == 500 and answer.json() == {"detail": "the server failed to answer this request; its log says why"}


def test_a_model_of_another_size_is_refused_when_the_app_is_made(tiny, demo, indexed, tmp_path):
    """The tiny model's 32-dimensional features against the demo model's 64: no app, and an error that names both
    sizes and the model to use, for an embeddings file, a FAISS index and a Milvus collection alike."""
    from openclip_lite.index import build_index

    checkpoint, tiny_model, tiny_preprocess = tiny
    demo_model, demo_preprocess = demo
    embeddings = open_search_index(indexed[0])  # made by the tiny model
    assert embeddings.features.shape[1] == tiny_model.text_projection.shape[1] == 32 != demo_model.text_projection.shape[1]
    with pytest.raises(ValueError) as raised:
        create_app(embeddings, demo_model, demo_preprocess, model_name="demo-model")
    assert str(raised.value) == (
        f"the model demo-model makes 64-dimensional features but the index holds 32-dimensional ones, so no search could run; "
        f"serve it with the model that made it, {checkpoint} (`openclip-lite serve` uses that one when --model is left out), "
        f"or embed the images again with this model"
    )
    faiss_index = build_index(embeddings.features, paths=embeddings.paths, kind="flat", model=checkpoint)
    with pytest.raises(ValueError, match="makes 64-dimensional features but the index holds 32-dimensional ones"):
        create_app(faiss_index, demo_model, demo_preprocess)
    with MilvusIndex(str(tmp_path / "milvus.db"), "shapes", dim=64, model=DEMO) as collection:
        with pytest.raises(ValueError, match=f"makes 32-dimensional features but the index holds 64-dimensional ones.*made it, {re.escape(DEMO)}"):
            create_app(collection, tiny_model, tiny_preprocess, model_name=checkpoint)
        create_app(collection, demo_model, demo_preprocess)  # the right model is served
    create_app(faiss_index, tiny_model, tiny_preprocess)


def test_serve_command_with_a_model_of_another_size_is_one_line_before_serving(indexed):
    # a subprocess with a time limit: a command that went on to serve would otherwise never return
    command = [sys.executable, "-m", "openclip_lite.cli", "serve", indexed[0], "--model", DEMO, "--port", str(free_port()), "--device", "cpu"]
    try:
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"serve started with a model of another size: {e.stdout}")
    assert result.returncode == 1 and "serving" not in result.stdout, result
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    for words in ("openclip-lite: error: ", f"the model {DEMO} makes 64-dimensional", "32-dimensional ones", "--model is left out"):
        assert words in result.stderr, result.stderr


# ---------------------------------------------------------------------------------------------------- concurrency


def test_concurrent_requests_get_the_answers_of_serial_ones(server, indexed):
    port, _ = server
    images = []
    for path in indexed[1][:4]:
        with open(path, "rb") as f:
            images.append((os.path.basename(path), f.read()))
    texts = ["a red circle", "a blue square", "a green triangle", "a yellow circle"]

    def ask(n: int):
        if n % 2:
            name, data = images[n // 2 % len(images)]
            return upload(port, data, filename=name, k=10).json()["results"]
        return http(port, "GET", f"/api/search?q={texts[n // 2 % len(texts)].replace(' ', '+')}&k=10").json()["results"]

    serial = [ask(n) for n in range(16)]
    with ThreadPoolExecutor(16) as pool:
        parallel = list(pool.map(ask, range(16)))
    for one, other in zip(serial, parallel):
        assert [r["id"] for r in one] == [r["id"] for r in other]
        assert [r["score"] for r in one] == pytest.approx([r["score"] for r in other], abs=1e-5)


# ---------------------------------------------------------------------------------------------------- a Milvus collection


def fill_milvus(uri: str, model, preprocess) -> tuple[dict[str, int], torch.Tensor]:
    """Collection "shapes" at `uri`: the features of examples/assets/*.jpg under ids that are not row numbers.

    Returns ({file name: id}, the features in file-name order).
    """
    images = sorted(os.path.join(ASSETS, f) for f in os.listdir(ASSETS) if f.endswith(".jpg"))
    features = clip.encode_images(model, preprocess, images, num_workers=0).features
    ids = [10**12 + 7919 * n for n in range(len(images))]  # far from 0..n-1: a lookup by row would find none
    with MilvusIndex(uri, "shapes", dim=features.shape[1], model=DEMO) as index:
        index.add(features, ids=ids, paths=images)
    return {os.path.basename(path): i for path, i in zip(images, ids)}, features


@pytest.fixture(scope="module")
def demo():
    return clip.load(DEMO, device="cpu")


@pytest.fixture(scope="module")
def milvus_server(demo, tmp_path_factory):
    """(port, {file name: id}, features) of the app over the reopened collection, which names its model itself."""
    model, preprocess = demo
    uri = str(tmp_path_factory.mktemp("milvus") / "milvus.db")
    ids, features = fill_milvus(uri, model, preprocess)
    with MilvusIndex(uri, "shapes") as index, running(create_app(index, model, preprocess)) as port:
        yield port, ids, features


def test_milvus_info(milvus_server):
    port, ids, _ = milvus_server
    info = http(port, "GET", "/api/info").json()
    assert (info["count"], info["model"]) == (6, DEMO) and len(ids) == 6


def test_milvus_text_search_ranks_the_red_circle_first(milvus_server, demo):
    port, ids, features = milvus_server
    answer = http(port, "GET", "/api/search?q=a+photo+of+a+red+circle&k=10&per_page=4").json()
    assert (answer["total"], answer["pages"]) == (6, 2)
    first = answer["results"][0]
    assert (first["name"], first["id"], first["thumb"]) == ("red_circle.jpg", ids["red_circle.jpg"], f"/api/thumb/{ids['red_circle.jpg']}")
    results = answer["results"] + http(port, "GET", "/api/search?q=a+photo+of+a+red+circle&k=10&per_page=4&page=2").json()["results"]
    assert [r["id"] for r in results] == [ids[r["name"]] for r in results]  # each id is its own image's
    assert sorted(r["id"] for r in results) == sorted(ids.values())
    expected = (features @ encode_texts(demo[0], ["a photo of a red circle"])[0]).sort(descending=True).values
    assert [r["score"] for r in results] == pytest.approx(expected.tolist(), abs=1e-4)


def test_milvus_image_search_finds_the_image_itself_first(milvus_server):
    port, ids, _ = milvus_server
    for name, id in ids.items():
        with open(os.path.join(ASSETS, name), "rb") as f:
            first = upload(port, f.read(), filename=name, k=3).json()["results"][0]
        assert (first["id"], first["name"]) == (id, name)
        assert first["score"] == pytest.approx(1.0, abs=1e-4)


def test_milvus_thumbnail_of_a_result(milvus_server):
    port, ids, _ = milvus_server
    thumb = http(port, "GET", "/api/search?q=a+green+triangle&k=1").json()["results"][0]["thumb"]
    assert thumb == f"/api/thumb/{ids['green_triangle.jpg']}"
    answer = http(port, "GET", thumb)
    assert answer.status == 200 and answer.headers["content-type"] == "image/jpeg"
    image = Image.open(io.BytesIO(answer.body))
    assert image.format == "JPEG" and image.size == (160, 160)
    for name in ids:  # the green triangle's picture, through one more JPEG round, and none of the others
        original = Image.open(os.path.join(ASSETS, name)).convert("RGB")
        difference = sum(ImageStat.Stat(ImageChops.difference(image.convert("RGB"), original)).mean) / 3
        assert (difference < 4) == (name == "green_triangle.jpg"), (name, difference)


@pytest.mark.parametrize("id", [0, 5, 6, 10**12 + 1, 2**63 - 1, 2**63, 10**29])  # rows, near misses, past int64
def test_milvus_unknown_id_is_a_404(milvus_server, id):
    assert_json_error(http(milvus_server[0], "GET", f"/api/thumb/{id}"), 404, f"no image has id {id}")


def test_milvus_negative_id_names_no_range(milvus_server):
    answer = http(milvus_server[0], "GET", "/api/thumb/-1")
    assert_json_error(answer, 422, "id must be a whole number from 0")
    assert "from 0 to" not in answer.json()["detail"]  # a collection's ids are not 0..n-1


def test_a_faiss_index_with_its_own_ids_serves_each_id_its_own_image(demo):
    from openclip_lite.index import build_index

    model, preprocess = demo
    images = sorted(os.path.join(ASSETS, f) for f in os.listdir(ASSETS) if f.endswith(".jpg"))
    features = clip.encode_images(model, preprocess, images, num_workers=0).features
    ids = [10**12 + 7919 * n for n in range(len(images))]  # not rows: a lookup by row would find none
    index = build_index(features, ids=ids, paths=images, kind="flat", model=DEMO)
    with running(create_app(index, model, preprocess)) as port:
        results = http(port, "GET", "/api/search?q=a+photo+of+a+red+circle&k=6&per_page=6").json()["results"]
        assert results[0]["name"] == "red_circle.jpg"
        assert [r["id"] for r in results] == [ids[images.index(os.path.join(ASSETS, r["name"]))] for r in results]
        for r in results[:2]:
            thumb = Image.open(io.BytesIO(http(port, "GET", r["thumb"]).body)).convert("RGB")
            original = Image.open(os.path.join(ASSETS, r["name"])).convert("RGB")
            assert sum(ImageStat.Stat(ImageChops.difference(thumb, original)).mean) / 3 < 4
        assert_json_error(http(port, "GET", "/api/thumb/0"), 404, "no image has id 0")


@pytest.mark.parametrize("kind", ["faiss", "milvus"])
def test_images_added_while_serving_are_counted_and_found(demo, kind, tmp_path):
    """An app that keeps adding photos to the index it serves: the page's count and the searches follow."""
    from openclip_lite.index import build_index

    model, preprocess = demo
    images = sorted(os.path.join(ASSETS, f) for f in os.listdir(ASSETS) if f.endswith(".jpg"))
    features = clip.encode_images(model, preprocess, images, num_workers=0).features
    ids = [10**12 + 7919 * n for n in range(len(images))]
    first, later = slice(0, 2), slice(2, None)
    if kind == "faiss":
        index = build_index(features[first], ids=ids[first], paths=images[first], kind="flat", model=DEMO)
    else:
        index = MilvusIndex(str(tmp_path / "milvus.db"), "shapes", dim=features.shape[1], model=DEMO)
        index.add(features[first], ids=ids[first], paths=images[first])
    with index if kind == "milvus" else contextlib.nullcontext(), running(create_app(index, model, preprocess)) as port:
        assert http(port, "GET", "/api/info").json()["count"] == 2
        index.add(features[later], ids=ids[later], paths=images[later])
        assert http(port, "GET", "/api/info").json()["count"] == len(images)
        for n, path in enumerate(images):
            with open(path, "rb") as f:
                top = upload(port, f.read(), filename=os.path.basename(path), k=10).json()
            assert top["total"] == len(images)
            assert (top["results"][0]["id"], top["results"][0]["name"]) == (ids[n], os.path.basename(path))
        assert http(port, "GET", f"/api/thumb/{ids[-1]}").status == 200


# ---------------------------------------------------------------------------------------------------- the command


def test_import_openclip_lite_imports_no_server_engine():
    code = "import sys, openclip_lite; print(sorted(m for m in ('fastapi', 'uvicorn', 'starlette', 'openclip_lite.server') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr


@contextlib.contextmanager
def serve_command(*args: str):
    """`openclip-lite serve ARGS --port P --device cpu` in a subprocess, once it answers; yields (P, output), a list
    that holds the command's whole output once the block has stopped it."""
    port, output = free_port(), []
    command = [sys.executable, "-m", "openclip_lite.cli", "serve", *args, "--port", str(port), "--device", "cpu"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                http(port, "GET", "/api/info")
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"serve did not start: {process.communicate(timeout=5)[0] if process.poll() is not None else 'timed out'}")
                time.sleep(0.2)
        yield port, output
    finally:
        process.terminate()
        output.append(process.communicate(timeout=30)[0])


def test_serve_command_binds_loopback_and_answers(indexed):
    with serve_command(indexed[0]) as (port, output):
        answer = http(port, "GET", "/api/info")
        assert answer.status == 200 and answer.json()["count"] == 24
        with pytest.raises(OSError):  # 127.0.0.2 is this machine too, but only 127.0.0.1 was bound
            socket.create_connection(("127.0.0.2", port), timeout=5).close()
    assert f"http://127.0.0.1:{port}/" in output[0] and "24 images" in output[0]
    assert not TRACEBACK.search(output[0]), output[0]


def test_serve_command_serves_a_milvus_collection(demo, tmp_path):
    uri = str(tmp_path / "milvus.db")
    ids, _ = fill_milvus(uri, *demo)  # closed again: the command's process takes Milvus Lite's LOCK
    with serve_command("--milvus", uri, "--collection", "shapes") as (port, output):  # the model: the collection's
        info = http(port, "GET", "/api/info").json()
        assert (info["model"], info["count"]) == (DEMO, 6)
        first = http(port, "GET", "/api/search?q=a+photo+of+a+red+circle&k=3").json()["results"][0]
        assert (first["name"], first["id"]) == ("red_circle.jpg", ids["red_circle.jpg"])
        assert http(port, "GET", first["thumb"]).headers["content-type"] == "image/jpeg"
    assert f"serving 6 images with {DEMO}" in output[0]
    assert not TRACEBACK.search(output[0]), output[0]
    with MilvusIndex(uri, "shapes") as index:  # the collection opens again once the command has stopped, whole
        assert len(index) == 6


def test_serve_command_errors_are_one_line(tmp_path, capsys):
    from openclip_lite.cli import main

    assert main(["serve", str(tmp_path / "none.safetensors"), "--port", str(free_port())]) == 1
    err = capsys.readouterr().err
    assert "none.safetensors" in err and "embed" in err and "Traceback" not in err


def test_serve_command_needs_an_index_or_a_collection_not_both(tmp_path, capsys):
    from openclip_lite.cli import main

    uri = str(tmp_path / "milvus.db")
    for args, words in [
        ([], ["embed --out", "--milvus URI --collection NAME"]),
        ([str(tmp_path / "index.safetensors"), "--milvus", uri, "--collection", "shapes"], ["index.safetensors", "--milvus", "not both"]),
        (["--milvus", uri], ["--milvus needs --collection"]),
    ]:
        assert main(["serve", *args, "--port", str(free_port())]) == 1, args
        err = capsys.readouterr().err
        assert err.startswith("openclip-lite: error: ") and all(word in err for word in words), err
    assert not os.path.exists(uri)  # refused before Milvus Lite made anything


def test_serve_command_needs_a_model_for_an_unnamed_collection(tmp_path, capsys):
    from openclip_lite.cli import main

    uri = str(tmp_path / "milvus.db")
    MilvusIndex(uri, "unnamed", dim=64).close()
    assert main(["serve", "--milvus", uri, "--collection", "unnamed", "--port", str(free_port())]) == 1
    err = capsys.readouterr().err
    assert "'unnamed'" in err and "does not name its model; give it with --model" in err and "Traceback" not in err


def test_serve_command_on_a_port_in_use_is_one_line_before_serving(indexed, capsys):
    from openclip_lite.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["serve", indexed[0], "--port", str(taken.getsockname()[1]), "--device", "cpu"]) == 1
    captured = capsys.readouterr()
    assert "serving" not in captured.out and captured.err.startswith("openclip-lite: error: cannot listen on 127.0.0.1 port")
    assert len(captured.err.strip().splitlines()) == 1
