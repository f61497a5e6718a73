"""Photo quality checks (issue 22, item 1): what they cost, and what they catch on five image sets.

1. **Cost**: the scoring engine over ELPV's 2,624 images with the quality measures and without,
   alternated in pairs; the ratio of throughputs (median of the pairs) and peak RSS.
2. **Detection**: for each set (ELPV, scikit-learn's digits upscaled, and the generated shapes,
   textures and instrument faces of ``bench_openset.py``), thresholds are calibrated on 60% of
   its images (``calibrate_quality``) and tried on the other 40%: the clean images (false flags
   per kind) and degraded copies of up to ``--per-level`` of them at six strengths of each kind
   (Gaussian blur, motion blur, under- and over-exposure, a glare blob, a crop to a tiny size).
   Recall is the share of the **strong half** (the three strongest levels) flagged with the
   kind's own flag. Strengths scale with the image's size, so a 64-pixel digit is blurred as
   much, relative to its size, as a 300-pixel cell.

Targets: cost <= 5% of throughput; per kind, recall >= 0.90 on the strong half at <= 5% false
flags on the clean images. Run alone (no other job): ``python bench/bench_quality.py``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

sys.path.insert(0, str(Path(__file__).parent))
from _memory import peak_mb  # noqa: E402
from _openset_sets import image_set  # noqa: E402

HERE = Path(__file__).parent
WS = HERE / "_out" / "quality" / "ws"
DATA = HERE / "_data" / "openset"
SETS = ("elpv", "digits", "shapes", "textures", "gauges")
LEVELS = 6


def _scale(img: Image.Image, f: float) -> Image.Image:
    a = np.asarray(img, np.float32) * f
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def _motion(img: Image.Image, n: int) -> Image.Image:
    """Horizontal motion blur over ``n`` pixels (edges repeated, not wrapped)."""
    a = np.asarray(img, np.float32)
    pad = np.pad(a, ((0, 0), (n // 2, n - 1 - n // 2), (0, 0)), mode="edge")
    c = np.cumsum(pad, axis=1)
    c = np.concatenate([np.zeros_like(c[:, :1]), c], axis=1)
    out = (c[:, n:] - c[:, :-n]) / n
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))


def _glare(img: Image.Image, frac: float, rng: np.random.Generator) -> Image.Image:
    """A saturated light blob of radius ``frac`` of the shorter side, somewhere central."""
    a = np.asarray(img, np.float32)
    h, w = a.shape[:2]
    cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
    r = frac * min(h, w)
    yy, xx = np.mgrid[:h, :w]
    blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (r / 2) ** 2))[..., None]
    return Image.fromarray(np.clip(a + blob * 400, 0, 255).astype(np.uint8))


def _crop(img: Image.Image, frac: float) -> Image.Image:
    w, h = img.size
    side = max(4, round(min(w, h) * frac))
    left, top = (w - side) // 2, (h - side) // 2
    return img.crop((left, top, left + side, top + side))


#: kind -> (the flag that must catch it, six strengths weakest first, degrade(img, strength, rng)).
DEGRADATIONS: dict[str, tuple[str, tuple[float, ...], Callable]] = {
    "gaussian blur": (
        "blurred",
        (0.7, 1.2, 2.0, 3.0, 4.5, 7.0),
        lambda im, s, rng: im.filter(ImageFilter.GaussianBlur(s * min(im.size) / 300)),
    ),
    "motion blur": (
        "blurred",
        (3, 5, 9, 15, 25, 41),
        lambda im, s, rng: _motion(im, max(2, round(s * min(im.size) / 300))),
    ),
    "under-exposure": (
        "dark",
        (0.7, 0.5, 0.35, 0.22, 0.14, 0.08),
        lambda im, s, rng: _scale(im, s),
    ),
    "over-exposure": (
        "bright",
        (1.3, 1.6, 2.0, 2.7, 3.5, 5.0),
        lambda im, s, rng: _scale(im, s),
    ),
    "glare blob": (
        "glare",
        (0.08, 0.12, 0.18, 0.25, 0.35, 0.5),
        lambda im, s, rng: _glare(im, s, rng),
    ),
    "crop to tiny": (
        "too_small",
        (0.67, 0.5, 0.37, 0.27, 0.17, 0.1),
        lambda im, s, rng: _crop(im, s),
    ),
}


#: Calibration on a small training set: this many images, this many random draws.
SMALL, SMALL_DRAWS = 80, 5


def cost(version, paths: list[str], pairs: int, of: str = "quality") -> dict:
    """Engine throughput with and without ``of`` (the quality measures, or the pixel signature
    with the measures on in both, as scoring runs), alternated; median ratio."""
    from imagesieve.classifier import ScoringEngine

    base = {"quality": True} if of == "signature" else {}
    engines = {
        q: ScoringEngine(version.onnx_path, version.config, **base, **{of: q})
        for q in (False, True)
    }
    for e in engines.values():  # warm-up: sessions, page cache
        sum(len(b) for b in e.run(paths[:64]))
    rates: dict[bool, list[float]] = {False: [], True: []}
    for i in range(pairs):
        for q in (False, True) if i % 2 == 0 else (True, False):
            t = time.perf_counter()
            n = 0
            for batch in engines[q].run(paths):
                n += sum(r.error is None for r in batch)
                if q:
                    assert all(getattr(r, of) is not None for r in batch if r.error is None)
            assert n == len(paths)
            rates[q].append(n / (time.perf_counter() - t))
    ratios = [w / wo for w, wo in zip(rates[True], rates[False], strict=True)]
    return {"rates": rates, "ratios": ratios, "ratio": statistics.median(ratios)}


def detection(name: str, config, per_level: int, seed: int = 0) -> dict:
    """Calibrate on 60% of a set, measure false flags on the rest and recall on its degradations."""
    from imagesieve.classifier import calibrate_quality, measure_quality

    items = image_set(name, DATA)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(items))
    cut = int(len(items) * 0.6)
    train = [items[i][0] for i in order[:cut]]
    held = [items[i][0] for i in order[cut:]]

    def measure(img: Image.Image):
        img = img.convert("RGB")
        return measure_quality(config.resize_and_crop(img), *img.size)

    t = time.perf_counter()
    train_measures = [measure(Image.open(p)) for p in train]
    rule = calibrate_quality(train_measures)
    calib_s = time.perf_counter() - t
    held_measures = [measure(Image.open(p)) for p in held]
    clean = [rule.flags(m) for m in held_measures]
    small = []  # a small training set: 80 images, as a user's first version may have
    for k in range(SMALL_DRAWS):
        pick = np.random.default_rng(100 + k).choice(len(train), SMALL, replace=False)
        few = calibrate_quality([train_measures[i] for i in pick])
        small.append(float(np.mean([bool(few.flags(m)) for m in held_measures])))
    false = {
        k: float(np.mean([k in f for f in clean])) for k in {d[0] for d in DEGRADATIONS.values()}
    }
    any_false = float(np.mean([bool(f) for f in clean]))
    sample = held[:per_level]
    recall: dict[str, list[float]] = {}
    psnr: dict[str, list[float]] = {}  # how much each strength changes the pixels, median dB
    for kind, (flag, strengths, degrade) in DEGRADATIONS.items():
        recall[kind], psnr[kind] = [], []
        for s in strengths:
            hits, change = [], []
            for p in sample:
                clean = Image.open(p).convert("RGB")
                bad = degrade(clean, s, rng)
                hits.append(flag in rule.flags(measure(bad)))
                if bad.size == clean.size:
                    diff = np.asarray(bad, np.float32) - np.asarray(clean, np.float32)
                    change.append(10 * np.log10(255**2 / max(float((diff**2).mean()), 1e-6)))
            recall[kind].append(float(np.mean(hits)))
            psnr[kind].append(float(np.median(change)) if change else float("nan"))
    return {
        "set": name,
        "train": len(train),
        "held": len(held),
        "rule": rule,
        "calibrate_s": calib_s,
        "false": false,
        "any_false": any_false,
        "small_any_false": small,
        "recall": recall,
        "psnr": psnr,
        "strong": {k: float(np.mean(v[LEVELS // 2 :])) for k, v in recall.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=5, help="alternated engine runs with / without")
    ap.add_argument("--per-level", type=int, default=100, help="held-out images per strength")
    ap.add_argument("--sets", default=",".join(SETS), help="sets to detect on ('' for none)")
    ap.add_argument(
        "--cost-of",
        choices=["quality", "signature"],
        default="quality",
        help="what section 1 times: the quality measures, or the near-duplicate pixel signature "
        "(measures on in both runs)",
    )
    args = ap.parse_args()

    from imagesieve._workspace import Workspace
    from imagesieve.models.export import imagenet_version

    version = imagenet_version(Workspace(WS))
    print(
        f"# bench_quality: {os.cpu_count()} cores, {platform.machine()}, python "
        f"{platform.python_version()}; command: python bench/bench_quality.py "
        + " ".join(sys.argv[1:])
    )
    elpv = [str(p) for p, _ in image_set("elpv", DATA)]
    c = (
        cost(version, elpv, args.pairs, args.cost_of)
        if args.pairs
        else {"rates": {False: [0], True: [0]}, "ratios": [], "ratio": float("nan")}
    )
    of = args.cost_of
    print(f"\n## 1. Cost: the engine over {len(elpv)} ELPV images, with and without {of}")
    print("| run | img/s per run | median |")
    print("|---|---|---|")
    for q, label in ((False, f"without {of}"), (True, f"with {of}")):
        runs = ", ".join(f"{r:.1f}" for r in c["rates"][q])
        print(f"| {label} | {runs} | {statistics.median(c['rates'][q]):.1f} |")
    ratios = ", ".join(f"{r:.3f}" for r in c["ratios"])
    print(
        f"\nwith / without, per pair: {ratios}; median **{c['ratio']:.3f}** "
        f"(cost {1 - c['ratio']:+.1%}"
        + ("; target: cost <= 5%" if of == "quality" else "")
        + f"). Peak RSS {peak_mb():.0f} MB."
    )

    print("\n## 2. Detection: calibrated on 60% of each set, tried on the other 40%")
    results = [detection(s, version.config, args.per_level) for s in args.sets.split(",") if s]
    for r in results:
        print(
            f"\n### {r['set']}: calibrated on {r['train']} images in {r['calibrate_s']:.1f} s, "
            f"{r['held']} held out; any flag on a clean image: {r['any_false']:.1%}"
        )
        rule = {
            k: (round(v, 4) if isinstance(v, float) else v) for k, v in r["rule"].to_dict().items()
        }
        print(f"rule: {rule}")
        print(
            "| degradation (flag) | recall per strength, weakest first | strong half | false flags on clean "
            "| PSNR of the copies per strength, dB (median; 40+: hard to see) |"
        )
        print("|---|---|---|---|---|")
        for kind, (flag, strengths, _) in DEGRADATIONS.items():
            per = ", ".join(
                f"{s:g}: {v:.2f}" for s, v in zip(strengths, r["recall"][kind], strict=True)
            )
            change = ", ".join(f"{v:.0f}" if v == v else "-" for v in r["psnr"][kind])
            print(
                f"| {kind} ({flag}) | {per} | **{r['strong'][kind]:.2f}** | {r['false'][flag]:.1%} "
                f"| {change} |"
            )

    print(
        f"\n## 3. A small training set: calibrated on {SMALL} of the 60% ({SMALL_DRAWS} draws), "
        "any flag on the same clean held-out images"
    )
    print("| set | calibrated on 60% | on 80 images, per draw | median |")
    print("|---|---|---|---|")
    for r in results:
        per = ", ".join(f"{v:.1%}" for v in r["small_any_false"])
        print(
            f"| {r['set']} | {r['any_false']:.1%} | {per} | "
            f"{statistics.median(r['small_any_false']):.1%} |"
        )

    print("\n## Summary (targets: strong-half recall >= 0.90 at <= 5% false flags, per kind)")
    print("| kind | " + " | ".join(r["set"] for r in results) + " | met |")
    print("|---|" + "---|" * len(results) + "---|")
    all_met = c["ratio"] >= 0.95
    for kind, (flag, _, _) in DEGRADATIONS.items():
        cells = []
        met = True
        for r in results:
            ok = r["strong"][kind] >= 0.90 and r["false"][flag] <= 0.05
            met &= ok
            cells.append(f"{r['strong'][kind]:.2f} / {r['false'][flag]:.1%}")
        all_met &= met
        print(f"| {kind} | " + " | ".join(cells) + f" | {'yes' if met else '**no**'} |")
    print(
        f"| cost | {1 - c['ratio']:+.1%} of throughput | | | | | {'yes' if c['ratio'] >= 0.95 else '**no**'} |"
    )
    print(f"\nall targets met: {'yes' if all_met else 'no'}")


if __name__ == "__main__":
    main()
