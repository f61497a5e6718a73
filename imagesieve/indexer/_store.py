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
import functools
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from imagesieve._workspace import Workspace
from imagesieve.classifier import Prediction
from imagesieve.indexer._images import remove_partial_images
from imagesieve.indexer._journal import Journal
from imagesieve.indexer._vectors import IndexFileError, VectorIndex

__all__ = [
    "STORE_FILE",
    "Failure",
    "IndexCheck",
    "Store",
    "StoreBusyError",
    "embedding_matrix",
    "using_store",
]

log = logging.getLogger(__name__)

STORE_FILE = "store.duckdb"
#: Rows appended but not yet folded into DuckDB (see ``Store.append``).
JOURNAL_FILE = "store.journal"
INDEX_DIR = "index"
#: The store never reads or writes files through DuckDB (rows arrive as Arrow tables), so
#: file and network access stay off: user SQL (filters, the console) cannot reach outside.
CONNECTION_CONFIG = {
    "enable_external_access": False,
    "autoinstall_known_extensions": False,
    "autoload_known_extensions": False,
}
#: Embeddings live in one table per dimension, a fixed-size ``FLOAT[d]`` column: inserting and
#: committing 8 rows of 1280 costs ~4 ms of CPU there against 9-12 ms in a ``FLOAT[]`` list
#: column, which matters to a server committing small groups. The view ``embeddings`` (id,
#: FLOAT[]) unites the tables for queries, whatever the model versions' sizes.
EMBEDDINGS_TABLE = "embeddings_{dim}"
#: Rows moved per transaction when an older store's list embeddings move to those tables.
MIGRATE_CHUNK = 50_000
#: A batch row's counters, kept up to date by each commit that passes them.
BATCH_COUNTS = ("n_items", "n_scored", "n_skipped", "n_unknown", "n_failed")
#: Rows read per chunk when rebuilding or catching up an index from DuckDB.
READ_CHUNK = 8192
#: Neighbour rows kept in memory at most (~0.3 KB each); past it, the newest are kept.
ROWS_KEPT = 200_000

SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    batch_id INTEGER PRIMARY KEY,
    started_at TIMESTAMPTZ NOT NULL,
    finished_at TIMESTAMPTZ,
    status VARCHAR NOT NULL,            -- running, done, interrupted
    model_version VARCHAR NOT NULL,
    inputs VARCHAR,                     -- JSON list of what was asked for
    options VARCHAR,                    -- JSON of the run's options
    n_items INTEGER DEFAULT 0,
    n_scored INTEGER DEFAULT 0,
    n_skipped INTEGER DEFAULT 0,        -- content already scored with this version
    n_unknown INTEGER DEFAULT 0,
    n_failed INTEGER DEFAULT 0
);
CREATE TABLE IF NOT EXISTS predictions (
    id BIGINT PRIMARY KEY,
    source VARCHAR NOT NULL,            -- path, URL or archive.zip:member
    sha256 VARCHAR NOT NULL,
    width INTEGER,
    height INTEGER,
    model_version VARCHAR NOT NULL,
    scored_at TIMESTAMPTZ NOT NULL,
    batch_id INTEGER NOT NULL,
    top1_class VARCHAR, top1_prob FLOAT,
    top2_class VARCHAR, top2_prob FLOAT,
    top3_class VARCHAR, top3_prob FLOAT,
    label VARCHAR NOT NULL,             -- a class, or UNKNOWN
    reason VARCHAR,                     -- why UNKNOWN: low_confidence, far_from_training, both
    neighbor_id INTEGER,                -- nearest training image (reference_images.id)
    neighbor_distance FLOAT,            -- its cosine distance
    cluster_id INTEGER                  -- clusters.cluster_id; -1 noise; NULL not clustered
);
CREATE UNIQUE INDEX IF NOT EXISTS predictions_content ON predictions (model_version, sha256);
CREATE TABLE IF NOT EXISTS failures (
    batch_id INTEGER NOT NULL,
    source VARCHAR NOT NULL,
    kind VARCHAR NOT NULL,              -- missing, not_image, truncated, http_error, timeout, ...
    message VARCHAR NOT NULL,
    failed_at TIMESTAMPTZ NOT NULL,
    model_version VARCHAR NOT NULL,
    resolved BOOLEAN NOT NULL DEFAULT false  -- the source was processed again later
);
CREATE TABLE IF NOT EXISTS clusters (
    model_version VARCHAR NOT NULL,
    cluster_id INTEGER NOT NULL,        -- stable across clustering runs
    status VARCHAR NOT NULL,            -- new, named, promoted, rejected
    name VARCHAR,
    size INTEGER NOT NULL,              -- members at the last run (0: not found again)
    medoid_id BIGINT,                   -- predictions.id of the member nearest the centroid
    cohesion FLOAT,                     -- mean cosine similarity of members to the centroid
    radius FLOAT,                       -- cosine distance covering ~95% of members
    centroid FLOAT[],
    top1 VARCHAR,                       -- JSON {class: members with that Top-1}
    top2 VARCHAR,
    run_id INTEGER,                     -- the clustering run that last saw it
    created_at TIMESTAMPTZ NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL,
    promoted_into VARCHAR,              -- the folder its images were copied into
    PRIMARY KEY (model_version, cluster_id)
);
CREATE TABLE IF NOT EXISTS cluster_runs (
    run_id INTEGER PRIMARY KEY,
    model_version VARCHAR NOT NULL,
    finished_at TIMESTAMPTZ NOT NULL,
    images INTEGER NOT NULL,
    clusters INTEGER NOT NULL,
    noise INTEGER NOT NULL,
    params VARCHAR,
    seconds VARCHAR
);
CREATE TABLE IF NOT EXISTS cluster_exclusions (
    model_version VARCHAR NOT NULL,
    cluster_id INTEGER NOT NULL,
    id BIGINT NOT NULL,                 -- a member left out of promotion
    PRIMARY KEY (model_version, cluster_id, id)
);
CREATE TABLE IF NOT EXISTS reference_images (
    model_version VARCHAR NOT NULL,
    id INTEGER NOT NULL,
    source VARCHAR NOT NULL,
    label VARCHAR NOT NULL,
    PRIMARY KEY (model_version, id)
);
"""

PREDICTION_COLUMNS = [
    "id",
    "source",
    "sha256",
    "width",
    "height",
    "model_version",
    "scored_at",
    "batch_id",
    "top1_class",
    "top1_prob",
    "top2_class",
    "top2_prob",
    "top3_class",
    "top3_prob",
    "label",
    "reason",
    "neighbor_id",
    "neighbor_distance",
    "cluster_id",
]


class StoreBusyError(RuntimeError):
    """Another process holds the workspace's store open for writing."""

    @classmethod
    def held(cls, path: Path, error: Exception) -> StoreBusyError:
        """The one-line error for DuckDB's lock ``error`` on ``path``: who holds it, what to do."""
        pid = re.search(r"\(PID (\d+)\)", str(error))
        return cls(
            f"the store {path} is in use by another imagesieve process"
            f"{f' (PID {pid[1]})' if pid else ''}; wait for it to finish, or, if it is "
            "`imagesieve serve`, use its app or REST API (/api/v1/sql, /api/v1/score)"
        )


@dataclass(frozen=True)
class Failure:
    """One input that could not be scored, with its one-line reason."""

    source: str
    kind: str
    message: str


@dataclass
class IndexCheck:
    """What opening (or ``reindex``) did to one version's FAISS index."""

    model_version: str
    rows: int
    action: str  # in_sync, caught_up, repaired, rebuilt
    added: int = 0
    removed: int = 0
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)


# DuckDB 2 streams results: a result not read to the end keeps the connection busy, so every
# query here is read in full (fetchall / fetchnumpy) before the next call.


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _utc_text(stamp: dt.datetime) -> str:
    """A timestamp as ISO 8601 UTC text to the second, as results show it."""
    return stamp.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def embedding_matrix(table, dim: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """An Arrow table (id, embedding list) -> (ids, (n, d) float32)."""
    import pyarrow.compute as pc

    ids = table.column("id").to_numpy().astype(np.int64)
    if len(ids) == 0:
        return ids, np.zeros((0, dim or 0), np.float32)
    flat = pc.list_flatten(table.column("embedding")).to_numpy().astype(np.float32)
    return ids, flat.reshape(len(ids), -1)


def _batch_counts(counts: dict[str, int]) -> tuple[str, list[int]]:
    """The SET clause and parameters that write a batch row's counters (missing ones: 0)."""
    return ", ".join(f"{c} = ?" for c in BATCH_COUNTS), [
        int(counts.get(c, 0)) for c in BATCH_COUNTS
    ]


def _locked(method: Callable) -> Callable:
    """Run a Store method holding the store's lock: one thread at a time on its connection."""

    @functools.wraps(method)
    def wrapper(self: Store, *args: Any, **kwargs: Any) -> Any:
        with self.lock:
            return method(self, *args, **kwargs)

    return wrapper


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

    A long-lived store is shared by threads (the server): every method holds ``lock``, and
    code reading ``con`` directly takes it too. ``con`` folds journaled rows into DuckDB before
    handing out the connection, so whatever runs on it sees every stored row.
    """

    def __init__(self, ws: Workspace, *, read_only: bool = False, check: bool = True):
        import duckdb

        self.ws = ws
        self.lock = threading.RLock()
        self.path = ws.root / STORE_FILE
        self.read_only = read_only
        if read_only and not self.path.is_file():
            raise FileNotFoundError(f"no store in {ws.root} yet: score some images first")
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
        # Appended, not yet folded: (table, {batch_id, counts}) per group, as the journal has it.
        self._pending: list[tuple[Any, dict[str, Any]]] = []
        # Neighbour-result fields by id (``result_rows``): every appended row, and rows read
        # since the connection was last handed out (any use of it may change rows: it clears).
        self._rows: dict[int, tuple] = {}
        self._pending_since = 0.0
        self._indexes: dict[str, VectorIndex] = {}
        self._content: dict[str, set[str]] = {}
        self.checks: list[IndexCheck] = []
        self._dims = self._embedding_dims()
        if not read_only:
            self.con.execute(SCHEMA)
            self._migrate_embeddings()
            self._create_embeddings_view()
            from imagesieve.search._sql import VIEWS_SQL  # local: search imports the indexer

            self.con.execute(VIEWS_SQL)
            self.con.execute("UPDATE batches SET status = 'interrupted' WHERE status = 'running'")
            self._replay()
        self._next_id = (
            int(self.con.execute("SELECT coalesce(max(id), 0) FROM predictions").fetchall()[0][0])
            + 1
        )
        if check and not read_only:
            self.checks = [self.check_index(v) for v in self.versions()]
        if not read_only:
            remove_partial_images(ws)

    # -- embedding tables -----------------------------------------------------------------
    def _embedding_dims(self) -> set[int]:
        """The dimensions that have an ``embeddings_<d>`` table."""
        names = self.con.execute(
            "SELECT table_name FROM duckdb_tables() WHERE table_name LIKE 'embeddings\\_%' ESCAPE '\\'"
        ).fetchall()
        return {int(n[11:]) for (n,) in names if n[11:].isdigit()}

    def _embeddings_of(self, dim: int) -> str:
        """The table holding ``dim``-sized embeddings (a store not yet migrated: the old one)."""
        return EMBEDDINGS_TABLE.format(dim=dim) if dim in self._dims else "embeddings"

    def _add_embedding_table(self, dim: int) -> None:
        """Create ``embeddings_<dim>`` and widen the ``embeddings`` view over it."""
        self._con.execute(
            f"CREATE TABLE IF NOT EXISTS {EMBEDDINGS_TABLE.format(dim=dim)} "
            f"(id BIGINT PRIMARY KEY, embedding FLOAT[{int(dim)}] NOT NULL)"
        )
        self._dims.add(int(dim))
        self._create_embeddings_view()

    def _create_embeddings_view(self) -> None:
        """``embeddings`` (id, FLOAT[]): every dimension's table as one, for SQL and clustering."""
        parts = [
            f"SELECT id, embedding::FLOAT[] AS embedding FROM {EMBEDDINGS_TABLE.format(dim=d)}"
            for d in sorted(self._dims)
        ] or ["SELECT NULL::BIGINT AS id, NULL::FLOAT[] AS embedding WHERE false"]
        self._con.execute(f"CREATE OR REPLACE VIEW embeddings AS {' UNION ALL '.join(parts)}")

    def _migrate_embeddings(self) -> None:
        """A store written before the per-size tables: move its ``FLOAT[]`` rows into them, once.

        In id windows of MIGRATE_CHUNK rows, each its own transaction (memory stays bounded); an
        interrupted move resumes where it stopped, and the old table goes only once all is moved.
        """
        kind = self.con.execute(
            "SELECT table_type FROM information_schema.tables WHERE table_name = 'embeddings'"
        ).fetchall()
        if not kind or kind[0][0] != "BASE TABLE":
            return
        n, lo, hi = self.con.execute(
            "SELECT count(*), coalesce(min(id), 0), coalesce(max(id), 0) FROM embeddings"
        ).fetchall()[0]
        dims = [
            int(d)
            for (d,) in self.con.execute(
                "SELECT DISTINCT len(embedding) FROM embeddings ORDER BY 1"
            ).fetchall()
        ]
        log.warning(
            "this store keeps its %d embeddings in the older list form: moving them into "
            "per-size tables (once; about 16 s per 100,000)",
            n,
        )
        for d in dims:
            table = EMBEDDINGS_TABLE.format(dim=d)
            self.con.execute(
                f"CREATE TABLE IF NOT EXISTS {table} "
                f"(id BIGINT PRIMARY KEY, embedding FLOAT[{d}] NOT NULL)"
            )
            done = self.con.execute(f"SELECT coalesce(max(id), ?) FROM {table}", [lo - 1])
            for a in range(int(done.fetchall()[0][0]), int(hi), MIGRATE_CHUNK):
                self.con.execute(
                    f"INSERT INTO {table} SELECT id, embedding::FLOAT[{d}] FROM embeddings "
                    "WHERE id > ? AND id <= ? AND len(embedding) = ? ORDER BY id",
                    [a, a + MIGRATE_CHUNK, d],
                )
        self.con.execute("DROP TABLE embeddings")
        self._dims = self._embedding_dims()

    # -- lifecycle ------------------------------------------------------------------------
    @property
    def con(self) -> Any:
        """The DuckDB connection, with every journaled row folded in first.

        It also forgets the neighbour rows kept in memory: whoever takes the connection may
        relabel or re-cluster rows.
        """
        with self.lock:  # a concurrent append must not lose its rows to the clearing
            if self._pending:
                self.fold()
            self._rows = {}
        return self._con

    @_locked
    def close(self) -> None:
        """Fold the journal, save changed indexes and close DuckDB."""
        try:
            self.fold()
            self.save_indexes()
        finally:
            self._journal.close()
            self._con.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- batches --------------------------------------------------------------------------
    @_locked
    def begin_batch(
        self, model_version: str, inputs: Sequence[str], options: dict[str, Any]
    ) -> int:
        """Record a new batch as running; returns its id."""
        import json

        batch_id = int(
            self.con.execute("SELECT coalesce(max(batch_id), 0) + 1 FROM batches").fetchall()[0][0]
        )
        self.con.execute(
            "INSERT INTO batches (batch_id, started_at, status, model_version, inputs, options) "
            "VALUES (?, ?, 'running', ?, ?, ?)",
            [
                batch_id,
                _now(),
                model_version,
                json.dumps(list(inputs)),
                json.dumps(options, default=str),
            ],
        )
        return batch_id

    @_locked
    def finish_batch(self, batch_id: int, status: str, counts: dict[str, int]) -> None:
        """Mark a batch done (or interrupted) with its final counts."""
        sets, values = _batch_counts(counts)
        self.con.execute(
            f"UPDATE batches SET status = ?, finished_at = ?, {sets} WHERE batch_id = ?",
            [status, _now(), *values, batch_id],
        )

    # -- rows -----------------------------------------------------------------------------
    @_locked
    def versions(self) -> list[str]:
        """Model versions with stored rows."""
        rows = self.con.execute(
            "SELECT DISTINCT model_version FROM predictions ORDER BY model_version"
        ).fetchall()
        return [r[0] for r in rows]

    @_locked
    def row_count(self, model_version: str) -> int:
        """Stored images of a model version (from the content set when loaded: no query)."""
        content = self._content.get(model_version)
        return len(content) if content is not None else self._db_stats(model_version)[0]

    @_locked
    def known_content(self, model_version: str) -> set[str]:
        """SHA-256 of every image already scored with ``model_version`` (a copy)."""
        return set(self._stored_content(model_version))

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

    def _stored_content(self, model_version: str) -> set[str]:
        """The live set behind ``known_content``, read once and kept up to date by ``commit``."""
        if model_version not in self._content:
            rows = self.con.execute(
                "SELECT sha256 FROM predictions WHERE model_version = ?", [model_version]
            ).fetchall()
            self._content[model_version] = {r[0] for r in rows}
        return self._content[model_version]

    @_locked
    def rows_by_content(
        self, model_version: str, sha256s: Iterable[str]
    ) -> dict[str, dict[str, Any]]:
        """Stored rows of ``model_version`` for these contents, keyed by SHA-256."""
        import pyarrow as pa

        wanted = pa.table({"sha256": pa.array(sorted(set(sha256s)), pa.string())})
        self.con.register("_wanted", wanted)
        try:
            cur = self.con.execute(
                f"SELECT {', '.join('p.' + c for c in PREDICTION_COLUMNS)} FROM predictions p "
                "JOIN _wanted w USING (sha256) WHERE p.model_version = ?",
                [model_version],
            )
            rows = [dict(zip(PREDICTION_COLUMNS, r, strict=True)) for r in cur.fetchall()]
        except BaseException:
            self.con.abort()
            raise
        finally:
            self.con.unregister("_wanted")
        return {r["sha256"]: r for r in rows}

    @_locked
    def register_version(
        self, model_version: str, sources: Sequence[str], labels: Sequence[str]
    ) -> None:
        """Record a version's training (reference) images once, so neighbour ids join in SQL."""
        import pyarrow as pa

        have = self.con.execute(
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
        self.con.register("_ref", ref)
        try:
            self.con.execute("INSERT INTO reference_images SELECT * FROM _ref")
        finally:
            self.con.unregister("_ref")

    @_locked
    def commit(
        self,
        batch_id: int,
        model_version: str,
        new: Sequence[Prediction] = (),
        rescored: Sequence[Prediction] = (),
        failures: Sequence[Failure] = (),
        processed_sources: Iterable[str] = (),
        counts: dict[str, int] | None = None,
    ) -> np.ndarray:
        """Write one chunk of a batch in one transaction; returns the ids given to ``new``.

        ``new`` rows are inserted with their embeddings; ``rescored`` rows (content already
        stored with this version) have their prediction replaced in place; ``failures`` are
        recorded; earlier failures of every processed source are marked resolved; ``counts``
        (the batch's counters so far) land with the rows, so a batch that dies keeps them. The FAISS
        index follows in memory once DuckDB has committed. Each new prediction gets its ``id``;
        content another writer of this process stored meanwhile is not inserted twice.
        """
        import pyarrow as pa

        new = self._not_stored(model_version, new)
        now = _now()
        ids = np.arange(self._next_id, self._next_id + len(new), dtype=np.int64)
        emb = np.stack([p.embedding for p in new]).astype(np.float32) if new else None
        # Load (and check) the index before this chunk lands in DuckDB, so it is added once.
        index = self.index(model_version, dim=emb.shape[1]) if new else None
        tables: dict[str, pa.Table] = {}
        if new:
            if emb.shape[1] not in self._dims:
                self._add_embedding_table(emb.shape[1])
            tables["_new"] = self._new_table(ids, new, emb, model_version, batch_id, now)
        if rescored:
            tables["_re"] = self._prediction_table(
                np.zeros(len(rescored), np.int64), rescored, model_version, batch_id, now
            )
        if failures:
            tables["_fail"] = pa.table(
                {
                    "batch_id": pa.array([batch_id] * len(failures), pa.int32()),
                    "source": pa.array([f.source for f in failures], pa.string()),
                    "kind": pa.array([f.kind for f in failures], pa.string()),
                    "message": pa.array([f.message for f in failures], pa.string()),
                    "failed_at": pa.array([now] * len(failures), pa.timestamp("us", tz="UTC")),
                    "model_version": pa.array([model_version] * len(failures), pa.string()),
                    "resolved": pa.array([False] * len(failures), pa.bool_()),
                }
            )
        sources = sorted(set(processed_sources))
        if sources:
            tables["_seen"] = pa.table({"source": pa.array(sources, pa.string())})
        con = self.con  # folds the journal first, and forgets kept rows (rescored ones change)
        with self._transaction(tables):
            if "_seen" in tables:
                con.execute(
                    "UPDATE failures SET resolved = true FROM _seen "
                    "WHERE NOT failures.resolved AND failures.source = _seen.source "
                    "AND failures.batch_id <> ?",
                    [batch_id],
                )
            if "_new" in tables:
                self._insert_new("_new", emb.shape[1])
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
            if counts is not None:
                self._update_counts(batch_id, counts)
        self._next_id += len(new)
        self._stored_content(model_version).update(p.sha256 for p in new)
        for i, p in zip(ids, new, strict=True):
            p.id = int(i)
        if index is not None:
            index.add(ids, emb)
        return ids

    @contextlib.contextmanager
    def _transaction(self, tables: dict[str, Any]) -> Iterator[None]:
        """One DuckDB transaction with ``tables`` (Arrow) registered by name.

        Committed, or rolled back on any error (which is what raises, even when the ROLLBACK
        fails too); the names are unregistered either way.
        """
        for name, table in tables.items():
            self._con.register(name, table)
        try:
            self._con.execute("BEGIN TRANSACTION")
            try:
                yield
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
            p.id = int(rows[p.sha256]["id"])
        return [p for p in new if p.sha256 not in stored]

    def _insert_new(self, name: str, dim: int, only_missing: bool = False) -> int:
        """Insert the registered new-rows table ``name`` (``_new_table``) into both tables.

        Returns the rows inserted; ``only_missing`` leaves out ids already stored.
        """
        cols = ", ".join(PREDICTION_COLUMNS)
        table = self._embeddings_of(dim)
        skip = " WHERE id NOT IN (SELECT id FROM {})" if only_missing else ""
        inserted = self._con.execute(
            f"INSERT INTO predictions ({cols}) SELECT {cols} FROM {name}"
            + skip.format("predictions")
        ).fetchall()[0][0]
        self._con.execute(
            f"INSERT INTO {table} SELECT id, embedding FROM {name}" + skip.format(table)
        ).fetchall()
        return int(inserted)

    @classmethod
    def _new_table(cls, ids, preds, emb, model_version, batch_id, now):
        """New rows as one Arrow table: prediction columns, then the embedding (``FLOAT[d]``).

        One registered table feeds both inserts: each registration costs a catalog change.
        """
        import pyarrow as pa

        return cls._prediction_table(ids, preds, model_version, batch_id, now).append_column(
            "embedding",
            pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel(), pa.float32()), emb.shape[1]),
        )

    # -- the journal ----------------------------------------------------------------------
    @_locked
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
        now = _now()
        ids = np.arange(self._next_id, self._next_id + len(new), dtype=np.int64)
        emb = np.stack([p.embedding for p in new]).astype(np.float32)
        index = self.index(model_version, dim=emb.shape[1])
        if emb.shape[1] not in self._dims:
            self._add_embedding_table(emb.shape[1])
        table = self._new_table(ids, new, emb, model_version, batch_id, now)
        self._journal.append(table, meta)
        self._pend(table, meta)
        stamp = _utc_text(now)
        for i, p in zip(ids, new, strict=True):
            p.id = int(i)
            top1 = p.top3[0] if p.top3 else (None, None)
            prob = None if top1[1] is None else float(np.float32(top1[1]))  # as stored
            self._rows[p.id] = (
                p.id,
                p.source,
                p.label,
                p.reason,
                top1[0],
                prob,
                p.cluster_id,
                stamp,
                p.sha256,
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

    @_locked
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
        tables = {f"_journal_{dim}": pa.concat_tables(t) for dim, t in by_dim.items()}
        inserted = 0
        with self._transaction(tables):
            for dim in by_dim:
                inserted += self._insert_new(f"_journal_{dim}", dim, only_missing)
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

    @_locked
    def result_rows(self, ids: Sequence[int]) -> dict[int, tuple]:
        """Neighbour-result fields of stored rows by id, without folding the journal.

        (id, source, label, reason, top1_class, top1_prob, cluster_id, scored_at, sha256),
        scored_at as UTC text. Rows appended or read since the connection was last handed out
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
                out[r[0]] = self._rows[r[0]] = (*r[:7], _utc_text(stamp), r[8])
        return out

    @staticmethod
    def _prediction_table(ids, preds, model_version, batch_id, now):
        import pyarrow as pa

        def top(i: int, part: int) -> list:
            return [p.top3[i][part] if len(p.top3) > i else None for p in preds]

        n = len(preds)
        return pa.table(
            {
                "id": pa.array(ids, pa.int64()),
                "source": pa.array([p.source for p in preds], pa.string()),
                "sha256": pa.array([p.sha256 for p in preds], pa.string()),
                "width": pa.array([p.width for p in preds], pa.int32()),
                "height": pa.array([p.height for p in preds], pa.int32()),
                "model_version": pa.array([model_version] * n, pa.string()),
                "scored_at": pa.array([now] * n, pa.timestamp("us", tz="UTC")),
                "batch_id": pa.array([batch_id] * n, pa.int32()),
                "top1_class": pa.array(top(0, 0), pa.string()),
                "top1_prob": pa.array(top(0, 1), pa.float32()),
                "top2_class": pa.array(top(1, 0), pa.string()),
                "top2_prob": pa.array(top(1, 1), pa.float32()),
                "top3_class": pa.array(top(2, 0), pa.string()),
                "top3_prob": pa.array(top(2, 1), pa.float32()),
                "label": pa.array([p.label for p in preds], pa.string()),
                "reason": pa.array([p.reason for p in preds], pa.string()),
                "neighbor_id": pa.array([p.neighbor_id for p in preds], pa.int32()),
                "neighbor_distance": pa.array([p.neighbor_distance for p in preds], pa.float32()),
                "cluster_id": pa.array([p.cluster_id for p in preds], pa.int32()),
            }
        )

    @_locked
    def unresolved_failures(self) -> list[Failure]:
        """The latest failure of every source not processed since (ignored files excluded)."""
        rows = self.con.execute(
            "SELECT source, arg_max(kind, failed_at), arg_max(message, failed_at) FROM failures "
            "WHERE NOT resolved AND kind <> 'ignored' GROUP BY source ORDER BY min(failed_at), source"
        ).fetchall()
        return [Failure(*r) for r in rows]

    # -- the vector index -----------------------------------------------------------------
    def index_path(self, model_version: str) -> Path:
        """Where a version's FAISS index is saved."""
        return self.ws.root / INDEX_DIR / f"{model_version}.faiss"

    def _db_stats(self, model_version: str) -> tuple[int, int, int]:
        count, max_id, id_sum = self.con.execute(
            "SELECT count(*), coalesce(max(id), -1), coalesce(sum(id), 0) FROM predictions "
            "WHERE model_version = ?",
            [model_version],
        ).fetchall()[0]
        return int(count), int(max_id), int(id_sum)

    def _embedding_dim(self, model_version: str) -> int | None:
        row = self.con.execute(
            "SELECT len(embedding) FROM embeddings "
            "WHERE id = (SELECT min(id) FROM predictions WHERE model_version = ?)",
            [model_version],
        ).fetchall()
        return int(row[0][0]) if row else None

    @_locked
    def check_index(self, model_version: str, *, verify: bool = False) -> IndexCheck:
        """Compare a version's FAISS index with DuckDB; catch it up, repair or rebuild it.

        A saved index whose sidecar agrees with DuckDB counts as in sync unless ``verify``: then
        it is loaded (kept in memory) and its file checked, and rebuilt if the check fails.
        """
        t0 = time.perf_counter()
        db = self._db_stats(model_version)
        path = self.index_path(model_version)
        loaded = self._indexes.get(model_version)
        if loaded is None and not verify and VectorIndex.saved_stats(path) == db:
            return IndexCheck(model_version, db[0], "in_sync", seconds=time.perf_counter() - t0)
        index, damage = loaded, None
        if index is None:
            try:
                index = VectorIndex.open(path)
            except IndexFileError as e:
                damage = str(e)
        dim = self._embedding_dim(model_version)
        if index is not None and index.stats() == db:
            self._indexes[model_version] = index
            if loaded is None and not (index.verified and VectorIndex.saved_stats(path) == db):
                if not self.read_only:
                    index.save()  # refresh a missing, stale or older (checksum-less) sidecar
            return IndexCheck(model_version, db[0], "in_sync", seconds=time.perf_counter() - t0)
        if index is None or (dim is not None and index.dim != dim):
            check = self.rebuild_index(model_version)
            check.seconds = time.perf_counter() - t0
            if damage:
                check.details["damaged"] = damage
                log.warning(
                    "%s; not used: rebuilt from the %d rows of %s in the store",
                    damage,
                    check.rows,
                    model_version,
                )
            return check
        have = index.ids()
        want = self._ids(model_version)
        extra = np.setdiff1d(have, want, assume_unique=True)
        missing = np.setdiff1d(want, have, assume_unique=True)
        index.remove(extra)
        self._add_from_db(index, model_version, missing)
        if not self.read_only:
            index.save()
        self._indexes[model_version] = index
        action = "repaired" if len(extra) else "caught_up"
        log.info("index %s %s: +%d -%d", model_version, action, len(missing), len(extra))
        return IndexCheck(
            model_version, db[0], action, len(missing), len(extra), time.perf_counter() - t0
        )

    @_locked
    def rebuild_index(self, model_version: str) -> IndexCheck:
        """Build a version's FAISS index afresh from the embeddings in DuckDB, and save it."""
        t0 = time.perf_counter()
        dim = self._embedding_dim(model_version)
        ids, vectors = self._read_embeddings(model_version, dim or 1)
        index = VectorIndex.build(self.index_path(model_version), dim or 1, ids, vectors)
        del vectors
        if not self.read_only:
            index.save()
        self._indexes[model_version] = index
        return IndexCheck(
            model_version,
            index.ntotal,
            "rebuilt",
            index.ntotal,
            0,
            time.perf_counter() - t0,
            {"kind": index.kind, **index.info},
        )

    def _read_embeddings(self, model_version: str, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """All of a version's (ids, embeddings) from DuckDB, read in chunks into one array."""
        import pyarrow as pa

        n = self._db_stats(model_version)[0]
        ids = np.zeros(n, np.int64)
        vectors = np.zeros((n, dim), np.float32)
        query = (
            f"SELECT e.id, e.embedding FROM {self._embeddings_of(dim)} e "
            "JOIN predictions p USING (id) WHERE p.model_version = ?"
        )
        i = 0
        for batch in self.con.sql(query, params=[model_version]).to_arrow_reader(READ_CHUNK):
            got_ids, got = embedding_matrix(pa.Table.from_batches([batch]), dim)
            ids[i : i + len(got_ids)], vectors[i : i + len(got_ids)] = got_ids, got
            i += len(got_ids)
        return ids[:i], vectors[:i]

    def _ids(self, model_version: str) -> np.ndarray:
        ids = self.con.execute(
            "SELECT id FROM predictions WHERE model_version = ? ORDER BY id", [model_version]
        ).fetchnumpy()["id"]
        return np.asarray(ids, dtype=np.int64)

    def _add_from_db(self, index: VectorIndex, model_version: str, ids: np.ndarray) -> None:
        """Add the stored embeddings of ``ids`` to ``index``, read in chunks."""
        import pyarrow as pa

        if len(ids) == 0:
            return
        self.con.register("_want_ids", pa.table({"id": pa.array(ids, pa.int64())}))
        try:
            query = (
                f"SELECT e.id, e.embedding FROM {self._embeddings_of(index.dim)} e "
                "JOIN _want_ids USING (id) ORDER BY e.id"
            )
            for batch in self.con.sql(query).to_arrow_reader(READ_CHUNK):
                got_ids, vectors = embedding_matrix(pa.Table.from_batches([batch]), index.dim)
                index.add(got_ids, vectors)
        finally:
            self.con.unregister("_want_ids")

    @_locked
    def index(self, model_version: str, dim: int | None = None) -> VectorIndex:
        """The version's FAISS index, loaded on first use; empty when new.

        The first use checks the saved file against its checksum and DuckDB, and searches a
        rebuilt index if it fails (``checks`` then says so).
        """
        path = self.index_path(model_version)
        if model_version not in self._indexes:
            if self._db_stats(model_version)[0] or path.is_file():
                check = self.check_index(model_version, verify=True)
                if check.action != "in_sync":  # replaces what opening reported
                    at = next(
                        (i for i, c in enumerate(self.checks) if c.model_version == model_version),
                        len(self.checks),
                    )
                    self.checks[at : at + 1] = [check]
            if model_version not in self._indexes:  # new
                if dim is None:
                    raise ValueError(f"no stored embeddings for {model_version} yet")
                self._indexes[model_version] = VectorIndex(path, dim)
        index = self._indexes[model_version]
        if dim is not None and index.dim != dim and index.ntotal == 0:
            index = self._indexes[model_version] = VectorIndex(path, dim)  # rebuilt without rows
        return index

    def upgrade_index(self, model_version: str) -> bool:
        """Turn a loaded flat index that outgrew FLAT_MAX into HNSW while the store stays in use.

        A server's flat index would otherwise grow until it stops, each search dearer than the
        last (8 queries: 7 ms at 6,000 vectors, 89 ms at 50,000; HNSW ~1.5 ms, measured in
        bench/bench_serve_index.py). The graph is built from a
        snapshot without the lock (seconds), so commits and searches go on meanwhile; vectors
        committed during the build are added before the swap. False when there was nothing to
        do, or vectors were removed meanwhile (a later call starts again).
        """
        with self.lock:
            index = self._indexes.get(model_version)
            if index is None or not index.outgrown:
                return False
            ids, vectors = index.vectors()
        # One thread: a server keeps its other cores for the requests meanwhile.
        hnsw = VectorIndex.build(index.path, index.dim, ids, vectors, threads=1)
        del vectors
        with self.lock:
            if self._indexes.get(model_version) is not index:
                return False
            if not np.array_equal(index.ids()[: len(ids)], ids):
                return False
            hnsw.add(*index.vectors(len(ids)))
            self._indexes[model_version] = hnsw
        log.info("index %s: %d vectors, now HNSW", model_version, hnsw.ntotal)
        return True

    def index_outgrown(self, model_version: str) -> bool:
        """True when the loaded index of this version is flat and past FLAT_MAX (lock-free)."""
        index = self._indexes.get(model_version)
        return index is not None and index.outgrown

    def retune_index(self, model_version: str) -> bool:
        """Re-tune a loaded HNSW index's efSearch once it has doubled, while the store stays in use.

        Saving does this too, but a server saves when it stops: a store that grows tenfold
        meanwhile would search all day with the efSearch of its first tenth. The lock is held
        only to read a chunk of vectors or run one recall search (ms each). False when there was
        nothing to do.
        """
        with self.lock:
            index = self._indexes.get(model_version)
            if index is None or not index.retune_due:
                return False
        index.tune(guard=self.lock)
        return True

    def index_retune_due(self, model_version: str) -> bool:
        """True when the loaded HNSW index of this version has doubled since tuned (lock-free)."""
        index = self._indexes.get(model_version)
        return index is not None and index.retune_due

    @_locked
    def save_indexes(self) -> None:
        """Save every index changed since it was loaded."""
        if self.read_only:
            return
        for index in self._indexes.values():
            if index.dirty:
                index.save()
