"""Loopback HTTP servers for the download tests: a Hugging Face Hub (its file protocol) and a plain file host.

The Hub part speaks what `huggingface_hub.hf_hub_download` needs: HEAD and GET on
`/{repo}/resolve/{revision}/{filename}` answering with `X-Repo-Commit`, an `ETag` that is the file's SHA256 (as
the Hub gives for LFS files), `Content-Length` and byte ranges (used to resume a cut download), and a 404 carrying
`X-Error-Code: EntryNotFound` / `RepoNotFound` for missing files and repos. No Xet headers are sent, so the
client falls back to a plain HTTP download.

Faults can be switched on per URL path: "cut" (the connection closes halfway through the body, on every request),
"cut-once" (only on the first GET), "tamper" (same length and headers, different bytes), "md5-etag" (ETags that are
the body's MD5, as some mirrors and proxies give, instead of its SHA256), or an HTTP status ("401", "403", "500",
"503") that every request gets instead of the file; `delay_s` holds every GET body back, so that two clients are
downloading at the same time.
"""

from __future__ import annotations

import hashlib
import re
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<revision>[^/]+)/(?P<filename>.+)$")
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")
STATUSES = ("401", "403", "500", "503")
FAULTS = ("cut", "cut-once", "tamper", "md5-etag", *STATUSES)


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    range: str | None


class FileServer:
    """Serve `files` (URL path -> bytes) on 127.0.0.1 at a free port, from a daemon thread, logging every request."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.faults: dict[str, str] = {}
        self.delay_s = 0.0
        self.log: list[Request] = []
        self.repos: dict[str, str] = {}  # Hub repo -> its commit hash
        self._cut_done: set[str] = set()
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._httpd.daemon_threads = True
        # a short poll interval makes close() quick
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.02,), daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def add(self, path: str, body: bytes) -> str:
        """Serve `body` at `path`; returns its full URL."""
        self.files[path] = body
        return self.url + path

    def add_hub_file(self, repo: str, filename: str, body: bytes, revision: str = "main") -> str:
        """Serve `body` as `filename` of the Hub repo `repo` (which now exists, even with no file)."""
        self.add_hub_repo(repo)
        return self.add(f"/{repo}/resolve/{revision}/{filename}", body)

    def add_hub_repo(self, repo: str) -> None:
        self.repos.setdefault(repo, hashlib.sha1(repo.encode()).hexdigest())

    def fault(self, path: str, kind: str | None) -> None:
        """Switch a fault (one of FAULTS) on for `path`, or off with None."""
        if kind is None:
            self.faults.pop(path, None)
        elif kind in FAULTS:
            self.faults[path] = kind
            self._cut_done.discard(path)
        else:
            raise ValueError(f"unknown fault {kind!r}; use one of {FAULTS}")

    def requests(self, method: str | None = None, path: str | None = None) -> list[Request]:
        """The requests seen so far, optionally only those with this method and/or URL path."""
        with self._lock:
            return [r for r in self.log if (method is None or r.method == method) and (path is None or r.path == path)]

    def clear_log(self) -> None:
        with self._lock:
            self.log.clear()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _record(self, request: Request) -> None:
        with self._lock:
            self.log.append(request)

    def _take_cut(self, path: str) -> bool:
        """Whether this GET of `path` is to be cut halfway."""
        kind = self.faults.get(path)
        with self._lock:
            if kind == "cut":
                return True
            if kind == "cut-once" and path not in self._cut_done:
                self._cut_done.add(path)
                return True
        return False


def _handler_for(server: FileServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, like the Hub; every response carries a Content-Length

        def do_HEAD(self) -> None:
            self._serve(send_body=False)

        def do_GET(self) -> None:
            self._serve(send_body=True)

        def log_message(self, format: str, *args) -> None:  # keep pytest's output clean
            pass

        def _serve(self, send_body: bool) -> None:
            path = self.path.split("?", 1)[0]
            server._record(Request(self.command, path, self.headers.get("Range")))
            body = server.files.get(path)
            hub = _RESOLVE.match(path)
            repo_commit = server.repos.get(hub["repo"]) if hub else None
            if body is None:
                return self._not_found(hub, repo_commit)
            if server.faults.get(path) in STATUSES:
                return self._refuse(int(server.faults[path]))

            sha256 = hashlib.sha256(body).hexdigest()
            if server.faults.get(path) == "md5-etag":
                sha256 = hashlib.md5(body).hexdigest()
            if server.faults.get(path) == "tamper":
                body = _tampered(body)
            start, end = 0, len(body) - 1
            byte_range = _RANGE.match(self.headers.get("Range") or "")
            if byte_range:
                start = int(byte_range[1])
                end = min(int(byte_range[2]), end) if byte_range[2] else end
            self.send_response(206 if byte_range else 200)
            if repo_commit is not None:
                self.send_header("X-Repo-Commit", repo_commit)
                self.send_header("X-Linked-Etag", f'"{sha256}"')
                self.send_header("X-Linked-Size", str(len(body)))
            self.send_header("ETag", f'"{sha256}"')
            self.send_header("Accept-Ranges", "bytes")
            if byte_range:
                self.send_header("Content-Range", f"bytes {start}-{end}/{len(body)}")
            self.send_header("Content-Length", str(end + 1 - start))
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            if not send_body:
                return
            if server.delay_s:
                time.sleep(server.delay_s)
            if server._take_cut(path):
                # The cut always falls at the same offset of the file, so a resumed request gets no further.
                self.wfile.write(body[start : max(start, len(body) // 2)])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.wfile.write(body[start : end + 1])

        def _refuse(self, status: int) -> None:
            """An answer without the file, as a gated or private repo (401, 403) or a failing server (5xx) gives."""
            message = f"error {status}".encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(message)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(message)

        def _not_found(self, hub: re.Match | None, repo_commit: str | None) -> None:
            message = b"not found"
            self.send_response(404)
            if hub and repo_commit is not None:
                self.send_header("X-Repo-Commit", repo_commit)
                self.send_header("X-Error-Code", "EntryNotFound")
                self.send_header("X-Error-Message", "Entry not found")
            elif hub:
                self.send_header("X-Error-Code", "RepoNotFound")
                self.send_header("X-Error-Message", "Repository not found")
            self.send_header("Content-Length", str(len(message)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(message)

    return Handler


def _tampered(body: bytes) -> bytes:
    """The same number of bytes, one of them changed in the middle."""
    middle = len(body) // 2
    return body[:middle] + bytes([body[middle] ^ 0xFF]) + body[middle + 1 :]
