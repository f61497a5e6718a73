"""A real threaded HTTP server on 127.0.0.1 for URL-fetching tests and benchmarks.

Routes:
  /img/<name>          the bytes of ``files[name]``, Content-Type from the extension, after ``latency`` s
  /status/<code>       that status (``?retry_after=N`` adds a Retry-After header)
  /slow/<seconds>      sleeps, then serves a tiny PNG-typed body
  /drip                headers, then one byte every 0.5 s for a minute
  /big                 declares a 10 GB Content-Length
  /big-chunked         chunked body of ``?bytes=N`` bytes (8 MB by default), no Content-Length
  /html                an HTML page, 200 text/html
  /redirect/<name>     302 -> /img/<name>
  /redirect-loop       302 -> /redirect-loop
  /redirect-ftp        302 -> ftp://127.0.0.1/x.png
  /redirect-to?url=U   302 -> U (anywhere)
  /flaky/<name>        503 on the first request for that name, then the image
  /empty               200 image/png with an empty body
"""

from __future__ import annotations

import mimetypes
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlsplit

__all__ = ["ImageServer"]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out as two writes; no 40 ms stalls
    server: _Server

    def log_message(self, format, *args):  # noqa: A002 -- quiet
        pass

    def do_GET(self):  # noqa: N802 -- http.server's naming
        parts = urlsplit(self.path)
        path, query = unquote(parts.path), parse_qs(parts.query)
        self.server.count(path)
        stop = self.server.stop
        head, _, rest = path.lstrip("/").partition("/")
        try:
            if head == "img":
                stop.wait(self.server.latency)
                self._image(rest)
            elif head == "status":
                code = int(rest)
                extra = {"Retry-After": query["retry_after"][0]} if "retry_after" in query else {}
                self._send(code, f"status {code}\n".encode(), "text/plain", extra)
            elif head == "slow":
                if stop.wait(float(rest)):
                    self.close_connection = True
                else:
                    self._send(200, b"\x89PNG slow", "image/png")
            elif head == "drip":
                self._drip()
            elif head == "big":
                self._send_headers(200, "image/png", {"Content-Length": str(10 * 1024**3)})
                self.wfile.write(b"\x89PNG")
                self.close_connection = True
            elif head == "big-chunked":
                self._chunked(int(query.get("bytes", [8 * 1024 * 1024])[0]))
            elif head == "html":
                self._send(200, b"<!doctype html><title>Not here</title><p>hello", "text/html")
            elif head == "redirect":
                self._redirect(f"/img/{quote(rest)}")
            elif head == "redirect-loop":
                self._redirect("/redirect-loop")
            elif head == "redirect-ftp":
                self._redirect("ftp://127.0.0.1/x.png")
            elif head == "redirect-to":
                self._redirect(query["url"][0])
            elif head == "flaky":
                if self.server.hits[path] == 1:
                    self._send(503, b"try again\n", "text/plain")
                else:
                    self._image(rest)
            elif head == "empty":
                self._send(200, b"", "image/png")
            else:
                self._send(404, b"not found\n", "text/plain")
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            self.close_connection = True

    def _send_headers(self, code: int, ctype: str, extra: dict[str, str]) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        for key, value in extra.items():
            self.send_header(key, value)
        self.end_headers()

    def _send(self, code: int, body: bytes, ctype: str, extra: dict | None = None) -> None:
        self._send_headers(code, ctype, {"Content-Length": str(len(body)), **(extra or {})})
        self.wfile.write(body)

    def _image(self, name: str) -> None:
        if name not in self.server.files:
            self._send(404, b"no such image\n", "text/plain")
            return
        ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
        self._send(200, self.server.files[name], ctype)

    def _redirect(self, location: str) -> None:
        self._send(302, b"", "text/plain", {"Location": location})

    def _drip(self) -> None:
        self._send_headers(200, "image/png", {"Connection": "close"})
        self.close_connection = True
        for _ in range(120):
            self.wfile.write(b"\x00")
            self.wfile.flush()
            if self.server.stop.wait(0.5):
                return

    def _chunked(self, size: int) -> None:
        self._send_headers(200, "image/png", {"Transfer-Encoding": "chunked"})
        chunk = b"\x00" * 65536
        sent = 0
        while sent < size and not self.server.stop.is_set():
            part = chunk[: size - sent]
            self.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
            sent += len(part)
        self.wfile.write(b"0\r\n\r\n")


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, files: dict[str, bytes], latency: float, host: str = "127.0.0.1"):
        super().__init__((host, 0), _Handler)
        self.files = files
        self.latency = latency
        self.stop = threading.Event()
        self.hits: Counter[str] = Counter()
        self._lock = threading.Lock()

    def count(self, path: str) -> None:
        with self._lock:
            self.hits[path] += 1

    def handle_error(self, request, client_address):
        """Client disconnects are normal here; anything else is printed as usual."""
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            super().handle_error(request, client_address)


class ImageServer:
    """``with ImageServer({"a.png": data}) as srv: requests.get(srv.url("a.png"))``.

    ``srv.hits`` counts requests per path (e.g. ``srv.hits["/flaky/a.png"]``).
    """

    def __init__(
        self, files: dict[str, bytes] | None = None, latency: float = 0.0, host: str = "127.0.0.1"
    ):
        self._server = _Server(dict(files or {}), latency, host)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        host, port = self._server.server_address[:2]
        self.base = f"http://{host}:{port}"

    @property
    def hits(self) -> Counter[str]:
        return self._server.hits

    def url(self, name: str) -> str:
        """The URL serving ``files[name]``."""
        return f"{self.base}/img/{quote(name)}"

    def __enter__(self) -> ImageServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.stop.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
