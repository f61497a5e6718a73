"""Label errors by confident learning (``_label_errors.py``): are flipped training labels found?

Sets: ELPV as the demo trains on it (the demo's 924 mono training cells, defective vs
functional), ELPV by cell type x defect (all 2,624 cells, 4 classes, as ``bench_openset.py``),
scikit-learn's digits upscaled, and the generated shapes (``_openset_sets.py``). Backbone
features (the phase-1 head's input, default backbone, ONNX engine) are cached once per set.

Per set and seed (3 seeds): 5% of the labels are moved to another class at random; the weight
decay is chosen on the noisy labels as training chooses it (``_fit_head``, 20% hold-out); then
out-of-fold probabilities of every image (``out_of_fold_probs``) and the ranked suspects
(``find_label_errors``). Reported: recall of the flipped images among the top 2k suspects
(k flips), precision there, how many were flagged, the random baseline (2k / n), seconds of
probabilities + ranking, and the process's peak RSS. Variants: ranking, filter, folds, L-BFGS
steps, temperature-calibrated probabilities, and the embedding instead of the head's features.

Usage: python bench/bench_label_errors.py [--sets elpv-demo elpv-4 digits shapes] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _memory import peak_mb  # noqa: E402
from _openset_sets import image_set  # noqa: E402

from imagesieve._demo import demo_split  # noqa: E402
from imagesieve._workspace import Workspace  # noqa: E402
from imagesieve.classifier import TrainOptions, softmax  # noqa: E402
from imagesieve.classifier._features import backbone_onnx, extract_features  # noqa: E402
from imagesieve.classifier._label_errors import find_label_errors, out_of_fold_probs  # noqa: E402
from imagesieve.classifier._train import _fit_head  # noqa: E402
from imagesieve.data import elpv_images  # noqa: E402
from imagesieve.models import DEFAULT_BACKBONE, get_backbone_spec  # noqa: E402

HERE = Path(__file__).resolve().parent
DATA = HERE / "_data" / "openset"
OUT = HERE / "_out" / "label_errors"
SHARE = 0.05
TARGET = 0.70
SETS = ("elpv-demo", "elpv-4", "digits", "shapes")
#: name -> (filter_by, rank_by, folds, steps, calibrate, features); "default" is the product's.
VARIANTS = {
    "default (prune by class, self-conf., 5 folds)": ("prune_by_class", "self_confidence", 5, 5, False, "features"),
    "normalized margin": ("prune_by_class", "normalized_margin", 5, 5, False, "features"),
    "prune by noise rate (cleanlab's default)": ("prune_by_noise_rate", "self_confidence", 5, 5, False, "features"),
    "both": ("both", "self_confidence", 5, 5, False, "features"),
    "confident joint": ("confident_joint", "self_confidence", 5, 5, False, "features"),
    "10 folds": ("prune_by_class", "self_confidence", 10, 5, False, "features"),
    "10 folds, prune by noise rate": ("prune_by_noise_rate", "self_confidence", 10, 5, False, "features"),
    "30 L-BFGS steps": ("prune_by_class", "self_confidence", 5, 30, False, "features"),
    "temperature-calibrated": ("prune_by_class", "self_confidence", 5, 5, True, "features"),
    "temperature-calibrated, prune by noise rate": ("prune_by_noise_rate", "self_confidence", 5, 5, True, "features"),
    "embedding": ("prune_by_class", "self_confidence", 5, 5, False, "embedding"),
}  # fmt: skip


def items_of(name: str) -> tuple[list[Path], list[str], str]:
    """(paths, labels, feature-cache name) of a set; the ELPV sets share one feature cache."""
    if name == "elpv-demo":
        train, _, _ = demo_split()
        return (
            [im.path for im in train],
            ["defective" if im.defective else "functional" for im in train],
            "elpv",
        )
    if name == "elpv-4":
        ims = elpv_images()
        return (
            [im.path for im in ims],
            [f"{im.cell_type}-{'defective' if im.defective else 'functional'}" for im in ims],
            "elpv",
        )
    pairs = image_set(name, DATA)
    return [p for p, _ in pairs], [c for _, c in pairs], name


def features(cache: str, ws: Workspace) -> tuple[list[str], dict[str, np.ndarray]]:
    """File names and backbone ``features``/``embedding`` of every image of a cached set."""
    path = OUT / f"features-{cache}.npz"
    if cache == "elpv":
        paths = [im.path for im in elpv_images()]
    else:
        paths = [p for p, _ in image_set(cache, DATA)]
    keys = [str(p.relative_to(p.parents[1])) for p in paths]
    if not path.exists():
        shared = HERE / "_out" / "openset" / f"features-{cache}.npz"  # same images, same order
        if shared.exists() and len(np.load(shared)["embedding"]) == len(paths):
            shutil.copyfile(shared, path)
        else:
            onnx = backbone_onnx(ws, DEFAULT_BACKBONE)
            arrays, errors = extract_features(
                onnx, get_backbone_spec(DEFAULT_BACKBONE).config, paths
            )
            assert all(e is None for e in errors), [e for e in errors if e][:3]
            np.savez(path, **arrays)
    z = np.load(path)
    assert len(z["embedding"]) == len(paths), "stale cache: delete " + str(path)
    return keys, {k: z[k] for k in ("features", "embedding")}


def flip(y: np.ndarray, n_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``y`` with SHARE of it moved to another class at random, and the flipped rows."""
    rng = np.random.default_rng(1000 + seed)
    rows = rng.choice(len(y), int(round(SHARE * len(y))), replace=False)
    noisy = y.copy()
    noisy[rows] = (y[rows] + rng.integers(1, n_classes, len(rows))) % n_classes
    return noisy, rows


def calibrate(probs: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Probabilities at the temperature that minimises their log loss on the given labels."""
    logp = np.log(np.clip(probs, 1e-12, 1.0))

    def nll(t: float) -> float:
        return float(-np.log(softmax(logp / t)[np.arange(len(y)), y] + 1e-12).mean())

    best = min(np.geomspace(0.25, 8, 31), key=nll)
    return softmax(logp / best)


def run_set(name: str, ws: Workspace, seeds: list[int]) -> dict[str, dict[str, float]]:
    paths, labels, cache = items_of(name)
    keys, arrays = features(cache, ws)
    index = {k: i for i, k in enumerate(keys)}
    take = np.array([index[str(p.relative_to(p.parents[1]))] for p in paths])
    classes = sorted(set(labels))
    y = np.array([classes.index(c) for c in labels], np.int64)
    n, c = len(y), len(classes)
    rows = np.arange(n)
    per: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
    for seed in seeds:
        noisy, flipped = flip(y, c, seed)
        truth = set(flipped.tolist())
        wd: dict[str, float] = {}
        wd_seconds: dict[str, float] = {}
        probs: dict[tuple, np.ndarray] = {}
        for variant, (filter_by, rank_by, folds, steps, cal, kind) in VARIANTS.items():
            x = arrays[kind][take]
            if kind not in wd:  # what training chose on these labels; not part of the cost here
                t = time.perf_counter()
                _, info, _ = _fit_head(x, noisy, rows, rows[:0], c, TrainOptions(seed=seed))
                wd[kind], wd_seconds[kind] = info["weight_decay"], time.perf_counter() - t
            t = time.perf_counter()
            key = (folds, steps, cal, kind)
            if key not in probs:
                p = out_of_fold_probs(
                    x, noisy, rows, c, wd[kind], folds=folds, seed=seed, steps=steps
                )
                probs[key] = calibrate(p, noisy) if cal else p
            suspects = find_label_errors(
                probs[key], noisy, classes, filter_by=filter_by, rank_by=rank_by
            )
            seconds = time.perf_counter() - t
            top = [s.index for s in suspects[: 2 * len(flipped)]]
            hits = len(truth.intersection(top))
            per[variant].append(
                {
                    "recall": hits / len(flipped),
                    "precision": hits / max(len(top), 1),
                    "flagged": len(suspects),
                    "seconds": seconds,
                    "wd_seconds": wd_seconds[kind],
                    "wd": wd[kind],
                }
            )  # fmt: skip
        d = per[next(iter(VARIANTS))][-1]
        print(
            f"  {name} seed {seed}: n {n}, {len(flipped)} flips, wd {d['wd']:g}, "
            f"default recall {d['recall']:.3f}, {d['seconds']:.1f} s",
            flush=True,
        )
    out = {v: {k: float(np.mean([r[k] for r in rs])) for k in rs[0]} for v, rs in per.items()}
    for v, rs in per.items():
        out[v]["recall_min"] = min(r["recall"] for r in rs)
    out["_"] = {
        "n": n,
        "classes": c,
        "flips": int(round(SHARE * n)),
        "random": 2 * round(SHARE * n) / n,
    }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", nargs="+", default=list(SETS), choices=SETS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    args = ap.parse_args()
    print("$ python bench/bench_label_errors.py", " ".join(sys.argv[1:]))
    print(f"# {platform.node()}, {platform.processor() or platform.machine()}, torch threads 2")
    torch.set_num_threads(2)
    OUT.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        ws = Workspace(tmp)
        for name in args.sets:
            results[name] = run_set(name, ws, args.seeds)
            results[name]["_"]["peak_mb"] = peak_mb()
    print(
        f"\n## Flipped labels ({SHARE:.0%}) found among the top 2k suspects, means over seeds {args.seeds}"
    )
    print("| set | n | classes | flips k | variant | recall@2k (min) | precision@2k | flagged | "
          "random recall | seconds (OOF + rank) | wd (choice s) | peak RSS MB |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, res in results.items():
        meta = res["_"]
        for v, m in res.items():
            if v == "_":
                continue
            print(f"| {name} | {meta['n']} | {meta['classes']} | {meta['flips']} | {v} | "
                  f"{m['recall']:.3f} ({m['recall_min']:.3f}) | {m['precision']:.3f} | {m['flagged']:.0f} | "
                  f"{meta['random']:.3f} | {m['seconds']:.1f} | {m['wd']:g} ({m['wd_seconds']:.1f}) | "
                  f"{meta['peak_mb']:.0f} |")  # fmt: skip
    print("\n## Variants: mean recall@2k over sets")
    print("| variant | " + " | ".join(results) + " | mean |")
    print("|---|" + "---|" * (len(results) + 1))
    for v in VARIANTS:
        r = [results[s][v]["recall"] for s in results]
        print(f"| {v} | " + " | ".join(f"{x:.3f}" for x in r) + f" | {np.mean(r):.3f} |")
    print(f"\n# whole run {time.perf_counter() - t0:.0f} s, peak RSS {peak_mb():.0f} MB")
    default = next(iter(VARIANTS))
    if "elpv-demo" in results:
        got = results["elpv-demo"][default]["recall"]
        met = "met" if got >= TARGET else "not met"
        print(
            f"target (ELPV recall >= {TARGET:.2f}): {met} (demo labelling, default method: {got:.3f})"
        )


if __name__ == "__main__":
    main()
