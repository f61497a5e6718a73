"""Hostile input against ``imagesieve serve`` and ``imagesieve score`` (issue 18).

1. A trained workspace (``--workspace DIR``, built there if it lacks a model or a store; else a
   temporary one): phase 1 on 80 ELPV mono cells, a few hundred other cells scored, clustered,
   a cluster named and one member excluded, so that every table holds rows.
2. A corpus generated here: truncated images; decompression bombs by declared size in each format
   Pillow opens (50,000 x 50,000, 12,000 x 12,000 and 1 x 80,000,000 where the header holds it);
   fuzzed headers (seeded byte flips in the first 64 bytes); non-images; zips (a bomb, 20,000
   members, ``../`` names, nested, encrypted); one-row CSV lists naming loopback servers run here
   (which count every request they get), local files and devices. If ``serve`` has
   ``--allow-fetch``, 127.0.0.2 (a redirector to 127.0.0.1) is allowed, so that the check made on
   each redirect is what is tested.
3. The server (``serve --no-ui``), each item its own request (``/predict`` and ``/score``): its
   peak RSS during each request (VmHWM, reset through /proc/PID/clear_refs before it), and how
   much it grew during the request.
4. ``/sql`` and ``/similar?where=``: write attempts and memory bombs; the store fingerprinted
   through ``/sql`` (rows and a hash sum of every table, the views and indexes) after each.
5. predict latency of 16 clients, idle vs with a slow ``/sql`` and a slow ``/similar`` filter
   running, in alternating windows (idle, loaded, idle, loaded, ...); medians quoted.
6. One ``imagesieve score`` over the whole corpus: exit code, peak RSS, failure rows.

Traffic goes only to this machine's loopback (127.0.0.1, 127.0.0.2, ::1). A server or CLI process
growing past ``--rss-guard-gb`` is killed and counted, to keep the shared machine usable. Exits 0
whatever the figures; a crash of this script itself prints a banner and exits 1.

Usage: python bench/bench_hostile.py [--quick] [--workspace DIR] [--fuzz 20] [--seconds 20]
                                    [--pairs 2] [--rss-guard-gb 4] [--keep]
"""

from __future__ import annotations

import argparse
import functools
import http.client
import io
import itertools
import json
import random
import re
import shlex
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

from _memory import reset_peak, status_mb
from bench_api import BOUNDARY, Client, multipart, pct, start_cli, with_counter
from PIL import Image

from imagesieve.data import IMAGE_EXTENSIONS
from imagesieve.data._elpv import elpv_images, export_elpv

MB = 2**20
TARGET_MB = 1024
TIMEOUT = 60  # client timeout: a request unanswered this long is a hang
SIZES = [(50_000, 50_000), (12_000, 12_000), (1, 80_000_000)]
#: Formats Pillow writes with the size at a fixed offset: Pillow name, mode, offset, struct
#: format (width first; height first for DDS), largest side the field holds.
PATCHED = {
    "bmp": ("BMP", "RGB", 18, "<ii", 2**31 - 1),
    "dds": ("DDS", "RGBA", 12, "<II", 2**32 - 1),
    "blp": ("BLP", "P", 12, "<II", 2**32 - 1),
    "qoi": ("QOI", "RGB", 4, ">II", 2**32 - 1),
    "tga": ("TGA", "RGB", 12, "<HH", 65535),
    "sgi": ("SGI", "RGB", 6, ">HH", 65535),
    "webp": ("WEBP", "RGB", 26, "<HH", 16383),  # VP8: 14 bits
}
TEXT = {  # formats whose header is text
    "ppm": "P6\n{w} {h}\n255\n",
    "pgm": "P5\n{w} {h}\n255\n",
    "xbm": "#define b_width {w}\n#define b_height {h}\nstatic char b_bits[] = {{0}};\n",
    "xpm": '/* XPM */\nstatic char *b[] = {{\n"{w} {h} 1 1",\n"a c #000000",\n"a"}};\n',
}
OTHERS = ["png", "ico", "cur", "psd", "gif", "jpeg", "tiff", "pcx", "dcx", "msp", "jpeg2000"]
OTHERS += ["avif", "im", "sun", "fits", "gbr"]
EXTENSIONS = {"jpeg": "jpg", "tiff": "tif", "jpeg2000": "j2k", "sun": "ras"}
FUZZ = ["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "TGA", "PCX", "SGI", "QOI", "DDS"]
Row = tuple[str, str, str, bool | None]  # figure, measured, target, met (None: no target)


def zero(figure: str, found: list) -> Row:
    """A row whose target is none at all: how many, and the first few."""
    return figure, f"{len(found)} {found[:3] if found else ''}".strip(), "0", not found


def peak(figure: str, mb: float, what: str = "") -> Row:
    return figure, f"{mb:.0f} MB {what}".strip(), f"<= {TARGET_MB} MB", mb <= TARGET_MB


# -- 1. the workspace ---------------------------------------------------------------------------
def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """``imagesieve ARGS`` to completion; stops the benchmark if it fails and ``check``."""
    cmd = [sys.executable, "-m", "imagesieve.cli", *args]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if check and out.returncode:
        sys.exit(f"imagesieve {' '.join(args[:2])} failed ({out.returncode}): {out.stderr[-2000:]}")
    return out


def build_workspace(ws: Path, work: Path, n_score: int) -> None:
    """Train on 80 ELPV mono cells, score ``n_score`` others, cluster; each step if missing."""
    images = elpv_images()
    mono = [im for im in images if im.cell_type == "mono"]
    chosen = [im for im in mono if im.defect_probability == 0.0][:40]
    chosen += [im for im in mono if im.defect_probability == 1.0][:40]
    if not (ws / "models").is_dir():
        print("    training phase 1 on 80 ELPV mono cells ...")
        export_elpv(work / "train", chosen)
        sizes = ["--test-size", "0.25", "--val-size", "0.15"]
        cli("train", str(work / "train"), "--workspace", str(ws), *sizes)
    if not (ws / "store.duckdb").exists():
        poly = [im for im in images if im.cell_type == "poly"]  # an unseen type: UNKNOWN
        rest = [im for im in mono if im not in chosen][: n_score // 2] + poly[: n_score // 2]
        export_elpv(work / "score", rest)
        cli("score", str(work / "score"), "--workspace", str(ws))
        got = cli("cluster", "--workspace", str(ws), "--min-cluster-size", "5", "--json")
        for c in json.loads(got.stdout).get("clusters", [])[:1]:
            cid = str(c["cluster_id"])
            cli("cluster", "--workspace", str(ws), "--name", cid, "hostile-bench")
            cli("cluster", "--workspace", str(ws), "--exclude", cid, str(c["medoid_id"]))


# -- 2. the corpus ------------------------------------------------------------------------------
def saved(im: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def put(data: bytes, at: int, packed: bytes) -> bytes:
    return data[:at] + packed + data[at + len(packed) :]


def png_bomb(w: int, h: int) -> bytes:
    d = put(saved(Image.new("RGB", (8, 8)), "PNG"), 16, struct.pack(">II", w, h))
    return put(d, 29, struct.pack(">I", zlib.crc32(d[12:29])))


def psd(w: int, h: int, pixels: bytes) -> bytes:
    """A raw 8-bit RGB PSD declaring w x h."""
    return b"8BPS" + struct.pack(">H6xHIIHHIIIH", 1, 3, h, w, 8, 3, 0, 0, 0, 0) + pixels


def bomb(fmt: str, w: int, h: int) -> bytes | None:
    """A small file of format ``fmt`` whose header declares w x h pixels; None if it cannot."""
    im, be = Image.new("RGB", (8, 8), (90, 120, 150)), struct.pack(">II", w, h)
    if fmt in PATCHED:
        name, mode, at, size, most = PATCHED[fmt]
        dims = struct.pack(size, *((h, w) if fmt == "dds" else (w, h))) if max(w, h) <= most else 0
        return put(saved(im.convert(mode), name), at, dims) if dims else None
    if fmt in TEXT:
        return TEXT[fmt].format(w=w, h=h).encode() + bytes(64)
    if fmt in ("png", "ico"):
        png = png_bomb(w, h)
        ico = struct.pack("<3H4B2H2I", 0, 1, 1, 0, 0, 0, 0, 1, 32, len(png), 22)
        return png if fmt == "png" else ico + png
    if fmt == "cur":
        dib = struct.pack("<IiiHHI20x", 40, w, 2 * h, 1, 32, 0) + bytes(64)
        return struct.pack("<3H4B2H2I", 0, 2, 1, 0, 0, 0, 0, 0, 0, len(dib), 22) + dib
    if fmt == "psd":
        return psd(w, h, bytes(64))
    if fmt == "tiff":
        d = saved(im, "TIFF")
        ifd = struct.unpack_from("<I", d, 4)[0]
        for e in range(ifd + 2, ifd + 2 + 12 * struct.unpack_from("<H", d, ifd)[0], 12):
            if (tag := struct.unpack_from("<H", d, e)[0]) in (256, 257):
                d = put(d, e + 2, struct.pack("<HII", 4, 1, w if tag == 256 else h))
        return d
    if fmt == "jpeg2000":  # SIZ: image and tile size
        return put(put(saved(im, "JPEG2000", no_jp2=True), 8, be), 24, be)
    if fmt == "avif":
        d = saved(im, "AVIF")
        return put(d, d.index(b"ispe") + 8, be)
    if fmt == "im":  # a text header padded with zeros to 512 bytes
        d, dims = saved(im, "IM"), f"{w}*{h}".encode()
        return d[:512].replace(b"8*8", dims).replace(bytes(len(dims) - 3), b"", 1) + d[512:]
    if fmt == "sun":
        return struct.pack(">8I", 0x59A66A95, w, h, 24, 0, 1, 0, 0) + bytes(64)
    if fmt == "fits":
        cards = ["SIMPLE  = T", "BITPIX  = 8", "NAXIS   = 2", f"NAXIS1  = {w}", f"NAXIS2  = {h}"]
        return "".join(c.ljust(80) for c in [*cards, "END"]).ljust(2880).encode() + bytes(64)
    if fmt == "gbr":
        return struct.pack(">5I4sI", 33, 2, w, h, 1, b"GIMP", 10) + b"bomb\0" + bytes(64)
    if max(w, h) > 65535:  # the formats below have 16-bit sizes
        return None
    w16 = struct.pack("<HH", w, h)
    if fmt == "gif":  # the screen and the frame
        d = put(saved(im.convert("P"), "GIF"), 6, w16)
        return put(d, d.index(b"\x2c\0\0\0\0", 13) + 5, w16)
    if fmt == "jpeg":
        d = saved(im, "JPEG")
        return put(d, d.index(b"\xff\xc0") + 5, struct.pack(">HH", h, w))
    if fmt in ("pcx", "dcx"):
        pcx = put(saved(im, "PCX"), 8, struct.pack("<HH", w - 1, h - 1))
        return pcx if fmt == "pcx" else struct.pack("<3I", 987654321, 12, 0) + pcx
    if fmt == "msp":  # the 16 header words XOR to 0
        d = put(put(saved(im.convert("1"), "MSP"), 4, w16), 24, b"\0\0")
        check = functools.reduce(int.__xor__, struct.unpack("<16H", d[:32]))
        return put(d, 24, struct.pack("<H", check))
    return None


def raw_zip(members: list[tuple[str, bytes, int, int, int, int]]) -> bytes:
    """A zip written by hand: (name, stored bytes, method, crc, inflated size, flag bits) each."""
    out, central = bytearray(), bytearray()
    for name, data, method, crc, size, flags in members:
        n = name.encode()
        head = (flags, method, 0, 0, crc, len(data), size, len(n), 0)
        central += struct.pack("<4s6H3I5H2I", b"PK\1\2", 20, 20, *head, 0, 0, 0, 0, len(out)) + n
        out += struct.pack("<4s5H3I2H", b"PK\3\4", 20, *head) + n + data
    k, c = len(members), len(central)
    return bytes(out + central + struct.pack("<4s4H2IH", b"PK\5\6", 0, 0, k, k, c, len(out), 0))


def stored(name: str, data: bytes) -> tuple[str, bytes, int, int, int, int]:
    return name, data, 0, zlib.crc32(data), len(data), 0


def zip_bomb(members: int, each: int) -> bytes:
    """``members`` members each inflating to ``each`` bytes of zeros (one deflate stream reused)."""
    z, crc, chunk, parts = zlib.compressobj(9, zlib.DEFLATED, -15), 0, bytes(MB), []
    for _ in range(each // MB):
        parts.append(z.compress(chunk))
        crc = zlib.crc32(chunk, crc)
    data = b"".join(parts) + z.flush()
    return raw_zip([(f"zeros{i:02d}.png", data, 8, crc, each, 0) for i in range(members)])


def make_corpus(root: Path, cell: bytes, fuzz: int, many: int) -> dict[str, list[Path]]:
    """Write the image corpus under ``root``: {"files": paths, "zips": paths}."""
    rng, files, real = random.Random(18), {}, Image.open(io.BytesIO(cell))
    for fmt in ("PNG", "JPEG", "GIF", "BMP", "TIFF"):
        whole = saved(real, fmt)
        files[f"truncated-half.{fmt.lower()}"] = whole[: len(whole) // 2]
        files[f"truncated-100.{fmt.lower()}"] = whole[:100]
    files["truncated.webp"] = saved(real, "WEBP")[:200]
    files["truncated-progressive.jpeg"] = saved(real, "JPEG", progressive=True)[:3000]
    for fmt in [*PATCHED, *TEXT, *OTHERS]:
        for w, h in SIZES:
            if (data := bomb(fmt, w, h)) is not None:
                files[f"bomb-{fmt}-{w}x{h}.{EXTENSIONS.get(fmt, fmt)}"] = data
    small = real.convert("RGB").crop((100, 100, 164, 164))
    bases = {f.lower(): saved(small.convert("RGBA" if f == "DDS" else "RGB"), f) for f in FUZZ}
    bases["psd"] = psd(64, 64, bytes(64 * 64 * 3))
    for fmt, base in bases.items():
        for i in range(fuzz):
            d = bytearray(base)
            for _ in range(rng.randint(1, 4)):
                d[rng.randrange(min(64, len(d)))] ^= rng.randrange(1, 256)
            files[f"fuzz-{fmt}-{i:02d}.{fmt}"] = bytes(d)
    files["notes.png"] = b"not an image, just some text\n" * 20
    files["notes.txt"] = b"plain text\n"
    files["page.jpg"] = b"<!doctype html><html><body><h1>404 Not Found</h1></body></html>\n"
    files["empty.png"] = b""
    files["random.jpg"] = rng.randbytes(4096)
    files["elf.png"] = b"\x7fELF\x02\x01\x01" + bytes(57) + rng.randbytes(512)
    inner = raw_zip([stored("cell.png", with_counter(cell, 1))])
    names = [f"../../../../../../../..{root}/escaped/evil.png", "../evil.png", "/abs/evil.png"]
    names += ["a/../../evil2.png", "..\\..\\evil3.png"]
    tiny = saved(Image.new("L", (1, 1)), "PNG")
    secret = ("secret.png", rng.randbytes(64), 0, 1234, 52, 1)  # flag bit 0: encrypted
    zips = {
        "bomb.zip": zip_bomb(16, 200 * MB),
        "many.zip": raw_zip([stored(f"m{i:05d}.png", tiny) for i in range(many)]),
        "traversal.zip": raw_zip(
            [stored(n, with_counter(cell, 10 + i)) for i, n in enumerate(names)]
        ),
        "nested.zip": raw_zip([stored("middle.zip", raw_zip([stored("inner.zip", inner)]))]),
        "disguised.zip": raw_zip([stored("inner.png", inner)]),
        "encrypted.zip": raw_zip([secret, stored("plain.png", with_counter(cell, 2))]),
    }
    out: dict[str, list[Path]] = {"files": [], "zips": []}
    for kind, named in (("files", files), ("zips", zips)):
        (root / kind).mkdir(parents=True, exist_ok=True)
        for name, data in named.items():
            (root / kind / name).write_bytes(data)
            out[kind].append(root / kind / name)
    return out


class Loopback:
    """Image servers on 127.0.0.1 and ::1 and a redirector on 127.0.0.2, counting requests."""

    def __init__(self, png: bytes):
        self.hits, self.lock, self.png = {"target": 0, "redirector": 0}, threading.Lock(), png
        self.servers = [self._serve("127.0.0.1", "target"), self._serve("127.0.0.2", "redirector")]
        self.port, self.rport = (s.server_address[1] for s in self.servers)
        try:
            self.servers.append(self._serve("::1", "target", socket.AF_INET6))
        except OSError:
            print("    no IPv6 loopback here: requests to [::1] cannot be counted")
        self.port6 = self.servers[-1].server_address[1] if len(self.servers) == 3 else self.port
        with socket.socket() as s:  # a port nobody listens on
            s.bind(("127.0.0.1", 0))
            self.closed = s.getsockname()[1]

    def _serve(self, host: str, kind: str, family: int = socket.AF_INET) -> ThreadingHTTPServer:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                with outer.lock:
                    outer.hits[kind] += 1
                body = b"" if kind == "redirector" else outer.png
                self.send_response(302 if kind == "redirector" else 200)
                to = parse_qs(urlsplit(self.path).query).get("to", ["/"])[0]
                self.send_header("Location", to)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        attrs = {"address_family": family, "daemon_threads": True}
        srv = type("Counting", (ThreadingHTTPServer,), attrs)((host, 0), Handler)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        return srv

    def rows(self) -> dict[str, str]:
        """One hostile list row per list: {slug: URL or path}."""
        p, r = self.port, f"http://127.0.0.2:{self.rport}/r?to="
        return {
            "loopback": f"http://127.0.0.1:{p}/a.png",
            "localhost": f"http://localhost:{p}/b.png",
            "decimal-ip": f"http://2130706433:{p}/c.png",
            "zero-ip": f"http://0.0.0.0:{p}/d.png",
            "ipv6-loopback": f"http://[::1]:{self.port6}/e.png",
            "closed-port": f"http://127.0.0.1:{self.closed}/a.png",
            "redirect-loopback": r + quote(f"http://127.0.0.1:{p}/from-redirect.png"),
            "redirect-file": r + quote("file:///etc/passwd"),
            "etc-passwd": "/etc/passwd",
            "no-such-file": "/etc/no-such-file-18",
            "bashrc": "~/.bashrc",
            "workspace-store": "../../store.duckdb",  # relative to uploads/<request>/
            "dotdot": "../../x",
            "dev-zero": "/dev/zero",
            "proc-environ": "/proc/self/environ",
            "file-url": "file:///etc/passwd",
        }

    def count(self) -> tuple[int, int]:
        with self.lock:
            return self.hits["target"], self.hits["redirector"]

    def close(self) -> None:
        for s in self.servers:
            s.shutdown()


# -- the server, one measured request at a time -------------------------------------------------
def form(field: str, name: str, data: bytes) -> tuple[bytes, dict[str, str]]:
    """A multipart/form-data body of one file part, and its headers."""
    head = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
    body = f"{head}Content-Type: application/octet-stream\r\n\r\n".encode() + data
    body += f"\r\n--{BOUNDARY}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


@dataclass
class Reply:
    """One request's answer and time, the server's RSS before and at its peak, what went wrong."""

    status: int | None
    body: bytes
    seconds: float
    start_mb: float
    peak_mb: float
    fault: str = ""  # hang, crash, guard (killed past the RSS guard), dropped

    def doc(self) -> dict:
        try:
            doc = json.loads(self.body)
        except ValueError:
            return {}
        return doc if isinstance(doc, dict) else {}

    def one_line_error(self) -> bool:
        err = self.doc().get("error")
        if not isinstance(err, dict) or not isinstance(err.get("message"), str):
            return False
        return err.get("status") == self.status and "\n" not in err["message"]

    def line(self) -> str:
        grew = self.peak_mb - self.start_mb
        return f"HTTP {self.status} {self.fault} {self.seconds:.1f} s, {self.peak_mb:.0f} MB (+{grew:.0f})"


class Server:
    """``imagesieve serve --no-ui`` on the workspace; restarted when it dies (each death kept)."""

    def __init__(self, ws: Path, log: Path, extra: list[str], guard_mb: float):
        self.ws, self.log, self.extra, self.guard_mb = ws, log, extra, guard_mb
        self.deaths: list[tuple[str, str]] = []  # (crash or guard, the request)
        self.start()
        self.hwm = reset_peak(self.proc.pid)
        self.method = "VmHWM reset by clear_refs" if self.hwm else "VmRSS sampled every 10 ms"

    def start(self) -> None:
        args = ["serve", "--no-ui", "--port", "0", "--workspace", str(self.ws), *self.extra]
        self.proc, url, _ = start_cli(args, self.log)
        host, port = re.match(r"http://([\d.]+):(\d+)", url).groups()
        self.host, self.port = host, int(port)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def _watch(self, stop: threading.Event, seen: list) -> None:
        while not stop.wait(0.01):
            seen[0] = max(seen[0], rss := status_mb("VmRSS", self.proc.pid, missing=0.0))
            if rss > self.guard_mb and not seen[1]:
                seen[1] = True
                self.proc.kill()

    def send(self, method: str, path: str, body: bytes = b"", headers=None) -> tuple[int, bytes]:
        """(status, body) of one request on a fresh connection; raises on a timeout or a drop."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=TIMEOUT)
        try:
            conn.request(method, path, body, headers or {})
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()

    def request(self, what: str, method: str, path: str, body: bytes = b"", headers=None) -> Reply:
        """One request with the server's peak RSS during it; the server restarted if it died."""
        self.hwm = self.hwm and reset_peak(self.proc.pid)
        start = status_mb("VmRSS", self.proc.pid, missing=0.0)
        seen, stop = [0.0, False], threading.Event()
        watcher = threading.Thread(target=self._watch, args=(stop, seen), daemon=True)
        watcher.start()
        status, data, fault, t = None, b"", "", time.perf_counter()
        try:
            status, data = self.send(method, path, body, headers)
        except TimeoutError:
            fault = "hang"
        except (OSError, http.client.HTTPException):
            fault = "dropped"
        seconds = time.perf_counter() - t
        hwm = status_mb("VmHWM", self.proc.pid, missing=0.0) if self.hwm else 0.0
        stop.set()
        watcher.join()
        if seen[1]:
            self.proc.wait(timeout=60)
        if self.proc.poll() is not None:
            fault = "guard" if seen[1] else "crash"
            self.deaths.append((fault, what))
            how = "killed past the RSS guard" if seen[1] else f"died (exit {self.proc.returncode})"
            print(f"    !! server {how} on {what}; restarting")
            self.start()
        return Reply(status, data, seconds, start, max(hwm, seen[0]), fault)

    def upload(self, what: str, route: str, field: str, path: Path) -> Reply:
        return self.request(what, "POST", route, *form(field, path.name, path.read_bytes()))

    def sql(self, text: str, limit: int = 1000) -> Reply:
        body = json.dumps({"sql": text, "limit": limit}).encode()
        headers = {"Content-Type": "application/json"}
        return self.request(f"POST /sql {text[:60]}", "POST", "/api/v1/sql", body, headers)

    def rows(self, text: str) -> list | None:
        return self.sql(text).doc().get("rows")


def rss_rows(replies: dict[str, Reply]) -> list[Row]:
    """The largest peak RSS of one request (the target) and the largest growth during one."""
    top = max(replies, key=lambda w: replies[w].peak_mb)
    grew = max(replies, key=lambda w: replies[w].peak_mb - replies[w].start_mb)
    growth = f"+{replies[grew].peak_mb - replies[grew].start_mb:.0f} MB ({grew})"
    top_row = peak("max peak RSS of one request", replies[top].peak_mb, f"({top})")
    return [top_row, ("largest growth during one request", growth, "", None)]


# -- 3. each corpus item, one request -----------------------------------------------------------
def failure_rows(server: Server) -> int | None:
    rows = server.rows("SELECT count(*) FROM failures")
    return rows[0][0] if rows else None


def corpus_phase(server: Server, corpus: dict, lists: dict[str, Path], loop: Loopback) -> list[Row]:
    """Every file to /predict and /score, every zip and list to /score; one request each."""
    jobs = [("predict", "file", p) for p in corpus["files"]]
    jobs += [("score", "files", p) for p in corpus["files"] + corpus["zips"] + list(lists.values())]
    replies, kept, rows = {}, {}, {}
    hits0, before = loop.count(), failure_rows(server)
    rss0 = status_mb("VmRSS", server.proc.pid, missing=0.0)
    for route, field, path in jobs:
        what = f"POST /api/v1/{route} {path.parent.name}/{path.name}"
        replies[what] = r = server.upload(what, f"/api/v1/{route}", field, path)
        doc, now = r.doc(), failure_rows(server)
        counts = sum(doc.get(k, 0) for k in ("scored", "rescored", "already_scored"))
        kept[what] = 0 if r.status != 200 else 1 if route == "predict" else counts  # images stored
        rows[what] = now - before if None not in (now, before) else 0
        before = now if now is not None else before
        if r.fault or (r.status or 0) >= 500 or r.peak_mb - r.start_mb > 100:
            print(f"    {what}: {r.line()}: {r.body[:150]!r}")
    slugs = {f"POST /api/v1/score lists/{p.name}": slug for slug, p in lists.items()}

    def answer(slug: str) -> str:  # what a failure says, less the names it is about
        doc = replies[next(w for w, s in slugs.items() if s == slug)].doc()
        text = str([(f.get("kind"), f.get("message")) for f in doc.get("failures", [])])
        for name in (f"{slug}.csv", loop.rows()[slug], Path(loop.rows()[slug]).name):
            text = text.replace(name, "X")
        return text.replace(str(loop.port), "PORT").replace(str(loop.closed), "PORT")

    pairs = [("etc-passwd", "no-such-file"), ("workspace-store", "dotdot")]
    pairs += [("loopback", "closed-port")]
    tells = [f"{a}: {answer(a)} vs {b}: {answer(b)}" for a, b in pairs if answer(a) != answer(b)]
    root, ws = corpus["zips"][0].parents[1], server.ws
    outside = [root / "escaped/evil.png", Path("/abs/evil.png"), ws / "uploads/evil.png"]
    outside = [str(p) for p in outside + [ws / "evil.png", ws / "evil2.png"] if p.exists()]
    codes = {what: r.status or 0 for what, r in replies.items()}
    shaped = [w for w, c in codes.items() if c // 100 == 4 and replies[w].one_line_error()]
    unshaped = [w for w, c in codes.items() if c // 100 == 4 and w not in shaped]
    (t0, r0), (t1, r1) = hits0, loop.count()
    reached = (t1 - t0) + (0 if server.extra else r1 - r0)
    reached_row = (
        f"{reached} (127.0.0.2 redirector: {r1 - r0}{', allowed' if server.extra else ''})"
    )
    tried = f"{len(replies)} ({len(corpus['files'])} files x /predict and /score, "
    tried += f"{len(corpus['zips'])} zips, {len(lists)} lists)"
    failed = f"{sum(n > 0 for n in rows.values())} ({sum(rows.values())} rows)"
    rss = f"{rss0:.0f} / {status_mb('VmRSS', server.proc.pid, missing=0.0):.0f} MB"
    return [
        ("requests tried", tried, "", None),
        ("answered 4xx with a one-line JSON error", str(len(shaped)), "", None),
        zero("answered 4xx in another shape", unshaped),
        ("requests that stored failure rows", failed, "", None),
        ("requests that stored an image", str(sum(n > 0 for n in kept.values())), "", None),
        zero("HTTP 5xx", [w for w, c in codes.items() if c >= 500]),
        zero("hangs over 60 s", [w for w, r in replies.items() if r.fault == "hang"]),
        *rss_rows(replies),
        ("server RSS before / after part 3", rss, "", None),
        ("requests that reached the loopback servers", reached_row, "0", reached == 0),
        zero("list rows fetched or read, and stored", [slugs[w] for w in slugs if kept[w]]),
        zero("failures telling whether a file or port exists", tells),
        zero("files written outside by zip member names", outside),
    ]


# -- 4. /sql and /similar -----------------------------------------------------------------------
WRITES = """
WITH x AS (UPDATE predictions SET label = 'pwned' RETURNING id) SELECT count(*) FROM x
WITH x AS (UPDATE batches SET status = 'pwned' RETURNING 1) SELECT count(*) FROM x
WITH x AS (UPDATE clusters SET name = 'pwned' RETURNING 1) SELECT count(*) FROM x
WITH x AS (INSERT INTO failures SELECT * FROM failures LIMIT 1 RETURNING 1) SELECT count(*) FROM x
WITH x AS (INSERT INTO cluster_runs SELECT * REPLACE (run_id + 99 AS run_id) FROM cluster_runs RETURNING 1) FROM x
SELECT * FROM (WITH x AS (DELETE FROM failures RETURNING 1) SELECT count(*) FROM x)
EXPLAIN ANALYZE WITH x AS (DELETE FROM predictions RETURNING 1) SELECT count(*) FROM x
SUMMARIZE WITH x AS (DELETE FROM predictions RETURNING id) SELECT * FROM x
MERGE INTO predictions USING (SELECT min(id) AS id FROM predictions) s ON predictions.id = s.id WHEN MATCHED THEN DELETE
DELETE FROM predictions
UPDATE predictions SET label = 'pwned'
INSERT INTO failures SELECT * FROM failures
DROP TABLE failures
TRUNCATE batches
ALTER TABLE predictions DROP COLUMN label
CREATE TABLE pwned AS SELECT 1 AS x
CREATE OR REPLACE VIEW unknowns AS SELECT 1 AS x
SELECT 1; DELETE FROM predictions
COMMIT; DELETE FROM predictions
SELECT * FROM query('DELETE FROM predictions')
COPY predictions TO '{tmp}/pwned.csv'
COPY failures FROM '/etc/passwd'
ATTACH '{tmp}/pwned.duckdb' AS pwned
INSTALL httpfs
LOAD httpfs
PRAGMA memory_limit='64GB'
SET lock_configuration = false
CHECKPOINT
SELECT * FROM force_checkpoint()
EXPORT DATABASE '{tmp}/pwned-export'
VACUUM
"""
WRITE_FILTERS = """
id IN (SELECT * FROM (WITH x AS (DELETE FROM predictions RETURNING id) SELECT id FROM x))
(SELECT count(*) FROM (WITH x AS (UPDATE batches SET status = 'pwned' RETURNING 1) SELECT * FROM x)) >= 0
true); DELETE FROM predictions; SELECT (1
id > 0 OR (SELECT count(*) FROM query('DELETE FROM failures')) > 0
true; CHECKPOINT
"""
MEMORY_BOMBS = """
SELECT repeat('x', 300000000) AS s
SELECT len(range(100000000))
WITH RECURSIVE r(s, n) AS (SELECT 'x', 0 UNION ALL SELECT s || s, n + 1 FROM r WHERE n < 30) SELECT max(len(s)) FROM r
SELECT list(range) FROM range(200000000)
SELECT count(DISTINCT range::VARCHAR) FROM range(100000000)
SELECT string_agg(range::VARCHAR, ',') FROM range(100000000)
SELECT range, md5(range::VARCHAR) AS h FROM range(100000)
"""
NESTED = "abs(" * 400 + "{x}" + ")" * 400


def fingerprint(server: Server, tables: list[str]) -> list | None:
    """[name, rows, hash sum] of every table, the stored views and the indexes, through /sql."""
    parts = [f"SELECT '{t}' AS t, count(*), coalesce(sum(hash(x)), 0) FROM {t} x" for t in tables]
    parts += [
        "SELECT 'views', count(*), coalesce(sum(hash(view_name, sql)), 0) FROM duckdb_views() "
        "WHERE NOT internal AND NOT temporary",
        "SELECT 'indexes', count(*), coalesce(sum(hash(index_name, sql)), 0) FROM duckdb_indexes()",
    ]
    return server.rows(" UNION ALL ".join(parts) + " ORDER BY 1")


def sql_phase(server: Server, tmp: Path) -> tuple[list[Row], int]:
    """Write attempts and memory bombs; the store fingerprinted after each. (rows, a stored id)."""
    tables = [r[0] for r in server.rows("SELECT table_name FROM duckdb_tables() ORDER BY 1") or []]
    tables = [t for t in tables if re.fullmatch(r"\w+", t)]
    some_id = (server.rows("SELECT min(id) FROM predictions") or [[1]])[0][0]
    before = last = fingerprint(server, tables)
    print("    store before: " + ", ".join(f"{t} {n}" for t, n, _ in before or []))
    writes = [f"WITH x AS (DELETE FROM {t} RETURNING 1) SELECT count(*) FROM x" for t in tables]
    writes = [("sql", s) for s in writes + WRITES.format(tmp=tmp).strip().splitlines()]
    writes += [("where", s) for s in WRITE_FILTERS.strip().splitlines()]
    bombs = [("sql", s) for s in MEMORY_BOMBS.strip().splitlines()]
    bombs += [("sql", f"SELECT {NESTED.format(x=1)}"), ("where", NESTED.format(x="id") + " > 0")]
    bombs += [("where", "length(repeat('x', 300000000)) > 0")]
    replies, changed = {}, []
    for route, text in writes + bombs:
        what = f"{route}: {text[:60]}"
        if route == "sql":
            replies[what] = r = server.sql(text, limit=100_000)
        else:
            path = f"/api/v1/similar?id={some_id}&k=5&where={quote(text)}"
            replies[what] = r = server.request(what, "GET", path)
        if (now := fingerprint(server, tables)) != last:
            changed.append(what)
            last = now
        if r.status == 200 or r.fault or (r.status or 0) >= 500 or r.peak_mb - r.start_mb > 100:
            print(f"    {what}: {r.line()}: {r.body[:120]!r}")
    unchanged = before is not None and not changed
    same = "yes" if unchanged else f"no, changed by: {changed[:3]}"
    answered = [w for w, r in replies.items() if r.status == 200]
    rows = [
        ("write attempts", str(len(writes)), ">= 30", len(writes) >= 30),
        ("store unchanged (rows, hash of every table, views, indexes)", same, "yes", unchanged),
        zero("files written by SQL", sorted(p.name for p in tmp.glob("pwned*"))),
        ("memory bombs", str(len(bombs)), "", None),
        ("answered 200", f"{len(answered)} {answered[:3]}", "", None),
        zero("hangs over 60 s", [w for w, r in replies.items() if r.fault == "hang"]),
        zero("HTTP 5xx", [w for w, r in replies.items() if (r.status or 0) >= 500]),
    ]
    return rows + rss_rows(replies), some_id


# -- 5. predict latency under a slow query ------------------------------------------------------
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"
SLOW_SQL = json.dumps({"sql": "SELECT count(*) FROM range(3000000000) WHERE range % 7 = 3"})
SLOW_WHERE = quote("(SELECT count(*) FROM range(3000000000) WHERE range % 7 = 3) > 0")


def latency_phase(
    server: Server, pngs: list, seconds: float, pairs: int, some_id: int
) -> list[Row]:
    """16 clients predicting distinct images, in idle and loaded windows taking turns."""
    counter, base = itertools.count(), time.time_ns()  # content never stored before

    def body() -> bytes:
        n = next(counter)
        return multipart(with_counter(pngs[n % len(pngs)], base + n), f"lat{n}.png")

    def timed(*request: Any) -> str:
        t = time.perf_counter()
        try:
            status = server.send(*request)[0]
        except (OSError, http.client.HTTPException) as e:
            status = type(e).__name__
        return f"{status} after {time.perf_counter() - t:.1f} s"

    def window(loaded: bool) -> dict:
        stop, lat, errors, slow = time.monotonic() + seconds, [], [], []

        def client() -> None:
            c = Client(server.host, server.port)
            while time.monotonic() < stop:
                try:
                    code, s = c.post(body())
                except (OSError, http.client.HTTPException):
                    code, s, c = 0, 0.0, Client(server.host, server.port)
                if code == 200:
                    lat.append(s)
                else:
                    errors.append(code)

        def loader(sql: bool) -> None:
            while time.monotonic() < stop:
                if sql:
                    headers = {"Content-Type": "application/json"}
                    slow.append(timed("POST", "/api/v1/sql", SLOW_SQL.encode(), headers))
                else:
                    slow.append(timed("GET", f"/api/v1/similar?id={some_id}&where={SLOW_WHERE}"))

        threads = [threading.Thread(target=client) for _ in range(16)]
        threads += [threading.Thread(target=loader, args=(s,)) for s in (True, False) if loaded]
        for t in threads:
            t.start()
        for t in threads:
            t.join()  # the loaders' last slow requests end too: the next window starts idle
        p50, p99 = (1000 * pct(lat, 50), 1000 * pct(lat, 99)) if lat else (float("nan"),) * 2
        return {"p50": p50, "p99": p99, "n": len(lat), "errors": errors, "slow": slow}

    for _ in range(20):  # warm-up
        timed("POST", "/api/v1/predict", body(), {"Content-Type": MULTIPART})
    got: dict[str, list[dict]] = {"idle": [], "loaded": []}
    for k in range(pairs):
        for phase in ("idle", "loaded"):
            got[phase].append(w := window(phase == "loaded"))
            slow = f"; slow requests: {', '.join(w['slow'])}" if w["slow"] else ""
            print(
                f"    pair {k + 1} {phase}: {w['n']} predictions, p50 {w['p50']:.0f} ms, "
                f"p99 {w['p99']:.0f} ms, errors {len(w['errors'])}{slow}"
            )
    med = {(p, q): statistics.median(w[q] for w in got[p]) for p in got for q in ("p50", "p99")}
    ratio = statistics.median(b["p99"] / a["p99"] for a, b in zip(*got.values(), strict=True))
    idle = f"{med['idle', 'p50']:.0f} / {med['idle', 'p99']:.0f} ms"
    loaded = f"{med['loaded', 'p50']:.0f} / {med['loaded', 'p99']:.0f} ms"
    return [
        ("p50 / p99 idle", idle, "", None),
        ("p50 / p99 with a slow /sql and /similar running", loaded, "", None),
        ("p99 loaded / idle, median of the pairs", f"{ratio:.2f}x", "<= 2.0x", ratio <= 2.0),
        zero("predict errors", [e for ws in got.values() for w in ws for e in w["errors"]]),
    ]


# -- 6. one CLI run over the whole corpus -------------------------------------------------------
def cli_value(ws: Path, query: str) -> Any:
    """The first value ``imagesieve sql`` answers, or None."""
    got = cli("sql", "--json", "--workspace", str(ws), query, check=False)
    try:
        return json.loads(got.stdout)["rows"][0][0]
    except (ValueError, LookupError, TypeError):
        return None


def cli_phase(ws: Path, inputs: list[str], guard_mb: float, cap_s: float, work: Path) -> list[Row]:
    """``imagesieve score`` over the corpus under /usr/bin/time -v (VmHWM polled for the guard)."""
    timing, out, err = work / "cli-time.txt", work / "cli-out.json", work / "cli-err.txt"
    cmd = [sys.executable, "-m", "imagesieve.cli", "score", *inputs, "--json"]
    cmd += ["--workspace", str(ws)]
    wrap = ["/usr/bin/time", "-v", "-o", str(timing)] if Path("/usr/bin/time").exists() else []
    t, polled, fault = time.perf_counter(), 0.0, ""
    with out.open("w") as so, err.open("w") as se:
        proc = subprocess.Popen(wrap + cmd, stdout=so, stderr=se)
        kids = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
        while proc.poll() is None:
            pid = proc.pid
            if wrap and kids.exists():  # the CLI is time's child
                pid = int(next(iter(kids.read_text().split()), pid))
            polled = max(polled, status_mb("VmHWM", pid, missing=0.0))
            if not fault and (polled > guard_mb or time.perf_counter() - t > cap_s):
                fault = "past the RSS guard" if polled > guard_mb else f"over {cap_s:.0f} s"
                subprocess.run(["kill", "-9", str(pid)], check=False)
            time.sleep(0.05)
    seconds, rc = time.perf_counter() - t, proc.returncode
    m = re.search(
        r"Maximum resident set size \(kbytes\): (\d+)", timing.read_text() if wrap else ""
    )
    most = max(polled, int(m[1]) / 1024 if m else 0.0)
    try:
        doc = json.loads(out.read_text())
    except ValueError:
        doc = {}
    batch = doc.get("batch_id") or cli_value(ws, "SELECT max(batch_id) FROM batches")
    rows = cli_value(ws, f"SELECT count(*) FROM failures WHERE batch_id = {int(batch or -1)}")
    stderr = err.read_text()
    lines = [line for line in stderr.splitlines() if line.strip()]
    print(f"    exit {rc} after {seconds:.0f} s {fault}; stderr: {len(lines)} lines: {lines[-3:]}")
    tried = f"{doc.get('items')} / {doc.get('failed')} / {len(doc.get('ignored', []))}"
    tb = "Traceback" in stderr
    return [
        ("exit code", f"{rc} {fault}".strip(), "3 or 4 (items failed)", rc in (3, 4)),
        ("traceback on stderr", "yes" if tb else "no", "no", not tb),
        ("lines on stderr", f"{len(lines)} {lines[-1:]}", "", None),
        peak("peak RSS", most),
        ("items tried / failed / ignored", tried, "", None),
        ("failure rows of its batch (ignored included)", f"{rows} (batch {batch})", "", None),
    ]


# -- 7. all of it -------------------------------------------------------------------------------
def start_server(ws: Path, work: Path, guard_mb: float) -> Server:
    """The server; told to allow fetches from 127.0.0.2 (the redirector) if it has the option."""
    if "--allow-fetch" in cli("serve", "--help").stdout:
        try:
            return Server(ws, work / "server.log", ["--allow-fetch", "127.0.0.2/32"], guard_mb)
        except SystemExit:
            print("    serve --allow-fetch 127.0.0.2/32 refused: started without it")
    return Server(ws, work / "server.log", [], guard_mb)


def run(args: argparse.Namespace, work: Path, ws: Path, held: list) -> list[tuple[str, list[Row]]]:
    """Parts 1-6: the table's rows per part. What needs stopping goes into ``held``."""
    fuzz = args.fuzz if args.fuzz is not None else (2 if args.quick else 20)
    many, n_score, cap_s = (2_000, 100, 300) if args.quick else (20_000, 300, 1200)
    guard = args.rss_guard_gb * 1024
    build_workspace(ws, work, n_score)
    cells = [im.path.read_bytes() for im in elpv_images()[::10]]
    corpus = make_corpus(work / "corpus", cells[0], fuzz, many)
    loop = Loopback(cells[1])
    held.append(loop)
    (work / "corpus/lists").mkdir()
    lists = {slug: work / "corpus/lists" / f"{slug}.csv" for slug in loop.rows()}
    for slug, row in loop.rows().items():
        lists[slug].write_text(f"url\n{row}\n")
    print(
        f"1-2. workspace {ws}; corpus {work / 'corpus'}: {len(corpus['files'])} files, "
        f"{len(corpus['zips'])} zips, {len(lists)} lists"
    )
    server = start_server(ws, work, guard)
    held.append(server)
    allowed = "allowed by --allow-fetch" if server.extra else "not allowed (no --allow-fetch)"
    print(
        f"3. server pid {server.proc.pid}; peak RSS per request: {server.method}; "
        f"the redirector on 127.0.0.2 {allowed}"
    )
    part3 = corpus_phase(server, corpus, lists, loop)
    print("4. /sql and /similar")
    part4, some_id = sql_phase(server, work)
    print(f"5. predict latency, 16 clients, {args.pairs} pairs of windows")
    seconds = args.seconds or (5 if args.quick else 20)
    part5 = latency_phase(server, cells, seconds, args.pairs, some_id)
    server.stop()
    held.remove(server)
    died = {kind: [w for f, w in server.deaths if f == kind] for kind in ("crash", "guard")}
    part3 += [zero("crashes in parts 3-5 (restarted)", died["crash"])]
    part3 += [zero(f"killed past the {args.rss_guard_gb:g} GB guard", died["guard"])]
    print("6. one imagesieve score over the whole corpus")
    inputs = [str(work / "corpus/files")]  # a folder gives its image extensions: the rest by name
    inputs += [str(p) for p in corpus["files"] if p.suffix.lower() not in IMAGE_EXTENSIONS]
    inputs += [str(p) for p in corpus["zips"] + list(lists.values())]
    part6 = cli_phase(ws, inputs, guard, cap_s, work)
    return [("server", part3), ("sql/similar", part4), ("latency", part5), ("CLI", part6)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a small corpus and 5 s windows")
    ap.add_argument("--workspace", type=Path, help="workspace to use (built there if empty)")
    ap.add_argument("--fuzz", type=int, help="fuzzed files per format (default 20; --quick 2)")
    ap.add_argument("--seconds", type=float, help="latency window (default 20; --quick 5)")
    ap.add_argument("--pairs", type=int, default=2, help="idle/loaded window pairs")
    ap.add_argument("--rss-guard-gb", type=float, default=4.0, help="kill a process past this RSS")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args()
    sys.stdout.reconfigure(line_buffering=True)
    print(f"# bench_hostile: command: python {shlex.join(sys.argv)}")
    work = Path(tempfile.mkdtemp(prefix="bench-hostile-"))
    held: list = []
    try:
        parts = run(args, work, (args.workspace or work / "ws").resolve(), held)
    except Exception:
        bar = "!" * 80
        print(f"\n{bar}\n!! bench_hostile.py ITSELF CRASHED; kept {work}\n{bar}")
        raise
    finally:
        for thing in held:
            if isinstance(thing, Server):
                thing.stop()
            else:
                thing.close()
    print("\n| part | figure | measured | target | |\n|---|---|---|---|---|")
    for part, rows in parts:
        for figure, measured, target, ok in rows:
            verdict = "" if ok is None else ("PASS" if ok else "**FAIL**")
            print(f"| {part} | {figure} | {measured} | {target} | {verdict} |")
    if args.keep:
        print(f"\nkept {work} (server.log, cli-*.txt, corpus/)")
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
