"""``imagesieve score``: any pile of images -> predictions in the store, a report, sorted copies.

Inputs stream through URL fetching (a thread pool), decoding (the engine's pool) and ONNX
inference at once. Content already scored with the model version is recognised by its
SHA-256 before decoding and not stored twice; each chunk of rows is one DuckDB transaction,
so a killed run loses nothing committed and re-running the same command completes it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
import zipfile
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from imagesieve._errors import UserError
from imagesieve._workspace import Workspace
from imagesieve.classifier import (
    INFER_BATCH,
    STORED_ARRAYS,
    STORED_MEASURES,
    UNKNOWN,
    DuplicateRule,
    Prediction,
    Predictor,
    Progress,
    image_shape,
)
from imagesieve.data import ImageLoadError, read_zip_member, sort_into
from imagesieve.ingest._batches import write_batch_report
from imagesieve.ingest._fetch import FetchOptions, fetch_items
from imagesieve.ingest._inputs import ArchiveLimits, InputItem, expand_inputs
from imagesieve.ingest._ray import RayOptions
from imagesieve.ingest._session import ScoringSession
from imagesieve.models import HISTORY_FILE, ModelVersion, get_version, read_history
from imagesieve.search import carry_keep_one, continue_clustering
from imagesieve.store import (
    KEEP_POLICIES,
    ZIP_MEMBER,
    BatchItem,
    Failure,
    IndexCheck,
    Store,
    image_source,
    using_store,
)

log = logging.getLogger(__name__)

__all__ = [
    "HISTORY_FILE",
    "POOR_QUALITY_FOLDER",
    "ScoreOptions",
    "ScoreSummary",
    "describe_history",
    "history_clustering_words",
    "read_history",
    "score_history",
    "score_inputs",
]


#: Where ``--sort-into`` puts photos too poor to judge (beside one folder per label).
POOR_QUALITY_FOLDER = "POOR_QUALITY"
#: Failure kind of files left out on purpose (non-image extensions inside folders and zips).
IGNORED = "ignored"
#: What became of each input (``batch_items.outcome``): stored new, stored again over an earlier
#: prediction, already stored (by an earlier run or earlier in this one), failed; or IGNORED.
SCORED, RESCORED, ALREADY, FAILED = "scored", "rescored", "already_scored", "failed"
#: How many outputs a summary keeps for display.
SHOW = 50
#: Shards' rows the store ingests per transaction at most (a DuckDB row group: 122,880), or
#: what came in this many seconds (bench_ingest.py: 131,072 rows a transaction 2x as fast as
#: 32,768).
INGEST_ROWS, INGEST_SECONDS = 131_072, 30.0
#: Stored rows a head-only retrain re-decides per transaction: ~400 MB of arrays at 1280-d.
#: Fewer, larger transactions checkpoint less (100,000 rows: 33 s at 20,000, 27 s at 50,000).
REDECIDE_CHUNK = 50_000


@dataclass
class ScoreOptions:
    """What ``imagesieve score`` can set."""

    model: str | None = None
    threshold: float | None = None
    distance_threshold: float | None = None
    column: str | None = None
    rescore: bool = False
    retry_failed: bool = False
    csv: str | None = None
    sort_into: str | None = None
    keep_images: str = "unknown"  # which scored images keep a copy in the workspace
    batch_size: int = INFER_BATCH
    commit_rows: int = 256
    commit_seconds: float = 2.0
    fetch: FetchOptions = field(default_factory=FetchOptions)
    #: Folders a list's cells may name files in (None: anywhere; a server's lists: its uploads
    #: and the operator's --allow-paths), and what zip archives may hold.
    local_paths: list[str] | None = None
    archives: ArchiveLimits = field(default_factory=ArchiveLimits)
    #: Score the images stored with this version (their kept copy, else the original file or
    #: zip member) instead of ``inputs``: a new version's view of the history.
    history_of: str | None = None
    #: Score on a Ray cluster (``ingest._ray``) instead of this machine's engine.
    ray: RayOptions | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``from_dict`` reads it back): how a CLI hands its run to a server."""
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> ScoreOptions:
        """The options ``to_dict`` wrote; a field it did not is a UserError."""
        try:
            fetch = doc.get("fetch") or {}
            nested = {
                "fetch": FetchOptions(
                    **fetch | {"allow_networks": tuple(fetch.get("allow_networks") or ())}
                ),
                "archives": ArchiveLimits(**doc.get("archives") or {}),
                "ray": None if doc.get("ray") is None else RayOptions(**doc["ray"]),
            }
            return cls(**doc | nested)
        except TypeError as e:
            raise UserError(f"not score options: {e}") from None


@dataclass
class ScoreSummary:
    """What one run did: counts per label, UNKNOWN reasons, failures, the store's batch id."""

    batch_id: int
    model_version: str
    items: int = 0
    scored: int = 0
    rescored: int = 0
    already_scored: int = 0
    labels: Counter = field(default_factory=Counter)
    unknown_reasons: Counter = field(default_factory=Counter)
    #: Photo quality flags of the images decoded in this run (each such image is UNKNOWN).
    quality_flags: Counter = field(default_factory=Counter)
    poor_quality: int = 0
    failures: list[Failure] = field(default_factory=list)
    ignored: list[tuple[str, str]] = field(default_factory=list)
    shown: list[Prediction] = field(default_factory=list)
    index_checks: list[IndexCheck] = field(default_factory=list)
    csv: str | None = None
    sort_into: str | None = None
    seconds: float = 0.0
    status: str = "running"
    #: Whether the batch departed from the training data: its ``drift_per_batch`` row.
    drift: dict[str, Any] | None = None
    #: Images of this batch that nearly duplicate another stored image (None: not checked).
    near_duplicates: int | None = None
    #: Where a ``--ray`` run scored (``ingest._ray.ray_plan``); None on this machine.
    ray: dict[str, Any] | None = None

    @property
    def unknown(self) -> int:
        """Items labelled UNKNOWN (new or already stored)."""
        return self.labels.get(UNKNOWN, 0)

    def counts(self) -> dict[str, int]:
        """The batch row's counters."""
        return {
            "n_items": self.items,
            "n_scored": self.scored + self.rescored,
            "n_skipped": self.already_scored,
            "n_unknown": self.unknown,
            "n_failed": len(self.failures),
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "batch_id": self.batch_id,
            "model_version": self.model_version,
            "status": self.status,
            "items": self.items,
            "scored": self.scored,
            "rescored": self.rescored,
            "already_scored": self.already_scored,
            "labels": dict(sorted(self.labels.items())),
            "unknown": self.unknown,
            "unknown_reasons": dict(sorted(self.unknown_reasons.items())),
            "poor_quality": self.poor_quality,
            "quality_flags": dict(sorted(self.quality_flags.items())),
            "failed": len(self.failures),
            "failures": [f.__dict__ for f in self.failures],
            "ignored": [{"source": n, "reason": r} for n, r in self.ignored],
            "csv": self.csv,
            "sort_into": self.sort_into,
            "seconds": round(self.seconds, 3),
            "index": [c.__dict__ for c in self.index_checks],
            "drift": self.drift,
            "near_duplicates": self.near_duplicates,
            "ray": self.ray,
            "predictions": [p.to_dict() for p in self.shown],
        }


def _link_duplicates(
    store: Store,
    version: ModelVersion,
    summary: ScoreSummary,
    progress: Progress,
    history_of: ModelVersion | None = None,
) -> int | None:
    """Link the rows stored since the last look to their near-duplicates; this batch's count.

    None when the version has no near-duplicate rule (trained before they were checked).
    ``history_of``: the version whose history this run scored; when both embed alike, the
    candidates it kept stand in for searching its rows again.
    """
    rule = DuplicateRule.of_version(version.meta)
    if rule is None:
        return None
    old = None if history_of is None else DuplicateRule.of_version(history_of.meta)
    like = (
        (history_of.name, old)
        if history_of is not None and old is not None and _same_embeddings(version, history_of)
        else None
    )
    store.duplicates.catch_up(
        version.name,
        rule,
        lambda done, total: progress("finding near-duplicates", done, total),
        like,
    )
    return store.duplicates.in_batch(version.name, summary.batch_id)


def _retry_items(failures: Sequence[Failure]) -> Iterator[InputItem]:
    """Items for recorded failures: URLs, files and zip members, as they were named."""
    for i, f in enumerate(failures):
        m = ZIP_MEMBER.match(f.source)
        if f.source.lower().startswith(("http://", "https://")):
            yield InputItem(i, f.source, None, url=f.source)
        elif m and Path(m["zip"]).is_file():
            try:
                with zipfile.ZipFile(m["zip"]) as zf:
                    data = read_zip_member(zf, zf.getinfo(m["member"]), f.source)
                yield InputItem(i, f.source, data, member=m["member"])
            except (ImageLoadError, KeyError, zipfile.BadZipFile, OSError) as e:
                error = (
                    e
                    if isinstance(e, ImageLoadError)
                    else ImageLoadError(f.source, "missing", f"cannot read zip member ({e})")
                )
                yield InputItem(i, f.source, None, error=error, member=m["member"])
        else:
            yield InputItem(i, f.source, f.source)


def score_history(
    ws: Workspace,
    new: str,
    old: str,
    progress: Progress | None = None,
    *,
    store: Store | None = None,
    predictor: Predictor | None = None,
    who: str | None = None,
    clustering: contextlib.AbstractContextManager | None = None,
) -> dict[str, Any] | None:
    """Score what ``old`` stored with the version ``new``; store and return the before/after diff.

    None (and nothing written) when nothing is stored with ``old``.

    Run after a retrain, so History, Similar, Unknowns and the threshold preview of the new
    version start with yesterday's images, and the operator sees what changed (``Store.
    history_diff``: labels changed, UNKNOWNs resolved, by class and by cluster). Near-
    duplicates a person set aside with ``old`` stay set aside where the new version groups
    them alike (``set_aside``: how many; one ``keep_one`` in the audit log, by ``who``,
    undoable). When ``old``'s UNKNOWNs were clustered, ``new``'s are clustered the same way
    (``continue_clustering``, inside ``clustering``: a server's one-run-at-a-time lock), so
    the loop goes on where it was. The diff goes to ``HISTORY_FILE`` in the new version's
    directory, with the scoring run's counts.
    """
    import json

    version = predictor.version if predictor is not None else get_version(ws, new)
    opts = ScoreOptions(model=version.name, history_of=old)
    with using_store(ws, store) as store:
        if not store.row_count(old):
            return None
        summary = score_inputs(ws, [], opts, progress, store=store, predictor=predictor)
        diff = store.history_diff(old, version.name)
        diff["set_aside"] = carry_keep_one(store, old, version.name, who)
        try:
            with clustering or contextlib.nullcontext():
                run = continue_clustering(ws, version.name, old, store=store, progress=progress)
        except Exception as e:  # the history stands; clustering can be run again by hand
            log.exception("clustering the UNKNOWNs of %s failed", version.name)
            run, diff["clustering"] = None, {"error": str(e) or type(e).__name__}
        if run is not None:
            diff["clustering"] = {
                "run_id": run.run_id,
                "images": run.images,
                "clusters": len(run.clusters),
                "noise": run.noise,
                "continued_from": run.continued_from,
            }
    diff |= {
        "batch_id": summary.batch_id,
        "scored": summary.scored + summary.rescored,
        "already_scored": summary.already_scored,
        "failed": len(summary.failures),
        "seconds": round(summary.seconds, 1),
    }
    path = version.path / HISTORY_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(diff, indent=2))
    tmp.replace(path)
    return diff


def history_clustering_words(h: dict[str, Any]) -> str:
    """How the new version's UNKNOWNs were clustered after its history, in words ("": not)."""
    c = h.get("clustering")
    if not c:  # the old version was never clustered
        return ""
    if c.get("error"):
        return f"UNKNOWNs not clustered ({c['error']}): run `imagesieve cluster`"
    carried = f", continuing {c['continued_from']}'s" if c["continued_from"] else ""
    n = c["clusters"]
    return (
        f"UNKNOWNs clustered as with {h['old']}: {n} cluster{'s' * (n != 1)} among "
        f"{c['images']} images{carried}"
    )


def describe_history(h: dict[str, Any]) -> list[str]:
    """The diff of :func:`score_history` as lines for people: the summary first, then details."""
    lines = [
        f"history: {h['compared']} images stored with {h['old']} scored by {h['new']}: "
        f"{h['changed']} changed label; UNKNOWN {h['unknown_before']} -> {h['unknown_after']}"
    ]
    if h["resolved"]:
        lines.append(
            "UNKNOWNs resolved: " + ", ".join(f"{k} {v}" for k, v in h["resolved"].items())
        )
    for cluster, labels in h["clusters"].items():
        if cluster != "-1":
            now = ", ".join(f"{k} {v}" for k, v in labels.items())
            lines.append(f"cluster {cluster} of {h['old']} is now: {now}")
    if h["new_unknown"]:
        lines.append("newly UNKNOWN: " + ", ".join(f"{k} {v}" for k, v in h["new_unknown"].items()))
    clustered = history_clustering_words(h)
    if clustered:
        lines.append(clustered)
    if h.get("set_aside"):  # a diff stored before keep-one decisions were carried has none
        lines.append(
            f"near-duplicates set aside with {h['old']}, still set aside: {h['set_aside']}"
        )
    return lines


def _redecide_stored(
    ws: Workspace, run: _Run, predictor: Predictor, old: str, progress: Progress
) -> None:
    """Score ``old``'s stored rows with ``predictor``'s version from their stored head inputs.

    When both versions embed with the same untouched backbone (a head-only retrain), an image's
    embedding and head input are what decoding it again would give: only the head, the
    nearest training image, the distance to the training data and the decision are computed,
    REDECIDE_CHUNK rows per transaction (seconds for 100,000 rows). Rows without stored head
    inputs (or without the features the new version's distance reads) are left to decoding.
    """
    import numpy as np
    import pyarrow as pa

    version, store = predictor.version, run.session.store
    old_version = get_version(ws, old)
    if not _same_embeddings(version, old_version):
        return
    total, fresh = store.row_count(old), not store.row_count(version.name)
    copied: list[tuple[np.ndarray, np.ndarray]] = []
    summary = run.summary
    # a fresh version takes over old's index at the end: its vectors are the embeddings
    source = store.indexes.peek(old) if fresh else None
    for rows in store.head_input_chunks(old, version.name, REDECIDE_CHUNK, source):
        probs = predictor.head_probs(rows.embedding, rows.avg_norm, rows.max_pooled)
        if probs is None or (predictor.far is not None and rows.ood is None):
            return
        stored = rows.table.select(["neighbor_id", "neighbor_cosine"]).to_pandas()
        neighbor, cosine = predictor.nearest_since(
            old_version,
            rows.embedding,
            stored["neighbor_id"].fillna(-1).to_numpy(np.int64),
            stored["neighbor_cosine"].to_numpy(np.float32),
            threads=os.cpu_count() or 1,  # one batch job, not a scoring stream per core
        )
        distance = predictor.far_distance(cosine, rows.ood)
        measured = {m: _floats(rows.table.column(m)) for m in STORED_MEASURES}
        measured["min_side"], measured["aspect"] = image_shape(
            _floats(rows.table.column("width")), _floats(rows.table.column("height"))
        )
        flags = (
            predictor.quality_rule.flag_columns(measured)
            if predictor.quality_rule is not None
            else [None] * len(rows.ids)
        )
        poor = np.array([f is not None for f in flags], bool)
        idx, top, reasons, labels = predictor.decide_columns(probs, distance, poor)
        names = np.asarray(predictor.classes, dtype=object)
        n = len(labels)
        columns: dict[str, Any] = {}
        for i in range(3):  # fewer than 3 classes: the missing places are null
            have = i < idx.shape[1]
            columns[f"top{i + 1}_class"] = (
                pa.array(names[idx[:, i]], pa.string()) if have else pa.nulls(n, pa.string())
            )
            columns[f"top{i + 1}_prob"] = (
                pa.array(top[:, i], pa.float32()) if have else pa.nulls(n, pa.float32())
            )
        columns["label"] = pa.array(labels, pa.string())
        columns["reason"] = pa.array(reasons, pa.string())
        columns["neighbor_id"] = pa.array(neighbor, pa.int32())
        columns["neighbor_distance"] = pa.array(distance, pa.float32())
        columns["neighbor_cosine"] = pa.array(cosine, pa.float32())
        columns["quality_flags"] = pa.array(flags, pa.string())
        table = pa.table(columns)
        before = Counter(summary.counts())
        summary.items += n
        summary.scored += n
        summary.labels.update(labels.tolist())
        summary.unknown_reasons.update(r for r in reasons if r)
        delta = Counter(summary.counts())
        delta.subtract(before)
        # a version with no rows yet gets the old index's graph at the end (IndexSet.adopt)
        ids = run.session.write_copied(delta, rows, table, index=not fresh)
        kept = ids >= 0
        skipped = int((~kept).sum())  # stored meanwhile (a server's upload): already scored
        summary.scored -= skipped
        summary.already_scored += skipped
        copied.append((rows.ids[kept], ids[kept]))
        _keep_redecided(ws, run.session, rows.sha256, rows.table.column("source"), labels)
        progress("scoring", summary.items, total)
    if fresh and copied:
        store.indexes.adopt(
            old,
            version.name,
            *(np.concatenate(part) for part in zip(*copied, strict=True)),
            peeked=source,
        )


def _same_embeddings(version: ModelVersion, other: ModelVersion) -> bool:
    """True when both versions embed with the same untouched backbone (a head-only retrain)."""
    return version.frozen_backbone is not None and version.frozen_backbone == other.frozen_backbone


def sort_folder(pred: Prediction) -> str:
    """The ``--sort-into`` folder of a prediction: its label, or POOR_QUALITY for a bad photo.

    A photo too poor to judge goes to be reshot, whatever else its UNKNOWN reason says.
    """
    if pred.quality_flags:  # its reason starts with poor_quality
        return POOR_QUALITY_FOLDER
    return pred.label


def _floats(column: Any) -> Any:
    """An Arrow column as (n,) float64, NaN where null (a measure not taken)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    return pc.fill_null(pc.cast(column, pa.float64()), float("nan")).to_numpy()


def _keep_redecided(
    ws: Workspace, session: ScoringSession, sha256: list[str], sources: Any, labels: Any
) -> None:
    """Keep the images the keep policy wants among re-decided rows (their images are not read).

    Only those not kept yet (images newly UNKNOWN, under the default policy) are read: from
    the original file or zip member, if it is still there with the same content.
    """
    import hashlib

    from imagesieve.store import kept_path, original_source

    # os.path on the kept copy, and no second look for it: a retrain can turn most of a large
    # history UNKNOWN, and pathlib's checks cost 35 us a row (3.4 s for 97,000 rows).
    for sha, source, label in zip(sha256, sources.to_pylist(), labels.tolist(), strict=True):
        if not session.keeps(label) or os.path.isfile(kept_path(ws, sha)):
            continue
        content = original_source(source)
        try:
            data = Path(content).read_bytes() if isinstance(content, str) else content
        except OSError:
            continue
        if data is not None and hashlib.sha256(data).hexdigest() == sha:
            session.keep(sha, data)


def _history_items(ws: Workspace, stored: Sequence[tuple[str, str]]) -> Iterator[InputItem]:
    """Items for stored images, named as first scored, read from their kept copy or origin."""
    for i, (source, sha256) in enumerate(stored):
        content = image_source(ws, sha256, source)
        if content is None:
            error = ImageLoadError(source, "missing", "no kept copy, and the original file is gone")
            yield InputItem(i, source, None, error=error)
        else:
            yield InputItem(i, source, content)


class _Run:
    """The state of one scoring run: pending rows, outputs and counters."""

    def __init__(self, session: ScoringSession, opts: ScoreOptions, summary: ScoreSummary):
        self.session = session
        self.opts = opts
        self.summary = summary
        self.this_run: dict[str, Prediction] = {}
        self.new: list[Prediction] = []
        self.rescored: list[Prediction] = []
        self.failures: list[Failure] = []
        self.items: list[BatchItem] = []
        self.lookup: list[tuple[InputItem, Prediction]] = []
        self.last_commit = time.monotonic()

    def skip(self, sha256: str) -> bool:
        """Engine hook: content already stored (or scored earlier in this run) is not decoded."""
        return not self.opts.rescore and (self.session.stored(sha256) or sha256 in self.this_run)

    def handle(self, batch: list[tuple[InputItem, Prediction]]) -> None:
        """Route one engine batch into pending rows and outputs."""
        for item, pred in batch:
            self.summary.items += 1
            outcome = ALREADY
            if pred.skipped:
                earlier = self.this_run.get(pred.sha256)
                self.summary.already_scored += 1
                if earlier is None:  # stored by an earlier run: its row is read at commit
                    self.lookup.append((item, pred))
                    self._item(item, pred, outcome)
                    continue
                pred = _copy_for(item.name, earlier)
            elif not pred.ok:
                outcome = FAILED
                self.failures.append(
                    Failure(item.name, pred.error_kind or "error", pred.error or "")
                )
                self.summary.failures.append(self.failures[-1])
            elif pred.sha256 in self.this_run:  # same content twice in one run
                pred = _copy_for(item.name, self.this_run[pred.sha256])
                self.summary.already_scored += 1
            else:
                self.this_run[pred.sha256] = pred
                if self.session.stored(pred.sha256):
                    outcome = RESCORED
                    self.rescored.append(pred)
                    self.summary.rescored += 1
                else:
                    outcome = SCORED
                    self.new.append(pred)
                    self.summary.scored += 1
            self._item(item, pred, outcome)
            self._output(item, pred)
        pending = len(self.new) + len(self.rescored) + len(self.failures) + len(self.lookup)
        if (
            pending >= self.opts.commit_rows
            or time.monotonic() - self.last_commit >= self.opts.commit_seconds
        ):
            self.commit()

    def _item(self, item: InputItem, pred: Prediction, outcome: str) -> None:
        """Keep the batch's record of one input: where it was, what became of it, its sheet row.

        Not for a version's view of the history, whose report lists the rows it stored.
        """
        if self.opts.history_of is not None:
            return
        error = None
        if outcome == FAILED:
            error = f"{pred.error_kind or 'error'}: {pred.error or ''}".rstrip(": ")
        self.items.append(
            BatchItem(item.index, item.name, outcome, pred.sha256 or None, error, item.row)
        )

    def ignore(self, ignored: Sequence[tuple[str, str]]) -> None:
        """Record files left out on purpose (after the scored items, in the order met)."""
        for k, (name, reason) in enumerate(ignored):
            self.failures.append(Failure(name, IGNORED, reason))
            seq, error = self.summary.items + k, f"{IGNORED}: {reason}"
            self.items.append(BatchItem(seq, name, IGNORED, error=error))

    def _output(self, item: InputItem, pred: Prediction) -> None:
        if pred.ok:
            self.summary.labels[pred.label] += 1
            if pred.label == UNKNOWN and pred.reason:
                self.summary.unknown_reasons[pred.reason] += 1
            if pred.quality_flags:
                self.summary.poor_quality += 1
                self.summary.quality_flags.update(pred.quality_flags)
        if len(self.summary.shown) < SHOW:
            self.summary.shown.append(pred)
        if pred.ok and item.source is not None:
            keeping = self.session.keeps(pred.label)
            if not (self.opts.sort_into or keeping):
                return
            content = item.content()  # a zip member is read again: only now is it needed
            if self.opts.sort_into:
                folder = sort_folder(pred)
                sort_into(self.opts.sort_into, folder, item.filename, content, pred.sha256)
            if keeping:
                self.session.keep(pred.sha256, content)

    def commit(self) -> None:
        """Write pending rows in one transaction (the session's); the batch's counters with them.

        Items already stored by earlier runs get their outputs here, from one lookup.
        """
        if self.lookup:
            rows = self.session.store.rows_by_content(
                self.session.version, [p.sha256 for _, p in self.lookup]
            )
            for item, pred in self.lookup:
                self._output(item, rows[pred.sha256].to_prediction(item.name))
            self.lookup = []
        if self.new or self.rescored or self.failures or self.items:
            delta = Counter(self.summary.counts())
            delta.subtract(self.session.counts)
            self.session.write(
                delta,
                new=self.new,
                rescored=self.rescored,
                failures=self.failures,
                items=self.items,
            )
            for p in self.new + self.rescored:  # stored now: keep only what reports need
                for name in STORED_ARRAYS:
                    setattr(p, name, None)
        self.new, self.rescored, self.failures, self.items = [], [], [], []
        self.last_commit = time.monotonic()


def _copy_for(name: str, pred: Prediction) -> Prediction:
    """The prediction of identical content, reported under another source name."""
    from dataclasses import replace

    return replace(pred, source=name, skipped=True, **dict.fromkeys(STORED_ARRAYS))


def _shard_folder(opts: ScoreOptions, batch_id: int) -> Path | None:
    """Where a ``--ray-shards`` run's actors write its shards (None: no shards)."""
    if opts.ray is None or opts.ray.shards is None:
        return None
    return Path(opts.ray.shards) / f"batch-{batch_id}"


def _score_sharded(
    predictor: Predictor,
    items: Iterator[InputItem],
    opts: ScoreOptions,
    run: _Run,
    progress: Progress,
    folder: Path,
) -> None:
    """Score on Ray with actors writing Parquet shards in ``folder``, stored whole, in bulk.

    No item passes through the driver one by one: each shard is one transaction (exactly once
    by content, its failures and batch items with it), the index catches up from DuckDB at the
    end, and the run's counts come from the store.
    """
    from imagesieve.ingest._ray import ray_batches, ray_plan, ray_session

    session, summary = run.session, run.summary
    store, version = session.store, session.version
    stored = store.stored_content(version)
    with ray_session(opts.ray) as ray:
        summary.ray = ray_plan(ray, opts.ray)
        actors = summary.ray["actors"]
        wants = (session.keep_policy, False)
        pending: list[dict[str, Any]] = []
        last = time.monotonic()

        def ingest() -> None:
            got = store.ingest_shards(
                summary.batch_id, version, [p["path"] for p in pending], session.counts
            )
            session.counts.update(got.counts())
            session.join_clusters(got.unknown_ids, got.unknown_vectors)
            summary.items += got.items
            summary.scored += got.scored
            summary.already_scored += got.already_scored
            for shard in pending:
                for sha256, content in shard["kept"]:
                    session.keep(sha256, content)
                Path(shard["path"]).unlink()
            pending.clear()
            progress("scoring", summary.items, 0)

        for shard in ray_batches(
            ray, predictor, items, stored, opts.ray, opts.fetch, wants, actors, folder
        ):
            pending.append(shard)
            summary.shown.extend(shard["shown"][: SHOW - len(summary.shown)])
            rows = sum(p["rows"] for p in pending)
            if rows >= INGEST_ROWS or time.monotonic() - last >= INGEST_SECONDS:
                ingest()
                last = time.monotonic()
        if pending:
            ingest()
    store.indexes.check(version)  # the shards' rows join the index in bulk
    outputs = store.batch_outputs(summary.batch_id)
    summary.labels, summary.unknown_reasons = outputs["labels"], outputs["reasons"]
    summary.quality_flags = outputs["quality_flags"]
    summary.poor_quality = outputs["poor_quality"]["images"]
    summary.failures = store.batch_failures(summary.batch_id)


def _scored(
    predictor: Predictor, items: Iterator[InputItem], opts: ScoreOptions, run: _Run
) -> Iterator[list[tuple[InputItem, Prediction]]]:
    """Each item paired with its prediction, a group at a time: here, or on Ray (``opts.ray``)."""
    if opts.ray is not None:
        from imagesieve.ingest._ray import ray_batches, ray_plan, ray_session

        store, version = run.session.store, run.session.version
        stored = [] if opts.rescore else store.stored_content(version)
        wants = (run.session.keep_policy, bool(opts.sort_into))
        with ray_session(opts.ray) as ray:
            run.summary.ray = ray_plan(ray, opts.ray)
            actors = run.summary.ray["actors"]
            yield from ray_batches(
                ray, predictor, items, stored, opts.ray, opts.fetch, wants, actors
            )
        return
    queue: deque[InputItem] = deque()

    def feed() -> Iterator[tuple[str, Any]]:
        for item in fetch_items(items, opts.fetch):
            queue.append(item)
            yield item.name, item.error if item.error is not None else item.source

    for batch in predictor.score_batches(feed(), skip=run.skip):
        yield [(queue.popleft(), pred) for pred in batch]


def score_inputs(
    ws: Workspace,
    inputs: Sequence[str],
    opts: ScoreOptions | None = None,
    progress: Progress | None = None,
    *,
    store: Store | None = None,
    predictor: Predictor | None = None,
) -> ScoreSummary:
    """Score files, folders, zips, CSV/XLSX lists and URLs into the store; returns the summary.

    Raises InputError before anything is stored when an input is unusable as a whole. A server
    passes its long-lived ``store`` and ``predictor``; otherwise both are opened for the run.
    """
    opts = opts or ScoreOptions()
    if opts.keep_images not in KEEP_POLICIES:
        raise UserError(
            f"keep-images must be one of {', '.join(KEEP_POLICIES)}, got {opts.keep_images!r}"
        )
    if opts.ray is not None and opts.ray.shards is not None and (opts.sort_into or opts.rescore):
        raise UserError(
            "--ray-shards stores in bulk and does not --sort-into or --rescore: leave it out"
        )
    progress = progress or (lambda stage, done, total: None)
    t0 = time.perf_counter()
    version = predictor.version if predictor is not None else get_version(ws, opts.model)
    if version.meta.get("kind") != "trained":
        raise UserError(
            f"{version.name} is not a trained version; only trained versions are stored"
        )
    if predictor is None:
        predictor = Predictor(
            version,
            threshold=opts.threshold,
            distance_threshold=opts.distance_threshold,
            batch_size=opts.batch_size,
        )
    expander = None
    if opts.history_of is not None and opts.retry_failed:
        raise UserError("score either the history of a version or the failures, not both")
    if not opts.retry_failed and opts.history_of is None:
        expander = expand_inputs(
            inputs, column=opts.column, local_paths=opts.local_paths, archives=opts.archives
        )
    with using_store(ws, store) as store:
        if predictor.reference is not None:
            store.register_version(
                version.name,
                predictor.reference.sources,
                predictor.reference.labels,
                version.drift_reference,
            )
        if opts.history_of is not None:
            items: Iterator[InputItem] = iter(())  # after the rows re-decided without decoding
            asked = [f"history of {opts.history_of} ({store.row_count(opts.history_of)} images)"]
        elif opts.retry_failed:
            retry = store.unresolved_failures()
            items = _retry_items(retry)
            asked = [f.source for f in retry]
        else:
            items = expander.items()
            asked = list(inputs)
        options = {
            "threshold": predictor.threshold,
            "distance_threshold": predictor.distance_threshold,
            "rescore": opts.rescore,
            "retry_failed": opts.retry_failed,
            "history_of": opts.history_of,
            "column": opts.column,
            "csv": opts.csv,
            "sort_into": opts.sort_into,
        }
        session = ScoringSession.begin(store, version.name, asked, options, keep=opts.keep_images)
        summary = ScoreSummary(session.batch_id, version.name)
        summary.index_checks = store.indexes.checks
        summary.csv, summary.sort_into = opts.csv, opts.sort_into
        run = _Run(session, opts, summary)
        if opts.history_of is not None:  # content stored with both counts as already scored
            done = store.row_count(opts.history_of) - len(
                store.stored_images(opts.history_of, missing_from=version.name)
            )
            summary.items += done
            summary.already_scored += done
            _redecide_stored(ws, run, predictor, opts.history_of, progress)
            items = _history_items(
                ws, store.stored_images(opts.history_of, missing_from=version.name)
            )
        shards = _shard_folder(opts, summary.batch_id)
        try:
            if shards is not None:
                _score_sharded(predictor, items, opts, run, progress, shards)
            else:
                for group in _scored(predictor, items, opts, run):
                    run.handle(group)
                    progress("scoring", summary.items, 0)
            if expander is not None:
                summary.ignored = list(expander.ignored)
                run.ignore(summary.ignored)
            run.commit()
            if shards is not None:  # stored: a re-run writes its own
                shutil.rmtree(shards, ignore_errors=True)
            summary.near_duplicates = _link_duplicates(
                store,
                version,
                summary,
                progress,
                None if opts.history_of is None else get_version(ws, opts.history_of),
            )
            summary.status = "done"
        finally:
            if summary.status != "done":
                summary.status = "interrupted"
                try:
                    run.commit()
                except Exception:  # the original error matters more than a failed final write
                    pass
            summary.seconds = time.perf_counter() - t0
            session.finish(summary.status, summary.counts())
            drift = store.drift("batch", summary.batch_id, limit=1)
            summary.drift = drift[0] if drift else None
            if opts.csv:  # the store's report of the batch: its inputs in order
                Path(opts.csv).parent.mkdir(parents=True, exist_ok=True)
                with open(opts.csv, "wb") as f:
                    write_batch_report(ws, summary.batch_id, f, store=store)
    return summary
