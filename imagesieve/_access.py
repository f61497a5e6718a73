"""Who may call the API: its tokens, and the health probe a container runs with them.

Tokens come from ``--token``, a token file or the environment. Standard library only, so
``python -m imagesieve._access`` (the Dockerfile's HEALTHCHECK) starts in a few milliseconds
every 30 s instead of importing the app.
"""

from __future__ import annotations

import os
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

from imagesieve._errors import UserError

__all__ = [
    "TOKEN_ENV",
    "TOKEN_FILE_ENV",
    "Tokens",
    "health_probe",
    "parse_tokens",
    "tokens_from_env",
]

#: Where the API token comes from when ``--token`` is not given.
TOKEN_ENV = "IMAGESIEVE_API_TOKEN"
#: A token file (one NAME=SECRET per line) when ``--token-file`` is not given: a container's
#: mounted secret, e.g. ``/run/secrets/imagesieve-tokens``.
TOKEN_FILE_ENV = "IMAGESIEVE_API_TOKEN_FILE"
#: Where the container's server listens (the Dockerfile's CMD).
PROBE_URL = "http://127.0.0.1:7860"

#: One API secret, or secrets mapped to the names the audit log records (None: unnamed).
Tokens = str | Mapping[str, str | None] | None
_TOKEN_NAME = re.compile(r"[A-Za-z][\w.-]{0,63}")


def parse_tokens(values: Sequence[str] = (), file: str | os.PathLike | None = None) -> Tokens:
    """API tokens from ``--token`` values and a ``--token-file`` (one per line, ``#`` comments).

    Each is ``NAME=SECRET`` (the audit log records ``api:NAME`` for its requests) or a bare
    SECRET (recorded as the client's address). Returns secret -> name, or None for no token.
    """
    lines = list(values)
    if file is not None:
        try:
            text = Path(file).read_text(encoding="utf-8")
        except OSError as e:
            raise UserError(f"cannot read the token file {file}: {e.strerror}") from None
        lines += [
            ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")
        ]
    tokens: dict[str, str | None] = {}
    for value in lines:
        name, sep, secret = value.partition("=")
        if sep and secret and _TOKEN_NAME.fullmatch(name):
            tokens[secret] = name
        elif value:
            tokens[value] = None
    names = [n for n in tokens.values() if n is not None]
    if len(names) != len(set(names)):
        raise UserError("two API tokens have the same name: give each its own")
    return tokens or None


def tokens_from_env() -> Tokens:
    """The tokens ``$IMAGESIEVE_API_TOKEN`` and ``$IMAGESIEVE_API_TOKEN_FILE`` give (None: none)."""
    return parse_tokens([os.environ.get(TOKEN_ENV) or ""], os.environ.get(TOKEN_FILE_ENV) or None)


def health_probe(url: str = PROBE_URL, timeout: float = 8.0) -> int:
    """0 when ``url``'s ``/api/v1/health`` answers 200 with a token the environment gives, else 1.

    The server reads the same variables, so the probe passes whichever form the token took
    (a bare secret, NAME=SECRET, a token file). On failure, one line on stderr says why.
    """
    try:
        tokens = tokens_from_env()
    except UserError as e:
        print(f"unhealthy: {e}", file=sys.stderr)
        return 1
    secret = next(iter(tokens), "") if isinstance(tokens, Mapping) else tokens or ""
    request = urllib.request.Request(
        f"{url.rstrip('/')}/api/v1/health", headers={"Authorization": f"Bearer {secret}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:  # noqa: S310 (our own URL)
            return 0 if r.status == 200 else 1
    except urllib.error.HTTPError as e:
        print(f"unhealthy: {url} answered {e.code} {e.reason}", file=sys.stderr)
    except (OSError, ValueError) as e:
        print(f"unhealthy: {url} did not answer: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(health_probe(sys.argv[1] if len(sys.argv) > 1 else PROBE_URL))
