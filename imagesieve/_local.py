"""The CLI beside a running server: the server's address file, and the client that uses it.

DuckDB lets one process open a database file for writing, and no other process even read it
meanwhile. So while ``imagesieve serve`` holds a workspace's store, the CLI hands its work to
that server, finding it as Jupyter's CLI finds its running server. The server writes
``<workspace>/server.json`` (its pid, URL and a secret made at start), readable by its own
user only; a CLI that can read it is the operator's own shell, so its requests may name local
files as the CLI could. Standard library only: the CLI imports this before it knows whether
it needs the rest.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import os
import secrets
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from imagesieve._errors import SieveError

__all__ = [
    "LOCAL_HEADER",
    "LOCAL_PREFIX",
    "SERVER_FILE",
    "LocalClient",
    "ServerRecord",
    "announce",
    "is_loopback",
    "new_secret",
    "running_server",
    "withdraw",
]

#: The address file a running server keeps in its workspace.
SERVER_FILE = "server.json"
#: The header that carries the address file's secret.
LOCAL_HEADER = "X-Imagesieve-Local"
#: Where the server answers the CLI (under the API's prefix).
LOCAL_PREFIX = "/api/v1/local"


@dataclass(frozen=True)
class ServerRecord:
    """A running server of a workspace: its process, where it listens, the CLI's secret."""

    pid: int
    url: str
    secret: str


def new_secret() -> str:
    """A fresh secret for one server run's ``server.json``."""
    return secrets.token_urlsafe(32)


def announce(root: Path, url: str, secret: str) -> ServerRecord:
    """Write ``server.json`` for this process serving ``url``; owner-only, replaced atomically."""
    record = ServerRecord(os.getpid(), _reachable(url), secret)
    path = root / SERVER_FILE
    tmp = path.with_name(f".{SERVER_FILE}.{record.pid}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(asdict(record), f)
    os.replace(tmp, path)
    return record


def withdraw(root: Path, record: ServerRecord) -> None:
    """Remove ``server.json`` if it is still this server's (a newer server's is left alone)."""
    path = root / SERVER_FILE
    if _read(path) == record:
        path.unlink(missing_ok=True)


def running_server(root: Path) -> ServerRecord | None:
    """The server holding this workspace's store, from its ``server.json``; None if none runs.

    A file left by a server that died (its pid gone) counts as none; so does one this user
    may not read (a server run by another account: the CLI then says the store is busy).
    """
    record = _read(root / SERVER_FILE)
    if record is None:
        return None
    try:
        os.kill(record.pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # alive under another user, whose secret we could read: usable
        pass
    return record


def _read(path: Path) -> ServerRecord | None:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        return ServerRecord(int(doc["pid"]), str(doc["url"]), str(doc["secret"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost'."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _reachable(url: str) -> str:
    """The URL this machine's CLI reaches the server at (a wildcard address: loopback)."""
    for wildcard, loopback in (("//0.0.0.0:", "//127.0.0.1:"), ("//[::]:", "//[::1]:")):
        url = url.replace(wildcard, loopback)
    return url


class LocalClient:
    """Calls a running server's local routes: each answers JSON lines, progress then a result."""

    def __init__(self, record: ServerRecord, timeout: float = 30.0):
        self.record = record
        self.timeout = timeout

    def answers(self, root: Path, version: str) -> bool:
        """Whether the server answers as the one serving ``root`` (not a dead one's reused pid).

        A server of another release than this CLI (``version``) is an error: restart it.
        """
        try:
            pong = self.call("ping", {})
            if not os.path.samefile(pong["root"], root):
                return False
        except (SieveError, OSError, TypeError, KeyError):
            return False
        if pong["version"] != version:
            raise SieveError(
                f"`imagesieve serve` (PID {self.record.pid}) holds the store of {root} and runs "
                f"imagesieve {pong['version']}, this command {version}: restart the server "
                "to use this release beside it",
                "conflict",
            )
        return True

    def call(
        self,
        route: str,
        body: dict[str, Any],
        progress: Callable[[str, int, int], None] | None = None,
    ) -> Any:
        """POST ``body`` to ``LOCAL_PREFIX/route``; the result, progress lines passed on.

        The server's error comes back as a SieveError of the same kind (so the same exit code).
        """
        for line in self._lines(route, body):
            if "progress" in line:
                if progress is not None:
                    progress(*line["progress"])
            elif "error" in line:
                raise SieveError(line["error"]["message"], line["error"]["kind"])
            elif "result" in line:
                return line["result"]
        raise SieveError(
            f"the server at {self.record.url} stopped before it finished (see its log); "
            "run the command again",
            "stopping",
        )

    def _lines(self, route: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        request = urllib.request.Request(
            f"{self.record.url}{LOCAL_PREFIX}/{route}",
            data=json.dumps(body, default=str).encode(),  # dates as ISO text
            headers={"Content-Type": "application/json", LOCAL_HEADER: self.record.secret},
            method="POST",
        )
        answered = False
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as answer:
                answered = True
                for raw in answer:
                    if raw.strip():
                        yield json.loads(raw)
        except urllib.error.HTTPError as e:
            try:
                message = json.loads(e.read())["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = f"HTTP {e.code}"
            raise SieveError(f"the server at {self.record.url} refused: {message}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            if answered:  # it went away mid-answer (stopped, restarted): call() says so
                return
            reason = getattr(e, "reason", e)
            raise SieveError(
                f"the server holding this workspace (PID {self.record.pid}) does not answer at "
                f"{self.record.url}: {reason}",
                "busy",
            ) from None
