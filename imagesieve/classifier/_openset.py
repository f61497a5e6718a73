"""Open-set calibration: thresholds set for the whole UNKNOWN decision, and the report card.

The decision (``UnknownRule``) is "Top-1 probability below ``confidence``, OR far-from-training
score above ``distance``", the score being the distance to the training data (the cosine
distance to the nearest training image, or for a version with tapped features its
``Mahalanobis`` distance, ``_far``) plus ``mix`` times (1 - Top-1 probability). Both
thresholds are set on held-out images of the known classes so that the whole decision, not
each rule alone, calls the target share of them UNKNOWN. Held out: each training image
predicted by a head refitted without its fold (on the cached features: no decoding) and its
distance to the training data without it (its nearest *other* training image, or the
Mahalanobis distance refitted without its fold), plus the validation images as the model sees
them.

The report card simulates a never-seen type on the operator's own data: each class in turn is
left out (head refitted without it, its images out of the reference set), and the share of its
images the calibrated decision flags is that class's recall. The card also chooses ``mix``:
on some data a new type still gets confident predictions (confidence misleads, mix 0), on
other data low confidence is the better sign; ``bench/bench_openset.py`` shows each on sets
from several domains.
"""

from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from imagesieve._errors import UserError
from imagesieve.classifier._far import FarFeatures, Mahalanobis
from imagesieve.classifier._quality import QualityRule
from imagesieve.classifier._reference import ReferenceSet
from imagesieve.classifier._unknown import UnknownRule

if TYPE_CHECKING:
    from imagesieve.models import ModelVersion

__all__ = [
    "CALIBRATION_FILE",
    "FOLDS",
    "MIX_GRID",
    "HeldOut",
    "Refit",
    "against_target",
    "calibrate_at",
    "calibrate_rule",
    "card_at",
    "card_of",
    "card_words",
    "load_calibration",
    "new_types",
    "save_calibration",
    "held_out",
    "off_target_words",
    "report_card",
]

#: What a version was calibrated on, in its directory (``save_calibration``).
CALIBRATION_FILE = "calibration.npz"
#: Folds of the out-of-fold predictions over the training images.
FOLDS = 5
#: The mixes the report card tries, in units of the spread of the distance over that of
#: (1 - Top-1 probability) on the held-out images.
MIX_GRID = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)
#: A mix other than 0 is chosen only if it raises the card's mean recall by this much.
MIN_GAIN = 0.01
#: A test count of false UNKNOWNs less likely than this under the target rate (either side) is
#: reported as off target rather than chance.
OFF_TARGET = 0.01

#: Fits the head on the given rows alone; returns every row's Top-1 probability under that head
#: (all ones when the rows hold one class only). ``warm``: start from the trained head (for
#: leaving a class out: its logit is dropped); otherwise from scratch (a fold: the trained head
#: has seen the rows left out).
Refit = Callable[[np.ndarray, bool], np.ndarray]


@dataclass(frozen=True)
class HeldOut:
    """Held-out images of the known classes as the model sees them: (n,) arrays and their source."""

    top1_prob: np.ndarray
    distance: np.ndarray
    label: np.ndarray
    on: str
    poor: np.ndarray | None = None  # photos the quality rule flags: UNKNOWN whatever else
    #: Their photo quality measures (``quality_columns``), so other bounds can judge them.
    measures: dict[str, np.ndarray] | None = None

    def arrays(self, prefix: str = "") -> dict[str, np.ndarray]:
        """Its arrays by name, for ``save_calibration``."""
        out = {"top1_prob": self.top1_prob, "distance": self.distance, "label": self.label}
        out |= {f"q_{k}": v for k, v in (self.measures or {}).items()}
        if self.poor is not None:
            out["poor"] = self.poor
        return {prefix + k: v for k, v in out.items()}

    @classmethod
    def from_arrays(cls, z: Mapping[str, np.ndarray], on: str, prefix: str = "") -> HeldOut | None:
        """``arrays``' inverse (None: no such arrays in ``z``)."""
        names = [k[len(prefix) :] for k in z if k.startswith(prefix)]
        if "top1_prob" not in names:
            return None
        measures = {k[2:]: z[prefix + k] for k in names if k.startswith("q_")}
        poor = z[prefix + "poor"] if "poor" in names else None
        return cls(
            z[prefix + "top1_prob"],
            z[prefix + "distance"],
            z[prefix + "label"],
            on,
            poor,
            measures or None,
        )

    def judged_by(self, quality: QualityRule | None) -> HeldOut:
        """The same images with their photos judged by ``quality`` (None: as they are)."""
        if quality is None or not self.measures:
            return self
        return replace(self, poor=quality.poor(self.measures))


#: Prefix of the simulated new types' arrays in ``CALIBRATION_FILE``.
NEW_TYPES = "new_"


def save_calibration(directory: str | os.PathLike, held: HeldOut, new: HeldOut | None) -> None:
    """Keep what training calibrated on (``CALIBRATION_FILE``) for ``load_calibration``.

    ``held``: the held-out images of the known classes; ``new``: the report card's images as
    a new type (``label``: the class left out), each seen by a model without its class.
    """
    arrays = held.arrays() | ({} if new is None else new.arrays(NEW_TYPES))
    np.savez(Path(directory) / CALIBRATION_FILE, **arrays)


def load_calibration(version: ModelVersion) -> tuple[HeldOut, HeldOut | None]:
    """What a version was calibrated on, and its simulated new types (None: none kept).

    A version trained before they were kept: a ``UserError`` that says to retrain it.
    """
    calibration = (version.meta.get("thresholds") or {}).get("calibration") or {}
    path = version.path / CALIBRATION_FILE
    if not path.is_file():
        raise UserError(
            f"{version.name} was trained before its calibration images were kept: retrain it "
            "(imagesieve train --false-unknown-rate) to calibrate at another rate"
        )
    stat = path.stat()
    z = _calibration_arrays(str(path), stat.st_mtime_ns, stat.st_size)
    held = None if z is None else HeldOut.from_arrays(z, calibration.get("on", "held-out images"))
    if held is None:
        raise UserError(f"{path} cannot be read: retrain {version.name} to calibrate it again")
    return held, HeldOut.from_arrays(z, "each class left out", NEW_TYPES)


@lru_cache(maxsize=4)
def _calibration_arrays(path: str, _mtime_ns: int, _size: int) -> dict[str, np.ndarray] | None:
    """A ``CALIBRATION_FILE``'s arrays, read-only (None: unreadable), cached by the file's identity.

    A trade-off table calibrates at five rates and scores the card at each: one read.
    """
    try:
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None
    for a in arrays.values():
        a.flags.writeable = False  # shared by every caller of the cache
    return arrays


def held_out(
    embeddings: np.ndarray,
    y: np.ndarray,
    train: np.ndarray,
    val: np.ndarray,
    val_top1: np.ndarray,
    refit: Refit,
    seed: int = 0,
    poor: np.ndarray | None = None,
    far: tuple[FarFeatures, Mahalanobis] | None = None,
    measures: dict[str, np.ndarray] | None = None,
) -> HeldOut:
    """Out-of-fold Top-1 probabilities and distances of ``train``, plus ``val``.

    ``embeddings``, ``y`` and ``poor`` (photos of poor quality, bool) cover all rows;
    ``val_top1`` is the trained model's Top-1 probability of each ``val`` row. ``far``: the
    tapped features of all rows and the version's Mahalanobis fit on ``train``'s (None: the
    cosine distance, leave-one-out). ``measures``: photo quality columns of all rows, kept for
    the rows used (as ``new_types`` does).
    """
    top1 = np.empty(len(y))
    order = np.random.default_rng(seed).permutation(train)
    fold = np.arange(len(order)) % FOLDS
    distance = np.full(len(y), np.nan)
    for f in range(min(FOLDS, len(order))):
        fit, hold = order[fold != f], order[fold == f]
        top1[hold] = refit(fit, False)[hold]
        if far is not None and len(fit):
            distance[hold] = _refitted(far, y, fit)(far[0].x[hold])
    if far is None:
        reference = ReferenceSet(embeddings[train], [""] * len(train), [""] * len(train))
        loo = reference.leave_one_out()
        if len(loo) == len(train):  # one training image: nothing to measure it against
            distance[train] = loo
    on = f"{len(train)} training images out of fold"
    distance = distance[train]
    if len(val):
        seen = (
            far[1](far[0].x[val])
            if far is not None
            else reference.nearest(embeddings[val])[1][:, 0]
        )
        distance = np.concatenate([distance, seen])
        on += f" + {len(val)} validation images"
    return HeldOut(
        np.concatenate([top1[train], val_top1]).astype(np.float64),
        distance.astype(np.float64),
        np.concatenate([y[train], y[val]]),
        on,
        None if poor is None else np.concatenate([poor[train], poor[val]]).astype(bool),
        None
        if measures is None
        else {k: np.concatenate([v[train], v[val]]) for k, v in measures.items()},
    )


def calibrate_rule(
    held: HeldOut, confidence: float, false_unknown_rate: float, mix: float = 0.0
) -> tuple[UnknownRule, dict]:
    """The rule whose whole decision flags ``false_unknown_rate`` of the held-out images.

    Photos of poor quality are UNKNOWN whatever the thresholds, so they spend their share of
    the rate first; low confidence takes at most half of what is left: when more held-out
    images than that are under ``confidence``, the confidence threshold is lowered until they
    are not. The distance threshold takes the rest, and never less than a quarter of the rate
    (poor quality cannot switch the search for new types off). Returns the rule and a record
    of how it was set.
    """
    p, d = held.top1_prob, held.distance
    n = len(p)
    poor = np.zeros(n, bool) if held.poor is None else held.poor
    measured = ~np.isnan(d)
    rate = max(false_unknown_rate - poor.mean(), false_unknown_rate / 4) if n else 0.0
    low = p < confidence
    used = confidence
    if n and (~poor).any() and (low & ~poor).mean() > rate / 2:
        share = min(1.0, rate / 2 * n / (~poor).sum())  # of the photos not poor
        used = float(np.quantile(p[~poor], share, method="lower"))
        low = p < used
    score = d + mix * (1.0 - p)
    rest = np.sort(score[~low & ~poor & measured])
    allowed = int(np.floor(rate * n)) - int((low & ~poor).sum())
    top = 2.0 + mix
    if len(rest) == 0:
        threshold = top
    elif allowed <= 0:
        threshold = float(rest[-1])
    else:
        threshold = float(rest[max(len(rest) - allowed - 1, 0)])
    # Stored with 6 decimals: rounded up, so the stored rule flags no held-out image more.
    threshold = math.ceil(min(max(threshold, 0.0), top) * 1e6) / 1e6
    rule = UnknownRule(used, min(threshold, top), mix)
    info = {
        "on": held.on,
        "n": n,
        "false_unknown_rate": false_unknown_rate,
        "realised": {k: round(v, 4) for k, v in rule.shares(p, d, held.poor).items()},
    }
    if used != confidence:
        info["confidence_requested"] = confidence
    return rule, info


def calibrate_at(
    version: ModelVersion, target: float, quality: QualityRule | None = None
) -> tuple[UnknownRule, dict[str, Any]]:
    """The thresholds training would have set for another false-UNKNOWN ``target``, and how.

    ``calibrate_rule`` on the held-out images the version was calibrated on, with the
    confidence training was asked for and the version's ``mix``; their photos judged by
    ``quality`` (default: the version's bounds). No retraining: the record kept at training
    holds their Top-1 probabilities, distances and quality measures.
    """
    if not 0.0 < target < 1.0:
        raise UserError(f"the false-UNKNOWN target must be a share within (0, 1), got {target}")
    held = load_calibration(version)[0].judged_by(quality or QualityRule.of_version(version.meta))
    options = (version.meta.get("training") or {}).get("options") or {}
    asked = float(options.get("confidence_threshold", version.confidence_threshold))
    return calibrate_rule(held, asked, target, version.mix)


def new_types(
    embeddings: np.ndarray,
    y: np.ndarray,
    train: np.ndarray,
    val: np.ndarray,
    refit: Refit,
    poor: np.ndarray | None = None,
    far: tuple[FarFeatures, Mahalanobis] | None = None,
    measures: dict[str, np.ndarray] | None = None,
) -> HeldOut:
    """Each class as a new type: its training and validation images, seen without the class.

    Per class left out in turn (skipped when nothing else is trained on, or it is not): the
    head refitted without it, its distance to the rest. ``label``: the class left out; ``on``
    says so. ``poor`` and ``far`` as for ``held_out``; ``measures``: photo quality columns of
    all rows, kept for the rows used.
    """
    parts: list[tuple[np.ndarray, ...]] = []
    for c in np.unique(y[train]):
        rest = train[y[train] != c]
        if len(rest) == 0:
            continue
        unseen = np.concatenate([train[y[train] == c], val[y[val] == c]])
        top1 = refit(rest, True)[unseen]
        if far is None:
            ref = ReferenceSet(embeddings[rest], [""] * len(rest), [""] * len(rest))
            dist = ref.nearest(embeddings[unseen])[1][:, 0]
        else:
            dist = _refitted(far, y, rest)(far[0].x[unseen])
        parts.append((unseen, top1, dist))
    rows = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64)
    return HeldOut(
        np.concatenate([p[1] for p in parts]).astype(np.float64) if parts else np.zeros(0),
        np.concatenate([p[2] for p in parts]).astype(np.float64) if parts else np.zeros(0),
        y[rows],
        "each class left out",
        None if poor is None else poor[rows].astype(bool),
        None if measures is None else {k: v[rows] for k, v in measures.items()},
    )


def _recalls(new: HeldOut, rule: UnknownRule) -> dict[int, float]:
    """Per class left out (``new_types``), the share of its images ``rule`` flags."""
    out = {}
    for c in np.unique(new.label):
        at = new.label == c
        bad = None if new.poor is None else new.poor[at]
        out[int(c)] = _flagged(rule, new.top1_prob[at], new.distance[at], bad)
    return out


def card_of(new: HeldOut, classes: list[str], rule: UnknownRule) -> dict[str, Any]:
    """The report card of ``rule``: per class left out, the share of its images flagged."""
    per_class = {classes[c]: round(r, 4) for c, r in _recalls(new, rule).items()}
    worst = min(per_class, key=per_class.get) if per_class else None
    return {
        "per_class": per_class,
        "mean_recall": round(float(np.mean(list(per_class.values()))), 4) if per_class else None,
        "worst": {"class": worst, "recall": per_class[worst]} if worst else None,
    }


def card_at(
    version: ModelVersion, rule: UnknownRule, quality: QualityRule | None = None
) -> dict[str, Any] | None:
    """The report card ``rule`` would have: ``card_of`` the new types training kept.

    Photos judged by ``quality`` (default: the version's bounds). None when the version kept
    none (trained before they were kept, or a class alone).
    """
    try:
        new = load_calibration(version)[1]
    except UserError:
        return None
    if new is None or not len(new.label):
        return None
    new = new.judged_by(quality or QualityRule.of_version(version.meta))
    return card_of(new, version.classes, rule)


def card_words(card: dict[str, Any]) -> str:
    """A report card (``card_of``, meta.json ``open_set``) in words, for the CLI and the app."""
    worst = card["worst"]
    return (
        f"a never-seen type would be {card['mean_recall']:.0%} UNKNOWN on average (each class "
        f"left out in turn; worst {worst['class']!r} {worst['recall']:.0%})"
    )


def report_card(
    embeddings: np.ndarray,
    y: np.ndarray,
    classes: list[str],
    train: np.ndarray,
    val: np.ndarray,
    held: HeldOut,
    refit: Refit,
    confidence: float,
    false_unknown_rate: float,
    poor: np.ndarray | None = None,
    far: tuple[FarFeatures, Mahalanobis] | None = None,
    new: HeldOut | None = None,
) -> tuple[UnknownRule, dict, dict]:
    """Leave each class out in turn; choose the mix; the calibrated rule, its record, the card.

    A class's recall is the share of its training and validation images that the decision,
    calibrated on all held-out images, calls UNKNOWN once the model has never seen the class.
    ``poor`` (all rows, bool): photos of poor quality, UNKNOWN whatever the model says.
    ``far``: as for ``held_out`` (the Mahalanobis distance is refitted without the class).
    ``new``: ``new_types`` of these, when the caller has them already.
    """
    spread_d = _spread(held.distance[~np.isnan(held.distance)])
    spread_u = _spread(1.0 - held.top1_prob)
    scale = spread_d / spread_u if spread_u > 0 else 0.0
    mixes = [0.0] if scale == 0 else [round(m * scale, 6) for m in MIX_GRID]
    rules = [calibrate_rule(held, confidence, false_unknown_rate, m) for m in mixes]
    if new is None:
        new = new_types(embeddings, y, train, val, refit, poor, far)
    by_rule = [_recalls(new, rule) for rule, _ in rules]
    recall = {classes[c]: [r[c] for r in by_rule] for c in by_rule[0]} if by_rule else {}
    means = np.mean(list(recall.values()), axis=0) if recall else np.zeros(len(mixes))
    best = int(np.argmax(means))
    if means[best] < means[0] + MIN_GAIN:
        best = 0
    rule, info = rules[best]
    per_class = {k: round(v[best], 4) for k, v in recall.items()}
    worst = min(per_class, key=per_class.get) if per_class else None
    card = {
        "method": "each class left out in turn: head refitted and reference set without it",
        "per_class": per_class,
        "mean_recall": round(float(means[best]), 4) if recall else None,
        "worst": {"class": worst, "recall": per_class[worst]} if worst else None,
        "mix_tried": {f"{m:.4g}": round(float(r), 4) for m, r in zip(mixes, means, strict=True)},
    }
    return rule, info, card


def against_target(rate: float, n: int, target: float) -> dict:
    """Whether ``rate`` of ``n`` held-out images of known classes flagged is off ``target``.

    A version calibrates on held-out training images and is tested on others; with few of
    them a rate far from the target can be chance (a two-sided binomial test says when it is
    not). Fine-tuned versions can land off target, since their calibration reads phase-1 refits.
    """
    from scipy.stats import binom

    k = int(round(rate * n))
    above, below = float(binom.sf(k - 1, n, target)), float(binom.cdf(k, n, target))
    verdict = "above" if above < OFF_TARGET else "below" if below < OFF_TARGET else "within"
    return {"target": target, "n": n, "flagged": k, "verdict": verdict, "p": min(above, below)}


def off_target_words(off: dict | None) -> str | None:
    """One line for an ``against_target`` record off target; None when within (or none)."""
    if not off or off["verdict"] == "within":
        return None
    more = "more" if off["verdict"] == "above" else "fewer"
    return (
        f"{off['flagged']} of {off['n']} images of known classes are UNKNOWN against a "
        f"{off['target']:.0%} target, {more} than chance explains (p {off['p']:.2g}); "
        "`imagesieve thresholds --preview` shows what other thresholds would mark"
    )


def _refitted(far: tuple[FarFeatures, Mahalanobis], y: np.ndarray, rows: np.ndarray) -> Mahalanobis:
    """The Mahalanobis distance fitted on ``rows`` alone (and their copies), on the version's scale."""
    return far[0].fit(y, rows, scale=far[1].scale)


def _flagged(
    rule: UnknownRule,
    top1_prob: np.ndarray,
    distance: np.ndarray,
    poor: np.ndarray | None = None,
) -> float:
    """Share of the rows ``rule`` calls UNKNOWN."""
    return rule.shares(top1_prob, distance, poor)["unknown"]


def _spread(a: np.ndarray) -> float:
    """Median to 95th percentile: how far the tail of held-out scores reaches."""
    if len(a) == 0:
        return 0.0
    q50, q95 = np.quantile(a, [0.5, 0.95])
    return float(q95 - q50)
