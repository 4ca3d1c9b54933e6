"""`openclip-lite serve`: a JSON API over a search index, and one plain HTML page that uses it.

Routes (errors are always JSON `{"detail": "<a sentence>"}` with a 4xx status, never a traceback):
- `GET  /`                   the page (static/index.html, app.js, style.css: no build step, nothing from a CDN)
- `GET  /api/info`           the model, the number of images and the server's limits
- `GET  /api/search`         text -> images: `q`, `k` (top-k, default 50), `page`, `per_page` (default 20)
- `POST /api/search`         image -> images: multipart form with the file in `image`, and `k`, `page`, `per_page`
                             (in both searches an empty number, `k=`, means its default, as a blank form field does)
- `GET  /api/thumb/{id}`     a JPEG thumbnail of image `id` (its row in an index file, its primary key in a Milvus
                             collection); files are only ever found by id, never by a path from the request
- `GET  /docs`               FastAPI's OpenAPI docs (`/openapi.json`)

The routes parse, call the library (`encode_texts`, `encode_images`, `index.search`) and shape JSON; the page
does nothing the API does not offer (it asks the API for each page of results). Routes are plain functions, which
FastAPI runs in its thread pool, so requests are served concurrently; the one model is shared, and a lock lets
one request at a time run it.
"""

import functools
import io
import ipaddress
import math
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional, Union

from PIL import Image, ImageOps

from .errors import ImageError, InputError, TextTooLongError, require

require("fastapi", "serve")
try:  # python-multipart parses the uploads; its import name was "multipart" before 0.0.13
    import python_multipart  # noqa: F401
except ImportError:
    require("multipart", "serve")

from fastapi import FastAPI, File, Form, Header, Query, Request, UploadFile
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, BeforeValidator
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

__all__ = ["create_app", "serve"]

DEFAULT_K = 50
MAX_K = 1000  # more results than anyone pages through, and a bound on the work one request can ask for
PER_PAGE = 20
MAX_PER_PAGE = 100
MAX_QUERY_CHARS = 1000  # a cheap bound before tokenizing; the model's context (77 tokens) is the real limit, a 422 past it
MAX_UPLOAD_BYTES = 20 * 2**20
MULTIPART_OVERHEAD = 64 * 2**10  # boundaries, part headers and the small form fields beside the file
THUMB_SIZE = 256  # pixels on the longer side
STATIC = Path(__file__).with_name("static")
PAGE_FILES = {"/": ("index.html", "text/html; charset=utf-8"), "/app.js": ("app.js", "text/javascript; charset=utf-8"), "/style.css": ("style.css", "text/css; charset=utf-8")}
# the page loads only its own files; thumbnails come from the API and the query preview is a blob: URL
PAGE_POLICY = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"


# ------------------------------------------------------------------------------------------ the JSON shapes


class Info(BaseModel):
    model: str
    count: int  # images in the index
    default_k: int
    max_k: int
    per_page: int
    max_per_page: int
    max_upload_bytes: int
    max_query_chars: int


class Result(BaseModel):
    rank: int  # 1 is the best match
    id: int  # the image's id in the index: GET /api/thumb/{id}
    score: float  # cosine similarity
    name: str  # the file's name, without its folder
    thumb: str  # the thumbnail's URL path


class SearchAnswer(BaseModel):
    query: dict[str, str]  # {"text": q} or {"image": the uploaded file's name}
    k: int
    total: int  # results in all pages: min(k, images in the index)
    page: int
    per_page: int
    pages: int
    results: list[Result]  # this page's results, best first


class ErrorBody(BaseModel):
    detail: str


ERRORS = {status: {"model": ErrorBody} for status in (404, 413, 422)}


# ------------------------------------------------------------------------------------------ the app


def create_app(
    index: Any,
    model: Any,
    preprocess: Callable,
    *,
    model_name: Optional[str] = None,
    max_k: int = MAX_K,
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
    max_pixels: Optional[int] = None,
) -> FastAPI:
    """The FastAPI app that serves `index` (see the module's docstring for the routes).

    index : what `openclip_lite.search.open_search_index` returns (an `Embeddings` file or an `index.Index`),
        or a `milvus.MilvusIndex`: anything with `search(queries, k) -> (scores, ids)`, `len()`, and either
        `get_paths(ids)` or `paths` (then ids are rows of it)
    model, preprocess : as `openclip_lite.load` returns them; the model must be the one that made the index
    model_name : shown by /api/info; default: the name stored in the index
    max_k : the most results one search may ask for
    max_upload_bytes : the largest image upload accepted (413 past it)
    max_pixels : the most pixels an uploaded image may have; default: PIL's decompression-bomb limit
        (`PIL.Image.MAX_IMAGE_PIXELS`, read at each upload)

    Mount it in another app with `parent.mount("/photos", create_app(...))`: the page and the thumbnail URLs in
    the answers use paths relative to where it is mounted.

    Raises ValueError when the model's features and the index's have different sizes: every search would fail.
    """
    name = model_name or getattr(index, "model", "") or ""
    _check_dimensions(index, model, name)
    default_k = min(DEFAULT_K, max_k)  # a server capped below 50 answers its cap by default
    paths_of, last_id = _path_lookup(index)
    # len(index) at each request, not once: an app may go on adding photos to the FAISS index or the Milvus
    # collection it serves (a Milvus count is one query, a FAISS one an attribute)
    lock = threading.Lock()  # one inference at a time on the shared model
    page_files = {route: ((STATIC / file).read_bytes(), media_type) for route, (file, media_type) in PAGE_FILES.items()}

    app = FastAPI(
        title="openclip-lite search",
        version=_version(),
        description=f"Search images by text or by image with CLIP ({name or 'model unnamed'}).",
    )
    app.add_middleware(_BodyLimit, max_bytes=max_upload_bytes + MULTIPART_OVERHEAD)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, functools.partial(_validation_error, max_k=max_k, last_id=last_id))
    app.add_exception_handler(Exception, _unexpected_error)

    def page_route(route: str):
        content, media_type = page_files[route]

        def page() -> Response:
            return Response(content, media_type=media_type, headers={"Content-Security-Policy": PAGE_POLICY, "Cache-Control": "no-cache"})

        app.get(route, include_in_schema=False)(page)

    for route in page_files:
        page_route(route)

    @app.get("/api/info", response_model=Info, summary="The model, the number of images and the limits")
    def info() -> Info:
        return Info(
            model=name,
            count=len(index),
            default_k=default_k,
            max_k=max_k,
            per_page=PER_PAGE,
            max_per_page=MAX_PER_PAGE,
            max_upload_bytes=max_upload_bytes,
            max_query_chars=MAX_QUERY_CHARS,
        )

    def answer(request: Request, query: dict[str, str], features, k: int, page: int, per_page: int) -> SearchAnswer:
        """The top-k rows for features (1, dim), cut to one page."""
        count = len(index)
        if count:
            scores, ids = index.search(features.float().cpu(), min(k, count))
            rows = [(int(i), float(s)) for s, i in zip(scores.tolist()[0], ids.tolist()[0]) if i >= 0]  # FAISS pads with -1
        else:
            rows = []
        pages = max(1, math.ceil(len(rows) / per_page))
        if page > pages:
            raise HTTPException(422, f"page {page} does not exist: {len(rows)} results make {pages} page{'s' * (pages > 1)} of {per_page}")
        first = (page - 1) * per_page
        shown = rows[first : first + per_page]
        paths = paths_of([i for i, _ in shown])  # this page's only: a collection may hold billions
        root = request.scope.get("root_path", "")
        results = [
            Result(rank=first + n + 1, id=i, score=score, name=os.path.basename(path or ""), thumb=f"{root}/api/thumb/{i}")
            for n, ((i, score), path) in enumerate(zip(shown, paths))
        ]
        return SearchAnswer(query=query, k=k, total=len(rows), page=page, per_page=per_page, pages=pages, results=results)

    @app.get("/api/search", response_model=SearchAnswer, responses=ERRORS, summary="Images that match a text")
    def search_text(
        request: Request,
        q: Annotated[str, Query(max_length=MAX_QUERY_CHARS, description='what to look for, e.g. "a photo of a red circle"')] = "",
        k: Annotated[int, Query(ge=1, le=max_k, description="how many results in all (top-k)"), _blank_is(default_k)] = default_k,
        page: Annotated[int, Query(ge=1, description="which page of the k results, from 1"), _blank_is(1)] = 1,
        per_page: Annotated[int, Query(ge=1, le=MAX_PER_PAGE, description="results a page"), _blank_is(PER_PAGE)] = PER_PAGE,
    ) -> SearchAnswer:
        from .search import encode_texts

        text = q.strip()
        if not text:
            raise HTTPException(422, 'The query is empty: type what to look for, e.g. "a photo of a dog".')
        try:
            with lock:
                features = encode_texts(model, [text])  # never truncate: a cut text is another query, answered silently
        except TextTooLongError as e:
            raise HTTPException(422, _too_long(text, model.context_length)) from e
        return answer(request, {"text": text}, features, k, page, per_page)

    @app.post("/api/search", response_model=SearchAnswer, responses=ERRORS, summary="Images that look like an uploaded image")
    def search_image(
        request: Request,
        image: Annotated[UploadFile, File(description="a JPEG, PNG, WebP, GIF, BMP or TIFF file")],
        k: Annotated[int, Form(ge=1, le=max_k, description="how many results in all (top-k)"), _blank_is(default_k)] = default_k,
        page: Annotated[int, Form(ge=1, description="which page of the k results, from 1"), _blank_is(1)] = 1,
        per_page: Annotated[int, Form(ge=1, le=MAX_PER_PAGE, description="results a page"), _blank_is(PER_PAGE)] = PER_PAGE,
    ) -> SearchAnswer:
        from .search import encode_images

        filename = os.path.basename(image.filename or "") or "the upload"
        data = image.file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise HTTPException(413, f"{filename} is larger than {_size(max_upload_bytes)}, the most this server accepts; upload a smaller image")
        picture = _decode_image(data, filename, max_pixels)
        try:
            with lock:
                features = encode_images(model, preprocess, [picture], num_workers=0).features
        except ImageError as e:
            raise HTTPException(422, f"{filename} cannot be used: {e}") from e
        return answer(request, {"image": filename}, features, k, page, per_page)

    @functools.lru_cache(maxsize=1024)  # ~10 kB each: the pages a session flips through stay in memory
    def thumbnail(path: str, identity: tuple[int, int, int]) -> bytes:
        # identity is only part of the key: a file replaced or edited since gets a new entry, never the old picture
        return _thumbnail(path, THUMB_SIZE)

    @app.get(
        "/api/thumb/{id}",
        response_class=Response,
        responses={200: {"content": {"image/jpeg": {}}, "description": "a JPEG, at most 256 pixels a side"}, **ERRORS},
        summary="A thumbnail of an image in the index, by id",
    )
    def thumb(
        id: Annotated[int, PathParam(ge=0, description="the image's id, as a search answer gives it")],
        if_none_match: Annotated[Optional[str], Header(description="the ETag of a thumbnail the browser holds")] = None,
    ) -> Response:
        path = paths_of([id])[0]  # the path comes from the index, never from the request
        if path is None:
            raise HTTPException(404, _unknown_id(id, len(index), last_id))
        try:
            identity = _file_identity(path)  # stat'ed at each request: a deleted photo is a 404 at once
            # the browser asks again each time it shows one (no-cache) and keeps its copy while the file is the same
            headers = {"Cache-Control": "private, no-cache", "ETag": '"{:x}-{:x}-{:x}"'.format(*identity)}
            if if_none_match and headers["ETag"] in (tag.strip() for tag in if_none_match.split(",")):
                return Response(status_code=304, headers=headers)
            data = thumbnail(path, identity)
        except (OSError, ImageError) as e:
            raise HTTPException(404, f"image {id} ({os.path.basename(path)}) cannot be read from disk any more: {type(e).__name__}") from e
        return Response(data, media_type="image/jpeg", headers=headers)

    return app


def _blank_is(default: int) -> BeforeValidator:
    """An empty value (`k=`, an empty form field) means the default, in a query string as in a form.

    FastAPI already reads an empty form field as absent; a query string's `k=` would otherwise be a 422, so the
    same request would succeed as an image search and fail as a text search.
    """
    return BeforeValidator(lambda value: default if isinstance(value, str) and not value.strip() else value)


def _check_dimensions(index: Any, model: Any, model_name: str) -> None:
    """ValueError naming both sizes when the model's features do not fit the index."""
    from .search import embed_dim

    model_dim, index_dim = embed_dim(model), _index_dim(index)
    if index_dim is None or model_dim == index_dim:
        return
    made_by = getattr(index, "model", "") or ""
    if made_by and made_by != model_name:
        remedy = f"serve it with the model that made it, {made_by} (`openclip-lite serve` uses that one when --model is left out)"
    else:
        remedy = "serve it with the model that made it"
    raise InputError(
        f"the model {model_name or '(unnamed)'} makes {model_dim}-dimensional features but the index holds "
        f"{index_dim}-dimensional ones, so no search could run; {remedy}, or embed the images again with this model"
    )


def _index_dim(index: Any) -> Optional[int]:
    """The size of the index's vectors: `dim` (a FAISS Index, a Milvus collection) or its features' width
    (an embeddings file); None for an index that tells neither."""
    dim = getattr(index, "dim", None)
    if dim is not None:
        return int(dim)
    features = getattr(index, "features", None)
    return int(features.shape[-1]) if getattr(features, "ndim", 0) == 2 else None


def _path_lookup(index: Any) -> tuple[Callable[[list[int]], list[Optional[str]]], Optional[int]]:
    """(ids -> their paths, None for an id not in the index; the largest id, or None where ids are not rows).

    A Milvus collection's ids are its own int64 keys and it may hold billions of rows, so it looks each page's ids
    up itself (`get_paths`); an index file's ids are rows of its list of paths, which it keeps in memory.
    """
    if hasattr(index, "get_paths"):
        return index.get_paths, None
    paths = list(index.paths)
    return (lambda ids: [paths[i] if 0 <= i < len(paths) else None for i in ids]), len(paths) - 1


def _too_long(text: str, context_length: int) -> str:
    """The 422 detail for a description past the model's context: its length in the units of the limit."""
    from .tokenizer import default_tokenizer

    tokens = len(default_tokenizer().encode(text)) + 2  # with the start and end markers, as the context counts them
    return f"the description is too long for the model: {tokens} tokens where it reads at most {context_length}; shorten it"


def _unknown_id(id: int, count: int, last_id: Optional[int]) -> str:
    if not count:
        return "this index holds no images"
    if last_id is None:
        return f"no image has id {id}: ids are the ones search answers give"
    return f"no image has id {id}: the ids of this index go from 0 to {last_id}"


# ------------------------------------------------------------------------------------------ images


def _decode_image(data: bytes, filename: str, max_pixels: Optional[int]) -> Image.Image:
    """Uploaded bytes -> a decoded PIL image, or HTTPException 422 (not an image) or 413 (too many pixels).

    The header is read first, so an image past the pixel limit is refused before a single pixel is decoded.
    """
    if not data:
        raise HTTPException(422, f"{filename} is empty; choose an image file")
    limit = max_pixels if max_pixels is not None else Image.MAX_IMAGE_PIXELS
    try:
        image = Image.open(io.BytesIO(data))
        if limit and image.width * image.height > limit:
            raise HTTPException(413, f"{filename} is {image.width}x{image.height} pixels, more than the {limit:,} this server decodes; downscale it first")
        image.load()
        return image
    except Image.DecompressionBombError as e:  # past twice PIL's limit, refused by PIL itself at open
        raise HTTPException(413, f"{filename} has too many pixels to decode safely; downscale it first") from e
    except HTTPException:
        raise
    except MemoryError:
        raise
    except Exception as e:  # PIL's decoders raise OSError, SyntaxError, ValueError, struct.error... on bad bytes
        raise HTTPException(422, f"{filename} is not an image this server can read ({type(e).__name__}); upload a JPEG, PNG, WebP, GIF, BMP or TIFF file") from e


def _file_identity(path: str) -> tuple[int, int, int]:
    """(mtime in ns, size, inode): changes when the file is edited in place or replaced by another (a rename, a
    sync tool that restores the old mtime); raises OSError (FileNotFoundError...) when the file is gone."""
    info = os.stat(path)
    return info.st_mtime_ns, info.st_size, info.st_ino


def _thumbnail(path: str, size: int) -> bytes:
    """A JPEG of the image at `path`, at most `size` pixels a side, turned upright by its EXIF orientation."""
    try:
        with Image.open(path) as image:
            image.draft("RGB", (size, size))  # JPEGs decode at 1/2, 1/4 or 1/8 scale: several times faster
            image = ImageOps.exif_transpose(image)
            image.thumbnail((size, size))
            out = io.BytesIO()
            image.convert("RGB").save(out, "JPEG", quality=85)
            return out.getvalue()
    except FileNotFoundError:
        raise
    except MemoryError:
        raise
    except Exception as e:  # as above: whatever PIL raises on a file that changed since it was embedded
        raise ImageError(f"cannot read {path} as an image ({type(e).__name__}: {e})") from e


# ------------------------------------------------------------------------------------------ errors


def _error(status: int, detail: str, headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    root = request.scope.get("root_path", "")  # where the app is mounted, e.g. "/photos"; "" at the top
    if exc.status_code == 404 and detail == "Not Found":
        api = f"{root}/api/info, {root}/api/search and {root}/api/thumb/{{id}}"
        detail = f"there is nothing at {request.url.path}; the API is {api} (see {root}/docs)"
    elif exc.status_code == 405:
        detail = f"{request.method} is not allowed on {request.url.path}; see {root}/docs for what each route accepts"
    return _error(exc.status_code, detail, getattr(exc, "headers", None))


# a sentence for each parameter, for answers to values that do not parse or are out of range
PARAMETERS = {
    "q": "q, the text to look for, must be at most {MAX_QUERY_CHARS} characters",
    "k": "k, the number of results, must be a whole number from 1 to {max_k}",
    "page": "page must be a whole number from 1",
    "per_page": "per_page, the results a page, must be a whole number from 1 to {MAX_PER_PAGE}",
    "id": "id must be a whole number from 0{to_last}: an image's id as a search answer gives it",
    "image": "image must be an image file, sent as multipart/form-data in the field 'image'",
}


async def _validation_error(request: Request, exc: RequestValidationError, max_k: int, last_id: Optional[int]) -> JSONResponse:
    to_last = "" if last_id is None else f" to {max(last_id, 0)}"  # a collection's ids have no range to tell
    sentences = []
    for error in exc.errors():
        field = str(error["loc"][-1]) if error.get("loc") else "request"
        if error.get("type") == "missing":
            sentence = PARAMETERS["image"] if field == "image" else f"{field} is missing"
        elif field in PARAMETERS:
            sentence = PARAMETERS[field].format(MAX_QUERY_CHARS=MAX_QUERY_CHARS, max_k=max_k, MAX_PER_PAGE=MAX_PER_PAGE, to_last=to_last)
            given = error.get("input")
            if isinstance(given, (str, int, float)) and field != "q":
                sentence += f", not {str(given)[:40]!r}"
        else:
            sentence = f"{field}: {error.get('msg', 'invalid')}"
        sentences.append(sentence)
    return _error(422, "; ".join(sentences) or "the request is not valid")


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    # a bug of ours: the details go to the server's log (uvicorn prints the traceback), never to the client
    return _error(500, "the server failed to answer this request; its log says why")


class _BodyLimit:
    """ASGI middleware: refuse request bodies over `max_bytes` with 413, before reading them when the
    Content-Length says so, else as soon as the streamed bytes pass the limit (chunked uploads)."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = _error(413, f"the request body is larger than {_size(self.max_bytes)}, the most this server accepts; upload a smaller image")
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            return await too_large(scope, receive, send)
        received = 0
        answered = False

        async def limited_receive():
            nonlocal received, answered
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    if not answered:
                        answered = True
                        await too_large(scope, receive, send)
                    return {"type": "http.disconnect"}  # the app stops reading; what it answers is dropped below
            return message

        async def guarded_send(message):
            if not answered:
                await send(message)

        await self.app(scope, limited_receive, guarded_send)


def _size(n: int) -> str:
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def _version() -> str:
    from .version import __version__

    return __version__


# ------------------------------------------------------------------------------------------ the command


def serve(
    index: Union[str, "os.PathLike[str]", Any],
    host: str = "127.0.0.1",
    port: int = 8000,
    device: Optional[str] = None,
    model: Optional[str] = None,
    download_root: Optional[str] = None,
) -> None:
    """Open the index, load the model once and serve the page and the API until interrupted (Ctrl+C).

    index : what `openclip-lite embed --out` wrote (an embeddings file or a FAISS index folder), or an open index
        such as a `milvus.MilvusIndex` (left open: whoever opened it closes it)
    host : the address to listen on; 127.0.0.1 (this machine only) unless another is given on purpose
    model : a model name or checkpoint path; default: the model stored in the index
    """
    uvicorn = require("uvicorn", "serve")
    import openclip_lite

    from .search import open_search_index

    if isinstance(index, (str, os.PathLike)):
        where, index = os.fspath(index), open_search_index(index)
    else:
        where = repr(index)
    model_name = model or getattr(index, "model", "")
    if not model_name:
        raise InputError(f"{where} does not name its model; give it with --model")
    clip_model, preprocess = openclip_lite.load(model_name, device=device, download_root=download_root)
    app = create_app(index, clip_model, preprocess, model_name=model_name)
    # bound here, so that a port in use or an unknown host is one OSError before anything says "serving"
    host = host.strip("[]")  # an IPv6 address as URLs write it
    sock = None
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # "::" means IPv6 only, as asyncio binds it
        sock.bind(address)
    except OSError as e:  # socket.gaierror for an unknown host is one too
        if sock is not None:
            sock.close()
        raise OSError(f"cannot listen on {host} port {port}: {e.strerror or e}; choose another --port (0: any free one) or --host") from e
    port = sock.getsockname()[1]  # the one chosen, for port 0
    if not _is_loopback(host):
        print(f"openclip-lite: warning: listening on {host}: anyone who can reach this machine can search these images and see their thumbnails", flush=True)
    shown = f"[{host}]" if ":" in host else host
    print(f"openclip-lite: serving {len(index)} images with {model_name} at http://{shown}:{port}/ (Ctrl+C stops)", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
