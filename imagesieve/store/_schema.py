"""The store's schema: tables, ready-made views and the ordered migrations that reach them.

Every store records the migrations it has run in ``schema_version`` (one row each). Opening a
store for writing runs the ones it lacks, in order, so a workspace written by any earlier
release opens and is brought up to date; a store written by a newer release is refused.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from typing import Any

from imagesieve._errors import SieveError
from imagesieve.classifier import STORED_MEASURES, UNKNOWN

__all__ = [
    "EMBEDDINGS_TABLE",
    "MIGRATIONS",
    "PREDICTION_COLUMNS",
    "SCHEMA_VERSION",
    "VIEWS",
    "add_embedding_table",
    "check_version",
    "embedding_dims",
    "has_shared_features",
    "migrate",
    "shared_sql",
    "views_sql",
]

log = logging.getLogger(__name__)

#: Embeddings live in one table per dimension, a fixed-size ``FLOAT[d]`` column: inserting and
#: committing 8 rows of 1280 costs ~4 ms of CPU there against 9-12 ms in a ``FLOAT[]`` list
#: column, which matters to a server committing small groups. The view ``embeddings`` (id,
#: FLOAT[]) unites the tables for queries, whatever the model versions' sizes.
EMBEDDINGS_TABLE = "embeddings_{dim}"
#: Rows moved per transaction when an older store's list embeddings move to those tables.
MIGRATE_CHUNK = 50_000

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
    neighbor_distance FLOAT,            -- distance to the training data (_far_distance)
    cluster_id INTEGER,                 -- clusters.cluster_id; -1 noise; NULL not clustered
    cluster_outlier FLOAT               -- GLOSH outlier score in its clustering run (0..1)
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
    "quality_flags",
    *STORED_MEASURES,
    "neighbor_cosine",
]


# -- ready-made views --------------------------------------------------------------------

_VIEWS: list[tuple[str, str, str]] = [
    (
        "predictions_per_day",
        "predictions per UTC day of their latest scoring, model version and label",
        """
SELECT CAST(timezone('UTC', scored_at) AS DATE) AS day, model_version, label, count(*) AS n
FROM predictions
GROUP BY ALL
ORDER BY day, model_version, label""",
    ),
    (
        "unknown_rate_per_batch",
        "per batch: items, scored (new + rescored + already stored), failed, UNKNOWN and its "
        "rate; batches that never finished count their stored rows",
        # A finished batch's counters are what it saw, even after later batches rescored its
        # rows; a batch that never finished has no counters, so its rows still carrying its
        # batch_id (a lower bound) and its failures stand in.
        f"""
WITH stored AS (
    SELECT batch_id, count(*) AS n, count(*) FILTER (WHERE label = '{UNKNOWN}') AS n_unknown
    FROM predictions GROUP BY batch_id
), failed AS (
    SELECT batch_id, count(DISTINCT source) AS n FROM failures WHERE kind <> 'ignored'
    GROUP BY batch_id
), counted AS (
    SELECT b.batch_id, b.started_at, b.model_version, b.status,
        CASE WHEN b.finished_at IS NULL THEN coalesce(s.n, 0) + coalesce(f.n, 0)
            ELSE b.n_items END AS items,
        CASE WHEN b.finished_at IS NULL THEN coalesce(s.n, 0)
            ELSE b.n_scored + b.n_skipped END AS scored,
        CASE WHEN b.finished_at IS NULL THEN coalesce(f.n, 0) ELSE b.n_failed END AS failed,
        CASE WHEN b.finished_at IS NULL THEN coalesce(s.n_unknown, 0)
            ELSE b.n_unknown END AS unknown
    FROM batches b LEFT JOIN stored s USING (batch_id) LEFT JOIN failed f USING (batch_id)
)
SELECT batch_id, started_at, model_version, status, items, scored, failed, unknown,
    unknown / nullif(scored, 0) AS unknown_rate
FROM counted
ORDER BY batch_id""",
    ),
    (
        "class_confusion",
        "pairs of Top-1 and Top-2 classes per model version: count, mean probabilities and "
        "margin, share marked UNKNOWN",
        f"""
SELECT model_version, top1_class, top2_class, count(*) AS n,
    avg(top1_prob) AS mean_top1_prob, avg(top2_prob) AS mean_top2_prob,
    avg(top1_prob - top2_prob) AS mean_margin,
    count(*) FILTER (WHERE label = '{UNKNOWN}') / count(*) AS unknown_share
FROM predictions
WHERE top2_class IS NOT NULL
GROUP BY ALL
ORDER BY n DESC, model_version, top1_class, top2_class""",
    ),
    (
        "unknowns",
        "UNKNOWN predictions with reason, Top-3, distance to the training data, nearest "
        "training image and its cosine distance, cluster",
        f"""
SELECT p.id, p.source, p.model_version, p.scored_at, p.batch_id, p.reason,
    p.top1_class, p.top1_prob, p.top2_class, p.top2_prob, p.top3_class, p.top3_prob,
    p.neighbor_distance, p.neighbor_id, r.label AS neighbor_label,
    r.source AS neighbor_source, p.neighbor_cosine, p.cluster_id
FROM predictions p
LEFT JOIN reference_images r ON r.model_version = p.model_version AND r.id = p.neighbor_id
WHERE p.label = '{UNKNOWN}'
ORDER BY p.id""",
    ),
    (
        "failures_open",
        "inputs whose latest attempt failed and that were not processed since (one row each)",
        """
SELECT source, kind, message, failed_at, batch_id, model_version
FROM failures
WHERE NOT resolved AND kind <> 'ignored'
QUALIFY row_number() OVER (PARTITION BY source ORDER BY failed_at DESC, batch_id DESC) = 1
ORDER BY failed_at, source""",
    ),
]

#: Drift: a group of images (a batch, a day) departed from the version's training data when
#: the two-sample Kolmogorov-Smirnov test of their distances to the nearest training image
#: against the held-out known images' (``drift_reference``) gives p below DRIFT_P and the
#: statistic D (the largest gap between the two distributions) is at least DRIFT_D: a large
#: batch's p is tiny for any shift, so D keeps a shift too small to matter from counting.
DRIFT_P, DRIFT_D = 0.001, 0.2


def _drift_view(key: str, observed: str) -> str:
    """A drift view's SQL: per ``key`` group, its counts, rates and KS test against the reference.

    ``observed`` gives rows (key, model_version, unknown, poor, d: the distance). p is the
    asymptotic two-sided Kolmogorov distribution with Stephens' small-sample term, as
    ``scipy.stats.kstwobign`` with the effective size n m / (n + m).
    """
    return f"""
WITH obs AS ({observed}),
ref AS (SELECT model_version, CAST(distance AS DOUBLE) AS d FROM drift_reference),
rn AS (SELECT model_version, count(*) AS n_ref, median(d) AS ref_median FROM ref GROUP BY ALL),
g AS (
    SELECT {key}, model_version, count(*) AS n,
        count(*) FILTER (WHERE unknown) AS unknown, count(*) FILTER (WHERE poor) AS poor,
        count(d) AS n_d, median(d) AS median_distance
    FROM obs GROUP BY ALL
),
pts AS (
    SELECT {key}, model_version, d, 1 AS o FROM obs WHERE d IS NOT NULL
    UNION ALL
    SELECT g.{key}, g.model_version, ref.d, 0 FROM g JOIN ref USING (model_version)
    WHERE g.n_d > 0
),
cdf AS (
    SELECT {key}, model_version, d,
        sum(o) OVER w AS below_obs, sum(1 - o) OVER w AS below_ref
    FROM pts
    WINDOW w AS (PARTITION BY {key}, model_version ORDER BY d RANGE UNBOUNDED PRECEDING)
),
ks AS (
    SELECT c.{key}, c.model_version,
        max(abs(c.below_obs / g.n_d - c.below_ref / rn.n_ref)) AS ks_d,
        any_value(g.n_d * rn.n_ref / (g.n_d + rn.n_ref)) AS ne
    FROM cdf c JOIN g USING ({key}, model_version) JOIN rn USING (model_version)
    GROUP BY ALL
),
tested AS (
    SELECT ks.*, least(1.0, greatest(0.0, 2 * sum(
        (CASE WHEN k % 2 = 1 THEN 1 ELSE -1 END)
        * exp(-2 * k * k * power((sqrt(ne) + 0.12 + 0.11 / sqrt(ne)) * ks_d, 2))
    ))) AS p_value
    FROM ks, range(1, 101) AS t(k) GROUP BY ALL
)
SELECT g.{key}, g.model_version, g.n AS images, g.unknown, g.unknown / g.n AS unknown_rate,
    g.poor / g.n AS poor_quality_rate, g.median_distance, rn.ref_median AS reference_median,
    t.ks_d, CASE WHEN t.ks_d = 0 THEN 1.0 ELSE t.p_value END AS p_value,
    coalesce(t.ks_d >= {DRIFT_D} AND t.p_value < {DRIFT_P}, false) AS drifted
FROM g LEFT JOIN rn USING (model_version) LEFT JOIN tested t USING ({key}, model_version)
ORDER BY g.{key}, g.model_version"""


_VIEWS += [
    (
        "drift_per_batch",
        "per batch and model version: images, UNKNOWN rate, poor-quality rate, median distance "
        "to the training data against the held-out known images', and the KS test of the "
        "distances (ks_d, p_value, drifted)",
        _drift_view(
            "batch_id",
            f"""
    SELECT bi.batch_id, b.model_version, p.label = '{UNKNOWN}' AS unknown,
        p.quality_flags IS NOT NULL AS poor,
        CASE WHEN NOT isnan(p.neighbor_distance) THEN CAST(p.neighbor_distance AS DOUBLE) END AS d
    FROM batch_items bi JOIN batches b USING (batch_id)
    JOIN predictions p ON p.model_version = b.model_version AND p.sha256 = bi.sha256
    WHERE bi.outcome IN ('scored', 'rescored', 'already_scored')
    UNION ALL  -- a batch that keeps no items (a server's live predictions): its stored rows
    SELECT p.batch_id, p.model_version, p.label = '{UNKNOWN}', p.quality_flags IS NOT NULL,
        CASE WHEN NOT isnan(p.neighbor_distance) THEN CAST(p.neighbor_distance AS DOUBLE) END
    FROM predictions p
    WHERE p.batch_id NOT IN (SELECT DISTINCT batch_id FROM batch_items)""",
        ),
    ),
    (
        "drift_per_day",
        "per UTC day of scoring and model version: as drift_per_batch",
        _drift_view(
            "day",
            f"""
    SELECT CAST(timezone('UTC', scored_at) AS DATE) AS day, model_version,
        label = '{UNKNOWN}' AS unknown, quality_flags IS NOT NULL AS poor,
        CASE WHEN NOT isnan(neighbor_distance) THEN CAST(neighbor_distance AS DOUBLE) END AS d
    FROM predictions""",
        ),
    ),
]
_VIEWS += [
    (
        "near_duplicates",
        "images with near-duplicates among the stored ones, per model version: the group (its "
        "smallest id), its size, and the row a person kept in its place (duplicate_of)",
        """
SELECT duplicate_group, count(*) OVER (PARTITION BY model_version, duplicate_group) AS group_size,
    id, source, sha256, model_version, label, reason, scored_at, duplicate_of
FROM predictions
WHERE duplicate_group IS NOT NULL
ORDER BY model_version, duplicate_group, id""",
    ),
    (
        "exact_duplicates",
        "contents that arrived under more than one name (same SHA-256): stored once, each "
        "name listed with the batches it came in",
        """
SELECT sha256, count(DISTINCT source) AS names, list(DISTINCT source ORDER BY source) AS sources,
    list(DISTINCT batch_id ORDER BY batch_id) AS batches
FROM batch_items
WHERE sha256 IS NOT NULL AND outcome IN ('scored', 'rescored', 'already_scored')
GROUP BY sha256
HAVING count(DISTINCT source) > 1
ORDER BY names DESC, sha256""",
    ),
]
#: Ready-made views: name -> one-line description.
VIEWS: dict[str, str] = {name: description for name, description, _ in _VIEWS}


def views_sql(temporary: bool = False) -> list[str]:
    """The statements creating (or updating) the ready-made views, one per view."""
    kind = "TEMP VIEW" if temporary else "VIEW"
    return [f"CREATE OR REPLACE {kind} {name} AS{body}" for name, _, body in _VIEWS]


# -- embedding tables -----------------------------------------------------------------------


def embedding_dims(con: Any) -> set[int]:
    """The dimensions that have an ``embeddings_<d>`` table."""
    names = con.execute(
        "SELECT table_name FROM duckdb_tables() WHERE table_name LIKE 'embeddings\\_%' ESCAPE '\\'"
    ).fetchall()
    return {int(n[11:]) for (n,) in names if n[11:].isdigit()}


def add_embedding_table(con: Any, dim: int) -> None:
    """Create ``embeddings_<dim>`` and widen the ``embeddings`` view over it."""
    con.execute(
        f"CREATE TABLE IF NOT EXISTS {EMBEDDINGS_TABLE.format(dim=dim)} "
        f"(id BIGINT PRIMARY KEY, embedding FLOAT[{int(dim)}] NOT NULL)"
    )
    _create_embeddings_view(con)


def has_shared_features(con: Any) -> bool:
    """Whether the store has ``shared_features`` (a read-only store of an older release lacks it)."""
    return bool(
        con.execute(
            "SELECT count(*) FROM duckdb_tables() WHERE table_name = 'shared_features'"
        ).fetchall()[0][0]
    )


def shared_sql(table: str, columns: str, shared: bool = True) -> str:
    """A subquery of ``table``'s rows (``id`` and ``columns``) plus those of the rows sharing them.

    A row of ``shared_features`` has the embedding and head input of row ``of_id`` (the same
    content, embedded by the same untouched backbone for another version), stored once.
    """
    if not shared:
        return table
    picked = ", ".join(f"t.{c.strip()}" for c in columns.split(","))
    return (
        f"(SELECT id, {columns} FROM {table} UNION ALL SELECT s.id, {picked} "
        f"FROM shared_features s JOIN {table} t ON t.id = s.of_id)"
    )


def _create_embeddings_view(con: Any) -> None:
    """``embeddings`` (id, FLOAT[]): every dimension's table as one, for SQL and clustering.

    Rows sharing another row's features (``shared_features``) are in it under their own id.
    """
    shared = has_shared_features(con)
    parts = [
        "SELECT id, embedding::FLOAT[] AS embedding FROM "
        + shared_sql(EMBEDDINGS_TABLE.format(dim=d), "embedding", shared)
        for d in sorted(embedding_dims(con))
    ] or ["SELECT NULL::BIGINT AS id, NULL::FLOAT[] AS embedding WHERE false"]
    con.execute(f"CREATE OR REPLACE VIEW embeddings AS {' UNION ALL '.join(parts)}")


# -- migrations -----------------------------------------------------------------------------


def _tables(con: Any) -> None:
    """Every table (a store of any earlier release has some of them already)."""
    con.execute(SCHEMA)


def _embeddings_per_size(con: Any) -> None:
    """A store written before the per-size tables: move its ``FLOAT[]`` rows into them.

    In id windows of MIGRATE_CHUNK rows, each its own transaction (memory stays bounded); an
    interrupted move resumes where it stopped, and the old table goes only once all is moved.
    """
    kind = con.execute(
        "SELECT table_type FROM information_schema.tables WHERE table_name = 'embeddings'"
    ).fetchall()
    if not kind or kind[0][0] != "BASE TABLE":
        return
    n, lo, hi = con.execute(
        "SELECT count(*), coalesce(min(id), 0), coalesce(max(id), 0) FROM embeddings"
    ).fetchall()[0]
    dims = [
        int(d)
        for (d,) in con.execute(
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
        con.execute(
            f"CREATE TABLE IF NOT EXISTS {table} (id BIGINT PRIMARY KEY, embedding FLOAT[{d}] NOT NULL)"
        )
        done = con.execute(f"SELECT coalesce(max(id), ?) FROM {table}", [lo - 1])
        for a in range(int(done.fetchall()[0][0]), int(hi), MIGRATE_CHUNK):
            con.execute(
                f"INSERT INTO {table} SELECT id, embedding::FLOAT[{d}] FROM embeddings "
                "WHERE id > ? AND id <= ? AND len(embedding) = ? ORDER BY id",
                [a, a + MIGRATE_CHUNK, d],
            )
    con.execute("DROP TABLE embeddings")


def _cluster_outlier(con: Any) -> None:
    """Each clustered image's outlier score, so review can show the least typical first."""
    con.execute("ALTER TABLE predictions ADD COLUMN IF NOT EXISTS cluster_outlier FLOAT")


def _head_inputs(con: Any) -> None:
    """The rest of each row's head input beside its embedding (``Prediction.max_pooled``).

    So a head-only retrain re-decides stored images without decoding them; float16 bytes.
    The rows it stores for the new version share the old rows' features (``shared_features``)
    instead of copying ~7.5 KB each.
    """
    con.execute(
        "CREATE TABLE IF NOT EXISTS head_inputs "
        "(id BIGINT PRIMARY KEY, avg_norm FLOAT NOT NULL, max_pooled BLOB NOT NULL)"
    )
    con.execute(
        "CREATE TABLE IF NOT EXISTS shared_features (id BIGINT PRIMARY KEY, of_id BIGINT NOT NULL)"
    )


def _review_record(con: Any) -> None:
    """The review record: actions and what undo restores, the files they moved, people's labels."""
    con.execute(
        """
CREATE TABLE IF NOT EXISTS audit (
    action_id INTEGER PRIMARY KEY,
    done_at TIMESTAMPTZ NOT NULL,
    who VARCHAR NOT NULL,               -- the app's user, the API token's name, cli:<user>
    action VARCHAR NOT NULL,            -- relabel, name, reject, exclude, promote, thresholds,
                                        -- activate, undo
    model_version VARCHAR,
    target VARCHAR,                     -- what it acted on: a cluster id, a class, a version
    images INTEGER NOT NULL,            -- how many images it touched
    summary VARCHAR NOT NULL,           -- one line in the user's words
    before VARCHAR,                     -- JSON: what undo puts back
    after VARCHAR,                      -- JSON: what it set
    touches VARCHAR[],                  -- keys of what it changed (undo refuses if a later
                                        -- action changed the same)
    undone_by INTEGER                   -- the undo's action_id
);
CREATE TABLE IF NOT EXISTS audit_files (
    action_id INTEGER NOT NULL,
    path VARCHAR NOT NULL,              -- a file in the training data
    change VARCHAR NOT NULL,            -- added, removed
    sha256 VARCHAR NOT NULL,
    trash VARCHAR                       -- where a removed file waits for an undo
);
CREATE TABLE IF NOT EXISTS labels (
    sha256 VARCHAR PRIMARY KEY,         -- the image content a person labelled
    label VARCHAR NOT NULL,
    id BIGINT NOT NULL,                 -- predictions.id it was labelled from
    action_id INTEGER NOT NULL,         -- audit.action_id that set it
    file VARCHAR,                       -- its copy in the training data
    labelled_at TIMESTAMPTZ NOT NULL
);
"""
    )


def _batch_items(con: Any) -> None:
    """Each batch's inputs in input order with what became of each: the batch report's rows."""
    con.execute(
        """
CREATE TABLE IF NOT EXISTS batch_items (
    batch_id INTEGER NOT NULL,
    seq INTEGER NOT NULL,               -- the item's place in the batch's inputs: 0, 1, 2, ...
    source VARCHAR NOT NULL,            -- as in predictions and failures
    outcome VARCHAR NOT NULL,           -- scored, rescored, already_scored, failed, ignored
    sha256 VARCHAR,                     -- its content: joins predictions (NULL when it failed)
    error VARCHAR,                      -- why it failed, one line (the failures row's message)
    input_row VARCHAR                   -- JSON: its row of a CSV/XLSX list, header -> cell
)
"""
    )


def _drift_reference(con: Any) -> None:
    """Each version's held-out known images' distances to the training data, for drift tests."""
    con.execute(
        "CREATE TABLE IF NOT EXISTS drift_reference (model_version VARCHAR NOT NULL, "
        "distance FLOAT NOT NULL)"
    )


def _photo_quality(con: Any) -> None:
    """Each image's photo quality: the flags its version's rule gave, and the measures behind them.

    Rows stored before have NULL: not measured, never flagged.
    """
    con.execute("ALTER TABLE predictions ADD COLUMN IF NOT EXISTS quality_flags VARCHAR")
    for name in ("blur", "brightness", "saturated", "clipped", "entropy"):
        con.execute(f"ALTER TABLE predictions ADD COLUMN IF NOT EXISTS {name} FLOAT")


def _edges_and_highlights(con: Any) -> None:
    """Photo quality's edge blur and highlights (``QualityMetrics``); NULL for rows before."""
    for name in ("edge_blur", "highlights"):
        con.execute(f"ALTER TABLE predictions ADD COLUMN IF NOT EXISTS {name} FLOAT")


def _far_distance(con: Any) -> None:
    """Versions whose distance to the training data is not the cosine to the nearest image.

    ``neighbor_distance`` is the distance the far-from-training rule reads (a version's
    Mahalanobis distance, ``classifier._far``, where it has one); ``neighbor_cosine`` the cosine
    distance to ``neighbor_id`` (filled for older rows by ``_older_cosine``). ``head_inputs``
    keeps the features that distance reads (float32), for head-only retrains.
    """
    con.execute("ALTER TABLE predictions ADD COLUMN IF NOT EXISTS neighbor_cosine FLOAT")
    con.execute("ALTER TABLE head_inputs ADD COLUMN IF NOT EXISTS ood_features BLOB")


def _older_cosine(con: Any) -> None:
    """Rows stored before the far distance get their ``neighbor_cosine``: it was their distance.

    So every row with a nearest training image has its cosine distance, and readers need no
    fallback.
    """
    con.execute(
        "UPDATE predictions SET neighbor_cosine = neighbor_distance "
        "WHERE neighbor_cosine IS NULL AND neighbor_distance IS NOT NULL"
    )


def _near_duplicates(con: Any) -> None:
    """Near-duplicates among stored images: pixel signatures, groups, and the rows set aside.

    ``signatures`` holds each row's ``image_signature`` (192 bytes; rows copied by a head-only
    retrain share their owner's, as embeddings do). ``duplicate_group`` is the smallest id of a
    row's group of near-duplicates (NULL: none found); ``duplicate_of`` the row a person kept
    in its place (the row is set aside: not clustered, not promoted). ``duplicate_checks``
    says up to which id each version's rows were linked.
    """
    con.execute(
        "CREATE TABLE IF NOT EXISTS signatures (id BIGINT PRIMARY KEY, signature BLOB NOT NULL)"
    )
    con.execute("ALTER TABLE predictions ADD COLUMN IF NOT EXISTS duplicate_group BIGINT")
    con.execute("ALTER TABLE predictions ADD COLUMN IF NOT EXISTS duplicate_of BIGINT")
    con.execute(
        "CREATE TABLE IF NOT EXISTS duplicate_checks (model_version VARCHAR PRIMARY KEY, "
        "checked_upto BIGINT NOT NULL)"
    )


def _duplicate_pairs(con: Any) -> None:
    """The candidates each near-duplicate search found within its rule's reach, kept.

    ``duplicate_pairs`` holds (a, b, cosine distance) for a row ``a`` checked and a stored row
    ``b`` near it, before the signatures judged the pair; ``duplicate_checks.pairs_from`` the
    largest id a version had checked before they were kept (its later rows have them).
    """
    con.execute(
        "CREATE TABLE IF NOT EXISTS duplicate_pairs "
        "(a BIGINT NOT NULL, b BIGINT NOT NULL, distance FLOAT NOT NULL)"
    )
    con.execute("ALTER TABLE duplicate_checks ADD COLUMN IF NOT EXISTS pairs_from BIGINT")
    con.execute("UPDATE duplicate_checks SET pairs_from = checked_upto WHERE pairs_from IS NULL")


#: The schema's history, oldest first: (name, step). Append only; a step must be safe to run
#: on a store that already has its change (stores older than ``schema_version`` record none).
MIGRATIONS: list[tuple[str, Callable[[Any], None]]] = [
    ("tables", _tables),
    ("embeddings in one table per size", _embeddings_per_size),
    ("cluster outlier scores", _cluster_outlier),
    ("head inputs", _head_inputs),
    ("review record", _review_record),
    ("batch items", _batch_items),
    ("photo quality", _photo_quality),
    ("drift reference", _drift_reference),
    ("near duplicates", _near_duplicates),
    ("edge blur and highlights", _edges_and_highlights),
    ("far distance", _far_distance),
    ("cosine of older rows", _older_cosine),
    ("near-duplicate candidates", _duplicate_pairs),
]
SCHEMA_VERSION = len(MIGRATIONS)


def schema_version(con: Any) -> int:
    """The migrations a store has run (0: none recorded, an older store or a new file)."""
    found = con.execute(
        "SELECT count(*) FROM duckdb_tables() WHERE table_name = 'schema_version'"
    ).fetchall()[0][0]
    if not found:
        return 0
    return int(con.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchall()[0][0])


def check_version(con: Any) -> int:
    """The store's schema version; SieveError for one written by a newer release."""
    have = schema_version(con)
    if have > SCHEMA_VERSION:
        raise SieveError(
            f"this store has schema version {have}, newer than this imagesieve knows "
            f"({SCHEMA_VERSION}): upgrade imagesieve to open it"
        )
    return have


def migrate(con: Any) -> list[str]:
    """Run the migrations the store lacks, in order, then (re)create the views; returns their names.

    Raises RuntimeError for a store written by a newer release (its schema is not known here).
    """
    have = check_version(con)
    con.execute(
        "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, "
        "name VARCHAR NOT NULL, applied_at TIMESTAMPTZ NOT NULL)"
    )
    ran = []
    for version, (name, step) in enumerate(MIGRATIONS[have:], have + 1):
        step(con)
        con.execute(
            "INSERT INTO schema_version VALUES (?, ?, ?)", [version, name, dt.datetime.now(dt.UTC)]
        )
        ran.append(name)
    _create_embeddings_view(con)
    for statement in views_sql():
        con.execute(statement)
    return ran
