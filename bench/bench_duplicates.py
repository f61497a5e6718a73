"""Near-duplicate groups: how well a calibrated rule finds re-shared copies, and how fast.

1. **Precision / recall** on five image sets (ELPV, scikit-learn's digits upscaled, and the
   generated shapes, textures and instrument faces of ``bench/_openset_sets.py``), for two
   strengths of copy (``near_duplicate_variants``): **realistic** (the target: JPEG quality
   60-90, a crop keeping 90-97% of each side, a resize to 50-90%, brightness +-5-15%) and
   **harsh** (a stress test: JPEG quality 20-40, a 5-10% crop, a resize to 40-60% and back,
   brightness +-8-15%). Each set is split in halves. On the first half, copies of up to
   ``--per-set`` images calibrate (a) the embedding-alone threshold
   (``calibrate_duplicate_distance``) and (b) the two-stage rule: embedding candidates
   confirmed by pixel signatures (``calibrate_duplicate_rule``, ``image_signature`` of the
   model's 224 x 224 crop). On the other half, copies of up to ``--per-set`` images are mixed
   with all of its images and grouped (``near_duplicate_groups``); pairwise precision and
   recall of "is a near-duplicate of" (two images in one group; true when they come from the
   same original), per set and per kind.
2. **Speed** of ``near_duplicate_groups`` with the median calibrated rule over 100,000 and
   1,000,000 synthetic 1280-d unit vectors (clusters with a decaying noise spectrum) with 1%
   planted near-duplicates at distances spread below the candidate distance, and synthetic
   signatures (random; a planted copy's close to its original's): wall time, peak RSS, and the
   share of planted pairs grouped together.

Targets: precision >= 0.95 and recall >= 0.90 per set on realistic copies; 1,000,000 vectors
grouped in <= 180 s on 2 cores. Embeddings are cached under bench/_out/duplicates. Run alone:
``python bench/bench_duplicates.py`` (``--sizes 100000`` for a quick run).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _memory import peak_mb  # noqa: E402
from _openset_sets import image_set  # noqa: E402

from imagesieve.classifier._duplicates import (  # noqa: E402
    VARIANT_KINDS,
    VARIANT_STRENGTHS,
    DuplicateRule,
    _pair_distances,
    calibrate_duplicate_distance,
    calibrate_duplicate_rule,
    near_duplicate_groups,
    near_duplicate_variants,
)
from imagesieve.classifier._signature import (  # noqa: E402
    SIGNATURE_BYTES,
    image_signature,
    signature_similarity,
)

HERE = Path(__file__).resolve().parent
DATA = HERE / "_data" / "openset"
OUT = HERE / "_out" / "duplicates"
OPENSET_OUT = HERE / "_out" / "openset"
SETS = ("elpv", "digits", "shapes", "textures", "gauges")
BACKBONE = "efficientnet_lite0"


def embed(sources: list) -> np.ndarray:
    from imagesieve._workspace import Workspace
    from imagesieve.classifier._features import backbone_onnx, extract_features
    from imagesieve.models import get_backbone_spec

    onnx = backbone_onnx(Workspace(OUT / "ws"), BACKBONE)
    arrays, errors = extract_features(
        onnx, get_backbone_spec(BACKBONE).config, sources, ("embedding",)
    )
    assert not any(errors), [e for e in errors if e][:3]
    return arrays["embedding"]


def model_crop(img: Image.Image) -> Image.Image:
    """The model's square input, where the scoring engine computes the signature."""
    from imagesieve.models import get_backbone_spec

    return get_backbone_spec(BACKBONE).config.resize_and_crop(img.convert("RGB"))


def originals(name: str, paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings, signatures) of a set's images: bench_openset's embeddings when it has them."""
    sig_path = OUT / f"signatures-{name}.npy"
    if sig_path.exists() and len(np.load(sig_path)) == len(paths):
        sig = np.load(sig_path)
    else:
        sig = np.stack([image_signature(model_crop(Image.open(p))) for p in paths])
        np.save(sig_path, sig)
    for path in (OPENSET_OUT / f"features-{name}.npz", OUT / f"originals-{name}.npz"):
        if path.exists():
            z = np.load(path)
            if len(z["embedding"]) == len(paths):
                return z["embedding"], sig
    x = embed(paths)
    np.savez(OUT / f"originals-{name}.npz", embedding=x)
    return x, sig


def variants(name: str, paths: list[Path], rows: np.ndarray, seed: int, strength: str) -> tuple:
    """(embeddings, signatures, source row, kind) of the copies of ``paths[rows]``, cached."""
    tag = "" if strength == "harsh" else f"-{strength}"  # harsh: the earlier runs' cache
    path = OUT / f"variants-{name}-{seed}-{len(rows)}{tag}.npz"
    if path.exists():
        z = np.load(path)
        if np.array_equal(z["rows"], rows) and "signature" in z:
            return z["embedding"], z["signature"], z["source"], z["kind"]
    rng = np.random.default_rng(seed)
    sources, source, kind, sig = [], [], [], []
    for r in rows:
        for k, img in near_duplicate_variants(Image.open(paths[r]), rng, strength):
            buf = io.BytesIO()
            img.save(buf, "PNG")  # lossless: the copy as made
            sources.append((f"{name}-{r}-{k}.png", buf.getvalue()))
            source.append(r)
            kind.append(k)
            sig.append(image_signature(model_crop(img)))
    x = None
    if path.exists():  # embeddings of an earlier run without signatures
        z = np.load(path)
        if np.array_equal(z["rows"], rows):
            x = z["embedding"]
    if x is None:
        x = embed(sources)
    sig = np.stack(sig)
    np.savez(
        path,
        embedding=x,
        signature=sig,
        source=np.array(source),
        kind=np.array(kind),
        rows=rows,
    )
    return x, sig, np.array(source), np.array(kind)


def pair_scores(groups: list[np.ndarray], src: np.ndarray, kind: np.ndarray, n_copied: int):
    """Pairwise precision and recall of groups, and per kind (recall, share wrongly grouped)."""
    label = np.full(len(src), -1)
    for g, members in enumerate(groups):
        label[members] = g
    pred = tp = 0
    for members in groups:
        _, counts = np.unique(src[members], return_counts=True)
        pred += len(members) * (len(members) - 1) // 2
        tp += int((counts * (counts - 1) // 2).sum())
    per_source = 1 + len(VARIANT_KINDS)
    truth = n_copied * per_source * (per_source - 1) // 2
    orig_row = {int(s): i for i, s in enumerate(src) if kind[i] == "original"}
    per_kind = {}
    for k in VARIANT_KINDS:
        rows = np.flatnonzero(kind == k)
        mates = np.array([orig_row[int(s)] for s in src[rows]])
        found = (label[rows] >= 0) & (label[rows] == label[mates])
        wrong = [  # grouped with another original's images
            label[r] >= 0 and np.any(src[label == label[r]] != src[r]) for r in rows
        ]
        per_kind[k] = (float(found.mean()), float(np.mean(wrong)))
    return (tp / pred if pred else 1.0), tp / truth, per_kind


def precision_recall(name: str, per_set: int, strength: str) -> dict:
    items = image_set(name, DATA)
    paths = [p for p, _ in items]
    x, sig = originals(name, paths)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(paths))
    half = len(paths) // 2
    calib, test = np.sort(order[:half]), np.sort(order[half:])
    c_rows = np.sort(rng.choice(calib, min(per_set, len(calib)), replace=False))
    t_rows = np.sort(rng.choice(test, min(per_set, len(test)), replace=False))
    cx, csig, csrc, _ = variants(name, paths, c_rows, 1, strength)
    tx, tsig, tsrc, tkind = variants(name, paths, t_rows, 2, strength)

    pos = np.full(len(paths), -1)
    pos[calib] = np.arange(len(calib))
    t0 = time.perf_counter()
    threshold = calibrate_duplicate_distance(x[calib], cx, pos[csrc])
    rule = calibrate_duplicate_rule(x[calib], cx, pos[csrc], sig[calib], csig)
    calib_s = time.perf_counter() - t0
    true_d, false_d = _pair_distances(x[calib], cx, pos[csrc])
    true_s = signature_similarity(csig, sig[csrc])

    # the held-out collection: its originals, then the copies; source = original's set index
    xb = np.concatenate([x[test], tx])
    sb = np.concatenate([sig[test], tsig])
    src = np.concatenate([test, tsrc])
    kind = np.concatenate([np.full(len(test), "original"), tkind])
    alone = pair_scores(near_duplicate_groups(xb, threshold), src, kind, len(t_rows))
    t0 = time.perf_counter()
    groups = near_duplicate_groups(xb, rule, signatures=sb)
    group_s = time.perf_counter() - t0
    precision, recall, per_kind = pair_scores(groups, src, kind, len(t_rows))
    return {
        "set": name,
        "images": len(paths),
        "calib": (len(calib), len(c_rows)),
        "test": (len(test), len(t_rows)),
        "threshold": threshold,
        "rule": rule,
        "alone": alone,
        "true_q": np.quantile(true_d, [0.5, 0.9, 0.99]),
        "false_q": np.quantile(false_d, [0.01, 0.05, 0.5]),
        "true_s": np.quantile(true_s, [0.01, 0.1, 0.5]),
        "calib_s": calib_s,
        "group_s": group_s,
        "groups": len(groups),
        "precision": precision,
        "recall": recall,
        "per_kind": per_kind,
    }


def synthetic(n: int, threshold: float, seed: int = 0, d: int = 1280) -> tuple:
    """(xb, planted pairs): clustered unit vectors, 1% of them copies of others."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(10, n // 1000), d), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    spectrum = (np.arange(1, d + 1, dtype=np.float32) ** -0.5)[rng.permutation(d)]
    spectrum *= 0.6 / np.linalg.norm(spectrum)  # noise of norm ~0.6 around a unit centre
    xb = np.empty((n, d), np.float32)
    for s in range(0, n, 65536):
        m = min(65536, n - s)
        x = centres[rng.integers(0, len(centres), m)]
        x += rng.standard_normal((m, d), dtype=np.float32) * spectrum
        xb[s : s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    p = n // 100
    rows = rng.choice(n, 2 * p, replace=False)
    a, b = rows[:p], rows[p:]
    target = rng.uniform(0.1, 0.9, p) * threshold
    g = rng.standard_normal((p, d), dtype=np.float32)
    g -= (g * xb[a]).sum(1, keepdims=True) * xb[a]
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    theta = np.arccos(1 - target)[:, None].astype(np.float32)  # exact cosine distance
    xb[b] = np.cos(theta) * xb[a] + np.sin(theta) * g
    return xb, a, b


def synthetic_signatures(n: int, a: np.ndarray, b: np.ndarray, seed: int = 0) -> np.ndarray:
    """Random standardised int8 signatures; a planted copy's at correlation ~0.9995 to its
    original's (real copies' median, p10 0.96-0.99: recall of planted measures the join)."""
    rng = np.random.default_rng(seed)
    sig = np.empty((n, SIGNATURE_BYTES), np.int8)
    for s in range(0, n, 65536):
        g = rng.standard_normal((min(65536, n - s), SIGNATURE_BYTES), dtype=np.float32)
        sig[s : s + len(g)] = np.clip(np.rint(g * 32), -127, 127)
    noise = rng.standard_normal((len(b), SIGNATURE_BYTES), dtype=np.float32)
    sig[b] = np.clip(np.rint(sig[a].astype(np.float32) + noise), -127, 127)
    return sig


def speed(n: int, rule: DuplicateRule) -> dict:
    t0 = time.perf_counter()
    xb, a, b = synthetic(n, rule.reach)
    sig = synthetic_signatures(n, a, b)
    gen_s = time.perf_counter() - t0
    sample = xb[:200] @ xb.T
    sample[np.arange(200), np.arange(200)] = -2
    nearest = np.quantile(1 - sample.max(1), [0.01, 0.5])
    del sample
    t0 = time.perf_counter()
    groups = near_duplicate_groups(xb, rule, signatures=sig)
    seconds = time.perf_counter() - t0
    label = np.full(n, -1)
    for g, members in enumerate(groups):
        label[members] = g
    found = (label[a] >= 0) & (label[a] == label[b])
    sizes = np.array([len(g) for g in groups])
    return {
        "n": n,
        "gen_s": gen_s,
        "seconds": seconds,
        "rss": peak_mb() / 1024,
        "recall": float(found.mean()),
        "planted": len(a),
        "groups": len(groups),
        "in_groups": int(sizes.sum()),
        "largest": int(sizes.max(initial=0)),
        "nearest": nearest,
    }


def floor_text(rule: DuplicateRule) -> str:
    return "none" if rule.floor is None else f"{rule.floor:.3f}"


def print_table(results: list[dict], strength: str) -> bool:
    met = True
    print(
        "| set | images | calibration: originals / copied | embedding alone: threshold, "
        "precision / recall | **rule**: distance (signature floor) / candidate distance / signature "
        "similarity "
        "| true-pair distance p50 / p90 / p99 | nearest-different p1 / p5 / p50 | true-pair "
        "signature p1 / p10 / p50 | held out: originals / copied | groups | **precision** | "
        "**recall** | met |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        ok = r["precision"] >= 0.95 and r["recall"] >= 0.90
        met &= ok
        rule = r["rule"]
        tq = " / ".join(f"{v:.4f}" for v in r["true_q"])
        fq = " / ".join(f"{v:.4f}" for v in r["false_q"])
        ts = " / ".join(f"{v:.4f}" for v in r["true_s"])
        print(
            f"| {r['set']} | {r['images']} | {r['calib'][0]} / {r['calib'][1]} | "
            f"{r['threshold']:.4f}, {r['alone'][0]:.3f} / {r['alone'][1]:.3f} | "
            f"{rule.distance:.4f} ({floor_text(rule)}) / {rule.candidate_distance:.4f} / "
            f"{rule.similarity:.4f} | "
            f"{tq} | {fq} | {ts} | {r['test'][0]} / {r['test'][1]} | {r['groups']} | "
            f"**{r['precision']:.3f}** | **{r['recall']:.3f}** | "
            f"{('yes' if ok else '**no**') if strength == 'realistic' else '(stress)'} |"
        )
    print(
        "\nPer kind of copy, held out, rule (embedding alone in brackets): recall (copy grouped "
        "with its original) / share grouped with another original's images"
    )
    print("| kind | " + " | ".join(r["set"] for r in results) + " |")
    print("|---|" + "---|" * len(results))
    for k in VARIANT_KINDS:
        cells = [
            f"{r['per_kind'][k][0]:.3f} / {r['per_kind'][k][1]:.3f} "
            f"({r['alone'][2][k][0]:.3f} / {r['alone'][2][k][1]:.3f})"
            for r in results
        ]
        print(f"| {k} | " + " | ".join(cells) + " |")
    secs = ", ".join(f"{r['set']} {r['calib_s']:.2f} / {r['group_s']:.2f}" for r in results)
    print(f"\nseconds to calibrate / to group the held-out half with the rule: {secs}")
    return met if strength == "realistic" else True


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-set", type=int, default=150, help="originals copied per half")
    ap.add_argument("--sets", default=",".join(SETS))
    ap.add_argument("--sizes", default="100000,1000000", help="synthetic sizes, or 0 for none")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    print(
        f"# bench_duplicates: {os.cpu_count()} cores, {platform.machine()}, python "
        f"{platform.python_version()}; command: python bench/bench_duplicates.py "
        + " ".join(sys.argv[1:])
    )
    print(
        "\nRealistic copies (the target) are what duplicate finders such as fastdup and "
        "CleanVision mean by a re-encode, crop, resize or brightness change; the harsh ones "
        "(JPEG quality 20-40, a resize to 40-60% and back) destroy detail few re-shared copies "
        "lose, so they are reported as a stress test only."
    )
    met = True
    sets = [s for s in args.sets.split(",") if s]
    rules = []
    for strength in VARIANT_STRENGTHS:
        results = [precision_recall(s, args.per_set, strength) for s in sets]
        if not results:
            continue
        title = (
            "target: precision >= 0.95, recall >= 0.90"
            if strength == "realistic"
            else "stress test, no target"
        )
        print(
            f"\n## 1{'a' if strength == 'realistic' else 'b'}. Precision / recall, {strength} "
            f"copies ({title}): calibrated on one half of each set, measured on the other"
        )
        met &= print_table(results, strength)
        if strength == "realistic":
            rules = [r["rule"] for r in results]

    sizes = [int(s) for s in args.sizes.split(",") if int(s)]
    rule_path = OUT / "median-rule.json"
    if rules:  # saved, so a speed-only run (--sets '') times the same rule

        def median(field: str) -> float | None:  # of the sets that have it (floor: some)
            values = [getattr(r, field) for r in rules if getattr(r, field) is not None]
            return float(np.median(values)) if values else None

        rule = DuplicateRule(*(median(f) for f in DuplicateRule.__annotations__))
        rule_path.write_text(json.dumps(dataclasses.asdict(rule)))
    elif rule_path.exists():
        rule = DuplicateRule(**json.loads(rule_path.read_text()))
    else:
        rule = DuplicateRule(0.01, 0.2, 0.99)
    if sizes:
        print(
            f"\n## 2. Speed: synthetic 1280-d unit vectors, 1% planted copies at 0.1-0.9 x the "
            f"candidate distance; median realistic rule: distance {rule.distance:.4f}, candidate "
            f"distance {rule.candidate_distance:.4f}, signature similarity {rule.similarity:.4f}, "
            f"signature floor {floor_text(rule)}"
        )
        print(
            "| n | load average before | generate s | **group s** | peak RSS (process) | "
            "planted pairs | recall of planted | groups | vectors in groups | largest | "
            "nearest-other distance p1 / p50 | met |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for n in sizes:
            load = wait_for_quiet() if n >= 1_000_000 else os.getloadavg()[0]
            r = speed(n, rule)
            ok = r["recall"] >= 0.90 and (n < 1_000_000 or r["seconds"] <= 180)
            met &= ok
            print(
                f"| {n:,} | {load:.2f} | {r['gen_s']:.1f} | **{r['seconds']:.1f}** | "
                f"{r['rss']:.2f} GB | {r['planted']:,} | {r['recall']:.4f} | {r['groups']:,} | "
                f"{r['in_groups']:,} | {r['largest']} | "
                f"{r['nearest'][0]:.4f} / {r['nearest'][1]:.4f} | {'yes' if ok else '**no**'} |"
            )
    print(f"\ntargets met: {'yes' if met else 'no'}")


def wait_for_quiet(limit: float = 2.5, tries: int = 3, pause: float = 60.0) -> float:
    """The 1-minute load average, after waiting up to ``tries`` pauses for it to fall below ``limit``."""
    for _ in range(tries):
        load = os.getloadavg()[0]
        if load <= limit:
            return load
        print(f"(load average {load:.2f} > {limit}: waiting {pause:.0f} s)", flush=True)
        time.sleep(pause)
    return os.getloadavg()[0]


if __name__ == "__main__":
    main()
