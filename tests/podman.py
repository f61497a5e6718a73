"""Build and run the project's container with podman on this machine (tests and bench_container).

No registry is reachable here, so the base image is made locally: Debian minbase with python3
from the apt mirror (``mmdebstrap``), imported with ``podman import``. What this machine needs
and users' machines do not stays here, out of the Dockerfile: the ``runc`` runtime (crun fails
on its mixed cgroups), raised ulimits, and the host's extra CA certificates (and pip's setting
to use them), put in the base image so that pip inside the build reaches the package index.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
BASE_TAG = "localhost/imagesieve-base:bookworm"
IMAGE_TAG = "localhost/imagesieve:test"
#: The container user's uid (Dockerfile): a bind-mounted workspace must be writable by it.
CONTAINER_UID = 10001
RUNTIME = ["--runtime", "runc"]
ULIMITS = ["--ulimit", "nofile=20000:20000", "--ulimit", "nproc=32768:32768"]
MIRROR = "http://deb.debian.org/debian"
HOST_CAS = Path("/usr/local/share/ca-certificates")


def podman(*args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run ``podman ARGS`` (captured text); raise with its stderr when it fails and ``check``."""
    out = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} failed ({out.returncode}):\n{out.stderr}")
    return out


def image_exists(tag: str) -> bool:
    """Whether podman has an image called ``tag``."""
    return podman("image", "exists", tag, check=False).returncode == 0


def build_base(workdir: Path, tag: str = BASE_TAG) -> float:
    """Debian bookworm minbase + python3 + venv, the host's extra CAs: seconds it took."""
    t = time.perf_counter()
    tar = workdir / "base.tar"
    hooks = [
        'mkdir -p "$1/usr/local/share/ca-certificates" "$1/etc"',
        "printf '[global]\\ncert = /etc/ssl/certs/ca-certificates.crt\\n' > \"$1/etc/pip.conf\"",
    ]
    cas = sorted(str(p) for p in HOST_CAS.glob("*.crt")) if HOST_CAS.is_dir() else []
    if cas:
        hooks.append(f"copy-in {' '.join(cas)} /usr/local/share/ca-certificates/")
    hooks.append('chroot "$1" update-ca-certificates')
    cmd = ["mmdebstrap", "--quiet", "--variant=minbase"]
    cmd += ["--include=python3,python3-venv,ca-certificates"]
    cmd += [f"--customize-hook={h}" for h in hooks]
    cmd += ["bookworm", str(tar), MIRROR]
    subprocess.run(cmd, check=True, capture_output=True, timeout=900)
    podman("import", str(tar), tag)
    tar.unlink()
    return time.perf_counter() - t


def build_image(
    base: str = BASE_TAG, tag: str = IMAGE_TAG, *, no_cache: bool = True
) -> tuple[float, str]:
    """``podman build`` the repository's Dockerfile on ``base``: (seconds, build log)."""
    t = time.perf_counter()
    args = ["build", *RUNTIME, *ULIMITS, "--format", "docker", "--build-arg", f"BASE={base}"]
    args += ["--no-cache"] * no_cache + ["--tag", tag, str(ROOT)]
    out = podman(*args, timeout=1800)
    return time.perf_counter() - t, out.stdout + out.stderr


def run_once(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """``podman run --rm ARGS`` (options, the image, then its command), health check off."""
    return podman("run", "--rm", "--no-healthcheck", *RUNTIME, *ULIMITS, *args, check=check)


def venv_megabytes(tag: str = IMAGE_TAG) -> float:
    """Size on disk of the image's installed environment (/opt/imagesieve), in MB (2**20)."""
    out = run_once("--entrypoint", "du", tag, "-sk", "/opt/imagesieve")
    return int(out.stdout.split()[0]) / 1024


def image_megabytes(tag: str = IMAGE_TAG) -> float:
    """The whole image's size as podman reports it, in MB (2**20)."""
    return json.loads(podman("image", "inspect", tag).stdout)[0]["Size"] / 2**20


def writable_workspace(path: Path) -> Path:
    """Let the container's user write a bind-mounted workspace (owned by root on the host)."""
    path.mkdir(parents=True, exist_ok=True)
    for p in [path, *path.rglob("*")]:
        shutil.chown(p, CONTAINER_UID, CONTAINER_UID)
    return path


def run_server(
    name: str,
    workspace: Path,
    token: str,
    tag: str = IMAGE_TAG,
    *extra: str,
    token_file: Path | None = None,
) -> str:
    """Start the image's server detached, the workspace mounted; its URL once health answers.

    Published on a free port of 127.0.0.1; ``extra`` are more ``podman run`` options. The
    server gets ``token`` in $IMAGESIEVE_API_TOKEN, or with ``token_file`` (which holds it) that
    file mounted read-only as a secret and named by $IMAGESIEVE_API_TOKEN_FILE.
    """
    secret = ["--env", f"IMAGESIEVE_API_TOKEN={token}"]
    if token_file is not None:
        secret = [
            "--volume", f"{token_file}:/run/secrets/imagesieve-tokens:ro",
            "--env", "IMAGESIEVE_API_TOKEN_FILE=/run/secrets/imagesieve-tokens",
        ]  # fmt: skip
    podman("rm", "--force", "--ignore", name)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    podman(
        "run", "--detach", "--name", name, *RUNTIME, *ULIMITS,
        "--publish", f"127.0.0.1:{port}:7860",
        "--volume", f"{workspace}:/workspace",
        *secret, *extra, tag,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            r = requests.get(f"{url}/api/v1/health", headers=bearer(token), timeout=5)
            if r.status_code == 200:
                return url
        except requests.ConnectionError:
            pass
        state = json.loads(podman("inspect", name).stdout)[0]["State"]
        if not state["Running"]:
            logs = podman("logs", name, check=False)
            raise AssertionError(f"the container stopped:\n{logs.stdout}{logs.stderr}")
        time.sleep(1)
    raise AssertionError(f"the container's server did not answer in 180 s: {podman('logs', name)}")


def bearer(token: str) -> dict[str, str]:
    """The API's Authorization header."""
    return {"Authorization": f"Bearer {token}"}
