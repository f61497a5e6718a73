"""Open-set detection and discovery on data the product was never tuned on (issue 20).

Five image sets from different domains (``_openset_sets.py``): ELPV solar cells (cell type x
defect), scikit-learn's digits upscaled, and three generated sets (shapes, textures, rendered
instrument faces). For each set, several leave-k-classes-out splits: the known classes' images
are cut 75/25, the 75% is trained on with ``train_model`` (what ``imagesieve train`` runs, default
options), and the held-out 25% (known) and every image of the left-out classes (unseen) are
scored with the version's ``Predictor`` (the ONNX path ``imagesieve score`` uses).

Two tables per set, means over its splits:

* *Scores*: each UNKNOWN score of OpenOOD's families on the same split, computed from the
  backbone features (cached once per set) and the trained version's own head: k-th
  nearest-training distance (k = 1, 5, 10; k = 1 is the product's distance), class-conditional
  Mahalanobis with a shared Ledoit-Wolf covariance, max-softmax, energy, ViM, and fusions
  (sums of scores standardised on the held-out training scores). AUROC and FPR at 95% known
  kept, of unseen vs held-out known; and each score's recall of unseen at a threshold set on
  out-of-fold training scores for the target false-UNKNOWN rate, with the realised rate.
  Beside them, ``bench_layers.py``'s study: knn1 and Mahalanobis on the 192-channel stage's
  average-pooled features (torch, cached in ``bench/_out/layers``), the product's distance
  since stop 44 on the same cache (the 112- and 192-channel stages, less a share of the
  one-Gaussian distance: ``classifier._far``), and the whole decision (confidence OR the
  distance, calibrated together by ``calibrate_rule``) with each distance.
* *Product*: the version's own decision at its calibrated thresholds (what an operator gets):
  realised false-UNKNOWN on held-out known, recall of unseen, the mix and report card the
  version chose, and clustering of the UNKNOWNs (``cluster_embeddings``, default parameters,
  the loosest trained class's tightness as ``run_clustering`` passes it):
  ARI against the true classes (noise as singletons; noise as one label in brackets), and the
  noise share.

Then the one-new-type-plus-strays case: trained on five gauge kinds, scored 30 images of the
sixth and 4 unrelated images (2 shapes, 2 textures), clustered at default settings.

Usage: python bench/bench_openset.py [--sets elpv digits shapes textures gauges]
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from scipy.special import logsumexp, softmax
from sklearn.covariance import LedoitWolf
from sklearn.metrics import adjusted_rand_score, roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _memory import peak_mb  # noqa: E402
from _openset_sets import SETS, image_set  # noqa: E402

from imagesieve._workspace import Workspace  # noqa: E402
from imagesieve.classifier import Predictor, TrainOptions, train_model  # noqa: E402
from imagesieve.classifier._far import Mahalanobis as ProductMahalanobis  # noqa: E402
from imagesieve.classifier._features import backbone_onnx, extract_features  # noqa: E402
from imagesieve.classifier._openset import FOLDS, HeldOut, calibrate_rule  # noqa: E402
from imagesieve.classifier._reference import ReferenceSet  # noqa: E402
from imagesieve.classifier._split import adaptive_split  # noqa: E402
from imagesieve.models import DEFAULT_BACKBONE, get_backbone_spec  # noqa: E402
from imagesieve.models.export import load_checkpoint  # noqa: E402
from imagesieve.search._cluster import class_tightness, cluster_embeddings  # noqa: E402

HERE = Path(__file__).resolve().parent
DATA = HERE / "_data" / "openset"
OUT = HERE / "_out" / "openset"
TARGET = 0.05
KNOWN_SHARE = 0.75


def splits(name: str, classes: list[str]) -> list[list[str]]:
    """Left-out classes per split: ELPV each of its 4 classes; others 3 seeded draws of 2 (3 of 10)."""
    if name == "elpv":
        return [[c] for c in classes]
    rng = np.random.default_rng(0)
    k = 3 if len(classes) >= 10 else 2
    return [sorted(rng.choice(classes, k, replace=False).tolist()) for _ in range(3)]


def split_rows(labels: np.ndarray, classes: list[str], s: int, left: list[str]) -> tuple:
    """Split ``s``'s rows: to train on (75% of each known class), held-out known, unseen."""
    known = [c for c in classes if c not in left]
    rows = np.random.default_rng(s).permutation(np.flatnonzero(~np.isin(labels, left)))
    by_class = [rows[labels[rows] == c] for c in known]
    fit = np.concatenate([r[: int(len(r) * KNOWN_SHARE)] for r in by_class])
    known_test = np.concatenate([r[int(len(r) * KNOWN_SHARE) :] for r in by_class])
    return fit, known_test, np.flatnonzero(np.isin(labels, left))


def features(name: str, items: list[tuple[Path, str]], ws: Workspace) -> dict[str, np.ndarray]:
    """Backbone ``features`` (head input) and ``embedding`` of every image of a set, cached."""
    path = OUT / f"features-{name}.npz"
    if path.exists():
        z = np.load(path)
        if len(z["embedding"]) == len(items):
            return {k: z[k] for k in ("features", "embedding")}
    onnx = backbone_onnx(ws, DEFAULT_BACKBONE)
    arrays, errors = extract_features(
        onnx, get_backbone_spec(DEFAULT_BACKBONE).config, [p for p, _ in items]
    )
    assert all(e is None for e in errors), [e for e in errors if e][:3]
    np.savez(path, **arrays)
    return arrays


# -- UNKNOWN scores (higher = more unknown) ---------------------------------------------------
def knn(ref: np.ndarray, q: np.ndarray, k: int, skip_self: bool = False) -> np.ndarray:
    r = ReferenceSet(ref, [""] * len(ref), [""] * len(ref))
    return r.nearest(q, k + skip_self)[1][:, k - 1 + skip_self]


class Mahalanobis:
    """Class means, one shared Ledoit-Wolf covariance; score = smallest squared distance."""

    def __init__(self, x: np.ndarray, y: np.ndarray):
        x = x.astype(np.float64)
        self.means = np.stack([x[y == c].mean(0) for c in np.unique(y)])
        centred = x - self.means[np.searchsorted(np.unique(y), y)]
        self.precision = LedoitWolf().fit(centred).precision_

    def __call__(self, q: np.ndarray) -> np.ndarray:
        q = q.astype(np.float64)
        return np.stack([(((q - m) @ self.precision) * (q - m)).sum(1) for m in self.means], 1).min(
            1
        )


class ViM:
    """Virtual-logit matching (Wang et al. 2022) on the head's input features."""

    def __init__(self, f: np.ndarray, w: np.ndarray, b: np.ndarray):
        self.w, self.b = w, b
        self.u = -np.linalg.pinv(w) @ b
        fc = f - self.u
        dim = min(256, len(f) // 4)
        eigval, eigvec = np.linalg.eigh(np.cov(fc.T))
        self.null = eigvec[:, np.argsort(eigval)[::-1][dim:]]
        self.alpha = (f @ w.T + b).max(1).mean() / np.linalg.norm(fc @ self.null, axis=1).mean()

    def __call__(self, f: np.ndarray) -> np.ndarray:
        v = np.linalg.norm((f - self.u) @ self.null, axis=1) * self.alpha
        return v - logsumexp(f @ self.w.T + self.b, axis=1)


def logit_scores(logits: np.ndarray) -> dict[str, np.ndarray]:
    return {"msp": 1 - softmax(logits, 1).max(1), "energy": -logsumexp(logits, 1)}


def feature_scores(emb_fit, y_fit, emb_q, skip_self=False) -> dict[str, np.ndarray]:
    out = {f"knn{k}": knn(emb_fit, emb_q, k, skip_self) for k in (1, 5, 10)}
    out["mahalanobis"] = Mahalanobis(emb_fit, y_fit)(emb_q)
    return out


#: ``bench_layers.py``'s finding, tried here on the trained versions: the same scores on the
#: 192-channel stage's average-pooled features (the product's embedding is the last conv's), and
#: the whole decision (confidence OR the score, calibrated together, mix 0, no quality rule) with
#: each distance.
ALTERNATIVE = "s6-192"
#: The product's distance since stop 44 (``classifier._far``, unscaled): the 112- and
#: 192-channel stages concatenated, less ``RELATIVE`` x the one-Gaussian distance.
PRODUCT = "s5+s6 relative mahalanobis"
PRODUCT_LAYERS = ("s5-112", "s6-192")
DECISION_SCORES = ("knn1", f"{ALTERNATIVE} knn1", f"{ALTERNATIVE} mahalanobis", PRODUCT)
#: Feature + logit fusions (each score standardised on the held-out known images, then summed),
#: the product's distance (the 192-channel Mahalanobis) with energy and with max-softmax among them.
FUSIONS = [
    ("knn1", "msp"),
    ("knn1", "energy"),
    ("mahalanobis", "energy"),
    (f"{ALTERNATIVE} mahalanobis", "energy"),
    (f"{ALTERNATIVE} mahalanobis", "msp"),
]
CONFIDENCE = 0.5


def head_logits(feats, y, train, head, rows, weight_decay):
    """The head refitted on ``rows`` as ``train_model``'s refits are (from the trained head)."""
    import torch

    from imagesieve.classifier._train import REFIT_STEPS, _class_weights, _fit_linear

    mu, sd = feats[train].mean(0), feats[train].std(0) + 1e-6
    z = ((feats - mu) / sd).astype(np.float32)
    with torch.no_grad():
        init = (head.weight * torch.from_numpy(sd), head.bias + head.weight @ torch.from_numpy(mu))
    n_classes = head.weight.shape[0]
    cw = _class_weights(y[rows], n_classes, "sqrt")
    lin, _, _ = _fit_linear(
        z[rows], y[rows], z[:0], y[:0], n_classes, cw, weight_decay, REFIT_STEPS, init
    )
    with torch.no_grad():
        return lin(torch.from_numpy(z)).numpy().astype(np.float64)


def score_table(feats, emb, alt, prod, y, plan, head, wd, known_test, unseen) -> dict[str, dict]:
    """Each score on one split: AUROC, FPR@95, and recall / realised rate at an OOF threshold.

    ``alt``: the alternative features (unit rows), ``prod`` the product's (``PRODUCT_LAYERS``,
    each unit length, concatenated); their scores and the ``decision: <score>`` rows (recall
    and realised rate of the whole decision with that distance) are added.
    """
    w = head.weight.detach().numpy().astype(np.float64)
    b = head.bias.detach().numpy().astype(np.float64)
    tr, cal = plan.train, np.concatenate([plan.train, plan.val])
    f64 = feats.astype(np.float64)
    q = np.concatenate([known_test, unseen])

    def distances(fit: np.ndarray, rows: np.ndarray) -> dict[str, np.ndarray]:
        out = feature_scores(emb[fit], y[fit], emb[rows])
        out[f"{ALTERNATIVE} knn1"] = knn(alt[fit], alt[rows], 1)
        out[f"{ALTERNATIVE} mahalanobis"] = Mahalanobis(alt[fit], y[fit])(alt[rows])
        out[PRODUCT] = ProductMahalanobis.fit(prod[fit], y[fit], scale=1.0).squared(prod[rows])
        return out

    scores = distances(tr, q) | logit_scores(f64[q] @ w.T + b)
    scores["vim"] = ViM(f64[tr], w, b)(f64[q])
    # Held-out scores of the training images: out of fold, and the validation images as is.
    held: dict[str, np.ndarray] = {}
    order = np.random.default_rng(1).permutation(tr)
    fold = np.arange(len(order)) % FOLDS
    oof_logits = np.zeros((len(y), w.shape[0]))
    for f in range(FOLDS):
        fit, hold = order[fold != f], order[fold == f]
        for k, v in distances(fit, hold).items():
            held.setdefault(k, np.zeros(len(y)))[hold] = v
        oof_logits[hold] = head_logits(feats, y, tr, head, fit, wd)[hold]
    for k, v in distances(tr, plan.val).items():
        held[k][plan.val] = v
    oof_logits[plan.val] = f64[plan.val] @ w.T + b
    held |= logit_scores(oof_logits)
    held = {k: v[cal] for k, v in held.items()}

    def standardised(k: str, s: np.ndarray) -> np.ndarray:
        med, q90 = np.quantile(held[k], [0.5, 0.9])
        return (s - med) / max(q90 - med, 1e-12)

    for a, c in FUSIONS:
        scores[f"{a}+{c}"] = standardised(a, scores[a]) + standardised(c, scores[c])
        held[f"{a}+{c}"] = standardised(a, held[a]) + standardised(c, held[c])
    n = len(known_test)
    out = {}
    for k, s in scores.items():
        sk, su = s[:n], s[n:]
        row = {
            "auroc": roc_auc_score(np.r_[np.zeros(n), np.ones(len(su))], np.r_[sk, su]),
            "fpr95": float((su <= np.quantile(sk, 0.95)).mean()),
        }
        if k in held:
            t = np.quantile(held[k], 1 - TARGET)
            row |= {"recall": float((su > t).mean()), "false": float((sk > t).mean())}
        out[k] = row
    for k in DECISION_SCORES:
        # calibrate_rule's distance thresholds live in [0, 2]: Mahalanobis is scaled into it
        scale = min(1.0, 0.5 / held[k].max())
        rule, _ = calibrate_rule(
            HeldOut(1 - held["msp"], held[k] * scale, np.zeros(len(cal)), "bench"),
            CONFIDENCE,
            TARGET,
        )
        flagged = np.array(
            [r is not None for r in rule.reasons(1 - scores["msp"], scores[k] * scale)]
        )
        out[f"decision: {k}"] = {
            "recall": float(flagged[n:].mean()),
            "false": float(flagged[:n].mean()),
        }
    return out


# -- the product's own decision --------------------------------------------------------------
def ari(truth: list[str], labels: np.ndarray) -> tuple[float, float]:
    singletons = [c if c != -1 else -2 - i for i, c in enumerate(labels)]
    return adjusted_rand_score(truth, singletons), adjusted_rand_score(truth, labels)


def tightness(version) -> float | None:
    """The loosest trained class's cohesion, as ``run_clustering`` passes it."""
    reference = ReferenceSet.load(version.path)
    return class_tightness(reference.embeddings, reference.labels)


def product(version, items, known_test, unseen, dump: Path) -> tuple[dict, dict]:
    """Score with the version's Predictor; its decision, and the clustering of its UNKNOWNs.

    The UNKNOWNs' embeddings, true classes and Top-1/Top-2 go to ``dump`` (to study clustering
    without scoring again).
    """
    rows = np.concatenate([known_test, unseen])
    preds = list(Predictor(version).score([str(items[i][0]) for i in rows]))
    assert all(p.ok for p in preds)
    unknown = np.array([p.reason is not None for p in preds])
    n = len(known_test)
    # The version's far-from-training score, for AUROC beside the scores table's.
    score = np.array([p.neighbor_distance + version.mix * (1 - p.confidence) for p in preds])
    truth_unseen = np.r_[np.zeros(n), np.ones(len(preds) - n)]
    decision = {
        "auroc": roc_auc_score(truth_unseen, score),
        "fpr95": float((score[n:] <= np.quantile(score[:n], 0.95)).mean()),
        "false": float(unknown[:n].mean()),
        "recall": float(unknown[n:].mean()),
        "mix": version.mix,
        "card_mean": version.meta["open_set"]["mean_recall"],
        "top1_p5": float(np.quantile([p.confidence for p in preds[:n]], 0.05)),  # held-out known
    }
    flagged = np.flatnonzero(unknown)
    truth = [items[rows[i]][1] for i in flagged]
    emb = np.stack([preds[i].embedding for i in flagged])
    top = [(p.top3[0][0], p.top3[min(1, len(p.top3) - 1)][0]) for p in (preds[i] for i in flagged)]
    pooled = np.stack([preds[i].max_pooled for i in flagged]).astype(np.float32)
    np.savez(
        dump,
        embedding=emb,
        max_pooled=pooled,
        truth=np.array(truth),
        top=np.array(top).reshape(-1, 2),
    )
    t = time.perf_counter()  # clustering's time includes reading the trained classes' tightness
    tight = tightness(version)

    def cluster(rows: np.ndarray):  # of the UNKNOWNs' rows ``rows``
        return cluster_embeddings(
            np.arange(len(rows), dtype=np.int64),
            emb[rows],
            [top[i][0] for i in rows],
            [top[i][1] for i in rows],
            tightness=tight,
        )

    clustering = cluster(np.arange(len(flagged)))
    seconds = time.perf_counter() - t
    a, a_one = ari(truth, clustering.labels)
    # As the product clusters by default: poor photos left out (``Clusters.unknowns``).
    good = np.array([not preds[i].quality_flags for i in flagged])
    a_good = a
    if not good.all():
        kept = np.flatnonzero(good)
        a_good = ari([truth[i] for i in kept], cluster(kept).labels)[0]
    return decision, {
        "ari_product": a_good,
        "poor": float(1 - good.mean()),
        "unknowns": len(flagged),
        "clusters": len(clustering.clusters),
        "ari": a,
        "ari_noise_one": a_one,
        "noise": float((clustering.labels == -1).mean()),
        "seconds": seconds,
    }


#: How a known image may come back re-shared: (name, JPEG quality or None for PNG, scale).
RESHARED = (
    ("JPEG 95", 95, 1.0),
    ("JPEG 85", 85, 1.0),
    ("JPEG 75", 75, 1.0),
    ("80% size", None, 0.8),
)


def reshared(version, items, known_test) -> dict[str, float]:
    """The UNKNOWN rate of the held-out known images sent again re-encoded or smaller.

    The same images as the realised false UNKNOWN, each as ``RESHARED`` says: a known image
    re-shared should stay known (a camera's or a chat app's JPEG, a smaller copy).
    """
    import io

    from PIL import Image

    predictor = Predictor(version)
    out = {}
    for name, quality, scale in RESHARED:
        blobs = []
        for i in known_test:
            im = Image.open(items[i][0]).convert("RGB")
            if scale != 1.0:
                im = im.resize((round(im.width * scale), round(im.height * scale)), Image.BILINEAR)
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=quality) if quality else im.save(buf, "PNG")
            blobs.append((f"{i}.{name}", buf.getvalue()))
        preds = list(predictor.score(blobs))
        out[name] = float(np.mean([p.reason is not None for p in preds]))
    return out


def link_folder(root: Path, items, rows) -> Path:
    """An ImageFolder of symlinks to ``items[rows]`` (a fresh one each run)."""
    shutil.rmtree(root, ignore_errors=True)
    for i in rows:
        path, label = items[i]
        (root / label).mkdir(parents=True, exist_ok=True)
        (root / label / path.name).symlink_to(path)
    return root


def training_groups(version, items: list, rows: np.ndarray) -> np.ndarray:
    """The near-duplicate groups training kept on one side of its split, one id per row of
    ``rows`` (from ``meta.json``, which lists them all when they are few, as here)."""
    dups = version.meta.get("duplicates") or {}
    listed = dups.get("listed") or []
    assert sum(map(len, listed)) == dups.get("images", 0), "meta.json lists only some groups"
    at = {(items[i][0].parent.name, items[i][0].name): k for k, i in enumerate(rows)}
    groups = np.arange(len(rows))
    for members in listed:
        ids = [at[(Path(m).parent.name, Path(m).name)] for m in members]
        groups[ids] = ids[0]
    return groups


def run_set(name: str, ws: Workspace) -> tuple[dict, list[dict]]:
    items = image_set(name, DATA)
    arrays = features(name, items, ws)
    feats, emb = arrays["features"], arrays["embedding"]
    from bench_layers import pooled_features, unit  # here: bench_layers imports this module

    layers = pooled_features(name, items)
    alt = unit(layers[ALTERNATIVE]).astype(np.float32)
    prod = np.concatenate([unit(layers[k]) for k in PRODUCT_LAYERS], 1).astype(np.float32)
    labels = np.array([c for _, c in items])
    classes = sorted(set(labels))
    tables, products = [], []
    for s, left in enumerate(splits(name, classes)):
        known = [c for c in classes if c not in left]
        fit_rows, known_test, unseen = split_rows(labels, classes, s, left)
        data = link_folder(OUT / name / f"split{s}", items, fit_rows)
        t = time.perf_counter()
        result = train_model(data, ws, TrainOptions(activate=False))
        seconds = time.perf_counter() - t
        version = result.version
        model, _ = load_checkpoint(version.checkpoint_path)
        # The scores table on the same images as the version trained on: its own split of them.
        fit_sorted = np.array(
            sorted(fit_rows, key=lambda i: (labels[i], str(items[i][0].name))), np.int64
        )
        y_fit = np.array([known.index(c) for c in labels[fit_sorted]])
        plan = adaptive_split(
            y_fit, known, seed=0, groups=training_groups(version, items, fit_sorted)
        )
        reference = ReferenceSet.load(version.path)
        assert reference.sources == [str(items[i][0]) for i in fit_sorted[plan.train]] or [
            Path(x).name for x in reference.sources
        ] == [items[i][0].name for i in fit_sorted[plan.train]], "the version split differently"
        y_all = np.full(len(items), -1)
        y_all[fit_sorted] = y_fit
        rows_all = np.concatenate([fit_sorted, known_test, unseen])
        remap = {r: i for i, r in enumerate(rows_all)}
        table = score_table(
            feats[rows_all],
            emb[rows_all],
            alt[rows_all],
            prod[rows_all],
            y_all[rows_all],
            plan,
            model.head,
            version.meta["training"]["phase1"]["weight_decay"],
            np.array([remap[r] for r in known_test]),
            np.array([remap[r] for r in unseen]),
        )
        decision, clusters = product(
            version, items, known_test, unseen, OUT / name / f"unknowns-split{s}.npz"
        )
        tables.append(table)
        decision["reshared"] = reshared(version, items, known_test)
        products.append(
            {"left": left, "version": version.name, "train_s": seconds, **decision, **clusters}
        )
        print(
            f"  {name} split {s} (unseen {', '.join(left)}): {version.name} trained in "
            f"{seconds:.0f} s; false UNKNOWN {decision['false']:.3f}, recall {decision['recall']:.3f}, "
            f"mix {decision['mix']:.3g}; {clusters['clusters']} clusters, ARI {clusters['ari']:.3f}, "
            f"noise {clusters['noise']:.2f}",
            flush=True,
        )
    mean = {
        k: {m: float(np.mean([t[k][m] for t in tables])) for m in tables[0][k]} for k in tables[0]
    }
    return mean, products


def strays_case(ws: Workspace) -> dict:
    """Trained on five gauge kinds; 30 of the sixth plus 2 shapes and 2 textures, clustered."""
    gauges = image_set("gauges", DATA)
    new = "counter"
    data = link_folder(
        OUT / "strays" / "data", gauges, [i for i, (_, c) in enumerate(gauges) if c != new]
    )
    version = train_model(data, ws, TrainOptions(activate=False)).version
    rng = np.random.default_rng(7)
    new_items = [p for p, c in gauges if c == new][:30]
    strays = [p for p, _ in rng.permutation(image_set("shapes", DATA))[:2]]
    strays += [p for p, _ in rng.permutation(image_set("textures", DATA))[:2]]
    sources = [str(p) for p in new_items + strays]
    truth = ["new"] * len(new_items) + [f"stray{i}" for i in range(len(strays))]
    preds = list(Predictor(version).score(sources))
    flagged = [i for i, p in enumerate(preds) if p.reason is not None]
    emb = np.stack([preds[i].embedding for i in flagged])
    names = [preds[i].top3[0][0] for i in flagged]
    np.savez(
        OUT / "strays" / "unknowns.npz",
        embedding=emb,
        max_pooled=np.stack([preds[i].max_pooled for i in flagged]).astype(np.float32),
        truth=np.array(truth)[flagged],
    )
    clustering = cluster_embeddings(
        np.array(flagged, np.int64), emb, names, names, tightness=tightness(version)
    )
    best = max(clustering.clusters, key=lambda c: c.size, default=None)
    members = set(best.member_ids.tolist()) if best else set()
    new_in = sum(1 for i in members if truth[i] == "new")
    return {
        "flagged_new": sum(1 for i in flagged if truth[i] == "new"),
        "flagged_strays": sum(1 for i in flagged if truth[i] != "new"),
        "clusters": len(clustering.clusters),
        "new_share_in_largest": new_in / len(new_items),
        "purity_of_largest": new_in / len(members) if members else 0.0,
    }


def fresh_workspace(out: Path, script: str) -> Workspace:
    """Print the command and the machine; a workspace under ``out`` with no versions yet."""
    print(f"$ python bench/{script}", " ".join(sys.argv[1:]))
    print(f"# {platform.node()}, {platform.processor() or platform.machine()}, target {TARGET:.0%}")
    out.mkdir(parents=True, exist_ok=True)
    ws = Workspace(out / "ws")
    shutil.rmtree(ws.models_dir, ignore_errors=True)
    return ws


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    args = ap.parse_args()
    ws = fresh_workspace(OUT, "bench_openset.py")
    t0 = time.perf_counter()
    results = {}
    for name in args.sets:
        results[name] = run_set(name, ws)
    for name, (table, prods) in results.items():
        print(
            f"\n## {name}: {len(prods)} splits, unseen: {'; '.join(', '.join(p['left']) for p in prods)}"
        )
        print("| score | AUROC | FPR@95 | recall at 5% | realised false |")
        print("|---|---|---|---|---|")
        for k, m in table.items():
            if k.startswith("decision: "):
                continue
            tail = f"{m['recall']:.3f} | {m['false']:.3f}" if "recall" in m else "- | -"
            print(f"| {k} | {m['auroc']:.3f} | {m['fpr95']:.3f} | {tail} |")
    print("\n## The product's decision and clustering (means over each set's splits)")
    print("| set | score AUROC (knn1) | FPR@95 (knn1) | realised false UNKNOWN | recall of unseen "
          "(knn1 at 5%) | mix (splits) | card mean recall | UNKNOWNs | clusters | "
          "ARI (noise one label) | noise | clustering s | poor photos among UNKNOWNs | ARI without them "
          "(as the product clusters) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    means = []
    for name, (_, prods) in results.items():
        m = {k: float(np.mean([p[k] for p in prods])) for k in ("auroc", "fpr95", "false", "recall",
             "card_mean", "unknowns", "clusters", "ari", "ari_noise_one", "noise", "seconds", "poor",
             "ari_product")}  # fmt: skip
        k1 = results[name][0]["knn1"]
        m |= {"k_auroc": k1["auroc"], "k_fpr95": k1["fpr95"], "k_recall": k1["recall"]}
        means.append(m)
        mixes = ", ".join(f"{p['mix']:.2g}" for p in prods)
        print(f"| {name} | {m['auroc']:.3f} ({m['k_auroc']:.3f}) | {m['fpr95']:.3f} ({m['k_fpr95']:.3f}) | "
              f"{m['false']:.3f} | {m['recall']:.3f} ({m['k_recall']:.3f}) | {mixes} | {m['card_mean']:.3f} | "
              f"{m['unknowns']:.0f} | {m['clusters']:.1f} | {m['ari']:.3f} ({m['ari_noise_one']:.3f}) | "
              f"{m['noise']:.2f} | {m['seconds']:.1f} | {m['poor']:.3f} | {m['ari_product']:.3f} |")  # fmt: skip
    avg = {k: float(np.mean([m[k] for m in means])) for k in means[0]}
    print(f"| **mean** | {avg['auroc']:.3f} ({avg['k_auroc']:.3f}) | {avg['fpr95']:.3f} ({avg['k_fpr95']:.3f}) | "
          f"{avg['false']:.3f} | {avg['recall']:.3f} ({avg['k_recall']:.3f}) | | {avg['card_mean']:.3f} | | | "
          f"{avg['ari']:.3f} ({avg['ari_noise_one']:.3f}) | {avg['noise']:.2f} | | {avg['poor']:.3f} | "
          f"{avg['ari_product']:.3f} |")  # fmt: skip
    print("\n## Held-out known images re-shared: UNKNOWN rate (means over each set's splits)")
    print(reshared_table({n: p for n, (_, p) in results.items()}))
    print("\n## Mean over sets of each score")
    print("| score | AUROC | FPR@95 | recall at 5% | realised false | beats knn1 on every set |")
    print("|---|---|---|---|---|---|")
    first = next(iter(results.values()))[0]
    for k in (k for k in first if not k.startswith("decision: ")):
        rows = [results[n][0][k] for n in results]
        m = {a: float(np.mean([r[a] for r in rows])) for a in rows[0]}
        beats = all(results[n][0][k]["auroc"] >= results[n][0]["knn1"]["auroc"] for n in results)
        tail = f"{m['recall']:.3f} | {m['false']:.3f}" if "recall" in m else "- | -"
        print(
            f"| {k} | {m['auroc']:.3f} | {m['fpr95']:.3f} | {tail} | {'yes' if beats else 'no'} |"
        )
    print(
        f"\n## The whole decision with each distance (Top-1 below {CONFIDENCE} OR the distance, "
        f"calibrated together at {TARGET:.0%} on the out-of-fold scores; mix 0, no quality rule)"
    )
    print("| distance | " + " | ".join(f"{n}: recall / false" for n in results) + " | **mean** |")
    print("|---|" + "---|" * (len(results) + 1))
    for k in DECISION_SCORES:
        rows = [results[n][0][f"decision: {k}"] for n in results]
        cells = " | ".join(f"{r['recall']:.3f} / {r['false']:.3f}" for r in rows)
        mean = [float(np.mean([r[a] for r in rows])) for a in ("recall", "false")]
        print(f"| {k} | {cells} | **{mean[0]:.3f} / {mean[1]:.3f}** |")
    print("\n## One new type plus strays (gauges: 'counter' unseen, 30 of them + 4 strays)")
    print(strays_case(ws))
    print(f"\n# whole run {time.perf_counter() - t0:.0f} s, peak RSS {peak_mb():.0f} MB")


def reshared_table(products: dict[str, list[dict]]) -> str:
    """The products' ``reshared`` rates beside their realised false UNKNOWN, per set and mean."""
    kinds = [k for k, _, _ in RESHARED]
    lines = ["| set | as stored (realised false) | " + " | ".join(kinds) + " |"]
    lines.append("|---|" + "---|" * (len(kinds) + 1))
    rows = {
        n: [float(np.mean([p["false"] for p in ps]))]
        + [float(np.mean([p["reshared"][k] for p in ps])) for k in kinds]
        for n, ps in products.items()
    }
    rows["**mean**"] = list(np.mean(list(rows.values()), axis=0))
    for n, r in rows.items():
        lines.append(f"| {n} | " + " | ".join(f"{v:.3f}" for v in r) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
