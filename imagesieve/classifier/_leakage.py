"""Near-duplicates among training images: found before the split, kept on one side of it.

A copy of a training image in the test split makes accuracy look better than it is (leakage).
The duplicate rule is calibrated on the version's own images: copies of a sample of them are
generated (``near_duplicate_variants``: re-encoded, cropped, resized, brightened), embedded with
the backbone, and ``calibrate_duplicate_rule`` sets the distances and the pixel-signature
similarity. The groups it finds then go to ``adaptive_split``, which keeps each on one side;
with pre-split folders (the operator's own split) the groups across splits are reported.
"""

from __future__ import annotations

import io
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from imagesieve.classifier._duplicates import (
    DuplicateRule,
    calibrate_duplicate_rule,
    near_duplicate_groups,
    near_duplicate_variants,
)
from imagesieve.data import ImageLoadError, load_image
from imagesieve.models import BackboneConfig

__all__ = ["TrainingDuplicates", "find_training_duplicates", "training_copies"]

#: Training images whose generated copies calibrate the rule (4 copies each); the far rule's
#: fit takes those of the training split too (``FarFeatures``). 60 cost 3.3 s on 1,200 shapes
#: (a 1.43x longer training than phase 1 alone); 30, as BMP, about half.
CALIBRATION_IMAGES = 30
#: Groups (and their paths) a version's meta.json lists.
LISTED = 50


@dataclass
class TrainingDuplicates:
    """The rule, each image's group id (near-duplicates share one) and the groups themselves."""

    rule: DuplicateRule | None
    groups: np.ndarray | None
    members: list[np.ndarray] = field(default_factory=list)
    seconds: float = 0.0
    note: str | None = None
    #: The image each embedded copy was made from (m,), and the copies' tapped features
    #: (m, d; None when the backbone has none): the far rule's fit takes them.
    copy_of: np.ndarray | None = None
    copy_ood: np.ndarray | None = None

    def report(self, plan: Any, paths: list[Path], presplit: bool) -> dict[str, Any]:
        """``meta.json`` "duplicates": the groups, and those the split has on several sides.

        Without pre-split folders none is: the split keeps groups together.
        """
        side = np.empty(len(paths), object)
        for name in ("train", "val", "test"):
            side[getattr(plan, name)] = name
        across = [g for g in self.members if len(set(side[g].tolist())) > 1]
        return {
            "method": "embedding candidates verified by an 8x8 RGB pixel signature, calibrated "
            f"on generated copies of {CALIBRATION_IMAGES} training images",
            "rule": None if self.rule is None else asdict(self.rule),
            "groups": len(self.members),
            "images": int(sum(len(g) for g in self.members)),
            "kept_together": not presplit,
            "across_splits": len(across),
            "leaking": [
                {str(paths[i]): str(side[i]) for i in g[:10].tolist()} for g in across[:LISTED]
            ],
            "listed": [[str(paths[i]) for i in g[:10].tolist()] for g in self.members[:LISTED]],
            "seconds": round(self.seconds, 2),
            **({"note": self.note} if self.note else {}),
        }


def find_training_duplicates(
    onnx_path: Path,
    config: BackboneConfig,
    paths: list[Path],
    embeddings: np.ndarray,
    signatures: np.ndarray,
    seed: int = 0,
    batch_size: int = 32,
) -> TrainingDuplicates:
    """Near-duplicate groups among training images ((n, d) unit embeddings, (n, 192) signatures).

    Copies of up to CALIBRATION_IMAGES of them calibrate the rule (a few seconds); fewer than
    10 images, or a rule that cannot be calibrated, give no groups and say why.
    """
    from imagesieve.classifier._features import extract_features
    from imagesieve.models import OOD_FEATURES

    t = time.perf_counter()
    n = len(paths)
    if n < 10:
        return TrainingDuplicates(None, None, note="fewer than 10 images: not checked")
    items, source = training_copies(paths, config, seed)
    copy_signatures: list = []
    arrays, errors = extract_features(
        onnx_path,
        config,
        items,
        ("embedding", OOD_FEATURES),
        batch_size=batch_size,
        signatures=copy_signatures,
    )
    ok = np.array([e is None for e in errors], bool)
    copies = {
        "copy_of": source[ok],
        "copy_ood": None if OOD_FEATURES not in arrays else arrays[OOD_FEATURES][ok],
    }
    try:
        rule = calibrate_duplicate_rule(
            embeddings,
            arrays["embedding"][ok],
            source[ok],
            signatures,
            np.stack([s for s, k in zip(copy_signatures, ok, strict=True) if k]),
        )
        members = near_duplicate_groups(embeddings, rule, signatures=signatures)
    except ValueError as e:  # e.g. too few copies decoded to calibrate on
        return TrainingDuplicates(
            None, None, seconds=time.perf_counter() - t, note=str(e), **copies
        )
    groups = np.arange(n)
    for g in members:
        groups[g] = g[0]
    return TrainingDuplicates(rule, groups, members, time.perf_counter() - t, **copies)


def training_copies(
    paths: list[Path], config: BackboneConfig, seed: int = 0
) -> tuple[list[tuple[str, bytes]], np.ndarray]:
    """Generated copies of up to CALIBRATION_IMAGES of ``paths`` (``near_duplicate_variants``).

    Returns (name, BMP bytes) items to embed and the index of each one's image; the same
    ``seed`` gives the same copies (a fine-tuned version embeds them again).
    """
    rng = np.random.default_rng(seed)
    items: list[tuple[str, bytes]] = []
    source: list[int] = []
    for i in rng.choice(len(paths), min(CALIBRATION_IMAGES, len(paths)), replace=False).tolist():
        try:
            image = load_image(paths[i], min_side=config.resize_side).image
        except ImageLoadError:
            continue
        for kind, copy in near_duplicate_variants(image, rng):
            buf = io.BytesIO()
            copy.save(buf, "BMP")  # no compression: the cheapest to write and to decode
            items.append((f"{paths[i].name} ({kind})", buf.getvalue()))
            source.append(i)
    return items, np.asarray(source, np.int64)
