"""The workspace's store, the only code that writes to its database.

DuckDB holds every scored image (the source of truth): predictions, batches and failures,
clusters and their review, the training images of each version; the journal holds a server's
rows until they are folded in; FAISS holds each version's embeddings (``IndexSet``); kept
images are files by content. User SQL runs read-only through ``run_sql``.
"""

from imagesieve.store._audit import AuditEntry, AuditFile, HumanLabel
from imagesieve.store._browse import (
    DUPLICATE_STATES,
    MAX_PAGE,
    ROW_FIELDS,
    SORTS,
    ImageQuery,
    browse,
)
from imagesieve.store._clusters import CLUSTER_FIELDS, PreviousCluster
from imagesieve.store._duplicates import DuplicateGroup
from imagesieve.store._images import (
    KEEP_POLICIES,
    ZIP_MEMBER,
    image_source,
    keep_image,
    kept_path,
    original_source,
)
from imagesieve.store._rows import (
    BatchItem,
    Failure,
    IndexCheck,
    PredictionRow,
    ResultRow,
    ShardIngest,
    StoredHeadInputs,
    write_shard,
)
from imagesieve.store._schema import MIGRATIONS, PREDICTION_COLUMNS, SCHEMA_VERSION, VIEWS
from imagesieve.store._sql import (
    SAFE_CONFIG,
    SqlError,
    SqlResult,
    open_readonly,
    run_sql,
    run_store_sql,
)
from imagesieve.store._store import (
    BATCH_ITEM_FIELDS,
    STORE_FILE,
    Store,
    StoreBusyError,
    using_store,
)
from imagesieve.store._vectors import VectorIndex

__all__ = [
    "ShardIngest",
    "write_shard",
    "BATCH_ITEM_FIELDS",
    "DUPLICATE_STATES",
    "AuditEntry",
    "AuditFile",
    "HumanLabel",
    "browse",
    "CLUSTER_FIELDS",
    "KEEP_POLICIES",
    "MAX_PAGE",
    "MIGRATIONS",
    "ROW_FIELDS",
    "PREDICTION_COLUMNS",
    "SAFE_CONFIG",
    "SCHEMA_VERSION",
    "SORTS",
    "STORE_FILE",
    "VIEWS",
    "ZIP_MEMBER",
    "BatchItem",
    "DuplicateGroup",
    "Failure",
    "ImageQuery",
    "IndexCheck",
    "PredictionRow",
    "PreviousCluster",
    "ResultRow",
    "StoredHeadInputs",
    "SqlError",
    "SqlResult",
    "Store",
    "StoreBusyError",
    "VectorIndex",
    "image_source",
    "keep_image",
    "kept_path",
    "open_readonly",
    "original_source",
    "run_sql",
    "run_store_sql",
    "using_store",
]
