"""The image sets of ``bench_openset.py``: ELPV, scikit-learn's digits, and three generated sets.

Every set is written once as an ImageFolder under ``bench/_data/openset/<set>/<class>/``
(seeded, so the same files every time) and returned as (path, class) pairs. The generated
sets vary what a photo varies (colour, size, position, angle, background, noise, blur), so
a class is a kind of thing, not one picture:

* ``shapes``: eight filled or outlined shapes.
* ``textures``: eight surface patterns at random scale, angle and colours.
* ``gauges``: six kinds of rendered instrument faces (round dial, LCD, rolling counter,
  bar gauge, two-dial meter, thermometer), each showing a random reading: the product's
  own domain, meter photos by kind.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 160
PER_CLASS = 150

Painter = Callable[[ImageDraw.ImageDraw, np.random.Generator], None]


def _colour(rng: np.random.Generator, lo: int = 0, hi: int = 256) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(lo, hi, 3))


def _contrasting(rng: np.random.Generator, bg: tuple[int, int, int]) -> tuple[int, int, int]:
    """A colour at least 120 away (sum of channels) from ``bg``."""
    while True:
        c = _colour(rng)
        if sum(abs(a - b) for a, b in zip(c, bg, strict=True)) >= 120:
            return c


def _photo(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """What a camera adds: a small turn, blur and sensor noise."""
    img = img.rotate(
        float(rng.uniform(-8, 8)), resample=Image.BILINEAR, fillcolor=img.getpixel((0, 0))
    )
    img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0, 1.2))))
    a = np.asarray(img, np.float32) + rng.normal(0, rng.uniform(2, 10), (SIZE, SIZE, 3))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def _polygon(cx: float, cy: float, r: float, n: int, turn: float, inner: float = 1.0) -> list:
    pts = []
    for i in range(n * (2 if inner != 1.0 else 1)):
        rr = r if inner == 1.0 or i % 2 == 0 else r * inner
        a = turn + i * math.pi * 2 / (n * (2 if inner != 1.0 else 1))
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return pts


def _shape(kind: str, rng: np.random.Generator) -> Image.Image:
    bg = _colour(rng)
    img = Image.new("RGB", (SIZE, SIZE), bg)
    d = ImageDraw.Draw(img)
    fg = _contrasting(rng, bg)
    r = rng.uniform(0.2, 0.36) * SIZE
    cx, cy = rng.uniform(r + 4, SIZE - r - 4, 2)
    turn = rng.uniform(0, 2 * math.pi)
    outline = rng.random() < 0.3
    width = int(rng.integers(3, 8))
    box = (cx - r, cy - r, cx + r, cy + r)

    def poly(pts: list) -> None:
        if outline:
            d.line([*pts, pts[0]], fill=fg, width=width, joint="curve")
        else:
            d.polygon(pts, fill=fg)

    if kind == "circle":
        d.ellipse(box, outline=fg if outline else None, fill=None if outline else fg, width=width)
    elif kind == "ring":
        d.ellipse(box, outline=fg, width=int(r * rng.uniform(0.25, 0.45)))
    elif kind == "square":
        poly(_polygon(cx, cy, r, 4, turn))
    elif kind == "triangle":
        poly(_polygon(cx, cy, r, 3, turn))
    elif kind == "hexagon":
        poly(_polygon(cx, cy, r, 6, turn))
    elif kind == "star":
        poly(_polygon(cx, cy, r, 5, turn, inner=rng.uniform(0.35, 0.5)))
    elif kind == "cross":
        t = r * rng.uniform(0.25, 0.4)
        arms = [(-t, -r), (t, -r), (t, -t), (r, -t), (r, t), (t, t), (t, r), (-t, r), (-t, t)]
        arms += [(-r, t), (-r, -t), (-t, -t)]
        c, s = math.cos(turn), math.sin(turn)
        poly([(cx + x * c - y * s, cy + x * s + y * c) for x, y in arms])
    elif kind == "crescent":
        d.ellipse(box, fill=fg)
        off = r * rng.uniform(0.35, 0.6)
        d.ellipse((cx - r + off, cy - r - off / 2, cx + r + off, cy + r - off / 2), fill=bg)
    return _photo(img, rng)


def _texture(kind: str, rng: np.random.Generator) -> Image.Image:
    a, b = np.array(_colour(rng), np.float32), None
    b = np.array(_contrasting(rng, tuple(int(v) for v in a)), np.float32)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    ang = rng.uniform(0, math.pi)
    u = xx * math.cos(ang) + yy * math.sin(ang)
    v = -xx * math.sin(ang) + yy * math.cos(ang)
    period = rng.uniform(10, 32)
    if kind == "stripes":
        m = (np.sin(2 * math.pi * u / period) > 0).astype(np.float32)
    elif kind == "checker":
        m = ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    elif kind == "dots":
        fu, fv = (u / period) % 1 - 0.5, (v / period) % 1 - 0.5
        m = (fu**2 + fv**2 < rng.uniform(0.04, 0.1)).astype(np.float32)
    elif kind == "grid":
        w = rng.uniform(0.08, 0.2)
        m = (((u / period) % 1 < w) | ((v / period) % 1 < w)).astype(np.float32)
    elif kind == "waves":
        m = np.sin(2 * math.pi * (u + 8 * np.sin(2 * math.pi * v / (period * 3))) / period) > 0
        m = m.astype(np.float32)
    elif kind == "blobs":
        n = rng.normal(0, 1, (SIZE // 8 + 2, SIZE // 8 + 2)).astype(np.float32)
        big = np.asarray(Image.fromarray(n).resize((SIZE, SIZE), Image.BICUBIC))
        m = (big > rng.uniform(-0.3, 0.3)).astype(np.float32)
    elif kind == "rings":
        cx, cy = rng.uniform(0, SIZE, 2)
        m = (np.sin(2 * math.pi * np.hypot(xx - cx, yy - cy) / period) > 0).astype(np.float32)
    elif kind == "zigzag":
        tri = np.abs((v / period) % 2 - 1) * period
        m = (((u + tri) / period) % 1 < 0.5).astype(np.float32)
    img = a * (1 - m[..., None]) + b * m[..., None]
    return _photo(Image.fromarray(img.astype(np.uint8)), rng)


def _digits7(d: ImageDraw.ImageDraw, x: float, y: float, h: float, text: str, fill) -> None:
    """Seven-segment digits, each ``h`` tall, from (x, y)."""
    segs = {
        "0": "abcdef", "1": "bc", "2": "abged", "3": "abgcd", "4": "fgbc",
        "5": "afgcd", "6": "afgedc", "7": "abc", "8": "abcdefg", "9": "abcdfg",
    }  # fmt: skip
    w, t = h * 0.5, max(2, h * 0.12)
    for ch in text:
        pos = {
            "a": (x, y, x + w, y + t), "g": (x, y + h / 2 - t / 2, x + w, y + h / 2 + t / 2),
            "d": (x, y + h - t, x + w, y + h), "f": (x, y, x + t, y + h / 2),
            "b": (x + w - t, y, x + w, y + h / 2), "e": (x, y + h / 2, x + t, y + h),
            "c": (x + w - t, y + h / 2, x + w, y + h),
        }  # fmt: skip
        for s in segs[ch]:
            d.rectangle(pos[s], fill=fill)
        x += w * 1.45


def _dial(d: ImageDraw.ImageDraw, rng, cx, cy, r, face, ink) -> None:
    d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=face, outline=ink, width=max(2, int(r / 12)))
    for i in range(11):
        a = math.radians(225 - i * 27)
        p, q = (0.78, 0.95) if i % 5 else (0.68, 0.95)
        d.line((cx + p * r * math.cos(a), cy - p * r * math.sin(a), cx + q * r * math.cos(a),
                cy - q * r * math.sin(a)), fill=ink, width=2)  # fmt: skip
    a = math.radians(225 - rng.uniform(0, 270))
    d.line((cx, cy, cx + 0.8 * r * math.cos(a), cy - 0.8 * r * math.sin(a)), fill=(200, 30, 30),
           width=max(2, int(r / 15)))  # fmt: skip
    d.ellipse((cx - r / 10, cy - r / 10, cx + r / 10, cy + r / 10), fill=ink)


def _gauge(kind: str, rng: np.random.Generator) -> Image.Image:
    bg = _colour(rng, 40, 220)
    img = Image.new("RGB", (SIZE, SIZE), bg)
    d = ImageDraw.Draw(img)
    s = rng.uniform(0.75, 1.0)
    cx, cy = SIZE / 2 + rng.uniform(-10, 10, 2)
    face = _colour(rng, 200, 256)
    ink = _colour(rng, 0, 60)
    if kind == "dial":
        _dial(d, rng, cx, cy, 70 * s, face, ink)
    elif kind == "two_dials":
        d.rounded_rectangle(
            (cx - 75 * s, cy - 45 * s, cx + 75 * s, cy + 45 * s), 8, fill=_colour(rng, 60, 200)
        )
        _dial(d, rng, cx - 36 * s, cy, 34 * s, face, ink)
        _dial(d, rng, cx + 36 * s, cy, 34 * s, face, ink)
    elif kind == "lcd":
        w, h = 70 * s, 30 * s
        d.rounded_rectangle(
            (cx - w - 8, cy - h - 8, cx + w + 8, cy + h + 8), 6, fill=_colour(rng, 30, 90)
        )
        panel = (
            int(rng.integers(120, 190)),
            int(rng.integers(160, 220)),
            int(rng.integers(100, 170)),
        )
        d.rectangle((cx - w, cy - h, cx + w, cy + h), fill=panel)
        digits = "".join(str(int(c)) for c in rng.integers(0, 10, 4))
        _digits7(d, cx - w + 10 * s, cy - h + 10 * s, 2 * h - 20 * s, digits, (20, 30, 20))
    elif kind == "counter":
        n = 5
        box = 22 * s
        x0 = cx - n * box / 2
        d.rectangle(
            (x0 - 6, cy - box - 6, x0 + n * box + 6, cy + box + 6), fill=_colour(rng, 150, 230)
        )
        for i in range(n):
            red = i == n - 1
            d.rectangle((x0 + i * box + 1, cy - box, x0 + (i + 1) * box - 1, cy + box),
                        fill=(150, 20, 20) if red else (15, 15, 15))  # fmt: skip
            d.text((x0 + i * box + box * 0.3, cy - box * 0.5), str(int(rng.integers(0, 10))),
                   fill=(240, 240, 240), font_size=int(box * 1.1))  # fmt: skip
    elif kind == "bar":
        w, h = 22 * s, 65 * s
        d.rectangle((cx - w, cy - h, cx + w, cy + h), fill=face, outline=ink, width=2)
        level = rng.uniform(0.05, 0.95)
        d.rectangle((cx - w + 4, cy + h - 4 - level * (2 * h - 8), cx + w - 4, cy + h - 4),
                    fill=_colour(rng, 0, 200))  # fmt: skip
        for i in range(9):
            y = cy - h + (i + 1) * 2 * h / 10
            d.line((cx + w, y, cx + w + 10, y), fill=ink, width=2)
    elif kind == "thermometer":
        h = 60 * s
        d.rounded_rectangle((cx - 9, cy - h, cx + 9, cy + h), 9, fill=face, outline=ink, width=2)
        d.ellipse(
            (cx - 18, cy + h - 10, cx + 18, cy + h + 26), fill=(200, 30, 30), outline=ink, width=2
        )
        top = cy + h - rng.uniform(0.1, 0.95) * 2 * h
        d.rectangle((cx - 4, top, cx + 4, cy + h), fill=(200, 30, 30))
        for i in range(7):
            y = cy - h + 8 + i * (2 * h - 16) / 6
            d.line((cx + 11, y, cx + 20, y), fill=ink, width=2)
    return _photo(img, rng)


SHAPES = ("circle", "ring", "square", "triangle", "hexagon", "star", "cross", "crescent")
TEXTURES = ("stripes", "checker", "dots", "grid", "waves", "blobs", "rings", "zigzag")
GAUGES = ("dial", "two_dials", "lcd", "counter", "bar", "thermometer")


def _generated(root: Path, kinds: tuple[str, ...], draw, seed: int) -> list[tuple[Path, str]]:
    out = []
    for ci, kind in enumerate(kinds):
        folder = root / kind
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng([seed, ci])
        for i in range(PER_CLASS):
            path = folder / f"{kind}-{i:04d}.png"
            img = draw(kind, rng)  # drawn even when the file exists, so the rng stays in step
            if not path.exists():
                img.save(path)
            out.append((path, kind))
    return out


def _digits(root: Path) -> list[tuple[Path, str]]:
    from sklearn.datasets import load_digits

    data = load_digits()
    out = []
    for i, (im, y) in enumerate(zip(data.images, data.target, strict=True)):
        path = root / f"digit{y}" / f"{i:04d}.png"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            g = Image.fromarray((im * 255 / 16).astype(np.uint8)).resize((64, 64), Image.BILINEAR)
            g.convert("RGB").save(path)
        out.append((path, f"digit{y}"))
    return out


def _elpv(root: Path) -> list[tuple[Path, str]]:
    from imagesieve.data import elpv_images, export_elpv

    def label(im) -> str:
        return f"{im.cell_type}-{'defective' if im.defective else 'functional'}"

    images = elpv_images()
    export_elpv(root, images, label)
    return [(root / label(im) / im.path.name, label(im)) for im in images]


SETS: dict[str, Callable[[Path], list[tuple[Path, str]]]] = {
    "elpv": _elpv,
    "digits": _digits,
    "shapes": lambda root: _generated(root, SHAPES, _shape, 1),
    "textures": lambda root: _generated(root, TEXTURES, _texture, 2),
    "gauges": lambda root: _generated(root, GAUGES, _gauge, 3),
}


def image_set(name: str, data_dir: Path) -> list[tuple[Path, str]]:
    """The (path, class) pairs of set ``name``, written under ``data_dir/name`` on first use."""
    return SETS[name](data_dir / name)
