"""The built-in demo: ELPV solar cells, trained on mono cells, scored on a mix with poly cells."""

from __future__ import annotations

from collections import Counter
from typing import Any

from imagesieve._workspace import Workspace
from imagesieve.classifier import UNKNOWN, Predictor, Progress
from imagesieve.classifier._train import TrainOptions, train_model
from imagesieve.data import scan_image_folder
from imagesieve.data._elpv import elpv_images, export_elpv
from imagesieve.models import active_version

__all__ = ["run_demo"]

MIXED_PER_TYPE = 150


def run_demo(
    ws: Workspace, progress: Progress | None = None, finetune_epochs: int = 0
) -> dict[str, Any]:
    """Build the demo data, train (or reuse the trained version), and score a mixed batch."""
    images = elpv_images()
    mono = [im for im in images if im.cell_type == "mono"]
    poly = [im for im in images if im.cell_type == "poly"]
    held_out = mono[-MIXED_PER_TYPE:]  # mono cells kept out of training, scored below
    data_dir = export_elpv(ws.root / "demo" / "elpv-mono", mono[:-MIXED_PER_TYPE])
    fingerprint = scan_image_folder(data_dir).fingerprint()
    version = active_version(ws)
    reused = version is not None and version.meta.get("data", {}).get("fingerprint") == fingerprint
    if not reused:
        version = train_model(
            data_dir, ws, TrainOptions(finetune_epochs=finetune_epochs), progress
        ).version
    mixed = [str(im.path) for im in held_out + poly[:MIXED_PER_TYPE]]
    kinds = ["mono"] * MIXED_PER_TYPE + ["poly"] * MIXED_PER_TYPE
    predictor = Predictor(version)
    per_kind: dict[str, Counter] = {"mono": Counter(), "poly": Counter()}
    done = 0
    for batch in predictor.score_batches(mixed):
        for pred in batch:
            per_kind[kinds[done]][pred.label if pred.ok else "failed"] += 1
            done += 1
        if progress:
            progress("scoring mixed batch", done, len(mixed))
    m = version.meta["metrics"]
    lines = [
        f"demo workspace: {ws.root}",
        f"model {version.name} ({'reused' if reused else 'trained'}) on {version.meta['data']['images']} mono cells "
        f"({', '.join(f'{c} {n}' for c, n in version.meta['data']['counts'].items())})",
        f"  test accuracy {m['accuracy']:.4f}, macro-F1 {m['macro_f1']:.4f}, report in {version.report_dir}",
        f"scored {len(mixed)} cells ({MIXED_PER_TYPE} unseen mono, "
        f"{MIXED_PER_TYPE} poly, a cell type never trained on):",
    ]
    for kind, counts in per_kind.items():
        lines.append(f"  {kind}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    lines.append(
        f"  {UNKNOWN} here means Top-1 below {predictor.threshold:.0%}: softmax confidence alone "
        "rarely flags the unseen cell type"
    )
    return {
        "workspace": str(ws.root),
        "model_version": version.name,
        "reused_model": reused,
        "metrics": m,
        "mixed_batch": {k: dict(v) for k, v in per_kind.items()},
        "summary": "\n".join(lines),
    }
