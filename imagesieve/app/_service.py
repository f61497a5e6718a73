"""The served workspace: one long-lived store and model behind the Gradio app and the REST API.

DuckDB allows one writing process, so the server owns the store and every request goes
through it. Single predictions (the API's ``/predict``, the app's Predict tab) are decoded on
the service's decode threads, then micro-batched: inference streams take whatever requests are
waiting and run them as one ONNX batch; the writer stores each group with one synced append to
the store's journal, answers it, and folds the journal into DuckDB every second, so 16 clients
cost little more than one batch job (measured in ``bench/bench_api.py``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import logging
import os
import queue
import re
import shutil
import threading
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from imagesieve._errors import SieveError, UserError, require_full_install
from imagesieve._workspace import Workspace
from imagesieve.classifier import (
    UNKNOWN,
    DuplicateRule,
    EngineResult,
    Prediction,
    Predictor,
    Progress,
    TrainOptions,
    confusion_counts,
    grad_cam,
    read_audit,
    train_model,
    unknown_now,
)
from imagesieve.ingest import (
    ArchiveLimits,
    FetchOptions,
    ScoreOptions,
    ScoreSummary,
    ScoringSession,
    batch_detail,
    batch_report,
    drift_history,
    list_batches,
    read_history,
    score_history,
    score_inputs,
)
from imagesieve.models import (
    ModelVersion,
    active_stamp,
    active_version,
    get_version,
    list_versions,
)
from imagesieve.search import (
    TRADEOFF_RATES,
    ClusterParams,
    activate_model,
    apply_thresholds,
    audit_log,
    browse_images,
    class_folder,
    compute_map,
    exclude_images,
    find_similar,
    fix_training_labels,
    keep_one,
    label_suspects,
    list_clusters,
    list_duplicates,
    map_points,
    nearest_stored,
    promote_cluster,
    record_activation,
    relabel_images,
    run_clustering,
    threshold_counts,
    threshold_tradeoff,
    thresholds_for_target,
    training_folder,
    undo_action,
    update_cluster,
)
from imagesieve.store import Failure, Store, image_source, run_store_sql

__all__ = ["Limits", "PredictResult", "Service", "ServiceError"]

log = logging.getLogger(__name__)

#: Images a single prediction's response lists as its nearest stored neighbours.
NEIGHBOURS = 5
#: Where uploads land inside the workspace, one folder per upload.
UPLOADS = "uploads"
#: Requests one inference stream takes at once. ONNX costs the same per image at batch 1 as at
#: 32 on one thread (measured), so small batches lose nothing, and a burst is shared out
#: between the streams instead of one stream taking it all while the other idles.
MAX_BATCH = 8
#: Scored requests the writer stores in one transaction at most.
MAX_GROUP = 256
#: How often the live serve batch's counters are stored with a commit (s).
COUNTS_EVERY = 2.0
#: How long the writer lets a group of scored requests grow while more are in flight (s).
GROUP_WAIT = 0.15
#: The share of the requests in flight a group grows to (within GROUP_WAIT).
GROUP_SHARE = 0.5
#: How often the writer folds the journaled groups into DuckDB (s): one transaction then costs
#: about what one group's did, for all of them.
FOLD_EVERY = 1.0
#: Untrusted SQL (``/sql``, ``similar`` filters) on the served store: DuckDB's buffer memory
#: and threads (one thread: a query runs on its caller, a low-priority thread, so predictions
#: keep the cores), the result size, and the growth of the process at which a query is stopped.
SQL_SETTINGS = {"memory_limit": "256MB", "threads": 1}
SQL_MAX_RESULT_BYTES = 64 * 2**20
SQL_MAX_MEMORY = 384 * 2**20
SQL_TIMEOUT = 10.0
#: Niceness of the threads that run untrusted SQL (Linux schedules threads by their own nice).
SQL_NICE = 19


#: Longest side of the Review grid's thumbnails, in pixels.
THUMB_SIDE = 160


def _logged(fn: Any, what: str) -> Any:
    """``fn`` for a background thread: its failure is logged with the traceback, not lost."""

    def run() -> None:
        try:
            fn()
        except Exception:
            log.exception("%s failed", what)

    return run


class ServiceError(SieveError, ValueError):
    """A request the service cannot do (no model yet, bad input); its message is one line.

    ``kind`` says which, for the doors that answer it: ``bad_request`` (the default),
    ``no_model``, ``too_large`` (over a limit) or ``stopping`` (the server is shutting down).
    """


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server: upload sizes, what its lists and zips may reach.

    Bytes per file, files and bytes per request; image members and inflated bytes its zip
    archives may hold (per archive and per request); the networks (CIDRs) beyond the public
    internet and the local folders that its URL lists may name (none by default).
    """

    max_file_bytes: int = 50 * 2**20
    max_files: int = 1000
    max_request_bytes: int = 1024 * 2**20
    max_members: int = 10_000
    max_inflated_bytes: int = 2 * 2**30
    allow_fetch: tuple[str, ...] = ()
    allow_paths: tuple[str, ...] = ()

    def __post_init__(self):
        FetchOptions(allow_networks=self.allow_fetch)  # raises for a bad CIDR
        for folder in self.allow_paths:
            if not os.path.isdir(folder):
                raise UserError(f"--allow-paths {folder}: no such folder")


@dataclass
class PredictResult:
    """One image scored and stored, with its nearest stored neighbours."""

    prediction: Prediction
    neighbours: list[dict[str, Any]] = field(default_factory=list)
    model_version: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "model_version": self.model_version,
            **self.prediction.to_dict(),
            "already_stored": self.prediction.skipped,
            "neighbours": self.neighbours,
            "seconds": round(self.seconds, 4),
        }


#: Most folder levels an uploaded file's name keeps (``site/2026-12/meter.jpg``).
MAX_UPLOAD_DEPTH = 8


def safe_relative_path(name: str) -> str:
    """An upload's name with its sub-folders kept, each part a safe file name.

    Never absolute and never above the upload folder (``..`` and empty parts are dropped).
    """
    parts = [p for p in re.split(r"[\\/]", name or "") if p.strip(" .")]
    parts = [safe_filename(p) for p in parts][-(MAX_UPLOAD_DEPTH + 1) :]
    return "/".join(parts) or "upload"


def _parents(path: str) -> list[str]:
    """The folders a relative path lies in: ``a/b/c.png`` -> ``a``, ``a/b``."""
    parts = path.split("/")
    return ["/".join(parts[:k]) for k in range(1, len(parts))]


def safe_filename(name: str) -> str:
    """A display/file name without directories or odd characters ('upload' if nothing is left)."""
    base = re.split(r"[\\/]", name or "")[-1]
    base = re.sub(r"[^\w.\- ]+", "_", base).strip(" .")
    return base[:120] or "upload"


@dataclass
class _Pending:
    predictor: Predictor
    result: EngineResult
    x: np.ndarray
    store: bool = True
    neighbours: int = NEIGHBOURS
    future: Future = field(default_factory=Future)


class _MicroBatcher:
    """Inference streams batching whatever requests wait, and one writer committing them.

    Each stream takes the waiting requests (up to MAX_BATCH) as one ONNX batch and moves on;
    the writer takes every scored request waiting (group commit), stores them with one journal
    append, finds their neighbours in one search, and answers them. While more requests are in
    flight it lets a group grow until it holds half of them (for up to GROUP_WAIT seconds): a
    neighbour search costs about as much for one request as for 32, so a busy server stores in
    fewer, larger groups, while the other half keeps the inference streams busy. A lone request
    is never held. Every FOLD_EVERY seconds the writer folds the journal into DuckDB.
    """

    def __init__(self, service: Service, streams: int):
        self.service = service
        self.queue: queue.Queue[_Pending | None] = queue.Queue()
        self.in_flight = 0  # accepted by the service (decoding included), not yet answered
        self._count = threading.Lock()
        self.scored: queue.Queue[tuple[_Pending, Prediction] | None] = queue.Queue()
        self.streams = [
            threading.Thread(target=self._infer, name=f"imagesieve-infer-{i}", daemon=True)
            for i in range(streams)
        ]
        self.writer = threading.Thread(target=self._write, name="imagesieve-writer", daemon=True)
        for t in [*self.streams, self.writer]:
            t.start()

    def accepted(self, answer: Future) -> None:
        """Count a request from its arrival until ``answer`` is resolved, whichever way."""
        with self._count:
            self.in_flight += 1
        answer.add_done_callback(self._answered)

    def _answered(self, _: Future) -> None:
        with self._count:
            self.in_flight -= 1

    def submit(self, pending: _Pending) -> Future:
        self.queue.put(pending)
        return pending.future

    def close(self) -> None:
        for _ in self.streams:
            self.queue.put(None)
        for t in self.streams:
            t.join(timeout=30)
        self.scored.put(None)
        self.writer.join(timeout=30)

    @staticmethod
    def _drain(q: queue.Queue, first: Any, limit: int) -> tuple[list, bool]:
        """``first`` plus whatever else waits in ``q`` (up to ``limit``); True when closing."""
        items = [first]
        while len(items) < limit:
            try:
                nxt = q.get_nowait()
            except queue.Empty:
                break
            if nxt is None:
                return items, True
            items.append(nxt)
        return items, False

    def _infer(self) -> None:
        while (first := self.queue.get()) is not None:
            batch, closing = self._drain(self.queue, first, MAX_BATCH)
            for predictor, group in _by_predictor(batch, lambda p: p.predictor):
                try:
                    results = predictor.engine.forward_prepared([(p.result, p.x) for p in group])
                    preds = predictor.predictions(results)
                except BaseException as e:  # every waiting request gets the error
                    log.exception("prediction batch failed")
                    _fail(group, e)
                    continue
                for p, pred in zip(group, preds, strict=True):
                    self.scored.put((p, pred))
            if closing:
                return

    def _next_scored(self) -> tuple[_Pending, Prediction] | None:
        """The next scored request; while none comes, journaled groups are folded when due."""
        while True:
            try:
                return self.scored.get(timeout=FOLD_EVERY)
            except queue.Empty:
                self.service._fold()

    def _write(self) -> None:
        while (first := self._next_scored()) is not None:
            done, closing = self._drain(self.scored, first, MAX_GROUP)
            deadline = time.monotonic() + GROUP_WAIT
            while not closing and len(done) < min(
                MAX_GROUP, int((self.in_flight + 1) * GROUP_SHARE)
            ):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    nxt = self.scored.get(timeout=left)
                except queue.Empty:
                    break
                if nxt is None:
                    closing = True
                else:
                    done.append(nxt)
            for predictor, group in _by_predictor(done, lambda d: d[0].predictor):
                pending = [p for p, _ in group]
                preds = [pred for _, pred in group]
                try:
                    self.service._store_new(predictor, [pred for p, pred in group if p.store])
                    near = self.service._neighbours_of(
                        predictor.version.name, preds, [p.neighbours for p in pending]
                    )
                except BaseException as e:
                    log.exception("storing predictions failed")
                    _fail(pending, e)
                    continue
                for p, pred, nb in zip(pending, preds, near, strict=True):
                    p.future.set_result((pred, nb))
            if self.service.store.fold_due(FOLD_EVERY):
                self.service._fold()
            if closing:
                return


def _lower_priority() -> None:
    """Run this thread at SQL_NICE (per thread on Linux); elsewhere a no-op."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), SQL_NICE)
    except (AttributeError, OSError):
        log.debug("cannot lower the priority of the SQL threads")


def _by_predictor(items: list, predictor_of: Any) -> list[tuple[Predictor, list]]:
    """Items grouped by the predictor (model version) they were prepared for, in order."""
    groups: dict[int, tuple[Predictor, list]] = {}
    for item in items:
        predictor = predictor_of(item)
        groups.setdefault(id(predictor), (predictor, []))[1].append(item)
    return list(groups.values())


def _fail(pending: list[_Pending], e: BaseException) -> None:
    for p in pending:
        if not p.future.done():
            p.future.set_exception(e)


class Service:
    """A workspace served: store, active model, predictions, search, SQL, clusters, training.

    One instance per server process; every method is safe to call from request threads.
    """

    def __init__(self, ws: Workspace, *, limits: Limits | None = None, streams: int | None = None):
        self.ws = ws
        self.limits = limits or Limits()
        self.store = Store(ws)
        self.store.configure(SQL_SETTINGS)
        # Untrusted SQL runs here, niced: a slow query waits for the CPU instead of predictions.
        self._sql = ThreadPoolExecutor(
            2, thread_name_prefix="imagesieve-sql", initializer=_lower_priority
        )
        self._state = threading.RLock()  # guards the model and its live session
        self.predictor: Predictor | None = None
        self._session: ScoringSession | None = None  # the live batch of single predictions
        self.started = time.time()
        self._training = threading.Lock()
        self._clustering = threading.Lock()
        self.clustering_status: dict[str, Any] = {"running": False}
        self.training_status: dict[str, Any] = {"running": False}
        self._active = active_stamp(ws)
        self._switch = threading.Lock()
        version = active_version(ws)
        if version is not None and version.meta.get("kind") == "trained":
            self._use(version)
        self._decode = ThreadPoolExecutor(
            os.cpu_count() or 1, thread_name_prefix="imagesieve-decode"
        )
        self._batcher = _MicroBatcher(self, streams or os.cpu_count() or 1)
        # Thumbnails are made two at a time (decoding releases the GIL), niced like SQL.
        self._mapping = threading.Lock()
        self.map_status: dict[str, Any] = {"running": False}
        self._thumbs = ThreadPoolExecutor(
            2, thread_name_prefix="imagesieve-thumbs", initializer=_lower_priority
        )
        self._upgrade: threading.Thread | None = None  # builds an outgrown index's HNSW
        #: Set when the server begins to stop: long work a CLI asked for ends at its next step.
        self.stopping = threading.Event()

    # -- lifecycle -------------------------------------------------------------------------
    def close(self) -> None:
        """Finish the live batch, save the vector indexes, close the store."""
        self._decode.shutdown(wait=True)
        self._sql.shutdown(wait=True, cancel_futures=True)
        self._thumbs.shutdown(wait=True, cancel_futures=True)
        self._batcher.close()
        if self._upgrade is not None:
            self._upgrade.join()
        with self._state:
            self._finish_session()
        self.store.close()

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _finish_session(self) -> None:
        if self._session is not None:
            self._session.finish()
            self.store.indexes.save()
            self._session = None

    def _use(self, version: ModelVersion) -> None:
        """Serve ``version``: load its predictor; the live batch of the old one ends."""
        predictor = Predictor(version, batch_size=MAX_BATCH)  # batches of 8 here too: memory
        if predictor.reference is not None:
            self.store.register_version(
                version.name,
                predictor.reference.sources,
                predictor.reference.labels,
                version.drift_reference,
            )
        with self._state:
            self._finish_session()
            self.predictor = predictor

    def follow_active(self) -> None:
        """Serve the version made active meanwhile by another process (``models --activate``).

        Polls the active-version marker (one stat); the request that notices loads it.
        """
        stamp = active_stamp(self.ws)
        if stamp == self._active:
            return
        with self._switch:
            if stamp == self._active:
                return
            version = active_version(self.ws)
            current = self.predictor.version.name if self.predictor else None
            if version is not None and version.meta.get("kind") == "trained":
                if version.name != current:
                    log.info("serving %s: it was made active outside this server", version.name)
                    self._use(version)
                    record_activation(self.store, version.name, current, "outside the server")
                    if current is not None:
                        self._score_history_later(current)
            self._active = stamp

    def _score_history_later(self, old: str) -> None:
        """Score ``old``'s stored images with the version now served, in the background.

        For a version trained outside the server (``imagesieve train`` while it runs could
        not reach the store): it serves with the history scored, as a retrain here does.
        Nothing when it has stored images already (it was served before) or ``old`` has none;
        ``training_status`` shows the progress, as for a retrain.
        """
        predictor = self.predictor
        new = predictor.version.name
        if self.store.row_count(new) or not self.store.row_count(old):
            return
        # A job that has just published its end may not have let go yet: wait a moment for it
        # (a retrain that is really running scores its own version's history).
        if not self._training.acquire(timeout=2):
            log.warning("%s's history not scored: a training run is going", new)
            return
        stage = f"scoring the images stored with {old}"
        progress = self._training_progress()

        def run() -> None:
            try:
                score_history(
                    self.ws,
                    new,
                    old,
                    progress,
                    store=self.store,
                    predictor=predictor,
                    clustering=self._clustering,
                )
                self.reload_clusters()
                self.training_status = {"running": False, "version": new}
            except Exception as e:
                self.training_status = {"running": False, "error": f"{stage}: {e}"}
                raise
            finally:
                self._training.release()

        self.training_status = {"running": True, "version": new, "stage": stage}
        threading.Thread(target=_logged(run, stage), daemon=True).start()

    def reload_clusters(self) -> None:
        """Re-read the live batch's clusters (after a clustering run or a review action)."""
        with self._state:
            if self._session is not None:
                self._session.reload_clusters()

    @property
    def version(self) -> ModelVersion:
        """The active, trained model version, or ServiceError saying how to get one."""
        if self.predictor is None:
            raise ServiceError(
                f"no trained model in {self.ws.root}: run 'imagesieve train DATA_DIR' or 'imagesieve demo'",
                "no_model",
            )
        return self.predictor.version

    def _live(self, version: str) -> ScoringSession:
        """The scoring session of the version's uploads (one batch), begun on first use.

        Every upload stored is kept (to be shown); new rows go through the store's journal and
        the batch's counters are stored with them every COUNTS_EVERY seconds.
        """
        with self._state:
            if self._session is None or self._session.version != version:
                self._finish_session()
                self._session = ScoringSession.begin(
                    self.store,
                    version,
                    ["serve"],
                    {"via": "app/api"},
                    keep="all",
                    journal=True,
                    counts_every=COUNTS_EVERY,
                )
            return self._session

    # -- single predictions ----------------------------------------------------------------
    def predict(
        self,
        data: bytes,
        name: str = "upload",
        *,
        neighbours: int = NEIGHBOURS,
        store: bool = True,
    ) -> PredictResult:
        """Score one uploaded image, store it (and keep its bytes), return it with neighbours.

        Content already stored with the active model comes back from the store, not re-scored.
        A file that is not a usable image raises ``ImageLoadError`` after its failure is stored.
        ``store=False`` (live camera frames) scores without storing anything.
        """
        return self.predict_async(data, name, neighbours=neighbours, store=store).result()

    def predict_async(
        self,
        data: bytes,
        name: str = "upload",
        *,
        neighbours: int = NEIGHBOURS,
        store: bool = True,
    ) -> Future:
        """``predict`` without blocking the caller: a Future of its PredictResult (or error).

        The image is decoded on the service's own decode threads (one per core), so an event
        loop can await many requests without a thread parked on each.
        """
        t0 = time.perf_counter()
        self.follow_active()
        predictor = self.predictor
        if predictor is None:
            self.version  # noqa: B018 - raises the one-line "no model" error
        if len(data) > self.limits.max_file_bytes:
            raise ServiceError(
                f"{name}: {len(data):,} bytes is over the {self.limits.max_file_bytes:,}-byte upload limit",
                "too_large",
            )
        out: Future = Future()
        self._batcher.accepted(out)
        job = (out, predictor, data, f"upload:{safe_filename(name)}", neighbours, store, t0)
        try:
            self._decode.submit(self._predict_prepared, *job)
        except RuntimeError as e:  # shutting down
            out.set_exception(ServiceError(f"the server is stopping: {e}", "stopping"))
        return out

    def _predict_prepared(
        self,
        out: Future,
        predictor: Predictor,
        data: bytes,
        source: str,
        neighbours: int,
        store: bool,
        t0: float,
    ) -> None:
        """Decode one image (decode thread), then answer from the store or queue it to score."""
        version = predictor.version.name

        def answer(pred: Prediction, near: list[dict[str, Any]]) -> None:
            out.set_result(PredictResult(pred, near, version, time.perf_counter() - t0))

        try:
            result, x = predictor.engine.prepare(
                (source, data),
                skip=(lambda sha: self.store.has_content(version, sha)) if store else None,
            )
            if result.skipped:
                row = self.store.rows_by_content(version, [result.sha256])[result.sha256]
                pred = row.to_prediction(source)
                answer(pred, [r.to_dict() for r in self.similar(id=pred.id, k=neighbours)[1]])
                return
            if result.error is not None:
                if store:
                    failed = Failure(source, result.error.kind, result.error.reason)
                    self._live(version).write(Counter(n_items=1, n_failed=1), failures=[failed])
                raise result.error
            if store:  # kept by content before it is stored: every stored upload can be shown
                try:
                    self._live(version).keep(result.sha256, data)
                except OSError as e:
                    log.exception("keeping %s failed", source)
                    raise ServiceError(
                        f"{source}: cannot keep the upload in the workspace ({e.strerror or e})"
                    ) from e
            scored = self._batcher.submit(_Pending(predictor, result, x, store, neighbours))

            def done(f: Future) -> None:
                if f.exception() is not None:
                    out.set_exception(f.exception())
                else:
                    answer(*f.result())

            scored.add_done_callback(done)
        except BaseException as e:  # the caller gets the error; the service carries on
            out.set_exception(e)

    def _store_new(self, predictor: Predictor, preds: Sequence[Prediction]) -> None:
        """Store one group of fresh predictions through the journal (the writer thread)."""
        version = predictor.version.name
        unknown = sum(p.label == UNKNOWN for p in preds)
        # uploads are not re-run: no earlier failure to resolve
        delta = Counter(n_items=len(preds), n_scored=len(preds), n_unknown=unknown)
        self._live(version).write(delta, new=preds)
        self._upgrade_soon(version)

    def _fold(self) -> None:
        """Fold the journaled groups into DuckDB (the writer thread); a failure waits for the next.

        The folded rows are then linked to their near-duplicates, as a scoring batch's are.
        """
        try:
            folded = self.store.fold()
        except Exception:  # the rows stay in the journal and in memory; the next fold retries
            log.exception("moving journaled rows into the store failed")
            return
        if not folded:  # an idle tick: nothing new to link
            return
        try:
            version = self.version
            self.store.duplicates.catch_up(version.name, DuplicateRule.of_version(version.meta))
        except Exception:  # the next fold, batch or listing links them
            log.exception("linking near-duplicates failed")

    def _upgrade_soon(self, version: str) -> bool:
        """Upkeep of the version's index on a thread: HNSW past FLAT_MAX, re-tuned when doubled.

        Requests go on meanwhile. True while that is under way.
        """
        if self._upgrade is not None and self._upgrade.is_alive():
            return True
        if not (self.store.indexes.outgrown(version) or self.store.indexes.retune_due(version)):
            return False
        self._upgrade = threading.Thread(
            target=self._upgrade_index, args=(version,), name="imagesieve-index", daemon=True
        )
        self._upgrade.start()
        return True

    def _upgrade_index(self, version: str) -> None:
        try:
            self.store.indexes.upgrade(version) or self.store.indexes.retune(version)
        except Exception:  # the index keeps serving as it is; the next save tries again
            log.exception("building or tuning the HNSW index of %s failed", version)

    def _neighbours_of(
        self, version: str, preds: Sequence[Prediction], ks: Sequence[int]
    ) -> list[list[dict[str, Any]]]:
        """The nearest stored images of a micro-batch, in one search (inference thread)."""
        k = max(ks, default=0)
        want = [i for i, (p, n) in enumerate(zip(preds, ks, strict=True)) if n and p.ok]
        out: list[list[dict[str, Any]]] = [[] for _ in preds]
        if k and want:
            xq = np.stack([preds[i].embedding for i in want])
            found = nearest_stored(self.store, version, xq, k, [preds[i].id for i in want])
            for i, rows in zip(want, found, strict=True):
                out[i] = [r.to_dict() for r in rows[: ks[i]]]
        for p in preds:
            p.probs = None
            if p.id is not None:
                p.embedding = None  # stored now: keep only what the response needs
        return out

    def example_images(self, per_class: int = 1, limit: int = 8) -> list[tuple[str, str]]:
        """(path, class) of a few training images of the active model, one per class first.

        For the Predict tab's examples; empty without a model or its training folder.
        """
        from imagesieve.data import IMAGE_EXTENSIONS

        root = training_folder(self.version) if self.predictor is not None else None
        if root is None:
            return []
        found = []
        for name in self.version.classes:
            folder = class_folder(root, name)
            if not folder.is_dir():
                continue
            files = sorted(
                e.path
                for e in os.scandir(folder)
                if e.is_file() and Path(e.name).suffix.lower() in IMAGE_EXTENSIONS
            )
            found += [(f, name) for f in files[:per_class]]
        return found[:limit]

    def gradcam(self, data: bytes | Any, class_name: str | None = None) -> Any:
        """Grad-CAM of the active model on an image: a ``GradCam`` (heatmap, ``overlay()``)."""
        require_full_install("Grad-CAM")
        return grad_cam(self.version, data, class_name)

    # -- batches ---------------------------------------------------------------------------
    def save_uploads(
        self, files: Sequence[tuple[str, bytes | str | os.PathLike]]
    ) -> tuple[Path, list[Path]]:
        """Copy uploaded files (name, bytes or temp path) into a new folder of the workspace.

        Returns the folder and the files saved, in upload order: score those (each one an
        input, so the report keeps the upload's order and every file is an item). A name's
        sub-folders are kept (``site/meter.jpg``: an uploaded folder's structure shows in the
        report), each part reduced to a safe file name, so nothing lands outside the folder;
        limits apply.
        """
        if len(files) > self.limits.max_files:
            raise ServiceError(
                f"{len(files)} files is over the limit of {self.limits.max_files} per upload",
                "too_large",
            )
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
        folder = self.ws.root / UPLOADS / f"{stamp}-{uuid.uuid4().hex[:8]}"
        folder.mkdir(parents=True)
        total, used, dirs, saved = 0, set(), set(), []
        for name, content in files:
            size = len(content) if isinstance(content, bytes) else os.path.getsize(content)
            total += size
            if size > self.limits.max_file_bytes:
                raise ServiceError(
                    f"{name}: {size:,} bytes is over the {self.limits.max_file_bytes:,}-byte upload limit",
                    "too_large",
                )
            if total > self.limits.max_request_bytes:
                raise ServiceError(
                    f"upload over the {self.limits.max_request_bytes:,}-byte total limit",
                    "too_large",
                )
            safe = safe_relative_path(name)
            if any(p in used for p in _parents(safe.lower())):  # a file has that folder's name
                safe = safe.replace("/", "_")
            stem, ext = os.path.splitext(safe)
            n = 1
            while safe.lower() in used or safe.lower() in dirs:
                n += 1
                safe = f"{stem}_{n}{ext}"
            used.add(safe.lower())
            dirs.update(_parents(safe.lower()))
            dest = folder / safe
            dest.parent.mkdir(parents=True, exist_ok=True)
            saved.append(dest)
            if isinstance(content, bytes):
                dest.write_bytes(content)
            else:
                shutil.copyfile(content, dest)
        return folder, saved

    def score(
        self,
        inputs: Sequence[str | os.PathLike],
        *,
        column: str | None = None,
        report_dir: str | os.PathLike | None = None,
        progress: Progress | None = None,
    ) -> ScoreSummary:
        """Score files, folders, zips or URL lists into the store, like ``imagesieve score``.

        With ``report_dir``, the CSV report (``report.csv``) and label folders (``sorted/``)
        are written there.
        """
        self.follow_active()
        predictor = self.predictor or self.version  # the second raises "no model"
        limits = self.limits
        # What arrives over HTTP reaches only public URLs, the request's own upload folder and
        # the operator's --allow-paths; zips within the request's budget.
        own = sorted({os.path.dirname(os.path.abspath(i)) for i in inputs})
        opts = ScoreOptions(
            column=column,
            keep_images="all",
            # 4 downloads of at most one upload's size at a time: a request's lists hold
            # little memory whatever the servers they name send.
            fetch=FetchOptions(
                workers=4,
                max_bytes=limits.max_file_bytes,
                private_networks=False,
                allow_networks=limits.allow_fetch,
            ),
            local_paths=[*own, *limits.allow_paths],
            archives=ArchiveLimits(
                max_member_bytes=limits.max_file_bytes,  # a member is no bigger than an upload
                max_members=limits.max_members,
                max_bytes=limits.max_inflated_bytes,
                max_total_members=limits.max_members,
                max_total_bytes=limits.max_inflated_bytes,
            ),
        )
        if report_dir is not None:
            opts.csv = str(Path(report_dir) / "report.csv")
            opts.sort_into = str(Path(report_dir) / "sorted")
        return self._score_into_store([str(i) for i in inputs], opts, progress, predictor)

    def score_local(
        self, inputs: Sequence[str], opts: ScoreOptions, progress: Progress | None = None
    ) -> ScoreSummary:
        """``imagesieve score`` run here for a CLI beside this server (``_local``): its options as given.

        Files, folders and lists anywhere the operator's shell reaches, reports and label
        folders written where it says. The served predictor scores unless the options ask for
        another version or thresholds, which load one for this run.
        """
        self.follow_active()
        served = self.predictor or self.version  # the second raises "no model"
        own = opts.model in (None, served.version.name) and (
            opts.threshold is None and opts.distance_threshold is None
        )
        return self._score_into_store(list(inputs), opts, progress, served if own else None)

    def _score_into_store(
        self,
        inputs: list[str],
        opts: ScoreOptions,
        progress: Progress | None,
        predictor: Predictor | None,
    ) -> ScoreSummary:
        summary = score_inputs(
            self.ws, inputs, opts, progress, store=self.store, predictor=predictor
        )
        # Saved now, unless the index has to become HNSW or be re-tuned first: that runs
        # beside the requests (saving would do it holding the store), saved when the server stops.
        if not self._upgrade_soon(summary.model_version):
            self.store.indexes.save()
        return summary

    # -- search, SQL -----------------------------------------------------------------------
    def similar(self, **query: Any) -> tuple[Any, list[Any]]:
        """``find_similar`` over the served store (image, id or class_name; k, max_distance, where).

        In the served version, or ``model`` (a CLI beside the server may name another).
        """
        served = self.version.name  # raises the one-line "no model" error
        other = query.get("model") not in (None, served)
        return find_similar(
            self.ws,
            store=self.store,
            predictor=None if other else self.predictor,
            filter_timeout=SQL_TIMEOUT,
            filter_memory=SQL_MAX_MEMORY,
            filter_executor=self._sql,
            **query,
        )

    def sql(self, sql: str, *, limit: int = 1000, timeout: float = SQL_TIMEOUT) -> Any:
        """Read-only SQL over the store (the CLI's rules, plus memory and result-size limits).

        Runs on the low-priority SQL threads, outside the store's lock (``run_store_sql``).
        """
        return run_store_sql(
            self.store,
            sql,
            executor=self._sql,
            limit=limit,
            timeout=timeout,
            max_bytes=SQL_MAX_RESULT_BYTES,
            max_memory=SQL_MAX_MEMORY,
        )

    # -- clusters and review ---------------------------------------------------------------
    def clusters(self) -> list[dict[str, Any]]:
        """The active version's clusters, largest first."""
        return list_clusters(self.ws, model=self.version.name, store=self.store)

    def cluster_members(
        self, cluster_id: int, limit: int = 48, offset: int = 0
    ) -> list[dict[str, Any]]:
        """A page of a cluster's members (id, source, sha256, top-1), least typical first."""
        if self.store.clusters.status(self.version.name, int(cluster_id)) is None:
            raise ServiceError(f"no cluster {cluster_id} for model {self.version.name}")
        members = self.store.clusters.members(
            self.version.name, int(cluster_id), int(limit), int(offset)
        )
        keys = ("id", "source", "sha256", "top1_class", "top1_prob", "excluded")
        return [{k: getattr(m, k) for k in keys} for m in members]

    def run_clustering(
        self,
        progress: Progress | None = None,
        *,
        model: str | None = None,
        export: str | os.PathLike | None = None,
        **params: Any,
    ) -> Any:
        """Cluster the UNKNOWNs of the active version, or ``model`` (ClusterParams fields as keywords).

        ``export``: where the folders go (a CLI beside the server names it; default the
        workspace's ``clusters/``).
        """
        with self._clustering:  # one run at a time; predictions go on meanwhile
            run = run_clustering(
                self.ws,
                ClusterParams(**params),
                model=model or self.version.name,
                store=self.store,
                export=export,
                progress=progress,
            )
            self.reload_clusters()
        return run

    def start_clustering(self, **params: Any) -> dict[str, Any]:
        """Cluster the active version's UNKNOWNs in the background; poll ``clustering_status``.

        One run at a time (the app's button included): another while one runs is a conflict.
        """
        chosen = ClusterParams(**params)  # bad parameters are an error now, not in the thread
        if not self._clustering.acquire(blocking=False):
            raise ServiceError("clustering is running already", kind="conflict")
        version = self.version.name

        def report(stage: str, done: int, total: int) -> None:
            self.clustering_status.update(stage=stage, done=done, total=total)

        def run() -> None:
            try:
                done = run_clustering(
                    self.ws, chosen, model=version, store=self.store, progress=report
                )
                self.reload_clusters()
                self.clustering_status = {
                    "running": False,
                    "version": version,
                    "run": done.to_dict(),
                }
            except Exception as e:
                self.clustering_status = {"running": False, "version": version, "error": str(e)}
                raise
            finally:
                self._clustering.release()

        self.clustering_status = {"running": True, "version": version}
        try:
            threading.Thread(target=_logged(run, "clustering"), daemon=True).start()
        except BaseException:
            self._clustering.release()
            raise
        return dict(self.clustering_status)

    def update_cluster(
        self, cluster_id: int, who: str | None = None, model: str | None = None, **change: Any
    ) -> dict[str, Any]:
        """Name, reject or exclude members of a cluster (recorded as ``who``); ``model``: served."""
        row = update_cluster(
            self.ws,
            cluster_id,
            model=model or self.version.name,
            who=who,
            store=self.store,
            **change,
        )
        self.reload_clusters()
        return row

    def exclude_images(self, ids: Sequence[int], who: str | None = None) -> dict[str, Any]:
        """Leave images out of the promotion of the clusters they are in (recorded)."""
        done = exclude_images(self.ws, ids, model=self.version.name, who=who, store=self.store)
        self.reload_clusters()
        return done

    def training_dir(self) -> Path | None:
        """The active version's training folder (where promoted clusters go), if it still exists."""
        return training_folder(self.version)

    def promote_cluster(
        self,
        cluster_id: int,
        name: str | None = None,
        into: str | os.PathLike | None = None,
        exclude: tuple[int, ...] = (),
        who: str | None = None,
        model: str | None = None,
    ) -> Any:
        """Copy a cluster into the training data (defaults: its name, the version's folder).

        Of the served version's clusters, or ``model``'s.
        """
        result = promote_cluster(
            self.ws,
            cluster_id,
            name,
            into,
            exclude=exclude,
            model=model or self.version.name,
            who=who,
            store=self.store,
        )
        self.reload_clusters()
        return result

    def relabel(
        self,
        ids: Sequence[int],
        label: str,
        into: str | os.PathLike | None = None,
        who: str | None = None,
    ) -> Any:
        """Give stored images of the active version a class; they join its training data."""
        result = relabel_images(
            self.ws, list(ids), label, into=into, model=self.version.name, who=who, store=self.store
        )
        return result

    def browse(
        self, query: Any = None, *, limit: int = 48, offset: int = 0, facets: bool = True
    ) -> dict[str, Any]:
        """A page of the active version's stored images by filters (an ``ImageQuery``)."""
        return browse_images(
            self.ws,
            query,
            limit=limit,
            offset=offset,
            facets=facets,
            model=self.version.name,
            store=self.store,
        )

    def batches(self, limit: int = 50, offset: int = 0) -> dict[str, Any]:
        """The scoring batches, newest first, with their counts."""
        return list_batches(self.ws, limit=limit, offset=offset, store=self.store)

    def batch(self, batch_id: int) -> dict[str, Any]:
        """One batch with its failures and its drift."""
        return batch_detail(self.ws, batch_id, store=self.store)

    def label_suspects(self) -> dict[str, Any]:
        """The active version's training images whose label looks wrong, likeliest first."""
        return label_suspects(self.ws, model=self.version.name)

    def fix_training_labels(
        self, paths: list[str], label: str | None, who: str | None = None
    ) -> dict[str, Any]:
        """Move suspected training images into ``label``'s folder, or out of the data (None)."""
        return fix_training_labels(
            self.ws, paths, label, model=self.version.name, who=who, store=self.store
        )

    def duplicates(self, limit: int = 20, offset: int = 0) -> dict[str, Any]:
        """The active version's groups of near-duplicate stored images, and exact ones."""
        return list_duplicates(
            self.ws, model=self.version.name, limit=limit, offset=offset, store=self.store
        )

    def keep_one(self, keep: int, who: str | None = None) -> dict[str, Any]:
        """Keep one stored image of its near-duplicate group and set the others aside."""
        return keep_one(self.ws, keep, model=self.version.name, who=who, store=self.store)

    def drift(self, per: str = "batch", limit: int = 100) -> list[dict[str, Any]]:
        """The newest batches' (or UTC days') drift against their version's training data."""
        return drift_history(self.ws, per, limit=limit, store=self.store)

    def batch_report(self, batch_id: int, fmt: str = "csv") -> tuple[str, Any]:
        """(file name, content chunks) of a batch's report: its inputs in order, CSV or XLSX."""
        return batch_report(self.ws, batch_id, fmt=fmt, store=self.store)

    def report_file(self, batch_id: int, fmt: str = "csv") -> Path:
        """A batch's report written to ``<workspace>/.cache/reports/`` (for the app's download).

        Written again each time (a relabel or rescore changes it), whole and then renamed.
        """
        name, chunks = self.batch_report(batch_id, fmt)
        path = self.ws.cache_dir / "reports" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
        try:
            with open(part, "wb") as f:
                for chunk in chunks:
                    f.write(chunk)
            os.replace(part, path)
        finally:
            part.unlink(missing_ok=True)
        return path

    def audit(self, limit: int = 100, offset: int = 0) -> dict[str, Any]:
        """The recorded review actions, newest first."""
        return audit_log(self.ws, limit=limit, offset=offset, store=self.store)

    def undo(self, action_id: int | None = None, who: str | None = None) -> dict[str, Any]:
        """Undo a recorded action (default: the latest); the server serves what it restored."""
        entry = undo_action(self.ws, action_id, who=who, store=self.store)
        self.follow_changes()
        return entry

    def follow_changes(self) -> None:
        """Serve what a review action changed: the active version, its thresholds, its clusters."""
        self.follow_active()
        if self.predictor is not None:
            fresh = get_version(self.ws, self.version.name)
            if fresh.meta.get("thresholds") != self.version.meta.get("thresholds"):
                self._use(fresh)
        self.reload_clusters()

    # -- models ----------------------------------------------------------------------------
    def versions(self) -> list[dict[str, Any]]:
        """Every model version with its metrics; the active one marked."""
        active = self.predictor.version.name if self.predictor else None
        out = []
        for v in list_versions(self.ws):
            m = v.meta.get("metrics", {})
            out.append(
                {
                    "version": v.name,
                    "active": v.name == active,
                    "kind": v.meta.get("kind"),
                    "backbone": v.meta.get("backbone"),
                    "classes": ", ".join(v.classes),
                    "accuracy": m.get("accuracy"),
                    "macro_f1": m.get("macro_f1"),
                    # the test images' UNKNOWN rate and verdict at the thresholds it has now
                    **unknown_now(v),
                    "created_at": v.meta.get("created_at"),
                }
            )
        return out

    def _named_version(self, name: str) -> ModelVersion:
        """A version of this workspace by name (a name from a request reaches no other folder)."""
        for version in list_versions(self.ws):
            if version.name == name:
                return version
        raise ServiceError(f"no model version named {name!r}: see the Model tab's versions")

    def activate(self, name: str, who: str | None = None) -> ModelVersion:
        """Make a version the active one and serve it (recorded as ``who``).

        A version with nothing stored yet gets the served one's history scored in the
        background (:meth:`_score_history_later`).
        """
        self._named_version(name)
        current = self.predictor.version.name if self.predictor else None
        version = get_version(self.ws, activate_model(self.ws, name, who=who, store=self.store))
        with self._switch:
            self._use(version)
            self._active = active_stamp(self.ws)
            if current is not None and current != version.name:
                self._score_history_later(current)
        return version

    def retrain(
        self,
        data_dir: str | os.PathLike | None = None,
        progress: Progress | None = None,
        who: str | None = None,
        **options: Any,
    ) -> ModelVersion:
        """Train a new version on the training folder (default: the active one's) and serve it.

        It starts from the active version's options and thresholds, and then scores the images
        stored with the active version, so it serves with the history scored; the before/after
        diff is kept with it (``history.json``, :meth:`history`). ``who`` is recorded for the
        near-duplicate decisions the new version takes over.
        """
        if not self._training.acquire(blocking=False):
            raise ServiceError("a training run is already going", kind="conflict")
        try:
            return self._retrain(data_dir, progress, who, **options)
        finally:
            self._training.release()

    def _retrain(
        self,
        data_dir: str | os.PathLike | None,
        progress: Progress | None,
        who: str | None = None,
        **options: Any,
    ) -> ModelVersion:
        """``retrain``'s work; the caller holds ``_training``."""
        try:
            data_dir = data_dir or self.training_dir()
            if data_dir is None:
                raise ServiceError("no training folder: give one")
            self.training_status = {"running": True, "data_dir": str(data_dir)}
            previous = self.predictor and self.predictor.version
            opts = TrainOptions.from_version(previous, **options)
            result = train_model(data_dir, self.ws, opts, progress)
            self._use(result.version)
            if previous is not None:
                self.training_status["stage"] = f"scoring the images stored with {previous.name}"
                score_history(
                    self.ws,
                    result.version.name,
                    previous.name,
                    progress,
                    store=self.store,
                    predictor=self.predictor,
                    who=who,
                    clustering=self._clustering,
                )
                self.reload_clusters()
            self.training_status = {"running": False, "version": result.version.name}
            return result.version
        except BaseException as e:
            self.training_status = {"running": False, "error": str(e)}
            raise

    def confusion(
        self, version: str | None = None, true: str | None = None, predicted: str | None = None
    ) -> dict[str, Any]:
        """A version's evaluation by true and Top-1 class; with both, that cell's images.

        From the version's evaluation report (``audit.csv``): ``classes``, ``counts`` (true x
        predicted) and, for a cell, ``images`` (path, Top-1 probability), most confident first.
        """
        info = self._named_version(version or self.version.name)
        name = info.name
        rows = read_audit(info.report_dir)
        out: dict[str, Any] = {
            "version": name,
            "classes": info.classes,
            "counts": confusion_counts(rows, info.classes),
        }
        if true is not None or predicted is not None:
            for given in (true, predicted):
                if given not in info.classes:
                    raise ServiceError(
                        f"{given!r} is not a class of {name}: {', '.join(info.classes)}"
                    )
            cell = [r for r in rows if r["true"] == true and r["top1"] == predicted]
            cell.sort(key=lambda r: -float(r.get("top1_prob") or 0))
            out["images"] = [{"path": r["path"], "top1_prob": float(r["top1_prob"])} for r in cell]
        return out

    def history(self, version: str | None = None) -> dict[str, Any] | None:
        """What a version said about the history when it was trained (None: not scored).

        ``version`` must name a version of this workspace (a name from a request reaches no
        other directory).
        """
        return read_history(self._named_version(version or self.version.name))

    def set_thresholds(
        self,
        confidence: float,
        distance: float | None,
        who: str | None = None,
        quality: dict[str, Any] | None = None,
        target: float | None = None,
    ) -> dict[str, Any]:
        """Make these the active version's UNKNOWN thresholds and re-decide its stored images.

        The version's ``meta.json`` keeps them (the CLI and later servers use them too); each
        stored row's label and reason are recomputed from its stored Top-1 probability,
        training distance and (with ``quality`` bounds) photo quality measures. Returns the
        counts of ``threshold_preview`` after the change.
        """
        counts = apply_thresholds(
            self.ws,
            confidence,
            distance,
            quality=quality,
            model=self.version.name,
            who=who,
            store=self.store,
            target=target,
        )
        self._use(get_version(self.ws, self.version.name))
        return counts

    def threshold_tradeoff(self, rates: list[float] | None = None) -> dict[str, Any]:
        """What each false-UNKNOWN rate costs and catches, for the active version."""
        return threshold_tradeoff(self.ws, rates or TRADEOFF_RATES, model=self.version.name)

    def thresholds_for_target(self, target: float) -> dict[str, Any]:
        """The active version's thresholds calibrated for another false-UNKNOWN ``target``."""
        return thresholds_for_target(self.ws, target, model=self.version.name)

    def thresholds(self) -> dict[str, Any]:
        """The active version's UNKNOWN thresholds, whether an operator tuned them, and counts."""
        return threshold_counts(self.ws, model=self.version.name, store=self.store)

    def _training_progress(self) -> Progress:
        """A progress callback keeping stage, done, total and ETA in ``training_status``."""
        stage_start = {"stage": None, "at": time.monotonic()}

        def progress(stage: str, done: int, total: int) -> None:
            now = time.monotonic()
            if stage != stage_start["stage"]:
                stage_start.update(stage=stage, at=now)
            spent = now - stage_start["at"]
            eta = spent * (total - done) / done if done and total else None
            self.training_status.update(
                stage=stage, done=done, total=total, eta_s=None if eta is None else round(eta, 1)
            )

        return progress

    def start_retrain(self, who: str | None = None) -> dict[str, Any]:
        """Retrain on the active version's training folder in the background; its status now.

        Progress (stage, done, total, ETA) is in ``training_status`` as it runs.
        """
        require_full_install("retraining")  # here, not in the background run's status
        data_dir = self.training_dir()
        if data_dir is None:
            raise ServiceError("the active model's training folder is gone; retrain from the CLI")
        if not self._training.acquire(blocking=False):
            raise ServiceError("a training run is already going", kind="conflict")
        progress = self._training_progress()

        def run() -> None:
            try:
                self._retrain(data_dir, progress, who)  # a failure is kept in training_status too
            finally:
                self._training.release()

        self.training_status = {"running": True, "data_dir": str(data_dir)}
        threading.Thread(
            target=_logged(run, f"retrain started by {who}"), name="retrain", daemon=True
        ).start()
        return dict(self.training_status)

    def threshold_preview(
        self,
        confidence: float,
        distance: float | None,
        quality: dict[str, Any] | None = None,
        target: float | None = None,
    ) -> dict[str, Any]:
        """How many stored images of the active version each rule would mark UNKNOWN.

        ``target``: the false-UNKNOWN rate these thresholds were calibrated for, which the
        held-out check judges against (``thresholds_for_target``).
        """
        return threshold_counts(
            self.ws,
            confidence,
            distance,
            quality=quality,
            keep=False,
            model=self.version.name,
            store=self.store,
            target=target,
        )["counts"]

    # -- images ----------------------------------------------------------------------------
    def thumbnail(self, sha256: str, source: str, side: int = THUMB_SIDE) -> bytes | None:
        """A stored image's thumbnail as WebP bytes (None: no longer available)."""
        path = self.thumbnail_file(sha256, source, side)
        return path.read_bytes() if path is not None else None

    def thumbnail_file(self, sha256: str, source: str, side: int = THUMB_SIDE) -> Path | None:
        """The cached WebP thumbnail of a stored image, made once per content and size.

        Decoding a 12-megapixel photo takes ~100 ms, reading the cached file well under one;
        under ``<workspace>/.cache/thumbs`` (derived data), written whole then renamed, so a
        file handed to a browser never changes (galleries serve these files as they are).
        None when the image is no longer available.
        """
        from PIL import Image

        from imagesieve.data import load_image

        if not re.fullmatch(r"[0-9a-f]{64}", sha256):  # not a content the store keeps
            return None
        path = self.ws.cache_dir / "thumbs" / str(int(side)) / sha256[:2] / f"{sha256}.webp"
        if path.is_file():
            return path
        src = image_source(self.ws, sha256, source)
        if src is None:
            return None
        try:
            im = load_image(src, min_side=side, name=sha256[:12]).image
        except Exception:  # a vanished or damaged file shows as missing, not as an error
            return None
        im.thumbnail((side, side), Image.Resampling.BILINEAR)
        out = io.BytesIO()
        im.save(out, "WEBP", quality=80, method=0)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{uuid.uuid4().hex[:8]}.tmp")
            tmp.write_bytes(out.getvalue())
            os.replace(tmp, path)
        except OSError as e:  # a full or read-only disk: shown without a thumbnail
            log.warning("thumbnail not written: %s", e)
            return None
        return path

    def file_thumbnail(self, path: str | os.PathLike, side: int = THUMB_SIDE) -> Path | None:
        """The cached thumbnail of an image file on this machine (a version's evaluation image).

        Only for paths the workspace itself names (its reports), never a path from a request.
        """
        try:
            with open(path, "rb") as f:
                sha256 = hashlib.file_digest(f, "sha256").hexdigest()
        except OSError:
            return None
        return self.thumbnail_file(sha256, str(path), side)

    def thumbnail_of(self, id: int, side: int = THUMB_SIDE) -> Path | None:  # noqa: A002
        """The cached thumbnail file of a stored row (None: no such row, or no longer available)."""
        rows = self.store.result_rows([int(id)])
        row = rows.get(int(id))
        return self.thumbnail_file(row.sha256, row.source, side) if row is not None else None

    def thumbnails(self, rows: Sequence[dict[str, Any]], side: int = THUMB_SIDE) -> list[Any]:
        """Thumbnails of stored rows (``sha256``, ``source``), in order, made two at a time."""
        return list(
            self._thumbs.map(lambda r: self.thumbnail(r["sha256"], r["source"], side), rows)
        )

    def embedding_map(self, color_by: str = "label") -> dict[str, Any]:
        """The active version's cached embedding map, coloured now; ``points`` 0 if not made."""
        try:
            return map_points(self.ws, color_by=color_by, model=self.version.name, store=self.store)
        except ValueError as e:
            raise ServiceError(str(e)) from None

    def make_map(
        self,
        progress: Progress | None = None,
        background: bool = False,
        *,
        model: str | None = None,
        max_points: int | None = None,
    ) -> dict[str, Any]:
        """Project the active version's (or ``model``'s) stored embeddings (cached); one at a time.

        ``background`` returns at once with ``map_status`` (poll it) instead of waiting;
        ``max_points``: a sample of at most that many (default ``compute_map``'s).
        """
        if not self._mapping.acquire(blocking=False):
            raise ServiceError("the map is being made already", kind="conflict")
        version = model or self.version.name
        sample = {} if max_points is None else {"max_points": max_points}

        def report(stage: str, done: int, total: int) -> None:
            self.map_status.update(stage=stage, done=done, total=total)
            if progress is not None:
                progress(stage, done, total)

        def run() -> dict[str, Any]:
            try:
                self.map_status = {"running": True, "version": version}
                made = compute_map(
                    self.ws, model=version, store=self.store, progress=report, **sample
                )
                self.map_status = {"running": False, "version": version, "points": len(made.ids)}
                return self.map_status
            except Exception as e:
                self.map_status = {"running": False, "version": version, "error": str(e)}
                raise
            finally:
                self._mapping.release()

        if not background:
            return run()
        self.map_status = {"running": True, "version": version}
        threading.Thread(target=_logged(run, "making the embedding map"), daemon=True).start()
        return dict(self.map_status)

    def prefetch_page(self, query: Any, limit: int, offset: int) -> None:
        """Make the thumbnails of the page after this one in the background (J is then instant)."""

        def make() -> None:
            try:
                rows = self.browse(query, limit=limit, offset=offset, facets=False)["rows"]
                for r in rows:
                    self.thumbnail_file(r["sha256"], r["source"])
            except Exception as e:  # only a head start: the page makes what is missing
                log.debug("prefetch of a review page: %s", e)

        self._thumbs.submit(make)

    def counts(self) -> dict[str, int]:
        """What the app's header counts for the active model.

        Stored images, UNKNOWN ones, clusters to review (the listing's ``open``) and images a
        person labelled.
        """
        name = self.version.name
        with self.store.cursor() as cur:
            stored, unknown = cur.execute(
                f"SELECT count(*), count(*) FILTER (WHERE label = '{UNKNOWN}') "
                "FROM predictions WHERE model_version = ?",
                [name],
            ).fetchall()[0]
            labelled = cur.execute("SELECT count(*) FROM labels").fetchall()[0][0]
        clusters = self.store.clusters.open_count(name)
        return {"stored": stored, "unknown": unknown, "clusters": clusters, "labelled": labelled}

    def health(self) -> dict[str, Any]:
        """Liveness and what is loaded."""
        self.follow_active()
        out: dict[str, Any] = {"status": "ok", "workspace": str(self.ws.root)}
        out["model_version"] = self.predictor.version.name if self.predictor else None
        if self.predictor is not None:
            out["stored_images"] = self.store.row_count(self.predictor.version.name)
            out["classes"] = self.predictor.classes
        out["uptime_seconds"] = round(time.time() - self.started, 1)
        out["training"] = self.training_status
        return out
