"""The built-in demo: ELPV cells, trained on mono, a mix with poly scored, UNKNOWNs clustered."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

from imagesieve._workspace import Workspace
from imagesieve.classifier import (
    FAR_FROM_TRAINING,
    LOW_CONFIDENCE,
    POOR_QUALITY,
    UNKNOWN,
    Progress,
    TrainOptions,
    train_model,
)
from imagesieve.data import ElpvImage, elpv_images, export_elpv, scan_image_folder
from imagesieve.ingest import ScoreOptions, score_inputs
from imagesieve.models import active_version
from imagesieve.search import run_clustering
from imagesieve.store import Store

__all__ = ["demo_split", "run_demo"]

MIXED_PER_TYPE = 150
#: Poly cells in the scored batch: enough for the UNKNOWNs to form clusters.
POLY_SCORED = 600


def demo_split() -> tuple[list[ElpvImage], list[ElpvImage], list[ElpvImage]]:
    """(mono cells to train on, unseen mono cells, poly cells): the demo's fixed split.

    The unseen mono cells are a seeded random sample of MIXED_PER_TYPE kept out of training.
    """
    images = elpv_images()
    mono = [im for im in images if im.cell_type == "mono"]
    poly = [im for im in images if im.cell_type == "poly"]
    held = set(random.Random(0).sample(range(len(mono)), MIXED_PER_TYPE))
    held_out = [im for i, im in enumerate(mono) if i in held]
    train = [im for i, im in enumerate(mono) if i not in held]
    return train, held_out, poly


def run_demo(
    ws: Workspace, progress: Progress | None = None, finetune_epochs: int = 0
) -> dict[str, Any]:
    """Build the demo data, train (or reuse the trained version), and score a mixed batch."""
    train, held_out, poly = demo_split()
    data_dir = export_elpv(ws.root / "demo" / "elpv-mono", train)
    fingerprint = scan_image_folder(data_dir).fingerprint()
    version = active_version(ws)
    reused = version is not None and version.meta.get("data", {}).get("fingerprint") == fingerprint
    if not reused:
        version = train_model(
            data_dir, ws, TrainOptions(finetune_epochs=finetune_epochs), progress
        ).version
    kind_of = {str(im.path): "mono" for im in held_out} | {
        str(im.path): "poly" for im in poly[:POLY_SCORED]
    }
    summary = score_inputs(ws, list(kind_of), ScoreOptions(model=version.name), progress)
    per_kind: dict[str, Counter] = {"mono": Counter(), "poly": Counter()}
    with Store(ws, check=False) as store:
        rows = [(r.source, r.label, r.reason) for r in store.rows(version.name)]
    for source, label, reason in rows:
        if source in kind_of:
            per_kind[kind_of[source]][f"{label} ({reason})" if reason else label] += 1
    clusters = run_clustering(ws, model=version.name, progress=progress)
    m = version.meta["metrics"]
    lines = [
        f"demo workspace: {ws.root}",
        f"model {version.name} ({'reused' if reused else 'trained'}) on {version.meta['data']['images']} mono cells "
        f"({', '.join(f'{c} {n}' for c, n in version.meta['data']['counts'].items())})",
        f"  test accuracy {m['accuracy']:.4f}, macro-F1 {m['macro_f1']:.4f}, report in {version.report_dir}",
        f"scored {len(kind_of)} cells ({MIXED_PER_TYPE} unseen mono, "
        f"{POLY_SCORED} poly, a cell type never trained on):",
    ]
    for kind, counts in per_kind.items():
        lines.append(f"  {kind}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    thresholds = version.meta["thresholds"]
    found = len(clusters.clusters)
    lines += [
        f"  {UNKNOWN}: a photo of poor quality ({POOR_QUALITY}), Top-1 below "
        f"{thresholds['confidence']:.0%} ({LOW_CONFIDENCE}) or nearest "
        f"training image further than {thresholds.get('distance', float('nan')):.3f} "
        f"({FAR_FROM_TRAINING})",
        f"stored in {store.path} (batch {summary.batch_id}: {summary.scored} newly scored, "
        f"{summary.already_scored} already stored)",
        f"clustered {clusters.images} UNKNOWNs: {found} cluster{'s' * (found != 1)}, "
        f"{clusters.noise} noise; folders in {clusters.export_dir}",
    ]
    for c in clusters.clusters[:5]:
        looks = ", ".join(f"{k} {v}" for k, v in list(c["top1"].items())[:2])
        lines.append(f"  cluster {c['cluster_id']}: {c['size']} images (Top-1: {looks})")
    lines.append(
        "next: imagesieve cluster --list | imagesieve similar --id N | "
        "imagesieve promote CLUSTER --name NAME --into DATA_DIR"
    )
    return {
        "workspace": str(ws.root),
        "model_version": version.name,
        "reused_model": reused,
        "metrics": m,
        "mixed_batch": {k: dict(v) for k, v in per_kind.items()},
        "batch": summary.to_dict() | {"predictions": None},
        "clusters": clusters.to_dict(),
        "summary": "\n".join(lines),
    }
