"""Near-duplicates among stored images: the groups, keep-one, and flags at promote and relabel.

The rule is the version's own (calibrated at training on copies of its images); the store links
rows as they arrive (``NearDuplicates.catch_up``, after each scoring batch and before a listing).
Keep-one sets a group's other images aside (not clustered, not promoted), recorded and undoable.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import numpy as np

from imagesieve._workspace import Workspace
from imagesieve.classifier import (
    DuplicateRule,
    image_signature,
    reference_signatures,
)
from imagesieve.data import ImageLoadError, load_image
from imagesieve.models import ModelVersion, get_version
from imagesieve.search._review import ReviewError, local_user
from imagesieve.store import STORE_FILE, AuditEntry, Store, using_store

__all__ = ["keep_one", "list_duplicates", "near_training", "undo_keep_one"]

#: Most groups (or exact contents) one listing returns.
MAX_GROUPS = 100
#: Most near-duplicates of training images promote and relabel list.
LISTED = 100
#: Most candidates (nearest training image within the rule's reach) checked for them.
NEAR_TRAINING_CHECKED = 10_000


def _rule(version: ModelVersion) -> DuplicateRule:
    rule = DuplicateRule.of_version(version.meta)
    if rule is None:
        raise ReviewError(
            f"{version.name} has no near-duplicate rule (trained before near-duplicates were "
            "checked, or on too few images): train a new version to find them"
        )
    return rule


def list_duplicates(
    ws: Workspace,
    *,
    model: str | None = None,
    limit: int = 20,
    offset: int = 0,
    store: Store | None = None,
) -> dict[str, Any]:
    """Groups of near-duplicate stored images (largest first) and exact ones (same content).

    Links the rows stored since the last look first. ``near`` groups: group_id, size, kept
    and members; ``exact``: contents stored once that arrived under several names.
    """
    if not 1 <= limit <= MAX_GROUPS or offset < 0:
        raise ReviewError(f"limit is 1 to {MAX_GROUPS} and offset at least 0")
    version = get_version(ws, model)
    rule = _rule(version)
    if store is None and not (ws.root / STORE_FILE).is_file():
        empty: dict[str, Any] = {"total": 0, "groups": []}
        return {"model_version": version.name, "rule": asdict(rule), "near": empty, "exact": empty}
    with using_store(ws, store, check=False) as store:
        store.duplicates.catch_up(version.name, rule)
        total, groups = store.duplicates.groups(version.name, limit, offset)
        exact_total, exact = store.duplicates.exact(limit, offset)
    return {
        "model_version": version.name,
        "rule": asdict(rule),
        "near": {"total": total, "groups": [g.to_dict() for g in groups]},
        "exact": {"total": exact_total, "groups": exact},
    }


def keep_one(
    ws: Workspace,
    keep: int,
    *,
    model: str | None = None,
    who: str | None = None,
    store: Store | None = None,
) -> dict[str, Any]:
    """Keep stored image ``keep`` and set the rest of its near-duplicate group aside.

    Set-aside images are not clustered and not promoted; the listing shows which was kept.
    Recorded as ``keep_one``; undo puts the group back as it was. Returns kept, set_aside
    and the audit action id.
    """
    version = get_version(ws, model).name
    with using_store(ws, store, check=False) as store, store.atomic():
        members = store.duplicates.group_of(version, int(keep))
        if members is None:
            raise ReviewError(f"stored image {keep} of {version} has no near-duplicates")
        after = {i: (None if i == int(keep) else int(keep)) for i in members}
        changed = {i: d for i, d in after.items() if members[i] != d}
        if not changed:
            raise ReviewError(f"image {keep} is already the one kept of its group")
        action_id = store.audit.record(
            "keep_one",
            who=who or local_user(),
            summary=f"kept image {keep}, set {len(members) - 1} near-duplicates aside",
            model_version=version,
            target=str(keep),
            images=len(changed),
            before={"duplicate_of": {str(i): members[i] for i in changed}},
            after={"duplicate_of": {str(i): d for i, d in changed.items()}},
            touches=[f"duplicates:{version}:{min(members)}"],
        )
        store.duplicates.set_aside(version, changed)
    return {"kept": int(keep), "set_aside": len(members) - 1, "action_id": action_id}


def carry_keep_one(store: Store, old: str, new: str, who: str | None = None) -> int:
    """Set aside in ``new`` the near-duplicates a person set aside in ``old``; how many.

    After a retrain, where ``new`` groups an image with the twin of the one kept in its place
    (``Duplicates.set_asides_to_carry``). Recorded as one ``keep_one`` for ``new`` (undo puts
    them back), touching each group it sets, so a later keep-one there is seen by undo.
    """
    with store.atomic():
        carried = store.duplicates.set_asides_to_carry(old, new)
        if not carried:
            return 0
        store.audit.record(
            "keep_one",
            who=who or local_user(),
            summary=f"set {len(carried)} near-duplicates aside as they were with {old}",
            model_version=new,
            target=old,
            images=len(carried),
            before={"duplicate_of": dict.fromkeys(map(str, carried))},
            after={"duplicate_of": {str(i): keep for i, (keep, _) in carried.items()}},
            touches=sorted({f"duplicates:{new}:{group}" for _, group in carried.values()}),
        )
        store.duplicates.set_aside(new, {i: keep for i, (keep, _) in carried.items()})
    return len(carried)


def undo_keep_one(ws: Workspace, store: Store, entry: AuditEntry) -> None:
    """Put a group's ``duplicate_of`` back as it was before a keep-one."""
    before = entry.before["duplicate_of"]
    store.duplicates.set_aside(entry.model_version, {int(i): d for i, d in before.items()})


def near_training(store: Store, version: ModelVersion, ids: list[int]) -> list[dict[str, Any]]:
    """Which stored images among ``ids`` nearly duplicate a training image of ``version``.

    For promote and relabel: such an image adds little, and one labelled otherwise than its
    twin contradicts the training data. The version's whole rule, between each image and its
    nearest training image: the distance, the signature floor and, where the version kept its
    training images' signatures, the looser band the signatures confirm (a re-encoded or
    resized copy). A version from before that compares with the training image's file for the
    floor (the distance alone when it cannot be read). Empty without a near-duplicate rule;
    at most LISTED images, nearest first.
    """
    rule = DuplicateRule.of_version(version.meta)
    if rule is None:
        return []
    kept = reference_signatures(version.path)
    loose = kept is not None and rule.similarity is not None
    reach, limit = (rule.reach, NEAR_TRAINING_CHECKED) if loose else (rule.distance, LISTED)
    found = store.duplicates.near_training(version.name, ids, reach, limit=limit)
    if not found:
        return []
    distance = np.array([f["distance"] for f in found], np.float64)
    need = np.flatnonzero(rule.needs_signature(distance))
    stored = store.duplicates.signatures([found[k]["id"] for k in need]) if len(need) else {}
    from_files: dict[str, np.ndarray | None] = {}

    def pair(k: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        f = found[k]
        if kept is not None and f["training_id"] is not None and f["training_id"] < len(kept):
            train = np.asarray(kept[f["training_id"]])
        else:  # a version that kept no signatures: its training image's file
            if f["training_source"] not in from_files:
                from_files[f["training_source"]] = _file_signature(version, f["training_source"])
            train = from_files[f["training_source"]]
        return stored.get(f["id"]), train

    keep = rule.judge(distance, pair)
    return [f for f, ok in zip(found, keep, strict=True) if ok][:LISTED]


def _file_signature(version: ModelVersion, source: str | None) -> np.ndarray | None:
    """The pixel signature of an image file as scoring computes it (None: it cannot be read)."""
    if not source:
        return None
    config = version.config
    try:
        image = load_image(source, min_side=config.resize_side).image
    except ImageLoadError:
        return None
    return image_signature(config.resize_and_crop(image))
