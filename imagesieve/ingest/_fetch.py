"""Fetch the URL items of an input stream concurrently, safely, with retries and hard limits."""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from email.utils import parsedate_to_datetime
from urllib.parse import urljoin, urlsplit

import requests
import urllib3.exceptions
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ReadTimeoutError

from imagesieve import __version__
from imagesieve.data import ImageLoadError
from imagesieve.ingest._inputs import InputError, InputItem

__all__ = ["FetchOptions", "fetch_items"]

log = logging.getLogger(__name__)

USER_AGENT = f"imagesieve/{__version__}"
#: Content types that are certainly not an image; anything else is left to the decoder.
NOT_IMAGE_TYPES = frozenset(
    {"text/html", "text/plain", "application/json", "application/xhtml+xml"}
)
_CHUNK = 64 * 1024
_MAX_RETRY_AFTER = 10.0
_NameResolutionError = getattr(urllib3.exceptions, "NameResolutionError", ())  # urllib3 >= 2
_ERRNO = re.compile(r"\[Errno -?\d+\] ([^'\")\]]+)")


@dataclass(frozen=True)
class FetchOptions:
    """How URLs are fetched. Timeouts are in seconds; ``total_timeout`` bounds one URL in all.

    ``retries`` extra attempts are made on connection errors, timeouts, HTTP 429 and 5xx (never
    on other 4xx), waiting ``backoff`` seconds doubled per attempt, or the server's
    Retry-After up to 10 s.
    """

    workers: int = 16
    connect_timeout: float = 5.0
    read_timeout: float = 15.0
    total_timeout: float = 60.0
    max_bytes: int = 50 * 1024 * 1024
    retries: int = 2
    backoff: float = 0.5
    max_redirects: int = 5
    #: False (a server's lists): only public addresses are fetched, checked after DNS and on
    #: every redirect, and the connection goes to the address checked; no proxy from the
    #: environment. ``allow_networks`` (CIDRs) widens that on purpose.
    private_networks: bool = True
    allow_networks: tuple[str, ...] = ()

    def __post_init__(self):
        for cidr in self.allow_networks:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise InputError(f"not a network (CIDR like 10.0.0.0/8): {cidr!r}") from None
        if self.workers < 1:
            raise InputError(f"workers must be at least 1, got {self.workers}")
        for name in ("connect_timeout", "read_timeout", "total_timeout", "max_bytes"):
            if getattr(self, name) <= 0:
                raise InputError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("retries", "backoff", "max_redirects"):
            if getattr(self, name) < 0:
                raise InputError(f"{name} must not be negative, got {getattr(self, name)}")


class _Retryable(Exception):
    """A failed attempt worth repeating; ``delay`` is the server's Retry-After, if any."""

    def __init__(self, kind: str, reason: str, delay: float | None = None):
        super().__init__(reason)
        self.kind = kind
        self.reason = reason
        self.delay = delay


class _Refused(Exception):
    """A connection to an address the fetch options do not allow; never attempted."""


class _AddressGuard:
    """Resolves a host and picks an address it may connect to: public, or in the allowed networks."""

    def __init__(self, allow_networks: tuple[str, ...]):
        self.networks = [ipaddress.ip_network(c, strict=False) for c in allow_networks]

    def allowed(self, ip: str) -> bool:
        """True when ``ip`` is a public unicast address, or inside an allowed network."""
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        if any(addr in net for net in self.networks):
            return True
        return addr.is_global and not addr.is_multicast

    def address(self, host: str, port: int) -> str:
        """An allowed address of ``host``; _Refused when it has none (every address is checked)."""
        try:
            found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror:
            raise _Refused(f"cannot resolve host {host}") from None
        ips = [info[4][0] for info in found]
        if not ips or not all(self.allowed(ip) for ip in ips):
            raise _Refused(
                f"{host} is not a public address: only public http(s) URLs are fetched here"
            )
        return ips[0]


def _guarded_pools(guard: _AddressGuard) -> dict[str, type]:
    """urllib3 pool classes whose connections go only to addresses ``guard`` allows.

    The host is resolved and checked when a connection is made, and the socket connects to the
    very address checked, so DNS that answers differently the second time (rebinding) gains
    nothing; TLS still verifies the host name.
    """

    def new_conn(base: type) -> type:
        class Guarded(base):
            def _new_conn(self) -> socket.socket:
                host = self._dns_host
                self._dns_host = guard.address(host.rstrip("."), self.port)
                try:
                    return super()._new_conn()
                finally:
                    self._dns_host = host

        return Guarded

    class Pool(HTTPConnectionPool):
        ConnectionCls = new_conn(HTTPConnection)

    class SecurePool(HTTPSConnectionPool):
        ConnectionCls = new_conn(HTTPSConnection)

    return {"http": Pool, "https": SecurePool}


def _check_url(url: str, original: str, redirected: bool = False) -> None:
    """Raise ``bad_url`` unless ``url`` is a well-formed http(s) URL with a host."""
    prefix = f"redirected to {url}: " if redirected else ""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError for a bad port
    except ValueError as e:
        raise ImageLoadError(original, "bad_url", f"{prefix}malformed URL ({e})") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise ImageLoadError(original, "bad_url", f"{prefix}only http and https URLs are fetched")
    if not parts.hostname:
        raise ImageLoadError(original, "bad_url", f"{prefix}malformed URL (no host)")


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta seconds or HTTP date), capped at 10 s."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
    return min(max(seconds, 0.0), _MAX_RETRY_AFTER)


def _is_timeout(e: BaseException) -> bool:
    if isinstance(e, requests.Timeout | ReadTimeoutError | TimeoutError):
        return True
    return any(isinstance(a, ReadTimeoutError | TimeoutError) for a in e.args)


def _connection_reason(e: requests.RequestException) -> str:
    """One line for a connection failure: "connection refused", "cannot resolve host x", ..."""
    if isinstance(e, requests.exceptions.SSLError):
        verify = "certificate verify failed" in str(e).lower()
        return "TLS/SSL error (certificate verify failed)" if verify else "TLS/SSL error"
    cause = getattr(e.args[0], "reason", None) if e.args else None
    if isinstance(cause, _NameResolutionError):
        return f"cannot resolve host {cause.conn.host}" if cause.conn else "cannot resolve host"
    text = str(e)
    if match := _ERRNO.search(text):
        return match.group(1).strip().rstrip(".").lower()
    if "Connection broken" in text or isinstance(e, requests.exceptions.ChunkedEncodingError):
        return "connection broken while reading the response"
    return f"connection failed ({type(cause or e).__name__})"


class _Fetcher:
    """Fetches one URL at a time on any thread; all threads share one Session."""

    def __init__(self, opts: FetchOptions, stop: threading.Event):
        self.opts = opts
        self.stop = stop
        self.session = requests.Session()
        adapter = HTTPAdapter(
            pool_connections=max(10, opts.workers), pool_maxsize=opts.workers, max_retries=0
        )
        if not opts.private_networks:
            adapter.poolmanager.pool_classes_by_scheme = _guarded_pools(
                _AddressGuard(opts.allow_networks)
            )
            self.session.trust_env = False  # a proxy from the environment would fetch anything
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.session.headers.update(
            {"User-Agent": USER_AGENT, "Accept": "image/*,*/*;q=0.5", "Accept-Encoding": "identity"}
        )

    def fetch(self, item: InputItem) -> InputItem:
        """The item with its bytes as ``source``, or with ``error`` set; never raises."""
        try:
            return replace(item, source=self._fetch_url(item.url))
        except ImageLoadError as e:  # without its frames, which hold the download's buffer
            return replace(item, error=e.detached())
        except Exception as e:
            log.debug("unexpected error fetching %s", item.url, exc_info=True)
            reason = f"unexpected error ({type(e).__name__}: {e})"
            return replace(item, error=ImageLoadError(item.url, "error", reason))

    def _fetch_url(self, url: str) -> bytes:
        opts = self.opts
        _check_url(url, url)
        deadline = time.monotonic() + opts.total_timeout
        current, redirects, attempt = url, 0, 0
        while True:
            try:
                result = self._attempt(current, url, deadline)
            except _Retryable as e:
                delay = e.delay if e.delay is not None else opts.backoff * 2**attempt
                if attempt >= opts.retries or time.monotonic() + delay >= deadline:
                    tries = f" (after {attempt + 1} attempts)" if attempt else ""
                    raise ImageLoadError(url, e.kind, e.reason + tries) from None
                attempt += 1
                if self.stop.wait(delay):
                    raise ImageLoadError(url, "error", "cancelled") from None
                continue
            if isinstance(result, bytes):
                return result
            redirects += 1
            if redirects > opts.max_redirects:
                raise ImageLoadError(url, "redirects", f"more than {opts.max_redirects} redirects")
            _check_url(result, url, redirected=True)
            current = result

    def _attempt(self, current: str, url: str, deadline: float) -> bytes | str:
        """One GET of ``current``: its body, or the redirect target; raises on failure."""
        opts = self.opts
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ImageLoadError(url, "timeout", f"took over {opts.total_timeout:g} s in total")
        timeout = (opts.connect_timeout, max(0.05, min(opts.read_timeout, remaining)))
        try:
            resp = self.session.get(current, stream=True, allow_redirects=False, timeout=timeout)
        except (requests.exceptions.InvalidURL, requests.exceptions.InvalidSchema) as e:
            raise ImageLoadError(url, "bad_url", f"malformed URL ({e})") from None
        except _Refused as e:
            prefix = f"redirected to {current}: " if current != url else ""
            raise ImageLoadError(url, "not_allowed", prefix + str(e)) from None
        except requests.RequestException as e:
            raise self._failure(e, url) from None
        with resp:
            target = self.session.get_redirect_target(resp)  # decodes non-ASCII Locations
            if target is not None:
                return urljoin(current, target)
            status = f"HTTP {resp.status_code} {resp.reason or ''}".strip()
            if resp.status_code == 429 or resp.status_code >= 500:
                raise _Retryable(
                    "http_error", status, _retry_after(resp.headers.get("retry-after"))
                )
            if resp.status_code >= 300:
                raise ImageLoadError(url, "http_error", status)
            ctype = resp.headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype in NOT_IMAGE_TYPES:
                raise ImageLoadError(url, "not_image", f"server returned {ctype}, not an image")
            limit = f"over the {opts.max_bytes:,}-byte limit"
            declared = resp.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > opts.max_bytes:
                raise ImageLoadError(url, "too_large", f"{int(declared):,} bytes, {limit}")
            body = bytearray()
            try:
                for chunk in _chunks(resp):
                    body += chunk
                    if len(body) > opts.max_bytes:
                        raise ImageLoadError(url, "too_large", f"body is {limit}")
                    if time.monotonic() > deadline:
                        reason = f"download took over {opts.total_timeout:g} s (total timeout)"
                        raise ImageLoadError(url, "timeout", reason)
                    if self.stop.is_set():
                        raise ImageLoadError(url, "error", "cancelled")
            except (requests.RequestException, urllib3.exceptions.HTTPError) as e:
                raise self._failure(e, url) from None
        if not body:
            raise ImageLoadError(url, "empty", "server returned an empty body")
        return bytes(body)

    def _failure(self, e: Exception, url: str) -> Exception:
        """What to raise for a requests/urllib3 error: retryable unless TLS or decoding failed."""
        if _is_timeout(e):
            if isinstance(e, requests.ConnectTimeout):
                return _Retryable(
                    "timeout", f"could not connect within {self.opts.connect_timeout:g} s"
                )
            return _Retryable("timeout", f"server sent no data for {self.opts.read_timeout:g} s")
        if isinstance(e, requests.exceptions.SSLError | urllib3.exceptions.SSLError):
            return ImageLoadError(url, "connection", _connection_reason(e))
        if isinstance(e, requests.exceptions.ContentDecodingError | urllib3.exceptions.DecodeError):
            return ImageLoadError(
                url, "http_error", "cannot decode the body (bad Content-Encoding)"
            )
        if isinstance(e, requests.ConnectionError | requests.exceptions.ChunkedEncodingError):
            return _Retryable("connection", _connection_reason(e))
        if isinstance(e, urllib3.exceptions.ProtocolError):
            return _Retryable("connection", "connection broken while reading the response")
        return _Retryable("connection", f"request failed ({type(e).__name__})")


def _chunks(resp: requests.Response) -> Iterator[bytes]:
    """The body in pieces as they arrive, so a slow drip still meets the total deadline.

    ``iter_content`` blocks until a whole chunk is in; urllib3 2's ``read1`` returns what one
    socket read gives. Older urllib3 falls back to ``iter_content`` (bounded by the read timeout).
    """
    read1 = getattr(resp.raw, "read1", None)
    if read1 is None:
        yield from resp.iter_content(_CHUNK)
        return
    while chunk := read1(_CHUNK, decode_content=True):
        yield chunk


def fetch_items(
    items: Iterable[InputItem], opts: FetchOptions | None = None
) -> Iterator[InputItem]:
    """Download the URL items of ``items``; other items pass straight through.

    Items come back **as they complete, not in input order** — each keeps its ``index`` — and
    every item comes back exactly once: with its bytes as ``source``, or with ``error`` set to
    an :class:`ImageLoadError` whose kind is one of bad_url, http_error, timeout, connection,
    too_large, not_image, redirects, empty (or error, for a bug). ``items`` is consumed lazily,
    at most about ``2 * workers`` URLs ahead of the caller, so huge lists stream. Closing the
    generator early cancels what has not started; running downloads stop at their next chunk.
    """
    opts = opts or FetchOptions()
    limit = 2 * opts.workers
    stop = threading.Event()
    fetcher: _Fetcher | None = None
    pool: ThreadPoolExecutor | None = None
    pending: set[Future] = set()
    source = iter(items)
    exhausted = False
    try:
        while True:
            while not exhausted and len(pending) < limit:
                item = next(source, None)
                if item is None:
                    exhausted = True
                elif item.url is None or item.error is not None or item.source is not None:
                    yield item
                else:
                    if pool is None:
                        fetcher = _Fetcher(opts, stop)
                        pool = ThreadPoolExecutor(opts.workers, thread_name_prefix="fetch")
                    pending.add(pool.submit(fetcher.fetch, item))
            if not pending:
                return
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                yield future.result()
    finally:
        stop.set()
        for future in pending:
            future.cancel()
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        if fetcher is not None:
            fetcher.session.close()
