"""The sieve store: DuckDB holds every scored image (the source of truth), FAISS its embedding.

One workspace, one writer: DuckDB's file lock keeps a second writing process out, so row ids
are handed out here. Each chunk of rows (predictions, embeddings, failures) is one DuckDB
transaction; the FAISS index follows in memory and is saved when a run ends. A server's small
groups are appended to the journal instead (``append``: one synced file write) and folded into
DuckDB in one transaction every second; any other use of the connection folds them first, so
every reader sees every row. After a crash, opening the store replays the journal, then finds
the saved index behind DuckDB and catches it up from the stored embeddings (or rebuilds it), so
the two never disagree for long and nothing committed is lost.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from imagesieve._errors import NotFoundError, SieveError
from imagesieve._workspace import Workspace
from imagesieve.classifier import (
    FAR_FROM_TRAINING,
    LOW_CONFIDENCE,
    POOR_QUALITY,
    STORED_MEASURES,
    UNKNOWN,
    Prediction,
    QualityRule,
    UnknownRule,
)
from imagesieve.store._audit import AuditLog
from imagesieve.store._browse import ROW_FIELDS
from imagesieve.store._clusters import Clusters
from imagesieve.store._duplicates import NearDuplicates
from imagesieve.store._images import remove_partial_images
from imagesieve.store._indexes import IndexSet, locked
from imagesieve.store._journal import Journal
from imagesieve.store._rows import (
    SHARD_VECTORS,
    BatchItem,
    Failure,
    PredictionRow,
    ResultRow,
    ShardIngest,
    StoredHeadInputs,
    embedding_matrix,
    new_table,
    now,
    prediction_table,
    read_shards,
    utc_text,
)
from imagesieve.store._schema import (
    EMBEDDINGS_TABLE,
    PREDICTION_COLUMNS,
    add_embedding_table,
    check_version,
    embedding_dims,
    has_shared_features,
    migrate,
    shared_sql,
)
from imagesieve.store._vectors import VectorIndex

__all__ = ["STORE_FILE", "Store", "StoreBusyError", "fold_stopped_journal", "using_store"]

log = logging.getLogger(__name__)

STORE_FILE = "store.duckdb"
#: A row whose photo quality was measured (rows stored before measuring have NULL measures).
MEASURED = "(blur IS NOT NULL)"
#: Rows appended but not yet folded into DuckDB (see ``Store.append``).
JOURNAL_FILE = "store.journal"
#: The store never reads or writes files through DuckDB (rows arrive as Arrow tables), so
#: file and network access stay off: user SQL (filters, the console) cannot reach outside.
CONNECTION_CONFIG = {
    "enable_external_access": False,
    "autoinstall_known_extensions": False,
    "autoload_known_extensions": False,
}
#: A batch row's counters, kept up to date by each commit that passes them.
BATCH_COUNTS = ("n_items", "n_scored", "n_skipped", "n_unknown", "n_failed")
#: DuckDB compression methods a bulk ingest leaves out: every one but ``uncompressed`` and
#: ``constant`` (``Store._stored_plain``).
PLAIN_STORAGE = "alp,alprd,chimp,patas,fsst,dictionary,zstd,rle,bitpacking,roaring,dict_fsst"
#: Rows read per chunk when rebuilding or catching up an index from DuckDB.
READ_CHUNK = 8192
#: DuckDB's memory limit while every embedding of a version streams out (an index rebuild).
STREAM_MEMORY = "128MB"
#: A batch report's own columns, after the input sheet's (``Store.batch_items``).
BATCH_ITEM_FIELDS = (
    "item",
    "source",
    "outcome",
    "id",
    "label",
    "reason",
    "top1_class",
    "top1_prob",
    "top2_class",
    "top2_prob",
    "top3_class",
    "top3_prob",
    "neighbor_distance",
    "quality_flags",
    "cluster_id",
    "person_label",
    "sha256",
    "scored_at",
    "error",
)
_BATCH_ITEMS_SQL = (
    "SELECT bi.input_row, bi.seq + 1, bi.source, bi.outcome, p.id, p.label, p.reason, "
    "p.top1_class, round(p.top1_prob::DOUBLE, 4), p.top2_class, round(p.top2_prob::DOUBLE, 4), "
    "p.top3_class, round(p.top3_prob::DOUBLE, 4), round(p.neighbor_distance::DOUBLE, 4), "
    "p.quality_flags, p.cluster_id, "
    "h.label, bi.sha256, strftime(p.scored_at AT TIME ZONE 'UTC', '%Y-%m-%d %H:%M:%S'), "
    "bi.error "
    "FROM batch_items bi JOIN batches b USING (batch_id) "
    "LEFT JOIN predictions p ON p.model_version = b.model_version AND p.sha256 = bi.sha256 "
    "LEFT JOIN labels h ON h.sha256 = bi.sha256 "
    "WHERE bi.batch_id = ? ORDER BY bi.seq"
)
#: Neighbour rows kept in memory at most (~0.3 KB each); past it, the newest are kept.
ROWS_KEPT = 200_000


def _fill_vectors(relation: Any, n: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, (rows, dim) float32) of a DuckDB relation of (id, embedding), at most ``n`` rows.

    Read in Arrow chunks straight into one preallocated array.
    """
    import pyarrow as pa

    ids = np.zeros(n, np.int64)
    vectors = np.zeros((n, dim), np.float32)
    i = 0
    for batch in relation.to_arrow_reader(READ_CHUNK):
        got_ids, got = embedding_matrix(pa.Table.from_batches([batch]), dim)
        ids[i : i + len(got_ids)], vectors[i : i + len(got_ids)] = got_ids, got
        i += len(got_ids)
    return ids[:i], vectors[:i]


class StoreBusyError(SieveError):
    """Another process holds the workspace's store open for writing."""

    kind = "busy"

    @classmethod
    def held(cls, path: Path, error: Exception) -> StoreBusyError:
        """The one-line error for DuckDB's lock ``error`` on ``path``: who holds it, what to do."""
        pid = re.search(r"\(PID (\d+)\)", str(error))
        return cls(
            f"the store {path} is in use by another imagesieve process"
            f"{f' (PID {pid[1]})' if pid else ''}; wait for it to finish, or, if it is "
            "`imagesieve serve`, use its app or REST API (/api/v1/sql, /api/v1/score)"
        )


# DuckDB 2 streams results: a result not read to the end keeps the connection busy, so every
# query here is read in full (fetchall / fetchnumpy) before the next call.


def _batch_counts(counts: dict[str, int]) -> tuple[str, list[int]]:
    """The SET clause and parameters that write a batch row's counters (missing ones: 0)."""
    return ", ".join(f"{c} = ?" for c in BATCH_COUNTS), [
        int(counts.get(c, 0)) for c in BATCH_COUNTS
    ]


def fold_stopped_journal(ws: Workspace) -> None:
    """Before a read-only open: rows a stopped server left in the journal, added by a brief write open.

    A read-only open means no process writes (DuckDB's rule), so they are safe to add; if that
    open fails, the reader goes on without them and says so.
    """
    journal = ws.root / JOURNAL_FILE
    if not journal.is_file() or not journal.stat().st_size:
        return
    try:
        Store(ws, check=False).close()
    except Exception as e:
        log.warning(
            "%s holds rows a stopped server answered but had not yet moved into the store; "
            "they appear once the store can be opened for writing (%s)",
            journal,
            str(e).splitlines()[0],
        )


@contextlib.contextmanager
def using_store(
    ws: Workspace, store: Store | None = None, *, check: bool = True, read_only: bool = False
) -> Iterator[Store]:
    """The given long-lived store (left open), or the workspace's store opened for this block.

    ``read_only`` opens it for reading (a read-only workspace, or a reader beside nothing
    writing); indexes are then checked and repaired in memory only.
    """
    if store is not None:
        yield store
        return
    with Store(ws, check=check and not read_only, read_only=read_only) as opened:
        yield opened


class Store:
    """The workspace's store: open it, write scored batches, read back rows and the vector index.

    ``Store(ws)`` opens (creating) ``store.duckdb`` for writing, marks batches left running by
    a dead process as interrupted, and checks every version's FAISS index against DuckDB,
    catching it up or rebuilding it. ``read_only=True`` opens for reading alongside nothing else
    writing (DuckDB's rule) and checks nothing.

    A long-lived store is shared by threads (the server): every method holds ``lock``. The
    connection is the store's own; a reader gets ``cursor()``, which folds journaled rows into
    DuckDB first, so whatever runs on it sees every stored row. ``indexes`` holds the versions'
    FAISS indexes, ``clusters`` the clustering runs and their review.
    """

    def __init__(self, ws: Workspace, *, read_only: bool = False, check: bool = True):
        import duckdb

        self.ws = ws
        self.lock = threading.RLock()
        self.path = ws.root / STORE_FILE
        self.read_only = read_only
        if read_only and not self.path.is_file():
            raise NotFoundError(f"no store in {ws.root} yet: score some images first")
        if not read_only:
            ws.root.mkdir(parents=True, exist_ok=True)
        else:
            fold_stopped_journal(ws)
        try:
            self._con = duckdb.connect(
                str(self.path), read_only=read_only, config=CONNECTION_CONFIG
            )
        except duckdb.IOException as e:
            if "lock" in str(e).lower():
                raise StoreBusyError.held(self.path, e) from None
            raise
        self._journal = Journal(ws.root / JOURNAL_FILE)
        try:
            self._open(check)
        except BaseException:  # a refused or failed open holds nothing: the next one may try
            self._journal.close()
            self._con.close()
            raise

    def _open(self, check: bool) -> None:
        """Migrate, replay the journal, check the indexes: the rest of opening."""
        ws, read_only = self.ws, self.read_only
        # Appended, not yet folded: (table, {batch_id, counts}) per group, as the journal has it.
        self._pending: list[tuple[Any, dict[str, Any]]] = []
        # Neighbour-result fields by id (``result_rows``): every appended row, and rows read
        # since the connection was last handed out (any use of it may change rows: it clears).
        self._rows: dict[int, ResultRow] = {}
        self._pending_since = 0.0
        self._content: dict[str, set[str]] = {}
        self.indexes = IndexSet(self, ws.root, read_only=read_only)
        self.clusters = Clusters(self)
        self.duplicates = NearDuplicates(self)
        self.audit = AuditLog(self)
        if read_only:
            check_version(self._con)
        else:
            migrate(self._con)
            self._con.execute("UPDATE batches SET status = 'interrupted' WHERE status = 'running'")
        self._dims = embedding_dims(self._con)
        self._shared = has_shared_features(self._con)
        if not read_only:
            self._replay()
        self._next_id = int(
            self._db.execute("SELECT coalesce(max(id), 0) + 1 FROM predictions").fetchall()[0][0]
        )
        if check and not read_only:
            self.indexes.checks = [self.indexes.check(v) for v in self.versions()]
        if not read_only:
            remove_partial_images(ws)

    # -- lifecycle ------------------------------------------------------------------------
    @property
    def _db(self) -> Any:
        """The DuckDB connection, with every journaled row folded in first.

        It also forgets the neighbour rows kept in memory: whoever takes the connection may
        relabel or re-cluster rows.
        """
        with self.lock:  # a concurrent append must not lose its rows to the clearing
            if self._pending:
                self.fold()
            self._rows = {}
        return self._con

    @contextlib.contextmanager
    def _connection(self) -> Iterator[Any]:
        """The folded connection, for this package's repositories, holding the lock."""
        with self.lock:
            yield self._db

    @contextlib.contextmanager
    def atomic(self) -> Iterator[None]:
        """Hold the lock and make the repositories' writes inside the block one transaction."""
        with self.lock:
            self._db  # noqa: B018 - folds the journal now: a fold opens a transaction of its own
            with self._transaction({}):
                yield

    @contextlib.contextmanager
    def cursor(self) -> Iterator[Any]:
        """A DuckDB cursor of its own for a reader, journal folded first; closed after the block.

        It does not hold the store's lock, so a slow query holds up nothing else.
        """
        with self.lock:
            cursor = self._db.cursor()
        try:
            yield cursor
        finally:
            cursor.close()

    @locked
    def configure(self, settings: dict[str, str]) -> None:
        """Apply DuckDB settings (``SET name = 'value'``) to the connection and its cursors."""
        for name, value in settings.items():
            self._con.execute(f"SET {name} = '{value}'")

    @locked
    def close(self) -> None:
        """Fold the journal, save changed indexes and close DuckDB."""
        try:
            self.fold()
            self.indexes.save()
        finally:
            self._journal.close()
            self._con.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- batches --------------------------------------------------------------------------
    @locked
    def begin_batch(
        self, model_version: str, inputs: Sequence[str], options: dict[str, Any]
    ) -> int:
        """Record a new batch as running; returns its id."""
        import json

        batch_id = int(
            self._db.execute("SELECT coalesce(max(batch_id), 0) + 1 FROM batches").fetchall()[0][0]
        )
        self._db.execute(
            "INSERT INTO batches (batch_id, started_at, status, model_version, inputs, options) "
            "VALUES (?, ?, 'running', ?, ?, ?)",
            [
                batch_id,
                now(),
                model_version,
                json.dumps(list(inputs)),
                json.dumps(options, default=str),
            ],
        )
        return batch_id

    @locked
    def finish_batch(self, batch_id: int, status: str, counts: dict[str, int]) -> None:
        """Mark a batch done (or interrupted) with its final counts."""
        sets, values = _batch_counts(counts)
        self._db.execute(
            f"UPDATE batches SET status = ?, finished_at = ?, {sets} WHERE batch_id = ?",
            [status, now(), *values, batch_id],
        )

    def batches(
        self, limit: int = 50, offset: int = 0, batch_id: int | None = None
    ) -> tuple[int, list[dict[str, Any]]]:
        """(how many, the batches newest first, or the one ``batch_id``), with their counts.

        The counts are ``unknown_rate_per_batch``'s.
        """
        which, params = (
            ("WHERE v.batch_id = ?", [int(batch_id)]) if batch_id is not None else ("", [])
        )
        with self.cursor() as cur:
            total = int(cur.execute("SELECT count(*) FROM batches").fetchall()[0][0])
            table = cur.sql(
                "SELECT v.batch_id, v.started_at, b.finished_at, v.status, v.model_version, "
                "v.items, v.scored, v.failed, v.unknown, v.unknown_rate, b.inputs "
                f"FROM unknown_rate_per_batch v JOIN batches b USING (batch_id) {which} "
                "ORDER BY v.batch_id DESC LIMIT ? OFFSET ?",
                params=[*params, int(limit), int(offset)],
            ).to_arrow_table()
        rows = table.to_pylist()
        for r in rows:
            for k in ("started_at", "finished_at"):
                r[k] = utc_text(r[k]) if r[k] is not None else None
            if r["unknown_rate"] is not None:
                r["unknown_rate"] = round(float(r["unknown_rate"]), 4)
        return total, rows

    def drift(self, per: str = "batch", key: Any = None, limit: int = 100) -> list[dict[str, Any]]:
        """Drift of each batch (``per="batch"``) or UTC day (``"day"``), newest first.

        ``drift_per_batch``'s or ``drift_per_day``'s rows (one per model version), for one
        ``key`` (a batch id, a date) or the newest ``limit``; none before a version has a
        drift reference.
        """
        if per not in ("batch", "day"):
            raise ValueError(f"drift is per batch or per day, not {per!r}")
        column = "batch_id" if per == "batch" else "day"
        which, params = (f"WHERE {column} = ?", [key]) if key is not None else ("", [])
        with self.cursor() as cur:
            if not cur.execute(
                "SELECT count(*) FROM duckdb_tables() WHERE table_name = 'drift_reference'"
            ).fetchall()[0][0]:
                return []  # a read-only store of an older release
            rows = (
                cur.sql(
                    f"SELECT * FROM drift_per_{per} {which} ORDER BY {column} DESC LIMIT ?",
                    params=[*params, int(limit)],
                )
                .to_arrow_table()
                .to_pylist()
            )
        for r in rows:
            if per == "day":
                r["day"] = r["day"].isoformat()
            for k, v in r.items():
                if isinstance(v, float):
                    r[k] = round(v, 6) if np.isfinite(v) else None
        return rows

    def batch_rows(self, batch_id: int) -> Iterator[list[tuple]]:
        """A batch's stored rows in the order stored (a batch stores in input order), in chunks.

        Rows a later batch scored again carry that batch's id; images already stored when the
        batch ran are the earlier batch's rows.
        """
        with self.cursor() as cur:
            result = cur.execute(
                f"SELECT {', '.join(ROW_FIELDS)} FROM predictions WHERE batch_id = ? ORDER BY id",
                [int(batch_id)],
            )
            while chunk := result.fetchmany(READ_CHUNK):
                yield chunk

    def batch_items(self, batch_id: int) -> tuple[list[str], Iterator[list[tuple]]]:
        """(the input sheets' columns, chunks of ``BATCH_ITEM_FIELDS`` rows) of a batch, in input order.

        Each input with what became of it and the prediction stored for its content now (an
        image already stored before the batch has the earlier row's). No columns and no rows for
        a batch scored before batch items were kept (see ``batch_rows``).
        """
        with self.cursor() as cur:
            keys = cur.execute(
                "SELECT k FROM (SELECT json_keys(input_row) AS k, min(seq) AS first "
                "FROM batch_items WHERE batch_id = ? AND input_row IS NOT NULL GROUP BY k) "
                "ORDER BY first",
                [int(batch_id)],
            ).fetchall()
        columns = list(dict.fromkeys(c for (k,) in keys for c in k))

        def chunks() -> Iterator[list[tuple]]:
            with self.cursor() as cur:
                result = cur.execute(_BATCH_ITEMS_SQL, [int(batch_id)])
                while chunk := result.fetchmany(READ_CHUNK):
                    yield chunk

        return columns, chunks()

    def batch_failures(self, batch_id: int) -> list[Failure]:
        """The failures a batch recorded (source, kind, one-line reason)."""
        with self.cursor() as cur:
            rows = cur.execute(
                "SELECT source, kind, message FROM failures WHERE batch_id = ? AND kind <> 'ignored' "
                "ORDER BY failed_at, source",
                [int(batch_id)],
            ).fetchall()
        return [Failure(*r) for r in rows]

    def batch_outputs(self, batch_id: int) -> dict[str, Counter]:
        """How a batch's scored and already-stored items are labelled, as counters.

        ``labels``, ``reasons`` (UNKNOWN reasons), ``quality_flags`` (each flag) and
        ``poor_quality`` (``images``: how many have any).
        """
        with self.cursor() as cur:
            rows = cur.execute(
                "SELECT p.label, p.reason, p.quality_flags, count(*) FROM batch_items i "
                "JOIN batches b USING (batch_id) JOIN predictions p "
                "ON p.model_version = b.model_version AND p.sha256 = i.sha256 "
                "WHERE i.batch_id = ? AND i.outcome IN ('scored', 'rescored', 'already_scored') "
                "GROUP BY ALL",
                [int(batch_id)],
            ).fetchall()
        out: dict[str, Counter] = {k: Counter() for k in ("labels", "reasons", "quality_flags")}
        out["poor_quality"] = Counter()
        for label, reason, flags, n in rows:
            out["labels"][label] += n
            if label == UNKNOWN and reason:
                out["reasons"][reason] += n
            if flags:
                out["poor_quality"]["images"] += n
                for flag in flags.split("+"):
                    out["quality_flags"][flag] += n
        return out

    # -- rows -----------------------------------------------------------------------------
    @locked
    def versions(self) -> list[str]:
        """Model versions with stored rows."""
        rows = self._db.execute(
            "SELECT DISTINCT model_version FROM predictions ORDER BY model_version"
        ).fetchall()
        return [r[0] for r in rows]

    @locked
    def row_count(self, model_version: str) -> int:
        """Stored images of a model version (from the content set when loaded: no query)."""
        content = self._content.get(model_version)
        return len(content) if content is not None else self._vector_stats(model_version)[0]

    def has_content(self, model_version: str, sha256: str) -> bool:
        """True when this content is already stored with ``model_version``.

        Lock-free once the version's content set is loaded (a set lookup is atomic in CPython),
        so request threads do not queue behind a commit to ask.
        """
        content = self._content.get(model_version)
        if content is None:
            with self.lock:
                content = self._stored_content(model_version)
        return sha256 in content

    @locked
    def stored_content(self, model_version: str) -> list[str]:
        """The content (SHA-256 hex) stored with ``model_version``, as of now."""
        return list(self._stored_content(model_version))

    def _stored_content(self, model_version: str) -> set[str]:
        """The live set behind ``has_content``, read once and kept up to date by ``commit``."""
        if model_version not in self._content:
            rows = self._db.execute(
                "SELECT sha256 FROM predictions WHERE model_version = ?", [model_version]
            ).fetchall()
            self._content[model_version] = {r[0] for r in rows}
        return self._content[model_version]

    @locked
    def rows_by_content(
        self, model_version: str, sha256s: Iterable[str]
    ) -> dict[str, PredictionRow]:
        """Stored rows of ``model_version`` for these contents, keyed by SHA-256."""
        import pyarrow as pa

        wanted = pa.table({"sha256": pa.array(sorted(set(sha256s)), pa.string())})
        self._db.register("_wanted", wanted)
        try:
            cur = self._db.execute(
                f"SELECT {', '.join('p.' + c for c in PREDICTION_COLUMNS)} FROM predictions p "
                "JOIN _wanted w USING (sha256) WHERE p.model_version = ?",
                [model_version],
            )
            rows = [PredictionRow(*r) for r in cur.fetchall()]
        except BaseException:
            self._db.abort()
            raise
        finally:
            self._db.unregister("_wanted")
        return {r.sha256: r for r in rows}

    @locked
    def rows(
        self, model_version: str | None = None, *, ids: Sequence[int] | None = None
    ) -> list[PredictionRow]:
        """Stored rows by id: of one version, or with these ids, or all."""
        where, params = [], []
        if model_version is not None:
            where, params = ["model_version = ?"], [model_version]
        if ids is not None:
            where.append("id IN (SELECT unnest(?::BIGINT[]))")
            params.append([int(i) for i in ids])
        rows = self._db.execute(
            f"SELECT {', '.join(PREDICTION_COLUMNS)} FROM predictions "
            f"WHERE {' AND '.join(where) or 'true'} ORDER BY id",
            params,
        ).fetchall()
        return [PredictionRow(*r) for r in rows]

    @locked
    def register_version(
        self,
        model_version: str,
        sources: Sequence[str],
        labels: Sequence[str],
        drift: Sequence[float] | None = None,
    ) -> None:
        """Record a version's training (reference) images once, so neighbour ids join in SQL.

        ``drift``: its held-out known images' distances to the training data, recorded once
        too, which the drift views test each batch's and day's distances against.
        """
        import pyarrow as pa

        if drift is not None and len(drift):
            have = self._db.execute(
                "SELECT count(*) FROM drift_reference WHERE model_version = ?", [model_version]
            ).fetchall()[0][0]
            if not have:
                self._db.execute(
                    "INSERT INTO drift_reference SELECT ?, unnest(?::FLOAT[])",
                    [model_version, [float(d) for d in drift]],
                )
        have = self._db.execute(
            "SELECT count(*) FROM reference_images WHERE model_version = ?", [model_version]
        ).fetchall()[0][0]
        if have or not sources:
            return
        ref = pa.table(
            {
                "model_version": pa.array([model_version] * len(sources), pa.string()),
                "id": pa.array(np.arange(len(sources)), pa.int32()),
                "source": pa.array(list(sources), pa.string()),
                "label": pa.array(list(labels), pa.string()),
            }
        )
        self._db.register("_ref", ref)
        try:
            self._db.execute("INSERT INTO reference_images SELECT * FROM _ref")
        finally:
            self._db.unregister("_ref")

    @locked
    def commit(
        self,
        batch_id: int,
        model_version: str,
        new: Sequence[Prediction] = (),
        rescored: Sequence[Prediction] = (),
        failures: Sequence[Failure] = (),
        processed_sources: Iterable[str] = (),
        counts: dict[str, int] | None = None,
        items: Sequence[BatchItem] = (),
    ) -> np.ndarray:
        """Write one chunk of a batch in one transaction; returns the ids given to ``new``.

        ``new`` rows are inserted with their embeddings; ``rescored`` rows (content already
        stored with this version) have their prediction replaced in place; ``failures`` are
        recorded; earlier failures of every processed source are marked resolved; ``counts``
        (the batch's counters so far) land with the rows, so a batch that dies keeps them, as do
        ``items`` (its inputs and what became of each, for the batch report). The FAISS
        index follows in memory once DuckDB has committed. Each new prediction gets its ``id``;
        content another writer of this process stored meanwhile is not inserted twice.
        """
        import pyarrow as pa

        new = self._not_stored(model_version, new)
        stamp = now()
        ids = np.arange(self._next_id, self._next_id + len(new), dtype=np.int64)
        emb = np.stack([p.embedding for p in new]).astype(np.float32) if new else None
        # Load (and check) the index before this chunk lands in DuckDB, so it is added once.
        index = self.indexes.get(model_version, dim=emb.shape[1]) if new else None
        tables: dict[str, pa.Table] = {}
        if new:
            if emb.shape[1] not in self._dims:
                self._add_embedding_table(emb.shape[1])
            tables["_new"] = new_table(ids, new, emb, model_version, batch_id, stamp)
        if rescored:
            tables["_re"] = prediction_table(
                np.zeros(len(rescored), np.int64), rescored, model_version, batch_id, stamp
            )
        if failures:
            tables["_fail"] = pa.table(
                {
                    "batch_id": pa.array([batch_id] * len(failures), pa.int32()),
                    "source": pa.array([f.source for f in failures], pa.string()),
                    "kind": pa.array([f.kind for f in failures], pa.string()),
                    "message": pa.array([f.message for f in failures], pa.string()),
                    "failed_at": pa.array([stamp] * len(failures), pa.timestamp("us", tz="UTC")),
                    "model_version": pa.array([model_version] * len(failures), pa.string()),
                    "resolved": pa.array([False] * len(failures), pa.bool_()),
                }
            )
        if items:
            tables["_items"] = pa.table(
                {
                    "batch_id": pa.array([batch_id] * len(items), pa.int32()),
                    "seq": pa.array([i.seq for i in items], pa.int32()),
                    "source": pa.array([i.source for i in items], pa.string()),
                    "outcome": pa.array([i.outcome for i in items], pa.string()),
                    "sha256": pa.array([i.sha256 for i in items], pa.string()),
                    "error": pa.array([i.error for i in items], pa.string()),
                    "input_row": pa.array(
                        [None if i.row is None else json.dumps(i.row) for i in items], pa.string()
                    ),
                }
            )
        sources = sorted(set(processed_sources) | {i.source for i in items})
        if sources:
            tables["_seen"] = pa.table({"source": pa.array(sources, pa.string())})
        _ = self._db  # folds the journal first, and forgets kept rows (rescored ones change)
        with self._transaction(tables):
            self._write_chunk(tables, batch_id, counts)
        self._next_id += len(new)
        self._stored_content(model_version).update(p.sha256 for p in new)
        for i, p in zip(ids, new, strict=True):
            p.id = int(i)
        if index is not None:
            index.add(ids, emb)
        return ids

    def _write_chunk(self, tables: dict[str, Any], batch_id: int, counts: dict | None) -> None:
        """A batch chunk's statements, inside the caller's transaction, from registered tables.

        ``_seen`` resolves earlier failures of its sources; ``_new`` (``new_table``) inserts
        rows; ``_re`` replaces predictions in place; ``_fail`` and ``_items`` record failures
        and the batch's items; ``counts`` are the batch's counters so far.
        """
        con = self._con
        if "_seen" in tables:
            con.execute(
                "UPDATE failures SET resolved = true FROM _seen "
                "WHERE NOT failures.resolved AND failures.source = _seen.source "
                "AND failures.batch_id <> ?",
                [batch_id],
            )
        if "_new" in tables:
            self._insert_new("_new", tables["_new"])
        if "_re" in tables:
            keep = ("id", "sha256", "model_version", "cluster_id")
            sets = ", ".join(f"{c} = _re.{c}" for c in PREDICTION_COLUMNS if c not in keep)
            con.execute(
                f"UPDATE predictions SET {sets} FROM _re "
                "WHERE predictions.model_version = _re.model_version "
                "AND predictions.sha256 = _re.sha256"
            )
        if "_fail" in tables:
            con.execute("INSERT INTO failures SELECT * FROM _fail")
        if "_items" in tables:
            con.execute("INSERT INTO batch_items SELECT * FROM _items")
        if counts is not None:
            self._update_counts(batch_id, counts)

    @locked
    def ingest_shards(
        self,
        batch_id: int,
        model_version: str,
        paths: Sequence[str | Path],
        counts: dict[str, int],
    ) -> ShardIngest:
        """Store Parquet shards of scored items (``write_shard``) in one transaction, in bulk.

        Exactly once by content, as ``commit``: an item whose content is stored with the version
        already (or earlier in the shards) is ``already_scored``; a failed one is recorded in
        ``failures``; every item lands in ``batch_items``. ``counts`` (the batch's counters
        before the shards) are stored with what they add. The FAISS index is not touched: it
        catches up from DuckDB when next checked (``indexes.check``), in bulk. DuckDB commits
        tens of thousands of rows at twice the rate of a few thousand (bench_ingest.py).
        """
        import pyarrow as pa
        import pyarrow.compute as pc

        shard = read_shards([str(p) for p in paths])
        n = shard.num_rows
        stored = self._stored_content(model_version)
        seen: set[str] = set()
        new_at, already_at = [], []
        failed = pc.is_valid(shard.column("error_kind")).to_numpy(zero_copy_only=False)
        skipped = shard.column("skipped").to_numpy(zero_copy_only=False)
        for i, sha in enumerate(shard.column("sha256").to_pylist()):
            if failed[i]:
                continue
            if skipped[i] or sha in stored or sha in seen:
                already_at.append(i)
            else:
                new_at.append(i)
                seen.add(sha)
        stamp = now()
        ids = np.arange(self._next_id, self._next_id + len(new_at), dtype=np.int64)
        tables: dict[str, Any] = {}
        outcome = np.full(n, "already_scored", dtype=object)
        outcome[failed] = "failed"
        outcome[new_at] = "scored"
        if new_at:  # picked by DuckDB: an Arrow take copies every vector (~2 s for 32,768)
            fixed = {
                "pos": pa.array(new_at, pa.int64()),
                "id": pa.array(ids, pa.int64()),
                "model_version": pa.array([model_version] * len(ids), pa.string()),
                "scored_at": pa.array([stamp] * len(ids), pa.timestamp("us", tz="UTC")),
                "batch_id": pa.array([batch_id] * len(ids), pa.int32()),
                "cluster_id": pa.nulls(len(ids), pa.int32()),
            }
            tables["_pick"] = pa.table(fixed)
            tables["_shard"] = shard.append_column("pos", pa.array(np.arange(n), pa.int64()))
            dim = shard.schema.field("embedding").type.list_size
            if dim not in self._dims:
                self._add_embedding_table(dim)
        errors = [
            None if k is None else f"{k}: {e or ''}".rstrip(": ")
            for k, e in zip(
                shard.column("error_kind").to_pylist(),
                shard.column("error").to_pylist(),
                strict=True,
            )
        ]
        tables["_items"] = pa.table(
            {
                "batch_id": pa.array([batch_id] * n, pa.int32()),
                "seq": shard.column("seq"),
                "source": shard.column("source"),
                "outcome": pa.array(outcome, pa.string()),
                "sha256": shard.column("sha256"),
                "error": pa.array(errors, pa.string()),
                "input_row": shard.column("input_row"),
            }
        )
        fail = shard.filter(pa.array(failed))
        if fail.num_rows:
            tables["_fail"] = pa.table(
                {
                    "batch_id": pa.array([batch_id] * fail.num_rows, pa.int32()),
                    "source": fail.column("source"),
                    "kind": fail.column("error_kind"),
                    "message": pc.fill_null(fail.column("error"), ""),
                    "failed_at": pa.array([stamp] * fail.num_rows, pa.timestamp("us", tz="UTC")),
                    "model_version": pa.array([model_version] * fail.num_rows, pa.string()),
                    "resolved": pa.array([False] * fail.num_rows, pa.bool_()),
                }
            )
        tables["_seen"] = pa.table({"source": pc.unique(shard.column("source"))})
        labels, shas = shard.column("label").to_pylist(), shard.column("sha256").to_pylist()
        label_of = {shas[i]: labels[i] for i in new_at}
        earlier = sorted({shas[i] for i in already_at} - seen)
        if earlier:  # content stored before this shard: its stored label, read once
            found = self.rows_by_content(model_version, earlier)
            label_of |= {sha: row.label for sha, row in found.items()}
        unknown = sum(label_of.get(shas[i]) == UNKNOWN for i in new_at + already_at)
        result = ShardIngest(n, len(new_at), len(already_at), int(failed.sum()), unknown)
        flags = shard.column("quality_flags").to_pylist()
        joins = [k for k, i in enumerate(new_at) if labels[i] == UNKNOWN and not flags[i]]
        if joins:
            at = pa.array([new_at[k] for k in joins], pa.int64())
            result.unknown_ids = ids[joins]
            result.unknown_vectors = embedding_matrix(
                pa.table(
                    {"id": pa.array(result.unknown_ids), "embedding": shard["embedding"].take(at)}
                )
            )[1]
        total = {k: counts.get(k, 0) + v for k, v in result.counts().items()}
        _ = self._db  # folds the journal first
        with self._stored_plain(), self._transaction(tables):
            if new_at:
                self._con.execute(
                    "CREATE OR REPLACE TEMP VIEW _new AS "
                    "SELECT k.* EXCLUDE (pos), s.* EXCLUDE (pos) FROM _pick k JOIN _shard s USING (pos)"
                )
                kept = [c for c in fixed if c != "pos"]
                fields = [tables["_pick"].schema.field(c) for c in kept] + [
                    shard.schema.field(c)
                    for c in (*PREDICTION_COLUMNS, *SHARD_VECTORS)
                    if c not in kept and c in shard.schema.names
                ]
                self._insert_new("_new", pa.schema(fields).empty_table())
                self._con.execute("DROP VIEW _new")
            self._write_chunk(tables, batch_id, total)
        self._next_id += len(new_at)
        stored.update(seen)
        return result

    @contextlib.contextmanager
    def _transaction(self, tables: dict[str, Any]) -> Iterator[Any]:
        """One DuckDB transaction on the connection (yielded) with ``tables`` (Arrow) registered.

        Committed, or rolled back on any error (which is what raises, even when the ROLLBACK
        fails too); the names are unregistered either way. The caller holds the lock.
        """
        for name, table in tables.items():
            self._con.register(name, table)
        try:
            self._con.execute("BEGIN TRANSACTION")
            try:
                yield self._con
                self._con.execute("COMMIT")
            except BaseException:
                try:  # best effort: after a failed COMMIT there may be no transaction left
                    self._con.execute("ROLLBACK")
                except Exception as e:
                    log.debug("ROLLBACK after a failed transaction: %s", e)
                raise
        finally:
            for name in tables:
                self._con.unregister(name)

    def _update_counts(self, batch_id: int, counts: dict[str, int]) -> None:
        """Write a batch row's counters (inside the caller's transaction)."""
        sets, values = _batch_counts(counts)
        self._con.execute(f"UPDATE batches SET {sets} WHERE batch_id = ?", [*values, batch_id])

    def _not_stored(self, model_version: str, new: Sequence[Prediction]) -> list[Prediction]:
        """``new`` without content another writer of this process stored meanwhile.

        Those left out get the stored row's ``id``.
        """
        stored = self._stored_content(model_version)
        dup = [p for p in new if p.sha256 in stored]
        if not dup:
            return list(new)
        log.info("%d images were stored meanwhile by another request; kept once", len(dup))
        rows = self.rows_by_content(model_version, [p.sha256 for p in dup])
        for p in dup:
            p.id = rows[p.sha256].id
        return [p for p in new if p.sha256 not in stored]

    def _insert_new(self, name: str, table: Any, only_missing: bool = False) -> int:
        """Insert ``table`` (``new_table``), registered as ``name``, into the row tables.

        Returns the rows inserted; ``only_missing`` leaves out ids already stored. Its head
        inputs, if it has them, go to ``head_inputs``.
        """
        dim = table.schema.field("embedding").type.list_size
        head = "max_pooled" in table.schema.names
        # a journal written by an earlier release may lack later columns: they stay NULL
        cols = ", ".join(c for c in PREDICTION_COLUMNS if c in table.schema.names)
        vectors = EMBEDDINGS_TABLE.format(dim=dim) if dim in self._dims else "embeddings"
        skip = " WHERE id NOT IN (SELECT id FROM {})" if only_missing else ""
        inserted = self._con.execute(
            f"INSERT INTO predictions ({cols}) SELECT {cols} FROM {name}"
            + skip.format("predictions")
        ).fetchall()[0][0]
        self._con.execute(
            f"INSERT INTO {vectors} SELECT id, embedding FROM {name}" + skip.format(vectors)
        ).fetchall()
        if "signature" in table.schema.names:
            self._con.execute(
                f"INSERT INTO signatures SELECT id, signature FROM {name} "
                "WHERE signature IS NOT NULL"
                + skip.format("signatures").replace(" WHERE ", " AND ")
            ).fetchall()
        if head:
            ood = "ood_features" if "ood_features" in table.schema.names else "NULL"
            self._con.execute(
                f"INSERT INTO head_inputs (id, avg_norm, max_pooled, ood_features) "
                f"SELECT id, avg_norm, max_pooled, {ood} FROM {name} "
                "WHERE max_pooled IS NOT NULL"
                + skip.format("head_inputs").replace(" WHERE ", " AND ")
            ).fetchall()
        return int(inserted)

    # -- the journal ----------------------------------------------------------------------
    @locked
    def append(
        self,
        batch_id: int,
        model_version: str,
        new: Sequence[Prediction],
        counts: dict[str, int] | None = None,
    ) -> np.ndarray:
        """Store new predictions durably through the journal; returns the ids given to them.

        What ``commit(new=...)`` does, for a server's small groups: the rows are synced to the
        journal (one file write) instead of committed to DuckDB (~10 ms of CPU per transaction
        however small), join the FAISS index at once, and reach DuckDB with the next ``fold``.
        ``counts`` (the batch's counters so far) land with them.
        """
        new = self._not_stored(model_version, new)
        meta = {"batch_id": batch_id, "counts": counts}
        if not new:
            if counts is not None:
                self._pend(None, meta)
            return np.zeros(0, np.int64)
        stamp = now()
        ids = np.arange(self._next_id, self._next_id + len(new), dtype=np.int64)
        emb = np.stack([p.embedding for p in new]).astype(np.float32)
        index = self.indexes.get(model_version, dim=emb.shape[1])
        if emb.shape[1] not in self._dims:
            self._add_embedding_table(emb.shape[1])
        table = new_table(ids, new, emb, model_version, batch_id, stamp)
        self._journal.append(table, meta)
        self._pend(table, meta)
        text = utc_text(stamp)
        for i, p in zip(ids, new, strict=True):
            p.id = int(i)
            top1 = p.top3[0] if p.top3 else (None, None)
            prob = None if top1[1] is None else float(np.float32(top1[1]))  # as stored
            self._rows[p.id] = ResultRow(
                p.id, p.source, p.label, p.reason, top1[0], prob, p.cluster_id, text, p.sha256
            )
        self._next_id += len(new)
        self._stored_content(model_version).update(p.sha256 for p in new)
        index.add(ids, emb)
        return ids

    def _pend(self, table: Any, meta: dict[str, Any]) -> None:
        if not self._pending:
            self._pending_since = time.monotonic()
        self._pending.append((table, meta))

    def fold_due(self, seconds: float) -> bool:
        """True when the oldest journaled group has waited ``seconds`` (lock-free)."""
        return bool(self._pending) and time.monotonic() - self._pending_since >= seconds

    @locked
    def fold(self) -> int:
        """Move every journaled row into DuckDB in one transaction, then empty the journal.

        Returns the rows moved. Nothing to do costs nothing.
        """
        if not self._pending:
            return 0
        moved = self._commit_journaled(self._pending)
        self._pending.clear()
        return moved

    def _commit_journaled(
        self, frames: list[tuple[Any, dict[str, Any]]], only_missing: bool = False
    ) -> int:
        """Insert journal frames' rows (and their batches' latest counters) in one transaction.

        Returns the rows inserted.
        """
        import pyarrow as pa

        by_dim: dict[int, list] = {}
        counts: dict[int, dict[str, int]] = {}
        for table, meta in frames:
            if table is not None and table.num_rows:
                by_dim.setdefault(table.schema.field("embedding").type.list_size, []).append(table)
            if meta.get("counts") is not None:
                counts[int(meta["batch_id"])] = meta["counts"]
        for dim in by_dim:
            if dim not in self._dims:
                self._add_embedding_table(dim)
        tables = {
            f"_journal_{dim}": pa.concat_tables(t, promote_options="default")
            for dim, t in by_dim.items()
        }
        inserted = 0
        with self._transaction(tables):
            for dim in by_dim:
                name = f"_journal_{dim}"
                inserted += self._insert_new(name, tables[name], only_missing)
            for batch_id, c in counts.items():
                self._update_counts(batch_id, c)
        self._journal.clear()
        return inserted

    def _replay(self) -> None:
        """Fold in what a process that died left in the journal (rows already in DuckDB skipped).

        Damaged entries are skipped; the journal as found is kept aside before it is emptied.
        """
        found = self._journal.scan()
        if found.damage:
            kept = self._journal.keep_damaged(found)
            log.warning(
                "%s: %s; the journal as found is kept in %s",
                self._journal.path,
                found.describe(),
                kept,
            )
        if not found.frames:
            self._journal.clear()  # nothing whole in it
            return
        rows = self._commit_journaled(found.frames, only_missing=True)
        log.warning(
            "%s: %d rows a stopped process had answered but not yet moved into the store were "
            "added now",
            self._journal.path,
            rows,
        )

    @locked
    def result_rows(self, ids: Sequence[int]) -> dict[int, ResultRow]:
        """Neighbour-result fields of stored rows by id, without folding the journal.

        Rows appended or read since the connection was last handed out
        come from memory (journaled ones must), the rest from DuckDB (a server's group of 8
        requests: ~3 ms of CPU for its 40 neighbours).
        """
        out = {i: self._rows[i] for i in ids if i in self._rows}
        rest = [int(i) for i in ids if i not in out]
        if len(self._rows) > ROWS_KEPT and not self._pending:
            self._rows = {i: r for i, r in self._rows.items() if i >= self._next_id - ROWS_KEPT}
        if rest:
            rows = self._con.execute(
                "SELECT id, source, label, reason, top1_class, top1_prob, cluster_id, "
                "epoch_us(scored_at), sha256 FROM predictions WHERE id IN (SELECT unnest(?::BIGINT[]))",
                [rest],
            ).fetchall()
            for r in rows:
                stamp = dt.datetime.fromtimestamp(r[7] / 1e6, dt.UTC)
                out[r[0]] = self._rows[r[0]] = ResultRow(*r[:7], utc_text(stamp), r[8])
        return out

    @locked
    def unresolved_failures(self) -> list[Failure]:
        """The latest failure of every source not processed since (ignored files excluded)."""
        rows = self._db.execute(
            "SELECT source, arg_max(kind, failed_at), arg_max(message, failed_at) FROM failures "
            "WHERE NOT resolved AND kind <> 'ignored' GROUP BY source ORDER BY min(failed_at), source"
        ).fetchall()
        return [Failure(*r) for r in rows]

    @locked
    def redecide(
        self, model_version: str, rule: UnknownRule, quality: QualityRule | None = None
    ) -> None:
        """Re-decide the label and reason of every stored row of a version by ``rule``.

        With ``quality``, the quality flags of its measured rows are first set by that rule.
        """
        if quality is not None:
            flags, params = quality.sql_flags()
            self._db.execute(
                f"UPDATE predictions SET quality_flags = {flags} "
                f"WHERE model_version = ? AND {MEASURED}",
                [*params, model_version],
            )
        reason, params = rule.sql_reason()
        label, label_params = rule.sql_label()
        self._db.execute(
            f"UPDATE predictions SET reason = {reason}, label = {label} WHERE model_version = ?",
            [*params, *label_params, model_version],
        )

    @locked
    def unknown_counts(
        self, model_version: str, rule: UnknownRule, quality: QualityRule | None = None
    ) -> dict[str, int]:
        """How many stored rows of a version ``rule`` marks UNKNOWN, by reason, and how many are now.

        With ``quality``, photos are judged by that rule instead of their stored flags.
        """
        poor = None
        if quality is not None:
            flags, params = quality.sql_flags()
            poor = (f"({MEASURED} AND {flags} IS NOT NULL)", params)
        counts, params = rule.sql_counts(poor)
        row = self._db.execute(
            f"SELECT count(*), {counts}, count(*) FILTER (WHERE label = '{UNKNOWN}') "
            "FROM predictions WHERE model_version = ?",
            [*params, model_version],
        ).fetchall()[0]
        keys = ("stored", POOR_QUALITY, LOW_CONFIDENCE, FAR_FROM_TRAINING, "unknown", "unknown_now")
        return dict(zip(keys, row, strict=True))

    @locked
    def stored_images(
        self, model_version: str, missing_from: str | None = None
    ) -> list[tuple[str, str]]:
        """(source, sha256) of each image stored with a version, in the order first stored.

        With ``missing_from``, only content not stored with that version too.
        """
        missing = (
            " AND sha256 NOT IN (SELECT sha256 FROM predictions WHERE model_version = ?)"
            if missing_from is not None
            else ""
        )
        return [
            (r[0], r[1])
            for r in self._db.execute(
                f"SELECT source, sha256 FROM predictions WHERE model_version = ?{missing} "
                "ORDER BY id",
                [model_version] + ([missing_from] if missing_from is not None else []),
            ).fetchall()
        ]

    def head_input_chunks(
        self, old: str, new: str, chunk: int, vectors: VectorIndex | None = None
    ) -> Iterator[StoredHeadInputs]:
        """``old``'s rows whose content ``new`` lacks, ``chunk`` at a time, by owner.

        With what their head read (embedding, average-pooled length, max-pooled features), the
        features a Mahalanobis distance reads (where stored), and the row that holds them
        (``owner``: itself, or the row it shares them with); rows stored without head inputs
        are left out. The lock is held per chunk, so the caller may write between chunks.
        ``vectors``: ``old``'s index (``IndexSet.peek``), which holds the embeddings a DuckDB
        read would decompress (5 KB a row); DuckDB is read where it does not. Embeddings read
        from a copy of it (not the loaded index a server may grow meanwhile) may be views of its
        storage: the caller keeps it, unchanged, while it uses them.
        """
        with self.lock:
            dim = self._vector_dim(old)
            if dim is None or dim not in self._dims or not self._shared:
                return
            rows = self._db.sql(
                "SELECT p.id, p.source, p.sha256, p.width, p.height, p.neighbor_id, "
                "p.neighbor_cosine, "
                f"{', '.join('p.' + m for m in STORED_MEASURES)}, "
                "coalesce(s.of_id, p.id) AS owner FROM predictions p "
                "LEFT JOIN shared_features s USING (id) "
                "SEMI JOIN head_inputs h ON h.id = coalesce(s.of_id, p.id) "
                "WHERE p.model_version = $old AND p.sha256 NOT IN "
                "(SELECT sha256 FROM predictions WHERE model_version = $new) ORDER BY owner",
                params={"old": old, "new": new},
            ).to_arrow_table()
        owners = rows.column("owner").to_numpy()
        for a in range(0, len(owners), chunk):
            part = rows.slice(a, chunk)
            want = owners[a : a + chunk]
            lo, hi = int(want[0]), int(want[-1])  # sorted: DuckDB skips row groups outside
            with self.lock:  # plain range scans: a join with the wanted ids costs 6x more
                ids, emb = part.column("id").to_numpy(), None
                if vectors is not None:
                    emb = vectors.vectors_of(ids, view=not self.indexes.in_use(vectors))
                if emb is None:
                    emb = self._db.sql(
                        f"SELECT id, embedding FROM {EMBEDDINGS_TABLE.format(dim=dim)} "
                        f"WHERE id BETWEEN {lo} AND {hi}"
                    ).to_arrow_table()
                head = self._con.sql(
                    "SELECT id, avg_norm, max_pooled, ood_features FROM head_inputs "
                    f"WHERE id BETWEEN {lo} AND {hi}"
                ).to_arrow_table()
            yield StoredHeadInputs.from_arrow(part, emb, head, dim)

    @locked
    def copy_redecided(
        self,
        batch_id: int,
        new: str,
        rows: StoredHeadInputs,
        decided: Any,
        counts: dict[str, int],
        index: bool = True,
    ) -> np.ndarray:
        """Store ``new``'s decisions on ``rows`` stored with another version, in one transaction.

        ``decided`` (Arrow) holds the decided prediction columns (Top-3, label, reason,
        neighbour, cluster, quality flags); source, size and quality measures are ``rows``',
        and the new rows share the
        embedding and head input of ``rows.owner`` (``shared_features``: nothing copied).
        Returns each row's new id, -1 where ``new`` stored its content meanwhile (a server's
        upload while the history is scored: kept once). They join the version's FAISS index
        as committed rows do; without ``index`` (and the index not loaded) it catches up from
        DuckDB when next used (or ``IndexSet.adopt`` gives it the other version's).
        """
        import pyarrow as pa

        stored = self._stored_content(new)
        shas = rows.sha256
        keep = np.array([s not in stored for s in shas], bool)
        out = np.full(len(shas), -1, np.int64)
        n, dim = int(keep.sum()), rows.embedding.shape[1]
        if not n:
            return out
        table, embedding = rows.table, rows.embedding
        if n < len(shas):  # copies only then: a chunk's embeddings are 256 MB
            log.info("%d images were stored with %s meanwhile; kept once", len(shas) - n, new)
            table, decided, embedding = table.filter(keep), decided.filter(keep), embedding[keep]
        ids = np.arange(self._next_id, self._next_id + n, dtype=np.int64)
        if index or self.indexes.is_loaded(new):  # before the rows land
            vectors = self.indexes.get(new, dim=dim)
        else:
            vectors = None
        columns = {
            "id": pa.array(ids),
            **{
                c: table.column(c)
                for c in ("source", "sha256", "width", "height", *STORED_MEASURES)
            },
            "model_version": pa.array([new] * n, pa.string()),
            "scored_at": pa.array([now()] * n, pa.timestamp("us", tz="UTC")),
            "batch_id": pa.array([batch_id] * n, pa.int32()),
            **{c: decided.column(c) for c in decided.column_names},
            "of_id": table.column("owner"),
        }
        cols = ", ".join(c for c in PREDICTION_COLUMNS)
        with self._transaction({"_copied": pa.table(columns)}) as con:
            con.execute(f"INSERT INTO predictions ({cols}) SELECT {cols} FROM _copied")
            con.execute("INSERT INTO shared_features SELECT id, of_id FROM _copied")
            self._update_counts(batch_id, counts)
        self._next_id += n
        stored.update(np.asarray(shas, dtype=object)[keep])
        if vectors is not None:
            vectors.add(ids, embedding)
        out[keep] = ids
        return out

    @locked
    def history_diff(self, old: str, new: str) -> dict[str, Any]:
        """What ``new`` says about the images ``old`` stored: labels changed, UNKNOWNs resolved.

        Images are matched by content. ``changes`` counts each (old label, new label) pair that
        differs; ``resolved`` counts old UNKNOWNs by the class ``new`` gives them; ``clusters``
        the same per old cluster (-1 noise); ``new_unknown`` old classes that are UNKNOWN now.
        """
        pairs = self._db.execute(
            "SELECT o.label, n.label, coalesce(o.cluster_id, -1), count(*) FROM predictions o "
            "JOIN predictions n ON n.sha256 = o.sha256 AND n.model_version = ? "
            "WHERE o.model_version = ? GROUP BY ALL ORDER BY ALL",
            [new, old],
        ).fetchall()
        changes: Counter = Counter()
        resolved: Counter = Counter()
        clusters: dict[int, Counter] = {}
        new_unknown: Counter = Counter()
        for was, now_, cluster, n in pairs:
            if was != now_:
                changes[f"{was} -> {now_}"] += n
            if was == UNKNOWN and now_ != UNKNOWN:
                resolved[now_] += n
            if was == UNKNOWN:
                clusters.setdefault(int(cluster), Counter())[now_] += n
            if was != UNKNOWN and now_ == UNKNOWN:
                new_unknown[was] += n
        return {
            "old": old,
            "new": new,
            "compared": sum(r[3] for r in pairs),
            "changed": sum(changes.values()),
            "changes": dict(changes.most_common()),
            "unknown_before": sum(r[3] for r in pairs if r[0] == UNKNOWN),
            "unknown_after": sum(r[3] for r in pairs if r[1] == UNKNOWN),
            "resolved": dict(resolved.most_common()),
            "clusters": {str(c): dict(v.most_common()) for c, v in sorted(clusters.items())},
            "new_unknown": dict(new_unknown.most_common()),
        }

    # -- what the vector indexes are built from --------------------------------------------
    def _embeddings_of(self, dim: int) -> str:
        """Where ``dim``-sized embeddings are read from, shared rows' included (``shared_sql``).

        A store not yet migrated: its old table.
        """
        if dim not in self._dims:
            return "embeddings"
        return shared_sql(EMBEDDINGS_TABLE.format(dim=dim), "embedding", self._shared)

    def _add_embedding_table(self, dim: int) -> None:
        add_embedding_table(self._con, dim)
        self._dims.add(int(dim))

    def _vector_stats(self, model_version: str) -> tuple[int, int, int]:
        """(rows, largest id, id sum) of a version: what its index must agree with."""
        count, max_id, id_sum = self._db.execute(
            "SELECT count(*), coalesce(max(id), -1), coalesce(sum(id), 0) FROM predictions "
            "WHERE model_version = ?",
            [model_version],
        ).fetchall()[0]
        return int(count), int(max_id), int(id_sum)

    def _vector_dim(self, model_version: str) -> int | None:
        """The size of a version's embeddings (None: it has no rows).

        Read from the per-size table that holds its first row's embedding (or its owner's): the
        ``embeddings`` view joins every shared row with its owner's table first (0.4 s at
        100,000 rows).
        """
        first = self._db.execute(
            "SELECT min(id) FROM predictions WHERE model_version = ?", [model_version]
        ).fetchall()[0][0]
        if first is None:
            return None
        owner = first
        if self._shared:
            row = self._db.execute("SELECT of_id FROM shared_features WHERE id = ?", [first])
            owner = next(iter(row.fetchall()), (first,))[0]
        for dim in sorted(self._dims):
            table = EMBEDDINGS_TABLE.format(dim=dim)
            if self._db.execute(f"SELECT 1 FROM {table} WHERE id = ?", [owner]).fetchall():
                return dim
        row = self._db.execute(  # a store not yet migrated: its old table
            "SELECT len(embedding) FROM embeddings WHERE id = ?", [first]
        ).fetchall()
        return int(row[0][0]) if row else None

    def _vector_ids(self, model_version: str) -> np.ndarray:
        ids = self._db.execute(
            "SELECT id FROM predictions WHERE model_version = ? ORDER BY id", [model_version]
        ).fetchnumpy()["id"]
        return np.asarray(ids, dtype=np.int64)

    def _vector_chunks(
        self, model_version: str, dim: int
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """A version's (ids, embeddings) from DuckDB, READ_CHUNK rows at a time (holds the lock).

        DuckDB's memory limit is lowered meanwhile: a one-off read of every embedding would
        otherwise stay cached beside the index being built (``release_cache``).
        """
        import pyarrow as pa

        query = (
            f"SELECT e.id, e.embedding FROM {self._embeddings_of(dim)} e "
            "JOIN predictions p USING (id) WHERE p.model_version = ?"
        )
        with self._connection() as con, self._memory_limit(STREAM_MEMORY):
            for batch in con.sql(query, params=[model_version]).to_arrow_reader(READ_CHUNK):
                yield embedding_matrix(pa.Table.from_batches([batch]), dim)

    def sample_vectors(
        self, model_version: str, max_rows: int, seed: int = 0
    ) -> tuple[np.ndarray, np.ndarray]:
        """Up to ``max_rows`` of a version's (ids, embeddings), a seeded sample, ids sorted.

        Read on a cursor of its own in chunks, streamed (no sort: a server's cursors have a
        memory limit), while a server keeps storing predictions.
        """
        import pyarrow as pa

        with self.lock:
            dim = self._vector_dim(model_version)
            ids = self._vector_ids(model_version)
            table = self._embeddings_of(dim) if dim else None
        if dim is None or not len(ids):
            return np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
        if len(ids) > max_rows:
            ids = np.sort(np.random.default_rng(seed).choice(ids, max_rows, replace=False))
        with self.cursor() as cur:
            cur.register("_sample_ids", pa.table({"id": pa.array(ids, pa.int64())}))
            query = f"SELECT e.id, e.embedding FROM {table} e JOIN _sample_ids USING (id)"
            got_ids, out = _fill_vectors(cur.sql(query), len(ids), dim)
        if len(got_ids) > 1 and not np.all(got_ids[1:] > got_ids[:-1]):  # rarely: no copy
            order = np.argsort(got_ids, kind="stable")
            got_ids, out = got_ids[order], out[order]
        return got_ids, out

    @locked
    def release_cache(self) -> None:
        """Let DuckDB drop the pages it keeps cached (after a one-off read of every embedding).

        Its buffer cache holds what was read up to its memory limit; a map's read of 50,000
        embeddings would otherwise keep ~230 MB that nothing else reads soon. Lowering the
        limit for a moment evicts them; the limit is then put back.
        """
        with self._memory_limit("16MB"):
            pass

    @contextlib.contextmanager
    def _stored_plain(self) -> Iterator[None]:
        """Row groups checkpointed in the block are stored without compression, then as before.

        For bulk ingests: embeddings and head inputs, ~97% of a row's bytes, do not compress
        (the store is 2.4% larger), and trying costs most of a commit (bench_ingest.py: 4.0 s
        against 10.8 s for 131,072 rows).
        """
        was = self._con.execute(
            "SELECT current_setting('disabled_compression_methods')"
        ).fetchall()[0][0]
        self._con.execute(f"SET disabled_compression_methods = '{PLAIN_STORAGE}'")
        try:
            yield
        finally:
            self._con.execute(f"SET disabled_compression_methods = '{was or ''}'")

    @contextlib.contextmanager
    def _memory_limit(self, limit: str) -> Iterator[None]:
        """Hold DuckDB's memory limit at ``limit`` for the block, then put it back.

        Lowering it evicts the cached pages beyond it. The caller holds the lock.
        """
        was = self._con.execute("SELECT current_setting('memory_limit')").fetchall()[0][0]
        self._con.execute(f"SET memory_limit = '{limit}'")
        try:
            yield
        finally:
            self._con.execute(f"SET memory_limit = '{was}'")

    def point_fields(self, model_version: str, ids: np.ndarray) -> dict[str, list]:
        """Label, reason, Top-1 class and cluster of stored rows, in the order of ``ids``."""
        import pyarrow as pa

        with self.cursor() as cur:
            cur.register(
                "_point_ids",
                pa.table({"id": pa.array(ids, pa.int64()), "k": pa.array(np.arange(len(ids)))}),
            )
            table = cur.sql(
                "SELECT p.label, coalesce(p.reason, '') AS reason, p.top1_class, "
                "coalesce(p.cluster_id, -2) AS cluster_id FROM _point_ids w "
                "LEFT JOIN predictions p ON p.id = w.id AND p.model_version = ? ORDER BY w.k",
                params=[model_version],
            ).to_arrow_table()
        return {c: table.column(c).to_pylist() for c in table.column_names}

    def _vectors_of(self, ids: np.ndarray, dim: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The stored embeddings of ``ids``, in chunks of (ids, vectors)."""
        import pyarrow as pa

        if len(ids) == 0:
            return
        self._db.register("_want_ids", pa.table({"id": pa.array(ids, pa.int64())}))
        try:
            query = (
                f"SELECT e.id, e.embedding FROM {self._embeddings_of(dim)} e "
                "JOIN _want_ids USING (id) ORDER BY e.id"
            )
            for batch in self._db.sql(query).to_arrow_reader(READ_CHUNK):
                yield embedding_matrix(pa.Table.from_batches([batch]), dim)
        finally:
            self._db.unregister("_want_ids")
