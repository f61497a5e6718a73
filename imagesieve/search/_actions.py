"""Review actions that are recorded and undoable: relabel images, set thresholds, activate, undo.

Each action is one ``audit`` row in the store: who did it and when, how many images it touched,
and what undo puts back; the cluster actions of ``_review`` record theirs the same way. Undo
reverses one action exactly, store and training-data files, and refuses when a later action
changed the same thing (undo that one first), as an editor's undo stack would.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from imagesieve._errors import UserError
from imagesieve._workspace import Workspace
from imagesieve.classifier import (
    CALIBRATED,
    UNKNOWN,
    QualityRule,
    UnknownRule,
    calibrate_at,
    card_at,
    held_out_unknowns,
    merge_overrides,
)
from imagesieve.data import sort_into
from imagesieve.models import (
    ModelVersion,
    activate_version,
    active_version,
    get_version,
    set_thresholds,
)
from imagesieve.search._duplicates import near_training, undo_keep_one
from imagesieve.search._review import (
    ReviewError,
    class_folder,
    class_name,
    label_dict,
    leave_old_class,
    local_user,
    place_in_class,
    training_folder,
    trash_folder,
)
from imagesieve.store import (
    AuditEntry,
    AuditFile,
    HumanLabel,
    Store,
    using_store,
)

__all__ = [
    "MAX_RELABEL",
    "RelabelResult",
    "activate_model",
    "apply_thresholds",
    "audit_log",
    "fix_training_labels",
    "label_suspects",
    "record_activation",
    "relabel_images",
    "threshold_counts",
    "undo_action",
]

#: Most images one relabel may name (a bulk action over a whole filtered store is paged).
MAX_RELABEL = 50_000


@dataclass
class RelabelResult:
    """What a relabel did: labels given, and copies added to or moved within the training data."""

    action_id: int | None
    label: str
    dest: str
    images: int
    labelled: int = 0
    unchanged: int = 0
    copied: int = 0
    already_there: int = 0
    moved: int = 0
    missing: list[str] = field(default_factory=list)
    #: Images that nearly duplicate a training image (``near_training``), with its label.
    near_training: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def relabel_images(
    ws: Workspace,
    ids: list[int] | tuple[int, ...],
    label: str,
    *,
    into: str | os.PathLike | None = None,
    model: str | None = None,
    who: str | None = None,
    store: Store | None = None,
) -> RelabelResult:
    """Give stored images a class (confirm, correct, or name a new type); they join its data.

    The label is kept per image content (it follows the image into later versions), and the
    image is copied into ``into/<label>/`` (default: the version's training folder), so the
    next training run learns it, as promote does. An image a person labelled before moves out
    of its old class folder. ``UNKNOWN`` says a person found the images belong to no class:
    they join no folder (and leave one a person put them in). Recorded in the audit log;
    undone by :func:`undo_action`.
    """
    info = get_version(ws, model)
    version = info.name
    label = class_name(label)
    if label.upper() == UNKNOWN:
        label = UNKNOWN
    wanted = sorted({int(i) for i in ids})
    if not wanted:
        raise ReviewError("no images given to relabel")
    if wanted[0] < 0 or wanted[-1] >= 2**62:
        raise ReviewError(f"no stored image has id {wanted[0] if wanted[0] < 0 else wanted[-1]}")
    if len(wanted) > MAX_RELABEL:
        raise ReviewError(f"at most {MAX_RELABEL} images per relabel, got {len(wanted)}")
    root = Path(into) if into is not None else training_folder(info)
    if label != UNKNOWN and (root is None or not root.is_dir()):
        raise ReviewError(
            f"training data folder not found: {root}"
            if root is not None
            else f"the training folder of {version} is gone; give the folder to add the images to"
        )
    dest = class_folder(root, label) if label != UNKNOWN else None
    with using_store(ws, store, check=False) as store:
        with store.atomic():
            rows = store.rows(version, ids=wanted)
            strangers = sorted(set(wanted) - {r.id for r in rows})
            if strangers:
                shown = ", ".join(map(str, strangers[:10])) + (" ..." * (len(strangers) > 10))
                raise ReviewError(f"no stored image of {version} has id {shown}")
            before = store.audit.labels([r.sha256 for r in rows])
            result = RelabelResult(None, label, "" if dest is None else str(dest), len(rows))
            created = dest is not None and not dest.exists()
            names = {p.name for p in dest.iterdir()} if dest is not None and not created else set()
            trash = trash_folder(ws)
            files: list[AuditFile] = []
            given: list[HumanLabel] = []
            for r in rows:
                prev = before.get(r.sha256)
                kept = prev is not None and prev.file is not None and Path(prev.file).is_file()
                if prev is not None and prev.label == label and (kept or prev.file is None):
                    result.unchanged += 1
                    continue
                result.moved += leave_old_class(prev, dest, trash, files)
                if dest is None:
                    given.append(HumanLabel(r.sha256, UNKNOWN, r.id, 0, None))
                else:
                    given.append(place_in_class(ws, dest, r, names, files, result))
            result.labelled = len(given)
            result.near_training = near_training(store, info, [r.id for r in rows])
            result.action_id = store.audit.record(
                "relabel",
                who=who or local_user(),
                summary=f"labelled {len(rows)} image{'s' * (len(rows) != 1)} as {label}",
                model_version=version,
                target=label,
                images=len(given),
                before={
                    "labels": {g.sha256: label_dict(before.get(g.sha256)) for g in given},
                    "created_dir": str(dest) if created and dest.exists() else None,
                },
                after={"label": label},
                touches=[f"image:{g.sha256}" for g in given],
                files=files,
                labels=given,
            )
    return result


def apply_thresholds(
    ws: Workspace,
    confidence: float,
    distance: float | None,
    *,
    quality: dict[str, Any] | None = None,
    model: str | None = None,
    who: str | None = None,
    store: Store | None = None,
    target: float | None = None,
) -> dict[str, Any]:
    """Make these a version's UNKNOWN thresholds and re-decide its stored images; recorded.

    ``quality`` sets photo quality bounds over the calibrated ones (a bound -> a number,
    None to switch its check off, ``"auto"`` for the calibrated value again); the stored
    images' quality flags follow. ``target``: the false-UNKNOWN rate the thresholds were
    calibrated for (``thresholds_for_target``), which the held-out check then judges against.
    Returns the rows' counts by rule after the change, and what the change does to the
    version's held-out known images (``_judged_counts``).
    """
    version = get_version(ws, model)
    rule, overrides, quality_rule = _rules(version, confidence, distance, quality)
    before = {
        "confidence": version.confidence_threshold,
        "distance": version.distance_threshold,
        "tuned": version.thresholds_tuned,
        "quality_overrides": version.meta.get("quality_overrides") or {},
        "target": (version.meta.get("thresholds") or {}).get("target"),
    }
    changed = ", ".join(
        f"{k} {'off' if v is None else f'{v:g}'}"
        for k, v in (quality or {}).items()
        if v != CALIBRATED
    )
    with using_store(ws, store, check=False) as store:
        with store.atomic():
            store.audit.record(
                "thresholds",
                who=who or local_user(),
                summary=(
                    f"UNKNOWN thresholds of {version.name}: confidence {rule.confidence:g}, "
                    f"distance {'off' if rule.distance is None else f'{rule.distance:g}'}"
                    + (f"; photo quality {changed or 'as calibrated'}" if quality else "")
                ),
                model_version=version.name,
                target=version.name,
                images=0,
                before=before,
                after={
                    "confidence": rule.confidence,
                    "distance": rule.distance,
                    "tuned": True,
                    "quality_overrides": overrides,
                    "target": target,
                },
                touches=[f"thresholds:{version.name}"],
            )
            _decide_with(
                store, version, rule, tuned=True, quality_overrides=overrides, target=target
            )
        return _judged_counts(store, version, rule, quality_rule, target)


def _judged_counts(
    store: Store,
    version: ModelVersion,
    rule: UnknownRule,
    quality: QualityRule | None,
    target: float | None = None,
) -> dict[str, Any]:
    """What ``rule`` (and ``quality``, None: the version's) marks UNKNOWN, by reason.

    Among the version's stored images (``Store.unknown_counts``); under ``held_out`` among
    its held-out test images, all of known classes: the false-UNKNOWN rate these thresholds
    would realise (``held_out_unknowns``, against ``target`` when given); under
    ``report_card`` the share of a never-seen type they would flag (``card_at``: each class
    left out in turn, as at training). Either is None when the version kept no such images.
    """
    counts: dict[str, Any] = store.unknown_counts(version.name, rule, quality)
    counts["held_out"] = held_out_unknowns(version, rule, quality, target)
    counts["report_card"] = card_at(version, rule, quality)
    return counts


def _rules(
    version: ModelVersion,
    confidence: float,
    distance: float | None,
    quality: dict[str, Any] | None,
) -> tuple[UnknownRule, dict[str, Any] | None, QualityRule | None]:
    """The UNKNOWN rule, quality overrides and quality rule a change asks for; checked.

    The overrides are the version's after ``quality`` (None: ``quality`` is None, unchanged);
    the quality rule is what they give (None when unchanged).
    """
    try:
        rule = UnknownRule(confidence, distance, version.mix)
        if quality is None:
            return rule, None, None
        if QualityRule.of_version(version.meta) is None:
            raise ValueError(
                f"{version.name} was trained before photo quality was measured: retrain it "
                "to judge photo quality"
            )
        overrides = merge_overrides(version.meta.get("quality_overrides"), quality)
        meta = version.meta | {"quality_overrides": overrides}
        return rule, overrides, QualityRule.of_version(meta)
    except ValueError as e:
        raise ReviewError(str(e)) from None


def _decide_with(
    store: Store,
    version: ModelVersion,
    rule: UnknownRule,
    *,
    tuned: bool,
    quality_overrides: dict[str, Any] | None = None,
    target: float | None = None,
) -> None:
    """Write ``rule`` and quality overrides into ``meta.json``; re-decide the stored rows.

    Inside the caller's transaction: if re-deciding fails, the store rolls back and
    ``meta.json`` goes back to what it held.
    """
    was = (version.confidence_threshold, version.distance_threshold, version.thresholds_tuned)
    had = version.meta.get("quality_overrides")
    aimed = (version.meta.get("thresholds") or {}).get("target")
    now = set_thresholds(
        version,
        rule.confidence,
        rule.distance,
        tuned=tuned,
        quality_overrides=quality_overrides,
        target=target,
    )
    try:
        quality = None if quality_overrides is None else QualityRule.of_version(now.meta)
        store.redecide(version.name, rule, quality)
    except BaseException:
        set_thresholds(
            version,
            was[0],
            was[1],
            tuned=was[2],
            quality_overrides=None if quality_overrides is None else (had or {}),
            target=aimed,
        )
        raise


def threshold_counts(
    ws: Workspace,
    confidence: float | None = None,
    distance: float | None = None,
    *,
    quality: dict[str, Any] | None = None,
    keep: bool = True,
    model: str | None = None,
    store: Store | None = None,
    target: float | None = None,
) -> dict[str, Any]:
    """A version's thresholds and how many of its stored images they mark UNKNOWN, by rule.

    With ``keep`` (the default) the version's own thresholds are counted; otherwise the given
    ``confidence``, ``distance`` (None: off) and ``quality`` bounds (as ``apply_thresholds``
    takes them) are previewed. ``counts`` also holds the held-out known images' figure
    (``_judged_counts``), judged against ``target`` when given (the rate previewed
    thresholds were calibrated for). Nothing changes.
    """
    version = get_version(ws, model)
    if keep:
        confidence, distance, quality = (
            version.confidence_threshold,
            version.distance_threshold,
            None,
        )
    rule, _, quality_rule = _rules(version, confidence, distance, quality)
    with using_store(ws, store, check=False, read_only=store is None) as store:
        counts = _judged_counts(store, version, rule, quality_rule, target)
    shown = quality_rule or QualityRule.of_version(version.meta)
    return {
        "version": version.name,
        "confidence": rule.confidence,
        "distance": rule.distance,
        "mix": version.mix,
        "tuned": keep and version.thresholds_tuned,
        "quality": None if shown is None else shown.to_dict(),
        "quality_overrides": version.meta.get("quality_overrides") or {},
        "counts": counts,
    }


def thresholds_for_target(ws: Workspace, target: float, *, model: str | None = None) -> dict:
    """The thresholds a version's calibration gives for another false-UNKNOWN ``target``.

    As training would set them with ``--false-unknown-rate target`` (``calibrate_at``), on the
    held-out images it kept; preview or apply them like any thresholds. Nothing changes.
    """
    version = get_version(ws, model)
    rule, info = calibrate_at(version, target)
    return {
        "version": version.name,
        "target": target,
        "confidence": rule.confidence,
        "distance": rule.distance,
        "mix": rule.mix,
        "calibration": info,
    }


#: The false-UNKNOWN rates ``threshold_tradeoff`` calibrates for by default.
TRADEOFF_RATES = (0.01, 0.02, 0.05, 0.1, 0.2)
#: Most rates one trade-off table may ask for.
MAX_TRADEOFF_RATES = 20


def threshold_tradeoff(
    ws: Workspace, rates: Sequence[float] = TRADEOFF_RATES, *, model: str | None = None
) -> dict[str, Any]:
    """What each false-UNKNOWN rate costs and catches: the table an operator picks a rate from.

    Per rate, the thresholds calibration gives (``thresholds_for_target``), the share of the
    version's held-out test images they flag (false alarms on known classes, images the
    calibration did not see) and their report card (the share of a never-seen type flagged).
    Nothing changes.
    """
    if not 0 < len(rates) <= MAX_TRADEOFF_RATES:
        raise UserError(f"give 1 to {MAX_TRADEOFF_RATES} rates, got {len(rates)}")
    version = get_version(ws, model)
    rows = []
    for rate in sorted(set(float(r) for r in rates)):
        rule, info = calibrate_at(version, rate)
        held = held_out_unknowns(version, rule, target=rate)
        card = card_at(version, rule)
        rows.append(
            {
                "target": rate,
                "confidence": rule.confidence,
                "distance": rule.distance,
                "calibration_realised": info["realised"]["unknown"],
                "test_unknown_rate": None if held is None else held["rate"],
                "new_type_recall": None if card is None else card["mean_recall"],
                "worst_new_type": None if card is None else card["worst"],
            }
        )
    return {"version": version.name, "mix": version.mix, "rates": rows}


def activate_model(
    ws: Workspace, name: str, *, who: str | None = None, store: Store | None = None
) -> str:
    """Make a trained version the active one (a running server follows); recorded. Its name."""
    version = get_version(ws, name)
    if version.meta.get("kind") != "trained":
        raise ReviewError(f"{name} is not a trained version")
    previous = active_version(ws)
    with using_store(ws, store, check=False) as store:
        with store.atomic():
            record_activation(
                store, version.name, previous.name if previous else None, who or local_user()
            )
            activate_version(ws, version.name)
    return version.name


def record_activation(store: Store, name: str, previous: str | None, who: str) -> None:
    """Record that ``name`` became the active version after ``previous`` (undo goes back)."""
    store.audit.record(
        "activate",
        who=who,
        summary=f"activated {name}" + (f" (was {previous})" if previous is not None else ""),
        model_version=name,
        target=name,
        before={"version": previous},
        after={"version": name},
        touches=["active"],
    )


def audit_log(
    ws: Workspace, *, limit: int = 100, offset: int = 0, store: Store | None = None
) -> dict[str, Any]:
    """The recorded review actions, newest first, and how many there are."""
    with using_store(ws, store, check=False) as store:
        entries = store.audit.entries(limit=limit, offset=offset)
        return {"total": store.audit.count(), "actions": [e.to_dict() for e in entries]}


def undo_action(
    ws: Workspace,
    action_id: int | None = None,
    *,
    who: str | None = None,
    store: Store | None = None,
) -> dict[str, Any]:
    """Reverse one recorded action (default: the latest not undone), store and files exactly.

    Returns the undo's own audit entry. Refused (ReviewError) for an action already undone, an
    undo, or one whose images or cluster a later action changed again.
    """
    with using_store(ws, store, check=False) as store:
        with store.atomic():
            entry = _undoable(store, action_id)
            later = store.audit.later_overlapping(entry)
            if later:
                raise ReviewError(
                    f"action {later[-1].action_id} ({later[-1].summary}) changed the same since; "
                    f"undo it first",
                    kind="conflict",
                )
            _UNDO[entry.action](ws, store, entry)
            undo_id = store.audit.record(
                "undo",
                who=who or local_user(),
                summary=f"undid {entry.action_id}: {entry.summary}",
                model_version=entry.model_version,
                target=str(entry.action_id),
                images=entry.images,
                before={"action_id": entry.action_id},
            )
            store.audit.mark_undone(entry.action_id, undo_id)
            return store.audit.entry(undo_id).to_dict()


def _undoable(store: Store, action_id: int | None) -> AuditEntry:
    if action_id is None:
        for e in store.audit.entries(limit=1000):
            if e.action != "undo" and e.undone_by is None:
                return e
        raise ReviewError("nothing to undo")
    entry = store.audit.entry(int(action_id))
    if entry is None:
        raise ReviewError(f"no recorded action {action_id}")
    if entry.action == "undo":
        raise ReviewError(f"action {action_id} is an undo; it cannot be undone")
    if entry.undone_by is not None:
        raise ReviewError(
            f"action {action_id} was already undone (by {entry.undone_by})", kind="conflict"
        )
    return entry


def _restore_files(store: Store, entry: AuditEntry) -> None:
    """Take out the files an action added (if unchanged) and put back those it moved away."""
    for f in reversed(store.audit.files(entry.action_id)):
        path = Path(f.path)
        if f.change == "added" and path.is_file():
            with open(path, "rb") as fh:
                if hashlib.file_digest(fh, "sha256").hexdigest() == f.sha256:
                    path.unlink()
        elif f.change == "removed" and f.trash and Path(f.trash).is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(f.trash, path)
    created = (entry.before or {}).get("created_dir")
    if created and Path(created).is_dir() and not any(Path(created).iterdir()):
        Path(created).rmdir()


def _restore_labels(store: Store, before: dict[str, dict[str, Any] | None]) -> None:
    store.audit.drop_labels([sha for sha, h in before.items() if h is None])
    store.audit.set_labels([HumanLabel(**h) for h in before.values() if h is not None])


def _undo_relabel(ws: Workspace, store: Store, entry: AuditEntry) -> None:
    _restore_files(store, entry)
    _restore_labels(store, entry.before["labels"])


def _undo_cluster(ws: Workspace, store: Store, entry: AuditEntry) -> None:
    """name, reject, exclude, promote: the cluster's review state, exclusions, labels, files."""
    version, cluster_id = entry.model_version, int(entry.target)
    before = entry.before
    if before.get("excluded"):
        store.clusters.include(version, cluster_id, before["excluded"])
    if "state" in before:
        store.clusters.restore(version, cluster_id, before["state"])
    if "labels" in before:
        _restore_files(store, entry)
        _restore_labels(store, before["labels"])


def _undo_thresholds(ws: Workspace, store: Store, entry: AuditEntry) -> None:
    version = get_version(ws, entry.model_version)
    b = entry.before
    _decide_with(
        store,
        version,
        UnknownRule(b["confidence"], b["distance"], version.mix),
        tuned=b["tuned"],
        quality_overrides=b.get("quality_overrides")
        if "quality_overrides" in entry.after
        else None,
        target=b.get("target"),
    )


def label_suspects(ws: Workspace, *, model: str | None = None) -> dict[str, Any]:
    """The training images a version's label check suspects, likeliest first, still in place.

    Each has its path, given class (its folder), the class the model suggests and both
    probabilities (out of fold). Images since moved or removed are left out.
    """
    version = get_version(ws, model)
    check = version.meta.get("label_check") or {}
    here = [
        s
        for s in check.get("suspects", [])
        if Path(s["path"]).is_file() and Path(s["path"]).parent.name == s["given"]
    ]
    return {
        "version": version.name,
        "method": check.get("method"),
        "checked": check.get("checked", 0),
        "found": check.get("found", 0),
        "classes": version.classes,
        "suspects": here,
    }


def fix_training_labels(
    ws: Workspace,
    paths: list[str] | tuple[str, ...],
    label: str | None,
    *,
    model: str | None = None,
    who: str | None = None,
    store: Store | None = None,
) -> dict[str, Any]:
    """Move suspected training images into class ``label``'s folder, or (None) out of the data.

    Only images the version's label check named can be moved (a request cannot reach other
    files). An image taken out waits in ``trash/`` for an undo; recorded, undone by
    :func:`undo_action`.
    """
    version = get_version(ws, model)
    named = {s["path"]: s for s in label_suspects(ws, model=version.name)["suspects"]}
    wanted = list(dict.fromkeys(str(p) for p in paths))
    if not wanted:
        raise ReviewError("no images given")
    strangers = [p for p in wanted if p not in named]
    if strangers:
        raise ReviewError(
            f"not a suspected label error of {version.name} (or no longer in place): {strangers[0]}"
        )
    root = training_folder(version)
    if root is None:
        raise ReviewError(f"the training folder of {version.name} is gone")
    dest = None
    if label is not None:
        label = class_name(label)
        dest = class_folder(root, label)
    trash = trash_folder(ws)
    files: list[AuditFile] = []
    with using_store(ws, store, check=False) as store:
        with store.atomic():
            created = dest is not None and not dest.exists()
            for path in wanted:
                with open(path, "rb") as f:
                    sha = hashlib.file_digest(f, "sha256").hexdigest()
                away = trash / f"{len(files)}-{Path(path).name}"
                away.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, away)
                files.append(AuditFile(path, "removed", sha, str(away)))
                if dest is not None:
                    target = sort_into(dest.parent, dest.name, Path(path).name, str(away), sha)
                    files.append(AuditFile(str(target), "added", sha))
            where = f"into {label}" if label is not None else "out of the training data"
            action_id = store.audit.record(
                "fix_labels",
                who=who or local_user(),
                summary=f"moved {len(wanted)} suspected label error{'s' * (len(wanted) != 1)} "
                + where,
                model_version=version.name,
                target=label,
                images=len(wanted),
                before={"created_dir": str(dest) if created and dest is not None else None},
                after={"label": label, "paths": wanted},
                touches=[f"file:{p}" for p in wanted],
                files=files,
            )
    return {"action_id": action_id, "label": label, "moved": len(wanted)}


def _undo_fix_labels(ws: Workspace, store: Store, entry: AuditEntry) -> None:
    _restore_files(store, entry)


def _undo_activate(ws: Workspace, store: Store, entry: AuditEntry) -> None:
    previous = entry.before["version"]
    if previous is None:
        raise ReviewError("no version was active before; activate the one to serve instead")
    activate_version(ws, previous)


_UNDO = {
    "relabel": _undo_relabel,
    "name": _undo_cluster,
    "reject": _undo_cluster,
    "exclude": _undo_cluster,
    "promote": _undo_cluster,
    "thresholds": _undo_thresholds,
    "activate": _undo_activate,
    "fix_labels": _undo_fix_labels,
    "keep_one": undo_keep_one,
}
