"""Photo quality's measures in one compiled pass over the model's crop (numba, GIL released).

Kept apart from ``_quality`` so numba is imported, and the kernel compiled (or loaded from
numba's cache: ~0.5 s; compiled afresh: several seconds, once per install), only when an image
is first measured. ``measures`` releases the GIL, so the engine's decode threads measure in
parallel with each other and with inference.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from imagesieve.classifier._quality import (
    BLUR_BOX,
    EDGE_MIN,
    EDGE_SHARE,
    EDGE_STEP,
    HIGHLIGHTS,
    SATURATED,
)

__all__ = ["measures"]

#: Largest sum of R, G and B differences: the bins of a step's histogram.
_STEPS = 3 * 255 + 1


@njit(nogil=True, cache=True)
def _blur_rows(g: np.ndarray) -> tuple[float, float]:
    """Along the rows of luma ``g``: (all detail, detail lost to a BLUR_BOX-pixel re-blur)."""
    h, w = g.shape
    half = BLUR_BOX // 2
    total = 0.0
    lost = 0.0
    for i in range(h):
        row = g[i]
        prev = np.float32(0.0)
        for j in range(w):
            s = np.float32(0.0)
            for t in range(-half, half + 1):
                s += row[min(max(j + t, 0), w - 1)]
            box = np.float32(s / np.float32(BLUR_BOX))
            if j > 0:
                d = abs(row[j] - row[j - 1])
                db = abs(box - prev)
                total += d
                if d > db:
                    lost += d - db
            prev = box
    return total, lost


@njit(nogil=True, cache=True)
def _edge_rows(a: np.ndarray, least: int) -> float:
    """Edge blur along the rows of ``a`` (h, w, 3); -1.0 when they have no strong step.

    1 - the median of steepest / step over the strongest EDGE_STEP-pixel steps (see
    ``_quality.QualityMetrics.edge_blur``).
    """
    h, w, _ = a.shape
    k = EDGE_STEP
    flat = a.reshape(h, w * 3)
    d1 = np.empty((w - 1) * 3, np.int32)
    dk = np.empty((w - k) * 3, np.int32)
    one = np.empty(w - 1, np.int32)
    n = h * (w - k)
    steps = np.empty(n, np.int32)
    steepest = np.empty(n, np.int32)
    counts = np.zeros(_STEPS, np.int64)
    q = 0
    for i in range(h):
        row = flat[i]
        for j in range((w - 1) * 3):  # channel by channel, in the row's own order: vectorised
            d1[j] = abs(np.int32(row[j + 3]) - np.int32(row[j]))
        for j in range((w - k) * 3):
            dk[j] = abs(np.int32(row[j + 3 * k]) - np.int32(row[j]))
        for j in range(w - 1):
            one[j] = d1[3 * j] + d1[3 * j + 1] + d1[3 * j + 2]
        for j in range(w - k):
            step = dk[3 * j] + dk[3 * j + 1] + dk[3 * j + 2]
            best = one[j]
            for u in range(1, k):
                best = max(best, one[j + u])
            steps[q] = step
            steepest[q] = best
            counts[step] += 1
            q += 1
    rank = np.int64(n * (1 - EDGE_SHARE))  # the strongest EDGE_SHARE start at this rank
    seen = 0
    cut = 0
    for v in range(_STEPS):
        seen += counts[v]
        if seen > rank:
            cut = v
            break
    cut = max(cut, least)
    m = 0
    for q in range(n):
        if steps[q] >= cut:
            m += 1
    if m == 0:
        return -1.0
    ratios = np.empty(m, np.float64)
    s = 0
    for q in range(n):
        if steps[q] >= cut:
            ratios[s] = steepest[q] / steps[q]
            s += 1
    mid = m // 2
    part = np.partition(ratios, mid)
    median = part[mid] if m % 2 else (part[mid] + part[:mid].max()) / 2
    return 1.0 - median


@njit(nogil=True, cache=True)
def measures(x: np.ndarray) -> tuple[float, float, float, float, float, float, float]:
    """(blur, edge_blur, brightness, highlights, saturated, clipped, entropy) of a crop.

    ``x``: (s, s, 3) uint8, s even, averaged over 2x2 pixels as PIL's ``reduce(2)``.
    """
    h, w = x.shape[0] // 2, x.shape[1] // 2
    a = np.empty((h, w, 3), np.int16)
    g = np.empty((h, w), np.float32)
    hist = np.zeros(64, np.int64)
    light = np.zeros(256, np.int64)
    lo, hi = 1 << 30, -1
    luma = 0.0
    saturated = 0
    clipped = 0
    for i in range(h):
        for j in range(w):
            top = 0
            total = 0
            for c in range(3):
                v = (
                    np.int32(x[2 * i, 2 * j, c])
                    + x[2 * i, 2 * j + 1, c]
                    + x[2 * i + 1, 2 * j, c]
                    + x[2 * i + 1, 2 * j + 1, c]
                    + 2
                ) >> 2
                a[i, j, c] = v
                total += v
                top = max(top, v)
            y = (  # luma, ITU-R BT.601 weights as PIL's "L" conversion
                np.float32(a[i, j, 0]) * np.float32(0.299)
                + np.float32(a[i, j, 1]) * np.float32(0.587)
                + np.float32(a[i, j, 2]) * np.float32(0.114)
            )
            g[i, j] = y
            luma += y
            hist[np.int64(y) >> 2] += 1
            light[top] += 1
            if y >= SATURATED:
                saturated += 1
            if top >= SATURATED:
                clipped += 1
            lo = min(lo, total)
            hi = max(hi, total)
    n = h * w
    entropy = 0.0
    for b in range(64):
        if hist[b] > 0:
            p = hist[b] / n
            entropy -= p * np.log2(p)
    want = HIGHLIGHTS * n
    seen = 0
    highlights = 255
    for v in range(256):
        seen += light[v]
        if seen >= want:
            highlights = v
            break
    blur = 0.0
    for rows in (g, np.ascontiguousarray(g.T)):
        total, lost = _blur_rows(rows)
        if total <= 1e-6:  # no detail at all along this axis: as blurred as it gets
            blur = 1.0
            break
        blur = max(blur, (total - lost) / total)
    least = max(6, np.int64(EDGE_MIN * (hi - lo)))
    edge = max(_edge_rows(a, least), _edge_rows(np.ascontiguousarray(a.transpose(1, 0, 2)), least))
    return (
        blur,
        1.0 if edge < 0 else edge,
        luma / n / 255.0,
        highlights / 255.0,
        saturated / n,
        clipped / n,
        entropy,
    )
